"""One authenticated peer connection: requests and replies, server-pushed streams,
cancellation, flow control, heartbeats and dead-peer detection.

The connection is the asyncio BufferedProtocol itself, so the socket reads straight into the
frame buffers (see `reader.FrameReader`). Life cycle:

    handshake -> open -> closing -> closed

In `handshake` only the auth frames are accepted (see `auth`); anything else closes the
connection before any handler runs. A bad frame at any time gets an `error` frame back and
closes this connection only. Every caller waiting on a connection that closes or whose peer
goes silent gets a `ConnectionClosedError` / `PeerDeadError`, never a hang.

Flow control: work we initiate (requests, notifications, opening streams) waits while the
socket's write buffer is above its high-water mark, so a peer that reads slowly pauses us.
Work we answer (replies, stream items) is bounded instead by the peer: one reply per request
and stream items only against the credit the stream's reader grants as it consumes them. That
split is what keeps two busy peers from deadlocking on each other's full buffers. Inbound
requests run as tasks, at most `max_inflight` at a time; beyond that we stop reading the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import re
import socket
import sys
import termios
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Final, TypeVar, cast

from transport.auth import NONCE_BYTES, ROLE_DIALER, ROLE_LISTENER, ClusterKey, new_nonce
from transport.errors import (
    AuthError,
    ConnectionClosedError,
    FrameError,
    PeerDeadError,
    RemoteError,
    TransportError,
    UnexpectedReplyError,
)
from transport.frames import Codec, Frame, Kind, Limits
from transport.load import system_load
from transport.messages import (
    AUTH_MESSAGES,
    CORE_MESSAGES,
    AuthChallenge,
    AuthHello,
    AuthOk,
    AuthProof,
    Cancel,
    Credit,
    Error,
    Heartbeat,
    Load,
    Ping,
    Pong,
    StreamEnd,
)
from transport.reader import FrameReader
from transport.schema import Message, Registry

log = logging.getLogger(__name__)

# Enum attribute lookups cost ~160 ns each on Python 3.11; these are used for every frame.
_NOTIFY, _REQUEST, _REPLY, _STREAM, _ITEM, _END = (
    Kind.NOTIFY,
    Kind.REQUEST,
    Kind.REPLY,
    Kind.STREAM,
    Kind.ITEM,
    Kind.END,
)

M = TypeVar("M", bound=Message)
NODE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

HANDSHAKE, OPEN, CLOSING, CLOSED = "handshake", "open", "closing", "closed"
_HANDLER_TASK: Final = "sled handler"


@dataclass(frozen=True)
class Timing:
    heartbeat_interval: float = 0.5
    dead_after: float = 2.0  # silence after which the peer is declared dead
    handshake_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.dead_after:
            raise ValueError("need 0 < heartbeat_interval < dead_after")


@dataclass(frozen=True)
class ConnectionConfig:
    registry: Registry = CORE_MESSAGES
    limits: Limits = field(default_factory=Limits)
    timing: Timing = field(default_factory=Timing)
    stream_window: int = 16  # stream items in flight before the writer waits for credit
    max_inflight: int = 64  # inbound handler tasks before we stop reading the socket
    write_high: int = 4 * 1024 * 1024  # write buffer bytes above which our own sends wait
    write_low: int = 1024 * 1024
    # SO_SNDBUF (the kernel doubles it for its bookkeeping); None keeps its autotuning (up
    # to tcp_wmem's 4 MiB). A bounded socket buffer keeps the sender from copying frames
    # far ahead of the reader: the receiver then copies bytes that are still in cache.
    # It also caps a connection at ~1 MiB in flight: ~1 GB/s at a 1 ms round trip.
    # Figures in transport/README.md (bench).
    send_buffer: int | None = 512 * 1024
    # Most bytes of a large frame to wait for in one wakeup (SO_RCVLOWAT, see
    # Connection._wake_at). It must stay well below what the peer can have unacknowledged
    # (its send buffer): a reader waiting for more stalls each frame until its delayed-ACK
    # timer fires (~3 ms per 1.5 MiB frame here). The peer's buffer is unknown; nodes of a
    # cluster share their config, so a connection also waits for at most half its own
    # send_buffer (a quarter of what the kernel makes of it).
    wake_bytes: int = 128 * 1024

    def __post_init__(self) -> None:
        if self.send_buffer is not None and self.send_buffer <= 0:
            raise ValueError("send_buffer must be positive or None")
        if self.wake_bytes < 1:
            raise ValueError("wake_bytes must be at least 1")


@dataclass(frozen=True)
class Identity:
    """This node as it presents itself in the handshake."""

    node_id: str
    key: ClusterKey
    listen_port: int = 0  # 0: not listening
    api_port: int = 0
    capabilities: str = ""

    def __post_init__(self) -> None:
        if not valid_node_id(self.node_id):
            raise ValueError(f"node id {self.node_id!r}: use 1-63 of A-Z a-z 0-9 _ . -")


@dataclass(frozen=True)
class PeerInfo:
    """The authenticated peer at the other end."""

    node_id: str
    host: str
    listen_port: int
    api_port: int
    capabilities: str
    dialed: bool  # True when this side opened the connection


def valid_node_id(node_id: str) -> bool:
    return NODE_ID_PATTERN.fullmatch(node_id) is not None


class Refused(TransportError):
    """Raise in a handler to answer the request with an `error` message of this code."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text


