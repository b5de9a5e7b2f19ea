"""The peer mesh: one authenticated connection to every other node of the cluster.

Candidates come from discovery (mDNS), from static peers (`--peer host:port`) and from the
peer lists that connected nodes exchange, so a node that knows one static peer learns the rest.
The mesh dials them, keeps exactly one connection per peer and reports `PeerUp` / `PeerDown`.
A peer is down when its connection closes or goes silent (heartbeats), never because of mDNS.

Two nodes that discover each other would both dial; the node with the smaller id dials
first and the other waits `answer_wait` before dialing too (in case multicast is one-way). If
both connections open anyway, both ends keep the one dialed by the smaller id (`keep_new`),
and the closing end says "duplicate" so the other does not report the peer down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from transport.connection import (
    Connection,
    ConnectionConfig,
    Context,
    Handler,
    Identity,
    LoadSource,
    PeerInfo,
    refuse_all,
)
from transport.discovery import DiscoveryEvent, PeerSeen
from transport.endpoint import Listener, connect, listen
from transport.errors import AuthError, DialError, TransportError
from transport.load import system_load
from transport.messages import PeerAddress, PeerList
from transport.schema import Message

log = logging.getLogger(__name__)

DUPLICATE: Final = "duplicate"


@dataclass(frozen=True)
class PeerUp:
    peer: PeerInfo


@dataclass(frozen=True)
class PeerDown:
    node_id: str
    reason: str


MeshEvent = PeerUp | PeerDown


@dataclass(frozen=True)
class MeshConfig:
    host: str = "127.0.0.1"
    port: int = 0
    static_peers: tuple[tuple[str, int], ...] = ()
    connection: ConnectionConfig = field(default_factory=ConnectionConfig)
    dial_timeout: float = 3.0
    answer_wait: float = 1.0  # the larger id waits this long for the smaller one to dial
    retry_min: float = 0.2
    retry_max: float = 5.0
    candidate_attempts: int = 3  # dials of a discovered/gossiped peer before giving up on it
    duplicate_grace: float = 1.0  # wait for the kept connection before reporting a peer down


def dialer_of(peer: PeerInfo, local_id: str) -> str:
    return local_id if peer.dialed else peer.node_id


def keep_new(existing: PeerInfo, new: PeerInfo, local_id: str) -> bool:
    """Whether a second connection to the same peer replaces the first. Both ends decide the
    same way: keep the connection dialed by the smaller node id; on a tie keep the first."""
    preferred = min(local_id, new.node_id)
    return dialer_of(new, local_id) == preferred and dialer_of(existing, local_id) != preferred


class Mesh:
    def __init__(
        self,
        identity: Identity,
        *,
        handler: Handler | None = None,
        config: MeshConfig | None = None,
        load_source: LoadSource = system_load,
        on_event: Callable[[MeshEvent], None] | None = None,
    ) -> None:
        self.identity = identity
        self.config = config or MeshConfig()
        self._handler = handler or refuse_all
        self._load_source = load_source
        self._on_event = on_event or (lambda event: None)
        self._listener: Listener | None = None
        self._conns: dict[str, Connection] = {}
        self._dialing: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def port(self) -> int:
        return self._listener.port if self._listener else 0

    @property
    def peers(self) -> Mapping[str, Connection]:
        """Open connections by peer node id (a read-only view)."""
        return MappingProxyType(self._conns)

    def connection(self, node_id: str) -> Connection | None:
        return self._conns.get(node_id)

    async def start(self) -> None:
        cfg = self.config
        self._listener = await listen(
            cfg.host,
            cfg.port,
            self.identity,
            handler=self._handle,
            config=cfg.connection,
            load_source=self._load_source,
            on_open=self._adopt,
        )
        self.identity = self._listener.identity
        for host, port in cfg.static_peers:
            self._dial(host, port, None, persistent=True)

    async def close(self) -> None:
        self._closing = True
        for task in list(self._dialing.values()) + list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._dialing.values(), *self._tasks, return_exceptions=True)
        await asyncio.gather(*(c.close() for c in list(self._conns.values())))
        if self._listener is not None:
            await self._listener.close()

    def on_discovery(self, event: DiscoveryEvent) -> None:
        """Feed discovery events here (`Discovery(..., on_event=mesh.on_discovery)`)."""
        if isinstance(event, PeerSeen):
            ad = event.advertisement
            for host in ad.addresses[:1]:
                self._dial(host, ad.peer_port, ad.node_id, persistent=False)
        # PeerGone: ignored on purpose; heartbeats decide when a peer is down.

    def add_peer(self, host: str, port: int) -> None:
        """A static peer: dialed now and again whenever its connection drops."""
        self._dial(host, port, None, persistent=True)

    # ----------------------------------------------------------------- dialing

    def _dial(self, host: str, port: int, node_id: str | None, persistent: bool) -> None:
        if self._closing or node_id == self.identity.node_id or node_id in self._conns:
            return
        key = (host, port)
        if key in self._dialing:
            return
        task = asyncio.get_running_loop().create_task(
            self._dial_loop(host, port, node_id, persistent)
        )
        self._dialing[key] = task
        task.add_done_callback(lambda _: self._dialing.pop(key, None))

    async def _dial_loop(self, host: str, port: int, node_id: str | None, persistent: bool) -> None:
        cfg = self.config
        if node_id is not None and node_id > self.identity.node_id and not persistent:
            await asyncio.sleep(cfg.answer_wait)  # let the smaller id dial us first
        delay, failures = cfg.retry_min, 0
        while not self._closing:
            current = self._conns.get(node_id) if node_id else None
            if current is not None:
                if not persistent:
                    return
                await current.wait_closed()
                await asyncio.sleep(cfg.retry_min)
                continue
            try:
                conn = await connect(
                    host,
                    port,
                    self.identity,
                    handler=self._handle,
                    config=cfg.connection,
                    load_source=self._load_source,
                    timeout=cfg.dial_timeout,
                )
            except (DialError, AuthError) as exc:
                failures += 1
                log.log(
                    logging.WARNING if isinstance(exc, AuthError) else logging.DEBUG,
                    "dialing %s:%d failed: %s",
                    host,
                    port,
                    exc,
                )
                if not persistent and failures >= cfg.candidate_attempts:
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, cfg.retry_max)
                continue
            assert conn.peer is not None
            node_id = conn.peer.node_id
            self._adopt(conn)
            if node_id == self.identity.node_id:
                return  # a static peer that is this node itself
            delay, failures = cfg.retry_min, 0
            if not persistent:
                return

    # ----------------------------------------------------------------- membership

    def _adopt(self, conn: Connection) -> None:
        peer = conn.peer
        assert peer is not None
        if self._closing:
            conn.abort()
            return
        if peer.node_id == self.identity.node_id:
            log.info("closing a connection to myself (%s)", conn.address)
            self._spawn(conn.close("to this node itself"))
            return
        existing = self._conns.get(peer.node_id)
        if existing is not None and existing.peer is not None:
            if not keep_new(existing.peer, peer, self.identity.node_id):
                log.debug("second connection to %s: keeping the first", peer.node_id)
                self._spawn(conn.close_with(DUPLICATE, "a connection to this peer exists"))
                return
            log.debug("second connection to %s: replacing the first", peer.node_id)
            self._conns[peer.node_id] = conn
            conn.add_close_callback(self._lost)
            self._spawn(existing.close_with(DUPLICATE, "replaced by the connection to keep"))
            return
        self._conns[peer.node_id] = conn
        conn.add_close_callback(self._lost)
        log.info("peer up: %s", conn.address)
        self._on_event(PeerUp(peer))
        self._share_peers()

    def _lost(self, conn: Connection) -> None:
        peer = conn.peer
        if peer is None or self._conns.get(peer.node_id) is not conn:
            return  # a replaced duplicate
        del self._conns[peer.node_id]
        if self._closing:
            return
        if conn.remote_close_code == DUPLICATE:
            self._spawn(self._down_unless_replaced(peer.node_id, conn))
        else:
            self._report_down(peer.node_id, conn)

    async def _down_unless_replaced(self, node_id: str, conn: Connection) -> None:
        await asyncio.sleep(self.config.duplicate_grace)
        if node_id not in self._conns and not self._closing:
            self._report_down(node_id, conn)

    def _report_down(self, node_id: str, conn: Connection) -> None:
        reason = str(conn.close_error or "closed")
        log.info("peer down: %s (%s)", node_id, reason)
        self._on_event(PeerDown(node_id, reason))

    def _share_peers(self) -> None:
        peers = tuple(
            PeerAddress(c.peer.node_id, c.peer.host, c.peer.listen_port)
            for c in self._conns.values()
            if c.peer is not None and c.peer.listen_port
        )
        for conn in list(self._conns.values()):
            others = tuple(p for p in peers if conn.peer is None or p.node_id != conn.peer.node_id)
            if others:
                self._spawn(_notify_quietly(conn, PeerList(others)))

    async def _handle(self, msg: Message, ctx: Context) -> Message | None:
        if isinstance(msg, PeerList):
            for p in msg.peers:
                self._dial(p.host, p.port, p.node_id, persistent=False)
            return None
        return await self._handler(msg, ctx)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _notify_quietly(conn: Connection, msg: Message) -> None:
    try:
        await conn.notify(msg)
    except TransportError as exc:  # the connection closed meanwhile: the peer list is moot
        log.debug("peer list to %s not sent: %s", conn.address, exc)
