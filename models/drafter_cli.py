"""`sled models train-drafter` arguments and command; torch is imported only when it runs, so
registering the parser keeps `sled models list` light (see agent/cli.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

HELDOUT_PROMPTS = Path(__file__).resolve().parent.parent / "bench" / "speculative_prompts.json"
DEFAULT_LAYERS = 4
DEFAULT_VOCAB = 16384
DEFAULT_MINUTES = 50.0
DEFAULT_MAX_NEW = 192
DEFAULT_SLOTS = 32


def add_train_drafter_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register `train-drafter` under `sled models`."""
    p = subparsers.add_parser(
        "train-drafter",
        help="distil a small drafter for a target model on the target's own generations",
    )
    p.add_argument("--target", required=True, help="registry name or .gguf path of the target")
    p.add_argument(
        "--out", default=None, help="drafter file (default: <cache>/drafters/NAME.drafter.gguf)"
    )
    p.add_argument(
        "--layers", type=int, default=DEFAULT_LAYERS, help="frozen target layers before the adapter"
    )
    p.add_argument(
        "--minutes", type=float, default=DEFAULT_MINUTES, help="time budget for the whole run"
    )
    p.add_argument(
        "--vocab", type=int, default=DEFAULT_VOCAB, help="rows of the reduced output head"
    )
    p.add_argument(
        "--slots", type=int, default=DEFAULT_SLOTS, help="sessions per target pass while generating"
    )
    p.add_argument(
        "--max-new", type=int, default=DEFAULT_MAX_NEW, help="tokens the target writes per prompt"
    )
    p.add_argument(
        "--gen-share",
        type=float,
        default=0.45,
        help="share of the time budget for the target to write training text (default 0.45)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--weights", default="bf16", help="weight format of target and drafter")
    p.add_argument("--heldout", default=str(HELDOUT_PROMPTS), help="held-out prompts JSON")
    p.add_argument(
        "--data", default=None, help="save the target's text here, or reuse it if present"
    )
    p.add_argument(
        "--kind",
        choices=("trained", "feature"),
        default="trained",
        help="trained: first target layers + adapter; feature: drafts from the target's "
        "features (one block; the verifier sends them)",
    )
    p.add_argument(
        "--samples-per-prompt",
        type=int,
        default=3,
        help="answers the target writes per training prompt (--kind feature)",
    )
    p.add_argument(
        "--more-text",
        action="store_true",
        help="with --data and --kind feature: add answers to the saved text, then train on all",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_train_drafter)
    return p


def cmd_train_drafter(args: argparse.Namespace) -> int:
    from models.drafter_prompts import training_prompts
    from models.drafter_training import TrainOptions, heldout_prompts, train_drafter
    from models.registry import RegistryError, resolve_model
    from models.trained_drafter import default_drafter_path
    from models.weight_formats import WEIGHT_FORMATS

    def fail(message: str) -> int:
        print(f"sled models train-drafter: {message}", file=sys.stderr)
        return 2

    if args.minutes <= 0:
        return fail(f"--minutes must be > 0, got {args.minutes}")
    if args.vocab < 2 or args.slots < 1 or args.max_new < 1 or args.threads < 1:
        return fail("--vocab must be >= 2 and --slots, --max-new, --threads >= 1")
    if args.weights not in WEIGHT_FORMATS:
        return fail(f"--weights must be one of {', '.join(WEIGHT_FORMATS)}, got {args.weights!r}")
    try:
        target_path = resolve_model(args.target)
    except (RegistryError, OSError) as exc:
        return fail(str(exc))
    name = Path(target_path).name.removesuffix(".gguf")
    if args.kind == "feature":
        from models.feature_drafter import default_feature_drafter_path

        out = Path(args.out) if args.out else default_feature_drafter_path(name)
    else:
        out = Path(args.out) if args.out else default_drafter_path(name)
    try:
        heldout = heldout_prompts(Path(args.heldout))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return fail(f"cannot read held-out prompts {args.heldout}: {exc}")
    import torch

    torch.set_num_threads(args.threads)
    if not 0.0 < args.gen_share < 1.0:
        return fail(f"--gen-share must be between 0 and 1, not {args.gen_share}")
    options = TrainOptions(
        layers=args.layers, vocab=args.vocab, minutes=args.minutes, max_new=args.max_new,
        slots=args.slots, weights=args.weights, gen_share=args.gen_share,
    )  # fmt: skip

    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    data = Path(args.data) if args.data else None
    report: Any
    try:
        if args.kind == "feature":
            from models.feature_training import train_feature_drafter

            report = train_feature_drafter(
                Path(target_path), out, options, training_prompts(heldout), heldout, name, say,
                data_path=data, samples_per_prompt=max(1, args.samples_per_prompt),
                more_text=args.more_text,
            )  # fmt: skip
        else:
            report = train_drafter(
                Path(target_path), out, options, training_prompts(heldout), heldout, name, say,
                data_path=data,
            )  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        return fail(str(exc))
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return 0
    print(f"drafter saved: {report.path}")
    print(
        f"{args.kind} drafter: agreement with the target on {report.heldout_positions} "
        "held-out positions: "
        f"{report.agreement:.1%} (untrained: {report.agreement_before:.1%})"
    )
    print(
        f"cost per one-token step: drafter {report.drafter_step_s * 1e3:.1f} ms, target "
        f"{report.target_step_s * 1e3:.1f} ms ({report.cost_ratio:.1%} of the target, "
        f"{report.threads} thread(s))"
    )
    print(
        f"data: {report.train_sequences} sequences, {report.train_tokens} target tokens "
        f"({report.gen_seconds:.0f} s); training: {report.steps} steps, {report.epochs} epochs, "
        f"{report.train_seconds:.0f} s; total {report.total_seconds / 60:.1f} min"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m models.drafter_training train-drafter ...` (what `sled models` runs)."""
    parser = argparse.ArgumentParser(prog="sled models")
    add_train_drafter_parser(parser.add_subparsers(dest="models_command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
