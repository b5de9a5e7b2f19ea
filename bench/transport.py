"""Transport bench: sled frames against raw sockets on the same loopback, side by side.

    python bench/transport.py [--quick] [--pin | --one-core]

Two figures, each measured for three senders in many short alternating rounds against servers
started once:

* throughput: 200 frames each carrying a 1.5 MiB tensor (an `activations` message), sent one
  way, then one acknowledged sync. Raw baselines send the very same frame bytes and the
  receiver only counts them (into one reused buffer): a blocking socket, and an asyncio
  (uvloop) BufferedProtocol. sled decodes every frame into a numpy view and runs a handler.
* round trip: 2000 small requests and their replies, one at a time. Raw baselines echo the
  bytes of a ping frame with the bytes of a pong frame (no parsing); sled runs
  `Connection.ping()`, which encodes, decodes, validates and matches the reply to its id.

Each round also records the CPU time both processes spent (the kernel's nanosecond
accounting, /proc/<pid>/task/*/schedstat; the sender reads its own with process_time): per
frame for each end, and per round trip for both ends together. On a machine shared with other
work the wall-clock figures move with the load from round to round; CPU time moves much less
(it still grows when other work evicts our caches). The "CPU time" throughput ratio compares
the busier end per frame (raw/sled); the round-trip one, both ends together (sled/raw).

Receiver and sender run in separate processes (with --pin, on separate cores; with --one-core,
both on the first core, which is what --pin did until the servers were started before the
sender pinned itself: they inherited its one core). Every figure
is the median of the best third of that sender's rounds (see `best_third`). The ratios in the
JSON line are sled / raw asyncio (uvloop) sockets, the baseline with the same event-loop
machinery; the blocking-socket ratios are printed above it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transport.auth import ClusterKey  # noqa: E402
from transport.connection import Context, Identity  # noqa: E402
from transport.endpoint import connect, listen  # noqa: E402
from transport.frames import Frame, Kind, Limits, encode_frame_bytes  # noqa: E402
from transport.messages import Activations, Ping, Pong, Tokens  # noqa: E402
from transport.runtime import run  # noqa: E402
from transport.schema import Message  # noqa: E402

TENSOR_SHAPE = (256, 1536)  # float32: 1.5 MiB
KEY_SECRET = "bench-transport"
MODES = ("raw-block", "raw-uvloop", "sled")


def payload() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(TENSOR_SHAPE, dtype=np.float32)


def frame_bytes() -> tuple[bytes, bytes, bytes]:
    """(activations frame, ping frame, pong frame): the bytes the raw baselines move."""
    limits = Limits()
    data = payload()
    act = encode_frame_bytes(
        Frame(Kind.NOTIFY, 0, Activations("bench", np.arange(TENSOR_SHAPE[0]), data)), limits
    )
    ping = encode_frame_bytes(Frame(Kind.REQUEST, 1, Ping(1)), limits)
    pong = encode_frame_bytes(Frame(Kind.REPLY, 1, Pong(1)), limits)
    return act, ping, pong


def best_third(values: list[float], high: bool) -> float:
    """Median of the best third of the rounds: on a machine shared with other work, noise only
    ever makes a round slower, so the best rounds estimate the cost; the median of a third of
    them is not carried by one lucky round."""
    ranked = sorted(values, reverse=high)
    return statistics.median(ranked[: max(1, len(ranked) // 3)])


def pin(core: int) -> None:
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2:
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[core % len(cores)]})


def process_cpu(pid: int) -> float:
    """Seconds of CPU time `pid` has used, all threads, from the scheduler's nanosecond
    accounting (/proc/<pid>/task/*/schedstat; utime/stime tick in 10 ms steps)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


class Sample(NamedTuple):
    """One timed run: wall seconds, and CPU seconds spent by the sender and the receiver."""

    wall: float
    client_cpu: float
    server_cpu: float


class Clock:
    """Wall and CPU clocks of both ends, read at the start and the end of a timed run."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self._start = (0.0, 0.0, 0.0)

    def start(self) -> None:
        self._start = (time.perf_counter(), time.process_time(), process_cpu(self.server_pid))

    def stop(self) -> Sample:
        wall, client, server = self._start
        return Sample(
            time.perf_counter() - wall,
            time.process_time() - client,
            process_cpu(self.server_pid) - server,
        )


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed")
        got += n


# ----------------------------------------------------------------------------- servers


def serve_blocking(sock: socket.socket) -> None:
    _, ping, pong = frame_bytes()
    buf = bytearray(4 << 20)
    view = memoryview(buf)
    while True:
        conn, _ = sock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with conn:
            head = bytearray(9)
            recv_exact(conn, memoryview(head))
            kind, total = head[:1], int.from_bytes(head[1:], "big")
            if kind == b"T":  # count `total` bytes, then acknowledge
                got = 0
                while got < total:
                    n = conn.recv_into(view[: min(len(buf), total - got)])
                    if n == 0:
                        break
                    got += n
                conn.sendall(b"k")
            else:  # echo `total` pings with pongs
                ping_view = memoryview(bytearray(len(ping)))
                for _ in range(total):
                    recv_exact(conn, ping_view)
                    conn.sendall(pong)


class RawUvloopServer(asyncio.BufferedProtocol):
    def __init__(self, ping: bytes, pong: bytes) -> None:
        self.ping, self.pong = ping, pong  # built once per process, not per connection
        self.buf = bytearray(4 << 20)
        self.head = bytearray()
        self.kind = b""
        self.total = 0
        self.got = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(self.buf)

    def buffer_updated(self, nbytes: int) -> None:
        assert self.transport is not None
        data = memoryview(self.buf)[:nbytes]
        if len(self.head) < 9:
            take = min(9 - len(self.head), nbytes)
            self.head += data[:take]
            data = data[take:]
            if len(self.head) < 9:
                return
            self.kind, self.total = bytes(self.head[:1]), int.from_bytes(self.head[1:], "big")
        if self.kind == b"T":
            self.got += len(data)
            if self.got >= self.total:
                self.transport.write(b"k")
        else:
            before = self.got // len(self.ping)
            self.got += len(data)
            for _ in range(self.got // len(self.ping) - before):
                self.transport.write(self.pong)


class SledSink:
    """Counts the activations it receives; answers a sync request with the count."""

    def __init__(self) -> None:
        self.frames = 0
        self.nbytes = 0

    async def __call__(self, msg: Message, ctx: Context) -> Message | None:
        if isinstance(msg, Activations):
            self.frames += 1
            self.nbytes += msg.hidden.nbytes
            return None
        if isinstance(msg, Tokens):  # sync: everything sent before it has been handled
            return Tokens("count", np.array([self.frames, self.nbytes], dtype=np.int64))
        return None


async def serve_sled_async(port_out: Callable[[int], None]) -> None:
    listener = await listen(
        "127.0.0.1",
        0,
        Identity("bench-server", ClusterKey.from_secret(KEY_SECRET)),
        handler=SledSink(),
    )
    port_out(listener.port)
    await asyncio.Event().wait()


async def serve_uvloop_async(port_out: Callable[[int], None]) -> None:
    _, ping, pong = frame_bytes()
    server = await asyncio.get_running_loop().create_server(
        lambda: RawUvloopServer(ping, pong), "127.0.0.1", 0
    )
    port_out(server.sockets[0].getsockname()[1])
    await asyncio.Event().wait()


def serve(mode: str, pinned: bool) -> None:
    if pinned:
        pin(1)

    def announce(port: int) -> None:
        print(json.dumps({"port": port}), flush=True)

    if mode == "raw-block":
        sock = socket.create_server(("127.0.0.1", 0))
        announce(sock.getsockname()[1])
        serve_blocking(sock)
    elif mode == "raw-uvloop":
        run(serve_uvloop_async(announce))
    else:
        run(serve_sled_async(announce))


# ----------------------------------------------------------------------------- clients


def block_throughput(port: int, frame: bytes, count: int, clock: Clock) -> Sample:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        total = len(frame) * count
        clock.start()
        sock.sendall(b"T" + total.to_bytes(8, "big"))
        for _ in range(count):
            sock.sendall(frame)
        assert sock.recv(1) == b"k"
        return clock.stop()


def block_rtt(port: int, ping: bytes, pong: bytes, count: int, clock: Clock) -> Sample:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"R" + count.to_bytes(8, "big"))
        view = memoryview(bytearray(len(pong)))
        clock.start()
        for _ in range(count):
            sock.sendall(ping)
            recv_exact(sock, view)
        return clock.stop()


class RawUvloopClient(asyncio.Protocol):
    def __init__(self, expect: int) -> None:
        self.expect = expect
        self.got = 0
        self.waiter: asyncio.Future[None] | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= self.expect and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    async def wait_for(self, nbytes: int) -> None:
        self.expect = nbytes
        if self.got < nbytes:
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter


async def uvloop_throughput(port: int, frame: bytes, count: int, clock: Clock) -> Sample:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(lambda: RawUvloopClient(1), "127.0.0.1", port)
    transport.set_write_buffer_limits(high=4 << 20, low=1 << 20)
    clock.start()
    transport.write(b"T" + (len(frame) * count).to_bytes(8, "big"))
    for _ in range(count):
        transport.write(frame)
        if not proto.can_write.is_set():
            await proto.can_write.wait()
    await proto.wait_for(1)
    sample = clock.stop()
    transport.close()
    return sample


async def uvloop_rtt(port: int, ping: bytes, pong: bytes, count: int, clock: Clock) -> Sample:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(lambda: RawUvloopClient(0), "127.0.0.1", port)
    transport.write(b"R" + count.to_bytes(8, "big"))
    clock.start()
    for i in range(1, count + 1):
        transport.write(ping)
        await proto.wait_for(i * len(pong))
    sample = clock.stop()
    transport.close()
    return sample


async def sled_throughput(port: int, count: int, key: ClusterKey, clock: Clock) -> Sample:
    conn = await connect("127.0.0.1", port, Identity("bench-client", key))
    msg = Activations("bench", np.arange(TENSOR_SHAPE[0]), payload())
    first = await conn.request(Tokens("sync", np.zeros(1)), Tokens)
    clock.start()
    for _ in range(count):
        await conn.notify(msg)
    done = await conn.request(Tokens("sync", np.zeros(1)), Tokens)
    sample = clock.stop()
    received = int(done.tokens[0] - first.tokens[0])
    if received != count:
        raise RuntimeError(f"sled server handled {received} frames of {count}")
    await conn.close()
    return sample


async def sled_rtt(port: int, count: int, key: ClusterKey, clock: Clock) -> Sample:
    conn = await connect("127.0.0.1", port, Identity("bench-client", key))
    for _ in range(100):
        await conn.ping()
    clock.start()
    for _ in range(count):
        await conn.ping()
    sample = clock.stop()
    await conn.close()
    return sample


def start_server(mode: str, pinned: bool) -> tuple[subprocess.Popen[str], int]:
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode] + (["--pin"] if pinned else []),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    return server, int(json.loads(server.stdout.readline())["port"])


def measure(
    mode: str, port: int, frames: int, pings: int, key: ClusterKey, clock: Clock
) -> tuple[Sample, Sample]:
    """(the run of `frames` tensor frames, the run of `pings` round trips), fresh connections."""
    act, ping, pong = frame_bytes()
    if mode == "raw-block":
        return (
            block_throughput(port, act, frames, clock),
            block_rtt(port, ping, pong, pings, clock),
        )

    async def both() -> tuple[Sample, Sample]:
        if mode == "raw-uvloop":
            return (
                await uvloop_throughput(port, act, frames, clock),
                await uvloop_rtt(port, ping, pong, pings, clock),
            )
        return (
            await sled_throughput(port, frames, key, clock),
            await sled_rtt(port, pings, key, clock),
        )

    return run(both())


class Figures(NamedTuple):
    """One round of one sender, per frame / per round trip."""

    mib_s: float  # throughput, wall clock
    frame_tx_us: float  # sender CPU per frame
    frame_rx_us: float  # receiver CPU per frame
    rtt_us: float  # round trip, wall clock
    rtt_cpu_us: float  # CPU of both ends per round trip

    @property
    def frame_cpu_us(self) -> float:
        """CPU per frame of the busier end: with one core each, that end sets the pace."""
        return max(self.frame_tx_us, self.frame_rx_us)


def figures(tput: Sample, rtt: Sample, frames: int, frame_len: int, pings: int) -> Figures:
    return Figures(
        frames * frame_len / tput.wall / 2**20,
        tput.client_cpu / frames * 1e6,
        tput.server_cpu / frames * 1e6,
        rtt.wall / pings * 1e6,
        (rtt.client_cpu + rtt.server_cpu) / pings * 1e6,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames and rounds (< 1 min)")
    parser.add_argument(
        "--rounds", type=int, default=0, help="rounds per sender (default 15, quick 9)"
    )
    parser.add_argument("--pin", action="store_true", help="pin sender and receiver to cores")
    parser.add_argument(
        "--one-core", action="store_true", help="pin sender and receiver to the first core"
    )
    parser.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.pin)
        return 0
    # Many short rounds, alternating senders: on a machine shared with other work the best
    # rounds of each sender are the least disturbed, and every sender gets the same chances.
    frames, pings = (100, 1000) if args.quick else (200, 2000)
    rounds = args.rounds or (9 if args.quick else 15)
    frame_len = len(frame_bytes()[0])
    key = ClusterKey.from_secret(KEY_SECRET)
    load_before = os.getloadavg()[0]  # other work on the machine, printed with the results
    if args.one_core:
        pin(0)  # before the servers start: they inherit it
    servers = {mode: start_server(mode, args.pin) for mode in MODES}
    if args.pin:  # after the servers start: they would inherit the sender's one core
        pin(0)
    results: dict[str, list[Figures]] = {m: [] for m in MODES}
    try:
        for r in range(rounds):
            for mode in MODES:
                server, port = servers[mode]
                tput, rtt = measure(mode, port, frames, pings, key, Clock(server.pid))
                fig = figures(tput, rtt, frames, frame_len, pings)
                results[mode].append(fig)
                print(
                    f"round {r + 1:2d} {mode:10s} {fig.mib_s:6.0f} MiB/s, CPU/frame "
                    f"tx {fig.frame_tx_us:4.0f} rx {fig.frame_rx_us:4.0f} us;  "
                    f"round trip {fig.rtt_us:5.1f} us, CPU {fig.rtt_cpu_us:5.1f} us",
                    flush=True,
                )
    finally:
        for server, _ in servers.values():  # the server processes started above
            server.kill()
            server.wait(timeout=10)
    placement = "one core" if args.one_core else "separate cores" if args.pin else "unpinned"
    # Per sender, each figure is the median of its best third of rounds (see best_third).
    good = {
        m: Figures(
            best_third([f.mib_s for f in v], high=True),
            best_third([f.frame_tx_us for f in v], high=False),
            best_third([f.frame_rx_us for f in v], high=False),
            best_third([f.rtt_us for f in v], high=False),
            best_third([f.rtt_cpu_us for f in v], high=False),
        )
        for m, v in results.items()
    }
    print(
        f"\n{frames} frames of {frame_len} bytes (1.5 MiB float32 tensor + header), "
        f"{pings} round trips, {rounds} rounds; load average {load_before:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after, {os.cpu_count()} CPUs, {placement}; "
        "medians of the best third of rounds"
    )
    print(
        f"{'sender':10s} {'MiB/s':>6s} {'CPU us/frame: tx':>17s} {'rx':>5s}"
        f"   {'round trip us':>13s} {'CPU us':>7s}"
    )
    for mode in MODES:
        g = good[mode]
        print(
            f"{mode:10s} {g.mib_s:6.0f} {g.frame_tx_us:17.0f} {g.frame_rx_us:5.0f}"
            f"   {g.rtt_us:13.1f} {g.rtt_cpu_us:7.1f}"
        )
    sled = good["sled"]
    for base in ("raw-uvloop", "raw-block"):
        raw = good[base]
        print(
            f"sled vs {base:10s}: wall clock: throughput {sled.mib_s / raw.mib_s:.2f}x, "
            f"round trip {sled.rtt_us / raw.rtt_us:.2f}x;  CPU time: throughput "
            f"{raw.frame_cpu_us / sled.frame_cpu_us:.2f}x (busier end per frame, raw/sled), "
            f"round trip {sled.rtt_cpu_us / raw.rtt_cpu_us:.2f}x (both ends, sled/raw)"
        )
    raw = good["raw-uvloop"]
    result: dict[str, Any] = {
        "throughput_vs_raw": round(sled.mib_s / raw.mib_s, 3),
        "rtt_vs_raw": round(sled.rtt_us / raw.rtt_us, 3),
        "cpu_throughput_vs_raw": round(raw.frame_cpu_us / sled.frame_cpu_us, 3),
        "cpu_rtt_vs_raw": round(sled.rtt_cpu_us / raw.rtt_cpu_us, 3),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