Handler = Callable[[Message, "Context"], Awaitable[Message | None]]
LoadSource = Callable[[], Load]


async def refuse_all(msg: Message, ctx: Context) -> Message | None:
    """Handler of connections that serve nothing (plain clients)."""
    raise Refused("no_handler", f"this node serves no {type(msg).__name__} requests")


class _Credit:
    """Stream items the reader has allowed us to send."""

    def __init__(self) -> None:
        self.available = 0
        self.changed = asyncio.Event()


class Context:
    """What a handler gets with the message: who asked, and `push` for streams."""

    __slots__ = ("connection", "request_id", "kind")  # one per handled frame: cheap to build

    def __init__(self, conn: Connection, request_id: int, kind: Kind) -> None:
        self.connection = conn
        self.request_id = request_id
        self.kind = kind

    @property
    def peer(self) -> PeerInfo:
        assert self.connection.peer is not None  # handlers run only on open connections
        return self.connection.peer

    @property
    def is_stream(self) -> bool:
        return self.kind is _STREAM

    async def push(self, msg: Message) -> None:
        """Sends one stream item, waiting while the reader has no credit left."""
        if not self.is_stream:
            raise TransportError("push() is only for requests opened with Connection.stream()")
        await self.connection._push(self.request_id, msg)


class Stream:
    """Client side of a server-pushed stream; `async with conn.stream(msg) as s: async for ...`.

    Leaving the block early cancels the stream at the peer.
    """

    def __init__(self, conn: Connection, msg: Message, window: int) -> None:
        if window < 1:
            raise ValueError("stream window must be >= 1")
        self._conn = conn
        self._msg = msg
        self.window = window
        self.request_id = 0
        self._queue: asyncio.Queue[Message | BaseException] = asyncio.Queue()
        self._consumed = 0
        self._done = False

    async def __aenter__(self) -> Stream:
        conn = self._conn
        self.request_id = conn._new_id()
        conn._streams[self.request_id] = self
        try:
            await conn._send(_STREAM, self.request_id, self._msg)
            conn._write(_NOTIFY, self.request_id, Credit(self.window))
        except BaseException:
            conn._streams.pop(self.request_id, None)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self._done:
            self._done = True
            self._conn._streams.pop(self.request_id, None)
            self._conn._cancel_remote(self.request_id)

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> Message:
        if self._done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, Message) and not isinstance(item, (StreamEnd, Error)):
            self._consumed += 1
            if self._consumed * 2 >= self.window:
                self._conn._write_quietly(_NOTIFY, self.request_id, Credit(self._consumed))
                self._consumed = 0
            return item
        self._done = True
        self._conn._streams.pop(self.request_id, None)
        if isinstance(item, StreamEnd):
            raise StopAsyncIteration
        if isinstance(item, Error):
            raise RemoteError(item.code, item.text)
        raise item

    def _deliver(self, item: Message | BaseException) -> bool:
        """Queues an item; False if the peer overran the credit it was given."""
        self._queue.put_nowait(item)
        return self._queue.qsize() <= self.window + 1


