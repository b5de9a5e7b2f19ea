"""Connections over loopback: requests, streams, cancellation, flow control, heartbeats,
dead peers, bad frames."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from transport.auth import ClusterKey
from transport.connection import (
    Connection,
    ConnectionConfig,
    Context,
    Identity,
    Refused,
    Timing,
)
from transport.endpoint import Listener, connect, listen
from transport.errors import (
    ConnectionClosedError,
    DialError,
    PeerDeadError,
    RemoteError,
    TransportError,
    UnexpectedReplyError,
)
from transport.frames import (
    PREFIX,
    Frame,
    Kind,
    Limits,
    body_length,
    decode_body,
    encode_frame_bytes,
)
from transport.messages import (
    CORE_MESSAGES,
    Cancel,
    Error,
    Heartbeat,
    Load,
    Ping,
    Pong,
    Tokens,
)
from transport.runtime import run
from transport.schema import Message

KEY = ClusterKey.from_secret("connection-tests")
FAST = ConnectionConfig(
    timing=Timing(heartbeat_interval=0.1, dead_after=0.5, handshake_timeout=2.0)
)


@dataclass
class Server:
    """A test handler with knobs and counters."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    handled: int = 0
    pushed: int = 0
    active: int = 0
    max_active: int = 0

    async def __call__(self, msg: Message, ctx: Context) -> Message | None:
        self.handled += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            return await self._serve(msg, ctx)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        finally:
            self.active -= 1

    async def _serve(self, msg: Message, ctx: Context) -> Message | None:
        assert isinstance(msg, Tokens)
        command = msg.session_id
        if command == "double":
            return Tokens("doubled", msg.tokens * 2)
        if command == "refuse":
            raise Refused("busy", "try another node")
        if command == "crash":
            raise ValueError("handler bug")
        if command == "nothing":
            return None
        if command == "wrong_type":
            return Pong(1)
        if command == "block":
            await asyncio.wait_for(self.release.wait(), 10)
            return Tokens("released", msg.tokens)
        if command == "count":
            for i in range(int(msg.tokens[0])):
                await ctx.push(Tokens("item", np.array([i])))
                self.pushed += 1
            return Tokens("last", np.array([-1]))
        raise Refused("unknown", command)


@pytest.fixture
async def server() -> AsyncIterator[tuple[Server, Listener]]:
    handler = Server()
    listener = await listen("127.0.0.1", 0, Identity("server", KEY), handler=handler, config=FAST)
    yield handler, listener
    await listener.close()


async def dial(listener: Listener, name: str = "client", **kwargs: object) -> Connection:
    return await connect("127.0.0.1", listener.port, Identity(name, KEY), config=FAST, **kwargs)  # type: ignore[arg-type]


async def test_request_reply_and_every_failure_mode(server: tuple[Server, Listener]) -> None:
    _, listener = server
    conn = await dial(listener)
    assert conn.peer is not None and conn.peer.node_id == "server" and conn.peer.dialed
    reply = await conn.request(Tokens("double", np.arange(5)), Tokens)
    assert reply.session_id == "doubled" and reply.tokens.tolist() == [0, 2, 4, 6, 8]
    with pytest.raises(RemoteError) as info:
        await conn.request(Tokens("refuse", np.zeros(1)), Tokens)
    assert (info.value.code, info.value.text) == ("busy", "try another node")
    with pytest.raises(RemoteError, match="handler_failed: ValueError: handler bug"):
        await conn.request(Tokens("crash", np.zeros(1)), Tokens)
    with pytest.raises(RemoteError, match="no_reply"):
        await conn.request(Tokens("nothing", np.zeros(1)), Tokens)
    with pytest.raises(UnexpectedReplyError, match="expected Tokens"):
        await conn.request(Tokens("wrong_type", np.zeros(1)), Tokens)
    assert 0 < await conn.ping() < 1.0
    # The connection survived all of that.
    assert (await conn.request(Tokens("double", np.ones(1)), Tokens)).tokens.tolist() == [2.0]
    await conn.close()
    with pytest.raises(ConnectionClosedError):
        await conn.request(Ping(1), Pong)


async def test_stream_respects_the_readers_window(server: tuple[Server, Listener]) -> None:
    handler, listener = server
    conn = await dial(listener)
    got = []
    max_outstanding = 0
    async with conn.stream(Tokens("count", np.array([40])), window=4) as items:
        async for item in items:
            assert isinstance(item, Tokens)
            got.append(int(item.tokens[0]))
            await asyncio.sleep(0.005)  # a slow reader
            max_outstanding = max(max_outstanding, handler.pushed - len(got))
    assert got == [*range(40), -1]
    assert max_outstanding <= 4  # the writer never ran more than a window ahead


