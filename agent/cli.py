"""`sled` command line: argument parsing only; each command's work lives in its own module.

Handlers are imported lazily so that `sled models list` does not pay for importing torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transport.auth import ClusterKey


def _models_list(args: argparse.Namespace) -> int:
    from models.registry import cmd_list

    return cmd_list(as_json=args.json)


def _models_fetch(args: argparse.Namespace) -> int:
    from models.registry import cmd_fetch

    return cmd_fetch(args.name, force=args.force, as_json=args.json)


def _demo(args: argparse.Namespace) -> int:
    from agent.demo import DEFAULT_PROMPT, cmd_demo

    args.prompt = args.prompt or DEFAULT_PROMPT
    return cmd_demo(args)


def _generate(args: argparse.Namespace) -> int:
    from models.generate import cmd_generate

    return cmd_generate(args)


def _chat(args: argparse.Namespace) -> int:
    from agent.chat_client import cmd_chat

    return cmd_chat(args)


def _run(args: argparse.Namespace) -> int:
    # The configuration is checked before the daemon (and torch) is imported: errors are quick.
    from agent.config import ConfigError, flags_from_args, load_config, unknown_env_keys

    try:
        config = load_config(args.config, flags=flags_from_args(args))
    except ConfigError as exc:
        print(f"sled run: config error: {exc}", file=sys.stderr)
        return 2
    from transport.auth import check_listen_allowed
    from transport.errors import ConfigError as TransportConfigError

    try:
        check_listen_allowed(config.peer_host, _cluster_key(config.cluster_key))
    except TransportConfigError as exc:
        print(f"sled run: {exc}", file=sys.stderr)
        return 2
    for name in unknown_env_keys(os.environ):
        if not name.startswith("SLED_TEST_"):
            print(f"sled run: warning: ignoring {name}: no such setting", file=sys.stderr)
    from agent.node import serve

    return serve(config, args.ready_file)


def _cluster_key(secret: str | None) -> ClusterKey:
    from transport.auth import ClusterKey

    return ClusterKey.from_secret(secret)


def _harness(args: argparse.Namespace) -> int:
    from agent import harness

    handlers = {
        "up": harness.cmd_up,
        "add": harness.cmd_add,
        "status": harness.cmd_status,
        "down": harness.cmd_down,
    }
    return handlers[args.harness_command](args)


def _status(args: argparse.Namespace) -> int:
    from agent.status_cli import cmd_status

    return cmd_status(args.url, args.json)


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from agent.config import add_flags

    run = sub.add_parser(
        "run",
        help="run the daemon (config: TOML file < SLED_* environment < flags)",
        description="Run a sled node. The cluster key comes from SLED_CLUSTER_KEY, the config "
        "file or --cluster-key-file, never from a flag.",
    )
    add_flags(run)
    run.add_argument("--ready-file", type=Path, default=None, help=argparse.SUPPRESS)
    run.set_defaults(func=_run)


def _add_harness(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    harness = sub.add_parser("harness", help="N local daemons as separate processes")
    hsub = harness.add_subparsers(dest="harness_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state", default=None, help="state file (default: XDG state dir)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    up = hsub.add_parser("up", parents=[common], help="start N nodes and wait until they agree")
    up.add_argument("-n", type=int, default=3, help="number of nodes")
    up.add_argument("--model", default=None, help="model every node offers (default: config's)")
    up.add_argument("--memory-budget", default=None, help="per node, comma-separated (or one)")
    up.add_argument("--role", default=None, help="per node, comma-separated (or one)")
    up.add_argument("--weights", default=None)
    up.add_argument("--backend", default=None)
    up.add_argument("--threads", type=int, default=1, help="forward threads per node")
    up.add_argument("--replicas", type=int, default=None)
    up.add_argument("--max-len", type=int, default=None)
    up.add_argument("--max-sessions", type=int, default=None)
    up.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config for all nodes"
    )
    up.add_argument(
        "--node-set", action="append", default=[], metavar="I:KEY=VALUE", help="config of node I"
    )
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for agreement")
    up.add_argument(
        "--no-wait-model", action="store_true", help="do not wait for the model to be loaded"
    )
    up.set_defaults(func=_harness)
    add = hsub.add_parser("add", parents=[common], help="start one more node in the harness")
    add.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    add.add_argument("--timeout", type=float, default=120.0)
    add.set_defaults(func=_harness)
    status = hsub.add_parser("status", parents=[common], help="the harness nodes and their state")
    status.set_defaults(func=_harness)
    down = hsub.add_parser("down", parents=[common], help="stop the harness nodes")
    down.add_argument("--timeout", type=float, default=30.0, help="seconds before SIGKILL")
    down.set_defaults(func=_harness)


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
    from models.drafter_cli import add_train_drafter_parser

    add_train_drafter_parser(msub)

    demo = sub.add_parser(
        "demo", help="start a local cluster, answer a chat prompt through it, stop it"
    )
    demo.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    demo.add_argument("-n", type=int, default=3, help="number of nodes (node-0 holds the model)")
    demo.add_argument("--prompt", default=None, help="the chat prompt (default: a coding task)")
    demo.add_argument("--max-tokens", type=int, default=128)
    demo.add_argument(
        "--drafter",
        default=None,
        help="node-1's drafter (default: text:gemma3-270m for the Qwen target); none: no drafter",
    )
    demo.add_argument("--threads", type=int, default=0, help="forward threads (0: all cores)")
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the nodes")
    demo.add_argument("--state-dir", default=None, help="where logs and state go (default: temp)")
    demo.add_argument("--keep", action="store_true", help="leave the nodes running")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON")
    demo.set_defaults(func=_demo)

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
        "--backend",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="execution backend (auto: the faster one measured on this machine)",
    )
    gen.add_argument(
        "--weights",
        default="auto",
        help="weight format: auto, fp32, bf16, int8, int4 (what the backend supports)",
    )
    gen.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    gen.add_argument(
        "--draft",
        default="none",
        help="speculative decoding in this process with a drafter: none, ngram, model:NAME, "
        "text:NAME, trained[:PATH], feature[:PATH] (the single-process baseline of drafting "
        "across peers)",
    )
    gen.add_argument("--draft-k", type=int, default=0, help="draft tokens per step (0: adaptive)")
    gen.add_argument("--drafter-backend", choices=["torch", "onnx"], default="torch")
    gen.add_argument("--drafter-weights", default="int4", help="weight format of a model drafter")
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

    _add_run(sub)
    _add_harness(sub)
    status = sub.add_parser("status", help="the cluster as a node sees it")
    status.add_argument("--url", default="http://127.0.0.1:8080", help="the node's API address")
    status.add_argument("--json", action="store_true", help="print the node's /status JSON")
    status.set_defaults(func=_status)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
