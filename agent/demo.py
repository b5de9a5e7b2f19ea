"""`sled demo`: a local cluster on the default model answering a chat prompt, then gone.

Fetches the model (progress bar), starts `-n` daemons on 127.0.0.1 with the harness (node-0 may
hold the model; the others get a memory budget too small for it, as a phone or a small board
would), asks the last node — one that does not hold the model — a chat question through its
OpenAI API, streams the answer, prints who served it and how fast, and stops the nodes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from agent.chat_client import ChatOptions, Conversation, api_base, stream_reply
from agent.harness import Harness, HarnessError, poll_statuses

DEFAULT_PROMPT = "Write a Python function that checks whether a string is a palindrome."
SMALL_DEVICE_BUDGET = "64M"  # too small for any real model: these nodes only relay


async def _ask(url: str, model: str, prompt: str, max_tokens: int, seed: int) -> dict[str, Any]:
    """Stream the reply to stdout; return the text and timings."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    conversation = Conversation().add("user", prompt)
    options = ChatOptions(model=model, max_tokens=max_tokens, seed=seed, temperature=0.0)
    pieces: list[str] = []
    start = time.perf_counter()
    first: float | None = None
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async for text in stream_reply(http, api_base(url), model, conversation, options):
            first = first if first is not None else time.perf_counter() - start
            pieces.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    return {"text": "".join(pieces), "ttft_s": first, "total_s": time.perf_counter() - start}


def cmd_demo(args: argparse.Namespace) -> int:
    from models.registry import RegistryError, fetch

    if args.n < 2:
        print("sled demo: -n must be at least 2 (one node holds the model)", file=sys.stderr)
        return 2
    try:
        fetch(args.model)  # downloads/assembles with a progress bar before any node starts
    except RegistryError as exc:
        print(f"sled demo: {exc}", file=sys.stderr)
        return 2
    state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="sled-demo-"))
    harness = Harness(state_dir / "harness.json")
    options = [{} if i == 0 else {"memory_budget": SMALL_DEVICE_BUDGET} for i in range(args.n)]
    common = {"threads": str(args.threads)} if args.threads else {}
    print(f"starting {args.n} nodes on 127.0.0.1 (logs in {state_dir}) ...", file=sys.stderr)
    try:
        state = harness.up(args.n, args.model, common, options, timeout=args.timeout)
    except HarnessError as exc:
        print(f"sled demo: {exc}", file=sys.stderr)
        return 1
    try:
        asking = state.nodes[-1]
        statuses = poll_statuses(state.nodes)
        holders = sorted(n for n, st in statuses.items() if args.model in st.get("loaded", []))
        print(
            f"asking {asking.name} ({asking.api}), which does not hold the model; "
            f"plan epoch {statuses.get(asking.name, {}).get('epoch')}",
            file=sys.stderr,
        )
        print(f"> {args.prompt}", file=sys.stderr)
        result = asyncio.run(_ask(asking.api, args.model, args.prompt, args.max_tokens, 0))
        summary = {
            "asked": asking.name,
            "holders": holders,
            "ttft_s": None if result["ttft_s"] is None else round(result["ttft_s"], 2),
            "total_s": round(result["total_s"], 2),
        }
        print(json.dumps(summary) if args.json else f"[{summary}]", file=sys.stderr)
        return 0
    except (aiohttp.ClientError, OSError, RuntimeError) as exc:
        print(f"sled demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            harness.down(timeout=30.0)
        else:
            print(f"nodes left running; stop them with: sled harness down --state "
                  f"{harness.state_path}", file=sys.stderr)  # fmt: skip
