"""Two network namespaces joined by a veth pair: nodes discover each other over mDNS on a
real (virtual) link with their own addresses, and exchange tensors across it.

Needs root and iproute2 (`ip`); skipped with the reason otherwise. Everything created here
(namespaces, veth pair, processes) is removed at the end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from transport.auth import ENV_KEY

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.netns


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture
def veth_pair() -> Iterator[tuple[tuple[str, str], tuple[str, str]]]:
    """Two namespaces with one end of a veth each: ((ns_a, addr_a), (ns_b, addr_b))."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 `ip` is not installed (apt-get install iproute2)")
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    tag = secrets.token_hex(3)
    subnet = secrets.randbelow(250) + 1
    ns_a, ns_b = f"sledtest-{tag}-a", f"sledtest-{tag}-b"
    dev_a, dev_b = f"sv{tag}a", f"sv{tag}b"
    addr_a, addr_b = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
    created: list[str] = []
    try:
        try:
            ip("netns", "add", ns_a)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot create a network namespace here: {exc.stderr.strip()}")
        created.append(ns_a)
        ip("netns", "add", ns_b)
        created.append(ns_b)
        ip("link", "add", dev_a, "type", "veth", "peer", "name", dev_b)
        ip("link", "set", dev_a, "netns", ns_a)
        ip("link", "set", dev_b, "netns", ns_b)
        for ns, dev, addr in ((ns_a, dev_a, addr_a), (ns_b, dev_b, addr_b)):
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield (ns_a, addr_a), (ns_b, addr_b)
    finally:
        for ns in created:  # deleting a namespace deletes its end of the veth, and the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


class NamespacedProbe:
    def __init__(self, ns: str, addr: str, name: str, key: str) -> None:
        self.name = name
        self.events: list[dict] = []
        self.unparsed: list[str] = []
        command = ["ip", "netns", "exec", ns, sys.executable, "-m", "transport.probe"]
        command += ["--node-id", name, "--host", addr, "--interface", addr]
        command += ["--exchange", "--duration", "30"]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, ENV_KEY: key},
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                # stop() drains the pipe with communicate() while this thread still reads it,
                # so a last line can arrive cut in two: not an event.
                self.unparsed.append(line)

    def exchanged_with(self, peer: str) -> dict | None:
        return next(
            (e for e in self.events if e["event"] == "exchanged" and e["peer"] == peer), None
        )

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate(timeout=10)
        self._thread.join(timeout=5)
        return err


@pytest.mark.timeout(90)
def test_peers_in_two_namespaces_discover_each_other_and_exchange_tensors(
    veth_pair: tuple[tuple[str, str], tuple[str, str]],
) -> None:
    (ns_a, addr_a), (ns_b, addr_b) = veth_pair
    key = f"netns-{secrets.token_hex(8)}"
    a = NamespacedProbe(ns_a, addr_a, "left", key)
    b = NamespacedProbe(ns_b, addr_b, "right", key)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if a.exchanged_with("right") and b.exchanged_with("left"):
                break
            if a.process.poll() is not None or b.process.poll() is not None:
                break
            time.sleep(0.05)
        got_a, got_b = a.exchanged_with("right"), b.exchanged_with("left")
    finally:
        err_a, err_b = a.stop(), b.stop()
    assert got_a and got_b, (a.events, b.events, err_a[-2000:], err_b[-2000:])
    assert got_a["ok"] and got_b["ok"] and got_a["bytes"] > 0
    up_a = next(e for e in a.events if e["event"] == "up")
    assert up_a["peer"] == "right" and up_a["host"] == addr_b
    print(
        f"\nnetns: exchanged {got_a['bytes']} bytes each way, rtt {got_a['rtt_ms']} ms / {got_b['rtt_ms']} ms"
    )
