"""`sled demo` end to end on a tiny model: a real cluster of processes, asked through a node
that does not hold the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(300)
def test_demo_answers_through_a_node_without_the_model(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--model", "tiny-qwen2", "-n", "3",
         "--max-tokens", "24", "--timeout", "120", "--state-dir", str(tmp_path), "--json"],
        capture_output=True, text=True, timeout=280, stdin=subprocess.DEVNULL,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stderr.strip().splitlines()[-1])
    assert summary["asked"] == "node-2"
    assert summary["holders"] == ["node-0"]
    assert summary["drafters"] == {"tiny-qwen2": ["node-1"]}  # drafting across peers
    assert summary["speculative"]["drafter"] == "model"
    assert summary["speculative"]["drafted_tokens"] > 0
    assert proc.stdout.strip(), "no answer text was streamed"
    state = json.loads((tmp_path / "harness.json").read_text())
    for node in state["nodes"]:  # the demo stopped every node it started
        assert not Path(f"/proc/{node['pid']}").exists() or _is_zombie(node["pid"])


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
