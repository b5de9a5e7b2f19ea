"""Helpers for tests that run real `sled run` processes through the harness (not a test module).

Each test module starts one harness (a few seconds: every node is a Python process importing
torch) and shares it between its tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.harness import Harness, HarnessState, NodeProcess, per_node_options
from agent.status_cli import fetch_status

MODEL = "tiny-qwen2"
# fp32: bf16 logits tie often enough that re-prefilling on another node could flip an argmax.
COMMON = {"weights": "fp32", "backend": "torch", "threads": "1", "replicas": "2"}
HOLDS = "1G"  # a budget that holds tiny-qwen2 (~70 MB with its KV cache)
TOO_SMALL = "10M"  # a budget that does not


def start_harness(state_dir: Path, budgets: Sequence[str], timeout: float = 90.0) -> Harness:
    harness = Harness(state_dir / "state.json")
    options = per_node_options(len(budgets), {"memory_budget": ",".join(budgets)}, [])
    harness.up(len(budgets), MODEL, COMMON, options, timeout)
    return harness


def state_of(harness: Harness) -> HarnessState:
    from agent.harness import read_state

    return read_state(harness.state_path)


def node(harness: Harness, name: str) -> NodeProcess:
    return next(n for n in state_of(harness).nodes if n.name == name)


def statuses(harness: Harness) -> dict[str, dict[str, Any]]:
    out = {}
    for proc in state_of(harness).nodes:
        with contextlib.suppress(Exception):
            out[proc.name] = fetch_status(proc.api, timeout=3.0)
    return out


def wait_for(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> float:
    """Seconds until predicate() held; AssertionError after timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.monotonic() - start


def post_json(url: str, body: Mapping[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return dict(json.loads(response.read()))


def stream_completion(
    api: str, body: Mapping[str, Any], timeout: float = 60.0
) -> Iterator[dict[str, Any]]:
    """The SSE chunks of a streaming /v1/completions request, as they arrive."""
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    request = urllib.request.Request(
        api + "/v1/completions", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[len("data: ") :])


def collect(chunks: Iterator[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    text, usage = [], {}
    for chunk in chunks:
        if chunk.get("choices"):
            text.append(chunk["choices"][0]["text"])
        if chunk.get("usage"):
            usage = chunk["usage"]
    return "".join(text), usage


def sled_generate(
    prompt: str,
    max_tokens: int,
    *,
    chat: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> str:
    """`sled generate` in its own process, with the harness nodes' backend, weights, threads."""
    argv = [
        sys.executable, "-m", "agent.cli", "generate", "--model", MODEL, "--prompt", prompt,
        "--max-tokens", str(max_tokens), "--temperature", str(temperature), "--top-p", str(top_p), "--seed", str(seed),
        "--backend", "torch", "--weights", "fp32", "--threads", "1", "--json",
    ]  # fmt: skip
    if chat:
        argv.append("--chat")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True)
    return str(json.loads(done.stdout)["text"])


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)


def exit_status(pid: int, timeout: float) -> int:
    """Exit status of a child process of this test process (harness nodes are)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not exit within {timeout} s")
