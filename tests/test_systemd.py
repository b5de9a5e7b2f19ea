"""The systemd unit verifies cleanly and the example configuration loads."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "sled.service"


def test_example_config_loads() -> None:
    config = load_config(
        ROOT / "systemd" / "sled.toml.example", environ={"SLED_CLUSTER_KEY": "k" * 32}, flags={}
    )
    assert config.peer_port == 7070 and config.api_host == "127.0.0.1"
    assert config.models == ("qwen2.5-coder-1.5b-instruct",)


def test_unit_declares_notify_and_hardening() -> None:
    text = UNIT.read_text()
    for line in ("Type=notify", "User=sled", "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert line in text
    assert "ExecStart=/usr/local/bin/sled run --config /etc/sled/sled.toml" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_prints_nothing(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this environment's sled script.
    sled = Path(sys.executable).parent / "sled"
    if not sled.exists():
        pytest.skip("the sled console script is not installed in this environment")
    unit = tmp_path / "sled.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/sled", str(sled)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout + proc.stderr == "", proc.stdout + proc.stderr
