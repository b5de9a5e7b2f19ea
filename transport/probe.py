"""A bare transport node that prints peer events as JSON lines: a diagnostic for networks
(does discovery work here? do two machines share a key?) and the process the multi-process
tests start.

    SLED_CLUSTER_KEY=... python -m transport.probe --host 0.0.0.0 [--peer HOST:PORT] [--exchange]

Events on stdout: listening, up, down, exchanged (with --exchange: a tensor request/reply
with every peer that comes up, checked element by element), exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Sequence

import numpy as np

from transport.auth import ClusterKey, is_loopback_host
from transport.connection import (
    Connection,
    ConnectionConfig,
    Context,
    Identity,
    Timing,
    valid_node_id,
)
from transport.discovery import Advertisement, Discovery, parse_peer
from transport.errors import TransportError
from transport.mesh import Mesh, MeshConfig, MeshEvent, PeerUp
from transport.messages import Activations
from transport.runtime import run
from transport.schema import Message

EXCHANGE_ROWS = 64
EXCHANGE_COLS = 1536


def emit(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def exchange_tensor(node_id: str) -> np.ndarray:
    """A tensor both ends can recompute, different for every sender."""
    seed = int.from_bytes(node_id.encode()[:8].ljust(8, b"\0"), "little")
    return np.random.default_rng(seed).standard_normal((EXCHANGE_ROWS, EXCHANGE_COLS), np.float32)


async def echo(msg: Message, ctx: Context) -> Message | None:
    """Answers an Activations request with the same tensors."""
    if isinstance(msg, Activations):
        return Activations(msg.session_id, msg.positions, msg.hidden)
    return None


async def exchange(conn: Connection, node_id: str) -> None:
    peer = conn.peer.node_id if conn.peer else "?"
    hidden = exchange_tensor(node_id)
    positions = np.arange(EXCHANGE_ROWS, dtype=np.int64)
    start = time.perf_counter()
    try:
        reply = await conn.request(Activations(node_id, positions, hidden), Activations, timeout=5)
    except (TimeoutError, TransportError) as exc:
        emit("exchanged", peer=peer, ok=False, error=str(exc))
        return
    ok = bool(
        np.array_equal(np.asarray(reply.hidden), hidden)
        and np.array_equal(np.asarray(reply.positions), positions)
    )
    emit(
        "exchanged",
        peer=peer,
        ok=ok,
        bytes=hidden.nbytes,
        rtt_ms=round((time.perf_counter() - start) * 1000, 3),
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m transport.probe", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--node-id", default=f"probe-{secrets.token_hex(4)}")
    p.add_argument("--host", default="127.0.0.1", help="listen address (non-loopback needs a key)")
    p.add_argument("--port", type=int, default=0)
    p.add_argument(
        "--interface",
        action="append",
        default=None,
        help="IPv4 address for mDNS (repeatable; default: the listen address, or all if wildcard)",
    )
    p.add_argument("--no-mdns", action="store_true", help="static peers only")
    p.add_argument("--peer", action="append", default=[], help="static peer host:port (repeatable)")
    p.add_argument(
        "--exchange", action="store_true", help="send a tensor to each peer that comes up"
    )
    p.add_argument("--duration", type=float, default=60.0, help="exit after this many seconds")
    p.add_argument("--heartbeat", type=float, default=0.5, help="heartbeat interval, seconds")
    p.add_argument("--dead-after", type=float, default=2.0, help="silence before a peer is dead")
    p.add_argument("--verbose", action="store_true")
    return p


async def main_async(args: argparse.Namespace) -> int:
    key = ClusterKey.from_env()
    identity = Identity(args.node_id, key)
    tasks: set[asyncio.Task[None]] = set()
    mesh_ref: list[Mesh] = []

    def on_event(event: MeshEvent) -> None:
        if isinstance(event, PeerUp):
            emit("up", peer=event.peer.node_id, host=event.peer.host, port=event.peer.listen_port)
            conn = mesh_ref[0].connection(event.peer.node_id) if mesh_ref else None
            if args.exchange and conn is not None:
                task = asyncio.get_running_loop().create_task(exchange(conn, args.node_id))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        else:
            emit("down", peer=event.node_id, reason=event.reason)

    timing = Timing(heartbeat_interval=args.heartbeat, dead_after=args.dead_after)
    config = MeshConfig(
        host=args.host,
        port=args.port,
        static_peers=tuple(parse_peer(p) for p in args.peer),
        connection=ConnectionConfig(timing=timing),
    )
    mesh = Mesh(identity, handler=echo, config=config, on_event=on_event)
    mesh_ref.append(mesh)
    await mesh.start()
    discovery = None
    if not args.no_mdns:
        interfaces = args.interface
        if interfaces is None and args.host not in ("", "0.0.0.0"):
            interfaces = [args.host if not is_loopback_host(args.host) else "127.0.0.1"]
        ad = Advertisement(args.node_id, key.cluster_id, mesh.port)
        discovery = Discovery(ad, mesh.on_discovery, interfaces=interfaces)
        await discovery.start()
    emit("listening", node=args.node_id, port=mesh.port, cluster=key.cluster_id, pid=os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), args.duration)
    if discovery is not None:
        await discovery.close()
    await mesh.close()
    emit("exit")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not valid_node_id(args.node_id):
        parser.error(f"--node-id {args.node_id!r}: use 1-63 of A-Z a-z 0-9 _ . -")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    return run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
