"""`sled` command line: argument parsing only; each command's work lives in its own module.

Handlers are imported lazily so that `sled models list` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _models_list(args: argparse.Namespace) -> int:
    from models.registry import cmd_list

    return cmd_list(as_json=args.json)


def _models_fetch(args: argparse.Namespace) -> int:
    from models.registry import cmd_fetch

    return cmd_fetch(args.name, force=args.force, as_json=args.json)


def _generate(args: argparse.Namespace) -> int:
    from models.generate import cmd_generate

    return cmd_generate(args)


def _chat(args: argparse.Namespace) -> int:
    from agent.chat_client import cmd_chat

    return cmd_chat(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sled", description="Run a large language model across a group of small devices."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list and fetch model weights")
    msub = models.add_subparsers(dest="models_command", required=True)
    mlist = msub.add_parser("list", help="known models and whether they are cached")
    mlist.add_argument("--json", action="store_true", help="machine-readable output")
    mlist.set_defaults(func=_models_list)
    mfetch = msub.add_parser("fetch", help="install/locate, assemble and verify a model")
    mfetch.add_argument("name")
    mfetch.add_argument("--force", action="store_true", help="re-assemble even if cached")
    mfetch.add_argument("--json", action="store_true", help="print the result as JSON")
    mfetch.set_defaults(func=_models_fetch)

    gen = sub.add_parser("generate", help="generate text with one model in this process")
    gen.add_argument("--model", required=True, help="registry name or path to a .gguf file")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument(
        "--backend", choices=["auto", "torch", "onnx"], default="auto",
        help="execution backend (auto: the faster one measured on this machine)",
    )
    gen.add_argument(
        "--weights", default="auto",
        help="weight format: auto, fp32, bf16, int8, int4 (what the backend supports)",
    )
    gen.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    gen.set_defaults(func=_generate)

    chat = sub.add_parser("chat", help="chat with the cluster through any node's OpenAI API")
    chat.add_argument("--url", default="http://127.0.0.1:8080", help="the node's API address")
    chat.add_argument("--model", default=None, help="model name (default: the node's first)")
    chat.add_argument("--system", default=None, help="a system message to start with")
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--top-p", type=float, default=None)
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for a token")
    chat.add_argument(
        "-m", "--message", action="append", default=[],
        help="send this message instead of reading stdin (repeat for more turns)",
    )  # fmt: skip
    chat.set_defaults(func=_chat)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
