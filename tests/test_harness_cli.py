"""The `sled run` / `sled harness` / `sled status` command lines: errors and small pieces."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.harness import (
    HarnessError,
    HarnessState,
    NodeProcess,
    parse_assignments,
    per_node_options,
    read_state,
    write_state,
)
from agent.node import sd_notify
from agent.status_cli import cluster_rows, render


def sled(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLED_")}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=full_env,
    )


def test_run_rejects_bad_config_without_a_traceback(tmp_path: Path) -> None:
    done = sled("run", "--api-port", "99999")
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        == "sled run: config error: command line: api_port: 99999 is not a port number (0-65535)"
    )
    bad = tmp_path / "sled.toml"
    bad.write_text("models = [1, 2]\n")
    done = sled("run", "--config", str(bad))
    assert done.returncode == 2 and "models: expected a list of strings" in done.stderr
    assert "Traceback" not in done.stderr
    done = sled("run", env={"SLED_MAX_SESSIONS": "many"})
    assert done.returncode == 2 and "environment: max_sessions" in done.stderr


def test_run_refuses_a_non_loopback_listener_without_a_key() -> None:
    done = sled("run", "--peer-host", "0.0.0.0", "--mdns", "false", "--models", "")
    assert done.returncode == 2, done.stderr
    assert "without a cluster key" in done.stderr and "SLED_CLUSTER_KEY" in done.stderr
    assert "Traceback" not in done.stderr


def test_harness_and_status_errors(tmp_path: Path) -> None:
    done = sled("harness", "status", "--state", str(tmp_path / "none.json"))
    assert done.returncode == 1 and "no harness state" in done.stderr
    done = sled("harness", "down", "--state", str(tmp_path / "none.json"))
    assert done.returncode == 1 and "sled harness up" in done.stderr
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = sled("status", "--url", f"http://127.0.0.1:{port}")
    assert done.returncode == 1 and "cannot reach" in done.stderr
    done = sled("harness", "up", "-n", "2", "--memory-budget", "1G,2G,3G", "--state",
                str(tmp_path / "s.json"))  # fmt: skip
    assert done.returncode == 1 and "give 1 or 2 values" in done.stderr


def test_options_per_node() -> None:
    options = per_node_options(3, {"memory_budget": "1G,2G,3G", "role": "auto"}, ["2:role=client"])
    assert options == [
        {"memory_budget": "1G", "role": "auto"},
        {"memory_budget": "2G", "role": "auto"},
        {"memory_budget": "3G", "role": "client"},
    ]
    assert parse_assignments(["max-len=64"], "--set") == {"max_len": "64"}
    with pytest.raises(HarnessError, match="KEY=VALUE"):
        parse_assignments(["cluster_key=x"], "--set")  # secrets are not settable this way
    with pytest.raises(HarnessError, match="I:KEY=VALUE"):
        per_node_options(2, {}, ["5:role=client"])


def test_state_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "st" / "state.json"
    state = HarnessState(
        str(path.parent), "secret", (NodeProcess("node-0", 1, "http://x", 2, "l"),)
    )
    write_state(path, state)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_state(path) == state
    assert "secret" not in json.dumps(state.public())
    path.write_text("{")
    with pytest.raises(HarnessError, match="unreadable"):
        read_state(path)


def test_sd_notify_sends_ready(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    address = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(address)
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        assert sd_notify("READY=1")
        assert server.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sd_notify("READY=1")


def test_status_table_from_a_status_object() -> None:
    status = {
        "node": "a",
        "epoch": 4,
        "loaded": ["m"],
        "load": {"engine_active": 1, "engine_queued": 0},
        "plan": {"members": ["a", "b", "c"], "models": {"m": ["a", "b"]}, "unplaced": []},
        "peers": [
            {"name": "b", "alive": True, "loaded": [], "epoch": 4, "load": {"active_sessions": 0}},
            {"name": "c", "alive": False},
        ],
    }
    rows = cluster_rows(status)
    assert rows[0] == ("a *", "yes", "verifier", "m", "1 active, 0 queued", "4")
    assert rows[1][:4] == ("b", "yes", "verifier", "m (loading)")
    assert rows[2] == ("c", "no", "-", "-", "-", "-")
    assert "plan (epoch 4): m on a, b" in render(status)
