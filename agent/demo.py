"""`sled demo`: a local cluster on the default model answering a chat prompt, then gone.

Fetches the models (progress bars), starts `-n` daemons on 127.0.0.1 with the harness: node-0
may hold the target model (the verifier); with three or more nodes node-1 is a drafter (a small
model drafting for the target: gemma3-270m through text for the default Qwen target); the rest
get a memory budget too small for any model, as a phone or a small board would. It asks the
last node — one that holds no model — a chat question through its OpenAI API, streams the
answer (drafted on node-1, verified on node-0), prints who served it, how fast, and how many
drafted tokens stood, and stops the nodes.
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
from agent.harness import Harness, HarnessError, poll_statuses, wait_for_drafters

DEFAULT_PROMPT = "Write a Python function that checks whether a string is a palindrome."
SMALL_DEVICE_BUDGET = "64M"  # too small for any real model: these nodes only relay
# The drafter node-1 runs for each target: the only small model with another tokenizer that the
# registry has drafts for Qwen through text; tiny test models share token ids with tiny-llama.
DEFAULT_DRAFTERS = {
    "qwen2.5-coder-1.5b-instruct": "text:gemma3-270m",
    "tiny-qwen2": "model:tiny-llama",
}


async def _ask(url: str, model: str, prompt: str, max_tokens: int, seed: int) -> dict[str, Any]:
    """Stream the reply to stdout; return the text, timings and usage."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    conversation = Conversation().add("user", prompt)
    options = ChatOptions(model=model, max_tokens=max_tokens, seed=seed, temperature=0.0)
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    start = time.perf_counter()
    first: float | None = None
    async with aiohttp.ClientSession(timeout=timeout) as http:
        async for text in stream_reply(http, api_base(url), model, conversation, options, usage):
            first = first if first is not None else time.perf_counter() - start
            pieces.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()
    sys.stdout.write("\n")
    total = time.perf_counter() - start
    return {"text": "".join(pieces), "ttft_s": first, "total_s": total, "usage": usage}


def cmd_demo(args: argparse.Namespace) -> int:
    from models.registry import RegistryError, fetch

    if args.n < 2:
        print("sled demo: -n must be at least 2 (one node holds the model)", file=sys.stderr)
        return 2
    drafter = args.drafter or DEFAULT_DRAFTERS.get(args.model, "none")
    with_drafter = args.n >= 3 and drafter not in ("none", "ngram")
    try:
        fetch(args.model)  # downloads/assembles with a progress bar before any node starts
        if with_drafter and ":" in drafter:
            source = drafter.split(":", 1)[1]
            if not source.endswith(".gguf"):
                fetch(source)
    except RegistryError as exc:
        print(f"sled demo: {exc}", file=sys.stderr)
        return 2
    state_dir = Path(args.state_dir or tempfile.mkdtemp(prefix="sled-demo-"))
    harness = Harness(state_dir / "harness.json")
    options: list[dict[str, str]] = [
        {} if i == 0 else {"memory_budget": SMALL_DEVICE_BUDGET} for i in range(args.n)
    ]
    if with_drafter:
        options[1].update({"role": "drafter", "drafter": drafter})
    common = {"threads": str(args.threads)} if args.threads else {}
    print(f"starting {args.n} nodes on 127.0.0.1 (logs in {state_dir}) ...", file=sys.stderr)
    try:
        state = harness.up(args.n, args.model, common, options, timeout=args.timeout)
    except HarnessError as exc:
        print(f"sled demo: {exc}", file=sys.stderr)
        return 1
    try:
        asking = state.nodes[-1]
        if with_drafter:
            wait_for_drafters(state.nodes, args.model, [state.nodes[1].name], args.timeout)
        statuses = poll_statuses(state.nodes)
        holders = sorted(n for n, st in statuses.items() if args.model in st.get("loaded", []))
        print(
            f"asking {asking.name} ({asking.api}), which does not hold the model; "
            f"plan epoch {statuses.get(asking.name, {}).get('epoch')}",
            file=sys.stderr,
        )
        print(f"> {args.prompt}", file=sys.stderr)
        result = asyncio.run(_ask(asking.api, args.model, args.prompt, args.max_tokens, 0))
        usage = result["usage"]
        sled = usage.get("sled", {}) if isinstance(usage, dict) else {}
        summary = {
            "asked": asking.name,
            "holders": holders,
            "drafters": statuses.get(asking.name, {}).get("plan", {}).get("drafters", {}),
            "completion_tokens": usage.get("completion_tokens"),
            "ttft_s": None if result["ttft_s"] is None else round(result["ttft_s"], 2),
            "total_s": round(result["total_s"], 2),
            "speculative": sled.get("speculative"),
        }
        print(json.dumps(summary) if args.json else f"[{summary}]", file=sys.stderr)
        return 0
    except (aiohttp.ClientError, OSError, RuntimeError, HarnessError) as exc:
        print(f"sled demo: {exc}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            harness.down(timeout=30.0)
        else:
            print(f"nodes left running; stop them with: sled harness down --state "
                  f"{harness.state_path}", file=sys.stderr)  # fmt: skip