class Connection(asyncio.BufferedProtocol):
    def __init__(
        self,
        identity: Identity,
        handler: Handler | None = None,
        config: ConnectionConfig | None = None,
        *,
        dialer: bool,
        host: str = "",
        load_source: LoadSource = system_load,
        on_open: Callable[[Connection], None] | None = None,
    ) -> None:
        self.identity = identity
        self.config = config or ConnectionConfig()
        self._handler = handler or refuse_all
        self._dialer = dialer
        self._host = host
        self._load_source = load_source
        self._on_open = on_open
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reader = FrameReader(self.config.limits)
        # The protocol's get_buffer is the reader's own: one Python call less per socket read.
        self.get_buffer = self._reader.get_buffer  # type: ignore[method-assign]
        self._socket: socket.socket | None = None  # for SO_RCVLOWAT (Linux), see _wake_at
        self._rcvlowat = 1
        wake, send_buffer = self.config.wake_bytes, self.config.send_buffer
        self._wake_bytes = wake if send_buffer is None else max(1, min(wake, send_buffer // 2))
        self._inq_seen = -1
        self._codec = Codec(self.config.registry, self.config.limits)
        self._state = HANDSHAKE
        self._ready: asyncio.Future[None] = self._loop.create_future()
        self._closed: asyncio.Future[None] = self._loop.create_future()
        self._close_error: TransportError | None = None
        self._close_callbacks: list[Callable[[Connection], None]] = []
        self._nonce = new_nonce()
        self._peer_hello: AuthHello | None = None
        self.peer: PeerInfo | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._streams: dict[int, Stream] = {}
        self._credits: dict[int, _Credit] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._notify_tasks: dict[int, asyncio.Task[None]] = {}  # by a sequence number
        self._notify_seq = itertools.count()
        self._writable = asyncio.Event()
        self._writable.set()
        self._can_write = True  # _writable.is_set(), read without a call on every send
        self._reading_paused = False
        self._last_rx = self._loop.time()
        # Reads so far: the heartbeat loop turns a change into `_last_rx` (one clock read per
        # tick instead of one per read).
        self._reads = 0
        self._reads_seen = 0
        self._timers: list[asyncio.TimerHandle] = []
        self._heartbeat_task: asyncio.Task[None] | None = None
        self.peer_load: Load | None = None
        self.remote_close_code = ""  # code of the `error` the peer sent before closing, if any
        self._remote_close_text = ""
        self.frames_received = 0
        self.app_frames_handled = 0  # frames given to the handler (auth tests count these)

    # ----------------------------------------------------------------- public API

    @property
    def is_open(self) -> bool:
        return self._state == OPEN

    @property
    def close_error(self) -> TransportError | None:
        """Why the connection closed (None while it is open)."""
        return self._close_error

    @property
    def address(self) -> str:
        peer = self.peer
        name = peer.node_id if peer else "?"
        if self._transport is None:
            return name
        sock = self._transport.get_extra_info("peername")
        return f"{name}@{sock[0]}:{sock[1]}" if sock else name

    async def wait_ready(self) -> None:
        """Returns once authenticated; raises AuthError / ConnectionClosedError otherwise."""
        await asyncio.shield(self._ready)

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed)

    def add_close_callback(self, callback: Callable[[Connection], None]) -> None:
        """Called once, from the event loop, when the connection has closed."""
        if self._closed.done():
            self._loop.call_soon(callback, self)
        else:
            self._close_callbacks.append(callback)

    async def request(self, msg: Message, expect: type[M], *, timeout: float | None = None) -> M:
        """Sends a request and returns its reply, which must be an `expect`.

        Raises RemoteError if the peer answered with an error, TimeoutError after `timeout`
        seconds, ConnectionClosedError / PeerDeadError if the connection ends first.
        Cancelling the caller cancels the request at the peer.
        """
        rid = next(self._ids)
        future: asyncio.Future[Message] = self._loop.create_future()
        self._pending[rid] = future
        sent = False
        try:
            if self._state != OPEN:
                raise self._not_open()
            self._write(_REQUEST, rid, msg)  # inlined _send: this is the round-trip path
            sent = True
            if not self._can_write:
                await self._wait_writable()
            reply = await (future if timeout is None else asyncio.wait_for(future, timeout))
        except BaseException:
            self._abandon(rid, sent)
            raise
        if type(reply) is not expect:
            if isinstance(reply, Error) and expect is not Error:
                raise RemoteError(reply.code, reply.text)
            if not isinstance(reply, expect):
                raise UnexpectedReplyError(
                    f"{self.address} answered {type(msg).__name__} with "
                    f"{type(reply).__name__}, expected {expect.__name__}"
                )
        return reply

    def stream(self, msg: Message, *, window: int | None = None) -> Stream:
        """Opens a server-pushed stream: `async with conn.stream(msg) as s: async for item in s`."""
        return Stream(self, msg, window or self.config.stream_window)

    async def notify(self, msg: Message) -> None:
        """Sends a one-way message (waits only while the peer reads slower than we write)."""
        await self._send(_NOTIFY, 0, msg)

    async def ping(self, timeout: float | None = None) -> float:
        """Round-trip time in seconds of a ping answered by the peer's connection itself.

        `request(Ping(nonce), Pong)` with the request id as nonce, written from its one field
        (no Ping object, no generic encode) and in this coroutine (no second one): pings
        measure the round trip and probe liveness, so they take the shortest path.
        """
        start = time.perf_counter()
        rid = next(self._ids)
        future: asyncio.Future[Message] = self._loop.create_future()
        self._pending[rid] = future
        sent = False
        try:
            if self._state != OPEN or self._transport is None:
                raise self._not_open()
            self._transport.write(self._codec.encode_fields(_REQUEST, rid, Ping, {"nonce": rid}))
            sent = True
            if not self._can_write:
                await self._wait_writable()
            reply = await (future if timeout is None else asyncio.wait_for(future, timeout))
        except BaseException:
            self._abandon(rid, sent)
            raise
        if type(reply) is not Pong or reply.nonce != rid:
            if isinstance(reply, Error):
                raise RemoteError(reply.code, reply.text)
            raise UnexpectedReplyError(f"{self.address} answered ping {rid} with {reply}")
        return time.perf_counter() - start

    def _abandon(self, rid: int, sent: bool) -> None:
        """A request given up before its reply (cancelled, timed out, failed): forget it and,
        if it went out, tell the peer to stop working on it."""
        if self._pending.pop(rid, None) is not None and sent:
            self._cancel_remote(rid)

    async def close(self, reason: str = "closed locally", timeout: float = 1.0) -> None:
        """Flushes what was written, then closes; aborts if the peer does not read in time."""
        self._shutdown(ConnectionClosedError(f"connection to {self.address} {reason}"))
        await self._wait_flushed(timeout)

    async def close_with(self, code: str, text: str, timeout: float = 1.0) -> None:
        """Closes after telling the peer why (an `error` notification it records as
        `remote_close_code`)."""
        self._shutdown(
            ConnectionClosedError(f"connection to {self.address} closed: {text}"),
            send=Error(code, text),
        )
        await self._wait_flushed(timeout)

    async def _wait_flushed(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self.wait_closed(), timeout)
        except TimeoutError:
            if self._transport is not None:
                self._transport.abort()
            await self.wait_closed()

    def abort(self, error: TransportError | None = None) -> None:
        """Drops the connection now, without flushing."""
        self._shutdown(
            error or ConnectionClosedError(f"connection to {self.address} aborted"), abort=True
        )

    # ----------------------------------------------------------------- asyncio protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        config = self.config
        transport.set_write_buffer_limits(high=config.write_high, low=config.write_low)
        sock = transport.get_extra_info("socket")
        if config.send_buffer is not None and sock is not None:
            with contextlib.suppress(OSError):  # not a TCP socket, or refused: autotuning
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, config.send_buffer)
        if sys.platform == "linux" and sock is not None and sock.type == socket.SOCK_STREAM:
            # Our own socket object on a duplicate descriptor (closed with the connection, see
            # _drop_socket): setting an option through the transport's pseudo-socket builds a
            # socket object and calls getsockname every time, twice per large frame.
            with contextlib.suppress(OSError):
                self._socket = socket.socket(fileno=os.dup(sock.fileno()))
        self._last_rx = self._loop.time()
        self._timers.append(
            self._loop.call_later(self.config.timing.handshake_timeout, self._handshake_expired)
        )
        if self._dialer:
            me = self.identity
            self._write(
                _NOTIFY,
                0,
                AuthHello(me.node_id, self._nonce, me.listen_port, me.api_port, me.capabilities),
            )

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._reader.get_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self._reads += 1
        reader = self._reader
        try:
            bodies = reader.feed(nbytes)
        except FrameError as exc:
            self._violation(exc)
            return
        if (reader.filling or self._rcvlowat != 1) and self._socket is not None:
            self._wake_at(min(reader.missing, self._wake_bytes) or 1)
        decode = self._codec.decode
        for body in bodies:
            if self._state not in (HANDSHAKE, OPEN):
                return
            try:
                frame = decode(body)
            except FrameError as exc:
                self._violation(exc)
                return
            self.frames_received += 1
            if self._state != OPEN:
                self._handshake_step(frame)
            elif frame[0] is _REPLY:  # resolved right here: the round-trip path
                future = self._pending.pop(frame[1], None)
                if future is not None and not future.done():
                    future.set_result(frame[2])
            else:
                self._dispatch(frame)
        if reader.large_frame_done and self._state == OPEN:
            # uvloop reads on while data is there (up to 32 reads per wakeup): let the handlers
            # run first, so that the next large frame can reuse the buffer they release.
            self._pause_reading()
            self._loop.call_soon(self._resume_reading)

    def _wake_at(self, nbytes: int) -> None:
        """Has the kernel wake us only once `nbytes` are queued (SO_RCVLOWAT) while a large
        frame arrives: one read per large frame instead of one per burst of segments. Set back
        to 1 between frames, so that a small frame is never held back."""
        if nbytes == self._rcvlowat or self._socket is None:
            return
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, nbytes)
        except OSError:  # not supported here: read as data comes
            self._drop_socket()
            return
        self._rcvlowat = nbytes

    def _drop_socket(self) -> None:
        """Closes our duplicate descriptor: before the transport closes its own (so that the
        peer sees the close or reset then, not when we let go), or once it has."""
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    def _still_receiving(self) -> bool:
        """While we wait for a large frame's bytes (SO_RCVLOWAT above 1) no read counts as the
        peer's sign of life; bytes piling up in the socket do."""
        if self._rcvlowat == 1 or self._socket is None:
            return False
        try:
            queued = int.from_bytes(
                fcntl.ioctl(self._socket.fileno(), termios.FIONREAD, bytes(4)), sys.byteorder
            )
        except OSError:
            return False
        grew, self._inq_seen = queued != self._inq_seen, queued
        return grew

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def pause_writing(self) -> None:
        self._can_write = False
        self._writable.clear()

    def resume_writing(self) -> None:
        self._can_write = True
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._close_error is None:
            if exc is not None:
                detail = f"{type(exc).__name__}: {exc}"
            elif self.remote_close_code:
                detail = f"closed by the peer: {self.remote_close_code}: {self._remote_close_text}"
            else:
                detail = "closed by the peer"
            self._close_error = ConnectionClosedError(
                f"connection to {self.address} lost ({detail})"
            )
        self._state = CLOSED
        self._drop_socket()
        self._fail_waiters(self._close_error)
        for task in list(self._tasks.values()) + list(self._notify_tasks.values()):
            task.cancel()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
        self._can_write = True
        self._writable.set()
        if not self._closed.done():
            self._closed.set_result(None)
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            callback(self)

    # ----------------------------------------------------------------- handshake

    def _handshake_step(self, frame: Frame) -> None:
        msg = frame.message
        if type(msg).__sled_schema__.name not in AUTH_MESSAGES or frame.kind is not _NOTIFY:
            self._violation(
                FrameError("auth_required", f"{type(msg).__name__} before authentication")
            )
            return
        if isinstance(msg, Error):
            self._auth_failed(
                AuthError(f"{self.address} refused the connection: {msg.code}: {msg.text}")
            )
            return
        try:
            if self._dialer:
                self._dialer_step(msg)
            else:
                self._listener_step(msg)
        except AuthError as exc:
            self._auth_failed(exc, tell_peer=True)

    def _listener_step(self, msg: Message) -> None:
        key = self.identity.key
        if isinstance(msg, AuthHello) and self._peer_hello is None:
            _check_hello(msg.node_id, msg.nonce)
            self._peer_hello = msg
            proof = key.proof(
                ROLE_LISTENER, (msg.node_id, msg.nonce), (self.identity.node_id, self._nonce)
            )
            me = self.identity
            self._write(
                _NOTIFY,
                0,
                AuthChallenge(
                    me.node_id, self._nonce, proof, me.listen_port, me.api_port, me.capabilities
                ),
            )
        elif isinstance(msg, AuthProof) and self._peer_hello is not None:
            hello = self._peer_hello
            if not key.verify(
                msg.proof,
                ROLE_DIALER,
                (hello.node_id, hello.nonce),
                (self.identity.node_id, self._nonce),
            ):
                raise AuthError(
                    f"peer {hello.node_id} failed the cluster-key challenge (its key differs)"
                )
            self._write(_NOTIFY, 0, AuthOk())
            self._opened(hello.node_id, hello.listen_port, hello.api_port, hello.capabilities)
        else:
            raise AuthError(f"unexpected {type(msg).__name__} during the handshake")

    def _dialer_step(self, msg: Message) -> None:
        key = self.identity.key
        if isinstance(msg, AuthChallenge) and self._peer_hello is None:
            _check_hello(msg.node_id, msg.nonce)
            me, peer = (self.identity.node_id, self._nonce), (msg.node_id, msg.nonce)
            if not key.verify(msg.proof, ROLE_LISTENER, me, peer):
                raise AuthError(
                    f"peer {msg.node_id} at {self._host} does not know the cluster key "
                    "(keys differ: check SLED_CLUSTER_KEY on both nodes)"
                )
            self._peer_hello = AuthHello(
                msg.node_id, msg.nonce, msg.listen_port, msg.api_port, msg.capabilities
            )
            self._write(_NOTIFY, 0, AuthProof(key.proof(ROLE_DIALER, me, peer)))
        elif isinstance(msg, AuthOk) and self._peer_hello is not None:
            hello = self._peer_hello
            self._opened(hello.node_id, hello.listen_port, hello.api_port, hello.capabilities)
        else:
            raise AuthError(f"unexpected {type(msg).__name__} during the handshake")

    def _opened(self, node_id: str, listen_port: int, api_port: int, capabilities: str) -> None:
        host = self._host
        if not host and self._transport is not None:
            sock = self._transport.get_extra_info("peername")
            host = sock[0] if sock else ""
        self.peer = PeerInfo(node_id, host, listen_port, api_port, capabilities, self._dialer)
        self._state = OPEN
        self._last_rx = self._loop.time()
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self._heartbeat_task = self._loop.create_task(self._heartbeat_loop())
        if not self._ready.done():
            self._ready.set_result(None)
        if self._on_open is not None:
            self._on_open(self)

    def _auth_failed(self, error: AuthError, tell_peer: bool = False) -> None:
        log.warning("authentication with %s failed: %s", self.address, error)
        reply = Error("auth_failed", str(error)) if tell_peer else None
        self._shutdown(error, send=reply)

    def _handshake_expired(self) -> None:
        if self._state == HANDSHAKE:
            self._auth_failed(
                AuthError(
                    f"{self.address} did not complete the handshake in "
                    f"{self.config.timing.handshake_timeout:.1f}s"
                )
            )

    # ----------------------------------------------------------------- dispatch

    def _dispatch(self, frame: Frame) -> None:
        """Everything but replies, which buffer_updated resolves itself."""
        kind, rid, msg = frame
        if kind is _REQUEST and isinstance(msg, Ping):
            # Answered here, inline (_write_quietly's job), with the checked nonce as the pong's
            # only field: the round-trip path.
            if self._state == OPEN and self._transport is not None:
                self._transport.write(
                    self._codec.encode_fields(_REPLY, rid, Pong, {"nonce": msg.nonce})
                )
        elif kind is _ITEM or kind is _END:
            if (kind is _END) != isinstance(msg, (StreamEnd, Error)):
                self._violation(
                    FrameError("bad_frame", "only a stream's end carries stream_end or error")
                )
                return
            stream = self._streams.get(rid)
            if stream is not None and not stream._deliver(msg):
                self._violation(FrameError("flow_control", f"stream {rid} overran its credit"))
        elif kind is _NOTIFY and isinstance(msg, (Heartbeat, Credit, Cancel, Error)):
            self._control(rid, msg)
        elif type(msg).__sled_schema__.name in AUTH_MESSAGES and not isinstance(msg, Error):
            self._violation(FrameError("bad_frame", f"{type(msg).__name__} after authentication"))
        elif kind is _REQUEST or kind is _STREAM or kind is _NOTIFY:
            self._start_handler(kind, rid, msg)

    def _control(self, rid: int, msg: Message) -> None:
        if isinstance(msg, Heartbeat):
            self.peer_load = msg.load
        elif isinstance(msg, Credit):
            if msg.items < 1:
                self._violation(FrameError("flow_control", f"credit of {msg.items} items"))
                return
            credit = self._credits.get(rid)
            if credit is not None:
                credit.available += msg.items
                credit.changed.set()
        elif isinstance(msg, Cancel):
            task = self._tasks.get(rid)
            if task is not None:
                task.cancel()
        elif isinstance(msg, Error):  # the peer says why it is about to close
            self.remote_close_code = msg.code
            self._remote_close_text = msg.text

    def _start_handler(self, kind: Kind, rid: int, msg: Message) -> None:
        if kind is not _NOTIFY and rid in self._tasks:
            self._violation(FrameError("bad_frame", f"request id {rid} reused while in flight"))
            return
        if kind is _STREAM:
            self._credits[rid] = _Credit()
        if kind is _NOTIFY:
            seq = next(self._notify_seq)
            self._notify_tasks[seq] = self._new_task(self._run_handler(kind, rid, msg, seq))
        else:
            self._tasks[rid] = self._new_task(self._run_handler(kind, rid, msg))
        if len(self._tasks) + len(self._notify_tasks) >= self.config.max_inflight:
            self._pause_reading()

    def _new_task(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        # A Task named up front: without a name, each Task formats "Task-<n>" for itself
        # (a measurable share of the per-frame cost on the receiving end).
        if self._loop.get_task_factory() is None:
            return asyncio.Task(coro, loop=self._loop, name=_HANDLER_TASK)
        return self._loop.create_task(coro)

    async def _run_handler(self, kind: Kind, rid: int, msg: Message, seq: int = 0) -> None:
        ctx = Context(self, rid, kind)
        self.app_frames_handled += 1
        reply: Message | None
        try:
            try:
                result = await self._handler(msg, ctx)
            except Refused as exc:
                reply = Error(exc.code, exc.text)
            except Exception as exc:  # the handler's bug must not take the connection down
                log.exception("handler for %s from %s failed", type(msg).__name__, self.address)
                reply = Error("handler_failed", f"{type(exc).__name__}: {exc}")
            else:
                reply = result
                if kind is _REQUEST and result is None:
                    reply = Error(
                        "no_reply", f"the handler of {type(msg).__name__} returned nothing"
                    )
            if kind is _REQUEST:
                assert reply is not None
                self._write_quietly(_REPLY, rid, reply)
            elif kind is _STREAM:
                if reply is not None and not isinstance(reply, Error):
                    await self._push(rid, reply)
                    reply = None
                self._write_quietly(_END, rid, reply or StreamEnd())
        except (ConnectionClosedError, asyncio.CancelledError):
            pass  # the peer is gone or cancelled the request: nobody to answer
        except FrameError as exc:  # the handler returned a message we cannot encode
            log.error(
                "cannot send the reply to %s from %s: %s", type(msg).__name__, self.address, exc
            )
            self._write_quietly(_END if kind is _STREAM else _REPLY, rid, Error(exc.code, exc.text))
        finally:
            if kind is _NOTIFY:
                self._notify_tasks.pop(seq, None)
            else:
                self._tasks.pop(rid, None)
                if kind is _STREAM:
                    self._credits.pop(rid, None)
            if (
                self._reading_paused
                and len(self._tasks) + len(self._notify_tasks) < self.config.max_inflight
            ):
                self._resume_reading()

    async def _push(self, rid: int, msg: Message) -> None:
        credit = self._credits.get(rid)
        while True:
            if self._state != OPEN or credit is None:
                raise self._closed_error()
            if credit.available > 0:
                break
            credit.changed.clear()
            await credit.changed.wait()
        credit.available -= 1
        self._write(_ITEM, rid, msg)

    # ----------------------------------------------------------------- sending

    def _new_id(self) -> int:
        return next(self._ids)

    def _closed_error(self) -> TransportError:
        return self._close_error or ConnectionClosedError(
            f"connection to {self.address} is not open"
        )

    def _write(self, kind: Kind, rid: int, msg: Message) -> None:
        """Queues a frame without waiting (FrameError if the message is invalid)."""
        transport = self._transport
        if transport is None or self._state in (CLOSING, CLOSED):
            raise self._closed_error()
        data = self._codec.encode_small(kind, rid, msg)
        if data is not None:
            transport.write(data)
            return
        buffers = self._codec.encode_tensors(kind, rid, msg)
        if len(buffers) == 1:
            transport.write(buffers[0])
        else:
            transport.writelines(buffers)

    def _write_quietly(self, kind: Kind, rid: int, msg: Message) -> None:
        """Like _write, for control frames whose loss a closing connection makes moot."""
        try:  # noqa: SIM105 (hot path: contextlib.suppress costs a context manager per frame)
            self._write(kind, rid, msg)
        except ConnectionClosedError:
            pass

    async def _send(self, kind: Kind, rid: int, msg: Message) -> None:
        if self._state != OPEN:
            raise self._not_open()
        self._write(kind, rid, msg)
        if not self._can_write:
            await self._wait_writable()

    async def _wait_writable(self) -> None:
        await self._writable.wait()
        if self._state != OPEN:
            raise self._closed_error()

    def _not_open(self) -> TransportError:
        if self._state == HANDSHAKE:
            return ConnectionClosedError(f"connection to {self.address} is not authenticated yet")
        return self._closed_error()

    def _cancel_remote(self, rid: int) -> None:
        if self._state == OPEN:
            self._write_quietly(_NOTIFY, rid, Cancel())

    # ----------------------------------------------------------------- liveness and closing

    async def _heartbeat_loop(self) -> None:
        timing = self.config.timing
        tick = timing.heartbeat_interval / 2
        next_beat = 0.0
        while self._state == OPEN:
            now = self._loop.time()
            if self._reads != self._reads_seen or self._still_receiving():
                self._reads_seen = self._reads
                self._last_rx = now
            silent = now - self._last_rx
            if not self._reading_paused and silent > timing.dead_after:
                self._shutdown(
                    PeerDeadError(f"peer {self.address} sent nothing for {silent:.1f}s"), abort=True
                )
                return
            if now >= next_beat:
                next_beat = now + timing.heartbeat_interval
                self._write_quietly(_NOTIFY, 0, Heartbeat(self._load(), time.time()))
            await asyncio.sleep(tick)

    def _load(self) -> Load:
        try:
            return self._load_source()
        except Exception:  # a broken load source must not stop heartbeats
            log.exception("load source failed; sending empty load figures")
            return Load()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if not self._reading_paused:  # the usual case for the call after a large frame
            return
        if len(self._tasks) + len(self._notify_tasks) >= self.config.max_inflight:
            return  # still saturated: the last handler to finish resumes
        if self._transport is not None and self._state == OPEN:
            self._reading_paused = False
            self._last_rx = self._loop.time()  # we were not listening: no silence to count
            self._transport.resume_reading()

    def _violation(self, error: FrameError) -> None:
        log.warning("closing connection to %s: %s", self.address, error)
        self._shutdown(
            ConnectionClosedError(f"connection to {self.address} closed: bad frame ({error})"),
            send=Error(error.code, error.text),
        )

    def _shutdown(
        self, error: TransportError, *, send: Message | None = None, abort: bool = False
    ) -> None:
        if self._state in (CLOSING, CLOSED):
            return
        self._state = CLOSING
        self._close_error = error
        for timer in self._timers:
            timer.cancel()
        self._fail_waiters(error)
        if self._transport is None:  # never connected: nothing to flush or wait for
            self._state = CLOSED
            if not self._closed.done():
                self._closed.set_result(None)
            return
        if send is not None and not abort:
            with contextlib.suppress(FrameError, RuntimeError):
                self._transport.writelines(self._codec.encode(_NOTIFY, 0, send))
        self._drop_socket()
        if abort:
            self._transport.abort()
        else:
            self._transport.close()

    def _fail_waiters(self, error: TransportError) -> None:
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: nobody may be waiting for it
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._deliver(error)
        for credit in self._credits.values():
            credit.changed.set()
        self._can_write = True
        self._writable.set()


def _check_hello(node_id: str, nonce: bytes) -> None:
    if not valid_node_id(node_id):
        raise AuthError(f"peer sent an invalid node id {node_id!r}")
    if len(nonce) != NONCE_BYTES:
        raise AuthError(f"peer sent a {len(nonce)}-byte nonce, expected {NONCE_BYTES}")
