"""Separate processes on 127.0.0.1: zeroconf discovery, dead-peer detection, static join.

Each node is `python -m transport.probe`, which prints its peer events as JSON lines with
`time.monotonic()` stamps (one clock for all processes on Linux), so latencies are measured
across processes. Every wait is bounded; only the processes started here are signalled.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from transport.auth import ENV_KEY

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Probe:
    name: str
    process: asyncio.subprocess.Process
    events: list[dict] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return next(int(e["port"]) for e in self.events if e["event"] == "listening")

    def first(self, event: str, peer: str) -> dict | None:
        return next((e for e in self.events if e["event"] == event and e.get("peer") == peer), None)

    def peers_up(self) -> set[str]:
        up: set[str] = set()
        for e in self.events:
            if e["event"] == "up":
                up.add(e["peer"])
            elif e["event"] == "down":
                up.discard(e["peer"])
        return up


async def _read(probe: Probe) -> None:
    assert probe.process.stdout is not None
    while line := await probe.process.stdout.readline():
        probe.events.append(json.loads(line))


async def spawn(name: str, key: str, *args: str) -> Probe:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "transport.probe",
        "--node-id",
        name,
        "--duration",
        "60",
        *args,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, ENV_KEY: key},
    )
    probe = Probe(name, process)
    probe.reader = asyncio.create_task(_read(probe))
    return probe


async def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


@pytest.fixture
async def probes() -> AsyncIterator[list[Probe]]:
    started: list[Probe] = []
    yield started
    for probe in started:  # only the processes this test started, by their own handles
        if probe.process.returncode is None:
            probe.process.send_signal(signal.SIGKILL)
    for probe in started:
        await asyncio.wait_for(probe.process.wait(), 10)
        if probe.reader is not None:
            probe.reader.cancel()


@pytest.mark.timeout(90)
async def test_five_processes_discover_detect_death_and_admit_a_static_peer(
    probes: list[Probe],
) -> None:
    run = secrets.token_hex(3)
    key = f"proc-test-{run}"
    names = [f"n{i}-{run}" for i in range(5)]
    probes.extend([await spawn(name, key) for name in names])

    # All five listening, then everyone sees everyone within 2 s of the last one starting.
    assert await wait_until(
        lambda: all(any(e["event"] == "listening" for e in p.events) for p in probes), 30
    )
    last_start = max(next(e["t"] for e in p.events if e["event"] == "listening") for p in probes)
    assert await wait_until(lambda: all(len(p.peers_up()) == 4 for p in probes), 10), [
        (p.name, p.peers_up()) for p in probes
    ]
    found_after = max(e["t"] - last_start for p in probes for e in p.events if e["event"] == "up")
    first_start = min(next(e["t"] for e in p.events if e["event"] == "listening") for p in probes)
    print(
        f"\nfive processes: full mesh {found_after:.3f}s after the last one started "
        f"({found_after + last_start - first_start:.3f}s after the first)"
    )
    assert found_after < 2.0

    # kill -9: the others declare it dead within 3 s.
    victim, rest = probes[4], probes[:4]
    killed_at = time.monotonic()
    victim.process.send_signal(signal.SIGKILL)
    assert await wait_until(lambda: all(p.first("down", victim.name) for p in rest), 5)
    kill_latency = max(p.first("down", victim.name)["t"] - killed_at for p in rest)  # type: ignore[index]
    print(f"kill -9: declared dead after {kill_latency:.3f}s")
    assert kill_latency < 3.0

    # SIGSTOP: no FIN, no RST; only the missing heartbeats tell.
    frozen, rest = probes[3], probes[:3]
    stopped_at = time.monotonic()
    frozen.process.send_signal(signal.SIGSTOP)
    assert await wait_until(lambda: all(p.first("down", frozen.name) for p in rest), 5)
    stop_latency = max(p.first("down", frozen.name)["t"] - stopped_at for p in rest)  # type: ignore[index]
    downs = [p.first("down", frozen.name) for p in rest]
    print(f"SIGSTOP: declared dead after {stop_latency:.3f}s: {downs[0]['reason']}")  # type: ignore[index]
    assert stop_latency < 3.0
    assert all("sent nothing for" in d["reason"] for d in downs)  # type: ignore[index]
    frozen.process.send_signal(signal.SIGKILL)

    # A node without mDNS, told one static peer, joins everyone still alive.
    loner = await spawn(f"static-{run}", key, "--no-mdns", "--peer", f"127.0.0.1:{rest[0].port}")
    probes.append(loner)
    alive = {p.name for p in rest}
    assert await wait_until(
        lambda: loner.peers_up() == alive and all(loner.name in p.peers_up() for p in rest), 15
    ), (loner.events, [(p.name, p.peers_up()) for p in rest])
    assert not any(
        e["event"] == "up" and e["peer"] in (victim.name, frozen.name) for e in loner.events
    )

    for p in rest + [loner]:
        p.process.send_signal(signal.SIGTERM)
    for p in rest + [loner]:
        assert await asyncio.wait_for(p.process.wait(), 10) == 0