async def test_leaving_a_stream_early_cancels_it_at_the_peer(
    server: tuple[Server, Listener],
) -> None:
    handler, listener = server
    conn = await dial(listener)
    async with conn.stream(Tokens("count", np.array([10_000])), window=2) as items:
        async for item in items:
            assert isinstance(item, Tokens)
            if item.tokens[0] == 3:
                break
    await asyncio.wait_for(handler.cancelled.wait(), 2)
    assert handler.pushed < 10
    assert (await conn.request(Tokens("double", np.ones(1)), Tokens)).tokens.tolist() == [2.0]


async def test_stream_errors_reach_the_reader(server: tuple[Server, Listener]) -> None:
    _, listener = server
    conn = await dial(listener)
    with pytest.raises(RemoteError, match="busy"):
        async with conn.stream(Tokens("refuse", np.zeros(1))) as items:
            async for _ in items:
                pass


async def test_cancelling_a_request_cancels_the_handler(server: tuple[Server, Listener]) -> None:
    handler, listener = server
    conn = await dial(listener)
    task = asyncio.create_task(conn.request(Tokens("block", np.zeros(1)), Tokens))
    await asyncio.sleep(0.1)
    task.cancel()
    await asyncio.wait_for(handler.cancelled.wait(), 2)
    with pytest.raises(TimeoutError):
        await conn.request(Tokens("block", np.zeros(1)), Tokens, timeout=0.2)
    assert await conn.ping() > 0


async def test_heartbeats_carry_load_figures() -> None:
    load = Load(queue_depth=3, active_sessions=2, free_memory=123, load_avg=0.5)
    listener = await listen(
        "127.0.0.1", 0, Identity("server", KEY), config=FAST, load_source=lambda: load
    )
    try:
        conn = await dial(listener)
        for _ in range(50):
            if conn.peer_load is not None:
                break
            await asyncio.sleep(0.02)
        assert conn.peer_load == load
    finally:
        await listener.close()


class SilentConnection(Connection):
    """A peer whose process froze after the handshake: it sends nothing more."""

    async def _heartbeat_loop(self) -> None:
        await asyncio.sleep(30)


async def test_silent_peer_is_declared_dead_and_waiters_fail() -> None:
    loop = asyncio.get_running_loop()
    slow = Server()
    server = await loop.create_server(
        lambda: SilentConnection(Identity("frozen", KEY), slow, FAST, dialer=False),
        "127.0.0.1",
        0,
    )
    port = server.sockets[0].getsockname()[1]
    try:
        conn = await connect("127.0.0.1", port, Identity("client", KEY), config=FAST)
        start = time.monotonic()
        with pytest.raises(PeerDeadError, match="frozen.*sent nothing for"):
            await conn.request(Tokens("block", np.zeros(1)), Tokens)
        elapsed = time.monotonic() - start
        assert elapsed < FAST.timing.dead_after + 0.5
        assert isinstance(conn.close_error, PeerDeadError)
    finally:
        slow.release.set()
        server.close()


class QuietDialer(Connection):
    """A dialer that sends no heartbeats, so that a test can write raw bytes on its socket."""

    async def _heartbeat_loop(self) -> None:
        await asyncio.sleep(30)


async def quiet_dial(listener: Listener) -> QuietDialer:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(
        lambda: QuietDialer(Identity("slow", KEY), None, FAST, dialer=True, host="127.0.0.1"),
        "127.0.0.1",
        listener.port,
    )
    await asyncio.wait_for(conn.wait_ready(), 2)
    return conn


async def test_a_large_frame_trickling_in_keeps_its_sender_alive(
    server: tuple[Server, Listener],
) -> None:
    """The receiver waits for most of a large frame before it reads (SO_RCVLOWAT), so reads
    stop meaning "the peer is alive" meanwhile; bytes arriving must count instead. And a
    small frame right after the large one must not wait for anything."""
    _, listener = server
    conn = await quiet_dial(listener)
    tokens = np.arange(200_000)  # 1.6 MB, sent over ~1.6 s while the peer's limit is 0.5 s
    data = encode_frame_bytes(Frame(Kind.REQUEST, 10_000, Tokens("double", tokens)), Limits())
    reply: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
    conn._pending[10_000] = reply
    assert conn._transport is not None
    step = len(data) // 16 + 1
    for start in range(0, len(data), step):
        conn._transport.write(data[start : start + step])
        await asyncio.sleep(0.1)
    doubled = await asyncio.wait_for(reply, 2)
    assert isinstance(doubled, Tokens) and np.array_equal(doubled.tokens, tokens * 2)
    started = time.monotonic()
    await asyncio.wait_for(conn.ping(), 2)
    assert time.monotonic() - started < 0.3  # not held back by the large frame's wait


