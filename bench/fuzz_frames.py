"""Fuzz campaign for the frame decoder: `python bench/fuzz_frames.py --count 100000`.

Feeds random, mutated-valid and hostile frame bodies to `transport.frames.decode_body` (and
some through the stream splitter) and counts inputs whose decoding raised anything other than
FrameError. Prints progress, the first crashes, and a final JSON line. Exit status 1 on crashes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # for tests.fuzz_frames

from tests.fuzz_frames import run_campaign  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000, help="inputs to try")
    parser.add_argument("--seed", type=int, default=0, help="seed of the mutation phase")
    args = parser.parse_args()
    result = run_campaign(args.count, args.seed, log=lambda line: print(line, flush=True))
    for crash in result.pop("first_crashes"):
        print(f"CRASH on input {crash['input'][:200]}...\n{crash['error']}")
    print(f"inputs: {result['count']}  crashes: {result['crashes']}  ({result['seconds']}s)")
    print(json.dumps(result))
    return 1 if result["crashes"] else 0


if __name__ == "__main__":
    sys.exit(main())