async def test_a_peer_that_stops_inside_a_large_frame_is_declared_dead(
    server: tuple[Server, Listener],
) -> None:
    _, listener = server
    conn = await quiet_dial(listener)
    (accepted,) = listener.connections
    data = encode_frame_bytes(Frame(Kind.NOTIFY, 0, Tokens("s", np.arange(200_000))), Limits())
    assert conn._transport is not None
    conn._transport.write(data[: len(data) // 3])
    started = time.monotonic()
    await asyncio.wait_for(accepted.wait_closed(), 3)
    assert isinstance(accepted.close_error, PeerDeadError)
    assert time.monotonic() - started < FAST.timing.dead_after + 0.5
    conn.abort()


async def test_bad_frame_closes_only_that_peers_connection(server: tuple[Server, Listener]) -> None:
    _, listener = server
    bad, good = await dial(listener, "bad"), await dial(listener, "good")
    assert bad._transport is not None
    bad._transport.write(PREFIX.pack(5) + b"\xc1\xc1\xc1\xc1\xc1")  # not msgpack
    await asyncio.wait_for(bad.wait_closed(), 2)
    assert bad.remote_close_code == "bad_header"
    assert "closed by the peer: bad_header" in str(bad.close_error)
    assert (await good.request(Tokens("double", np.ones(2)), Tokens)).tokens.tolist() == [2, 2]
    late = await dial(listener, "late")
    assert await late.ping() > 0


async def read_error_frame(reader: asyncio.StreamReader) -> Error:
    prefix = await asyncio.wait_for(reader.readexactly(4), 2)
    body = await asyncio.wait_for(reader.readexactly(body_length(prefix, Limits())), 2)
    frame = decode_body(bytearray(body), CORE_MESSAGES, Limits())
    assert isinstance(frame.message, Error)
    return frame.message


async def test_4gib_length_prefix_over_a_socket(server: tuple[Server, Listener]) -> None:
    _, listener = server
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(b"\xff\xff\xff\xff" + b"x" * 100)
    error = await read_error_frame(reader)
    assert error.code == "frame_too_large" and "4294967295" in error.text
    assert await asyncio.wait_for(reader.read(), 2) == b""  # then closed
    writer.close()
    assert await (await dial(listener)).ping() > 0


async def test_slow_reader_pauses_the_writer() -> None:
    handler = Server()
    config = ConnectionConfig(
        timing=FAST.timing, max_inflight=1, write_high=256 * 1024, write_low=64 * 1024
    )
    listener = await listen("127.0.0.1", 0, Identity("server", KEY), handler=handler, config=config)
    try:
        conn = await connect("127.0.0.1", listener.port, Identity("client", KEY), config=config)
        payload = np.zeros(1 << 17, np.int64)  # 1 MiB per frame
        sent = 0
        blocked = False
        for _ in range(200):  # the kernel buffers a few MiB at most before the writer must wait
            try:
                await asyncio.wait_for(conn.notify(Tokens("block", payload)), 0.3)
                sent += 1
            except TimeoutError:
                sent += 1  # written into the buffer; only the wait for room timed out
                blocked = True
                break
        assert blocked, "the writer never had to wait for a reader that stopped reading"
        assert conn._transport is not None
        assert conn._transport.get_write_buffer_size() <= config.write_high + payload.nbytes + 4096
        assert handler.handled == 1  # the server stopped reading after max_inflight handlers
        assert conn.is_open  # a paused reader is not a dead peer (heartbeats still flow)
        handler.release.set()
        for _ in range(200):
            if handler.handled == sent:
                break
            await asyncio.sleep(0.05)
        assert handler.handled == sent
        assert handler.max_active == 1
    finally:
        handler.release.set()
        await listener.close()


def test_socket_buffer_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="send_buffer"):
        ConnectionConfig(send_buffer=0)
    with pytest.raises(ValueError, match="wake_bytes"):
        ConnectionConfig(wake_bytes=0)


def send_buffer_of(conn: Connection) -> int:
    assert conn._transport is not None
    sock = conn._transport.get_extra_info("socket")
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))


# Not below 64 KiB: on loopback (64 KiB segments) a smaller SO_SNDBUF takes seconds per few
# MB with any socket (a raw blocking one too, measured here).
@pytest.mark.parametrize(("send_buffer", "wake_bytes"), [(64 * 1024, 1), (64 * 1024, 1 << 20)])
async def test_large_frames_with_small_socket_buffers(send_buffer: int, wake_bytes: int) -> None:
    """Frames much larger than the send buffer (and a receiver waiting for more than the
    sender can have in flight) still arrive whole and in order; the option reaches the
    socket (Linux reports it doubled), and None leaves the kernel's autotuning."""
    handler = Server()
    config = dataclasses.replace(FAST, send_buffer=send_buffer, wake_bytes=wake_bytes)
    listener = await listen("127.0.0.1", 0, Identity("server", KEY), handler=handler, config=config)
    try:
        conn = await connect("127.0.0.1", listener.port, Identity("client", KEY), config=config)
        if sys.platform == "linux":
            assert send_buffer_of(conn) == 2 * send_buffer
        # waits for at most half its own send buffer (a peer configured alike can send more)
        assert conn._wake_bytes == min(wake_bytes, send_buffer // 2)
        for i in range(3):
            tokens = np.arange(i, i + 300_000)  # 2.4 MB
            reply = await asyncio.wait_for(conn.request(Tokens("double", tokens), Tokens), 5)
            assert np.array_equal(reply.tokens, tokens * 2)
        auto = await connect(
            "127.0.0.1",
            listener.port,
            Identity("auto", KEY),
            config=dataclasses.replace(FAST, send_buffer=None),
        )
        if sys.platform == "linux":  # tcp_wmem's default, not a doubled setting of ours
            assert send_buffer_of(auto) != 2 * send_buffer
        assert (await auto.request(Tokens("double", np.ones(3)), Tokens)).tokens.tolist() == [2] * 3
    finally:
        await listener.close()


async def test_closing_fails_pending_requests_promptly(server: tuple[Server, Listener]) -> None:
    handler, listener = server
    conn = await dial(listener)
    task = asyncio.create_task(conn.request(Tokens("block", np.zeros(1)), Tokens))
    await asyncio.sleep(0.05)
    await listener.close()
    with pytest.raises(ConnectionClosedError):
        await asyncio.wait_for(task, 2)
    handler.release.set()


async def test_dial_errors_are_typed() -> None:
    listener = await listen("127.0.0.1", 0, Identity("server", KEY))
    port = listener.port
    await listener.close()
    with pytest.raises(DialError, match=f"cannot connect to 127.0.0.1:{port}"):
        await connect("127.0.0.1", port, Identity("client", KEY), timeout=1)


async def test_frames_before_authentication_are_refused(server: tuple[Server, Listener]) -> None:
    handler, listener = server
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
    writer.write(encode_frame_bytes(Frame(Kind.REQUEST, 1, Tokens("double", np.ones(1))), Limits()))
    error = await read_error_frame(reader)
    assert error.code == "auth_required"
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
    assert handler.handled == 0


def test_works_on_uvloop() -> None:
    async def scenario() -> list[int]:
        handler = Server()
        listener = await listen("127.0.0.1", 0, Identity("server", KEY), handler=handler)
        conn = await connect("127.0.0.1", listener.port, Identity("client", KEY))
        loop_name = type(asyncio.get_running_loop()).__module__
        items = []
        async with conn.stream(Tokens("count", np.array([5])), window=2) as stream:
            async for item in stream:
                assert isinstance(item, Tokens)
                items.append(int(item.tokens[0]))
        reply = await conn.request(Tokens("double", np.arange(3)), Tokens)
        await listener.close()
        assert loop_name.startswith("uvloop")
        return items + reply.tokens.tolist()

    assert run(scenario()) == [0, 1, 2, 3, 4, -1, 0, 2, 4]


def test_transport_errors_share_a_base() -> None:
    for error in (
        ConnectionClosedError,
        PeerDeadError,
        RemoteError,
        DialError,
        UnexpectedReplyError,
    ):
        assert issubclass(error, TransportError)


async def test_a_ping_that_times_out_or_is_cancelled_leaves_nothing_behind(
    server: tuple[Server, Listener],
) -> None:
    _, listener = server
    conn = await dial(listener)
    (accepted,) = listener.connections
    seen: list[Frame] = []
    dispatch = accepted._dispatch
    accepted._dispatch = seen.append  # type: ignore[method-assign]  # answers nothing
    with pytest.raises(TimeoutError):
        await conn.ping(timeout=0.1)
    task = asyncio.ensure_future(conn.ping())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert conn._pending == {}
    # The peer saw both pings (the request id as nonce), then a cancel for each.
    seen = [f for f in seen if not isinstance(f.message, Heartbeat)]
    kinds = [(f.kind, type(f.message)) for f in seen]
    assert kinds == [(Kind.REQUEST, Ping), (Kind.NOTIFY, Cancel)] * 2
    assert [f.message.nonce for f in seen[::2]] == [f.request_id for f in seen[::2]]
    accepted._dispatch = dispatch  # type: ignore[method-assign]
    assert await conn.ping() > 0
