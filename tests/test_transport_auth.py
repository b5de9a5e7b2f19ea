"""Cluster-key authentication: both sides must prove the key before any application frame."""

from __future__ import annotations

import asyncio
import logging
import os

import numpy as np
import pytest

from transport.auth import (
    ENV_KEY,
    ROLE_DIALER,
    ROLE_LISTENER,
    ClusterKey,
    check_listen_allowed,
    is_loopback_host,
    new_nonce,
)
from transport.connection import Connection, Context, Identity
from transport.discovery import Advertisement, to_txt
from transport.endpoint import connect, listen
from transport.errors import AuthError, ConfigError
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
    AuthChallenge,
    AuthHello,
    AuthOk,
    AuthProof,
    Error,
    Tokens,
)
from transport.schema import Message

SECRET = "correct horse battery staple"
KEY = ClusterKey.from_secret(SECRET)
OTHER = ClusterKey.from_secret("a different secret")
LIMITS = Limits()


class Counter:
    def __init__(self) -> None:
        self.handled = 0

    async def __call__(self, msg: Message, ctx: Context) -> Message | None:
        self.handled += 1
        return msg


def frame(msg: Message, kind: Kind = Kind.NOTIFY, rid: int = 0) -> bytes:
    return encode_frame_bytes(Frame(kind, rid, msg), LIMITS)


async def read_frame(reader: asyncio.StreamReader) -> Frame:
    prefix = await asyncio.wait_for(reader.readexactly(PREFIX.size), 2)
    body = await asyncio.wait_for(reader.readexactly(body_length(prefix, LIMITS)), 2)
    return decode_body(bytearray(body), CORE_MESSAGES, LIMITS)


APP_FRAMES = (
    frame(Tokens("s", np.arange(3)), Kind.REQUEST, 1)
    + frame(Tokens("s", np.arange(3)), Kind.NOTIFY, 0)
    + frame(Tokens("s", np.arange(3)), Kind.STREAM, 2)
)


def test_key_derivation_is_deterministic_and_hides_the_secret() -> None:
    again = ClusterKey.from_secret(SECRET)
    assert again.cluster_id == KEY.cluster_id and again == KEY
    assert OTHER.cluster_id != KEY.cluster_id
    assert SECRET not in repr(KEY) and KEY.cluster_id in repr(KEY)
    assert len(KEY.cluster_id) == 16 and KEY.configured
    assert not ClusterKey.from_secret(None).configured
    assert ClusterKey.from_env({ENV_KEY: SECRET}) == KEY
    assert not ClusterKey.from_env({}).configured


def test_proofs_are_bound_to_role_nonces_and_key() -> None:
    dialer, listener = ("a", new_nonce()), ("b", new_nonce())
    proof = KEY.proof(ROLE_LISTENER, dialer, listener)
    assert KEY.verify(proof, ROLE_LISTENER, dialer, listener)
    assert not KEY.verify(proof, ROLE_DIALER, dialer, listener)  # no reflection
    assert not KEY.verify(proof, ROLE_LISTENER, dialer, ("b", new_nonce()))  # no replay
    assert not OTHER.verify(proof, ROLE_LISTENER, dialer, listener)


def test_keyless_node_listens_on_loopback_only() -> None:
    keyless = ClusterKey.from_secret(None)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        assert is_loopback_host(host)
        check_listen_allowed(host, keyless)
    for host in ("0.0.0.0", "", "192.168.1.20", "::", "node.local"):
        with pytest.raises(ConfigError, match=ENV_KEY):
            check_listen_allowed(host, keyless)
        check_listen_allowed(host, KEY)


async def test_listen_without_key_refuses_before_binding() -> None:
    with pytest.raises(ConfigError, match="refusing to listen on '0.0.0.0' without a cluster key"):
        await listen("0.0.0.0", 0, Identity("n", ClusterKey.from_secret(None)))


async def test_keyless_nodes_talk_on_loopback_but_not_to_keyed_ones() -> None:
    keyless = ClusterKey.from_secret(None)
    listener = await listen("127.0.0.1", 0, Identity("server", keyless), handler=Counter())
    try:
        conn = await connect("127.0.0.1", listener.port, Identity("client", keyless))
        assert await conn.ping() > 0
        with pytest.raises(AuthError):
            await connect("127.0.0.1", listener.port, Identity("keyed", KEY))
    finally:
        await listener.close()


async def test_wrong_key_dialer_is_refused_and_no_frame_reaches_the_handler() -> None:
    """Listener side: a dialer that cannot prove the key gets nothing processed."""
    handler = Counter()
    accepted: list[Connection] = []
    listener = await listen("127.0.0.1", 0, Identity("server", KEY), handler=handler)
    try:
        # An honest client with the wrong key fails at connect.
        with pytest.raises(AuthError, match="does not know the cluster key"):
            await connect("127.0.0.1", listener.port, Identity("honest", OTHER), handler=handler)
        # A hostile client ignores the listener's proof, sends a bogus one and app frames.
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(frame(AuthHello("hostile", new_nonce(), 0, 0, "")))
        challenge = (await read_frame(reader)).message
        assert isinstance(challenge, AuthChallenge)
        writer.write(frame(AuthProof(b"\0" * 32)) + APP_FRAMES)
        refusal = (await read_frame(reader)).message
        assert isinstance(refusal, Error) and refusal.code == "auth_failed"
        assert "failed the cluster-key challenge" in refusal.text
        assert await asyncio.wait_for(reader.read(), 2) == b""  # closed, app frames dropped
        writer.close()
        accepted.extend(listener._connections)
        await asyncio.sleep(0.1)
        assert handler.handled == 0
        assert all(c.app_frames_handled == 0 for c in accepted)
    finally:
        await listener.close()


async def test_wrong_key_listener_is_refused_and_no_frame_reaches_the_handler() -> None:
    """Dialer side: a listener that cannot prove the key gets nothing processed, even if it
    claims success and sends requests."""
    handler = Counter()
    heard: list[Message] = []

    async def fake_listener(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hello = (await read_frame(reader)).message
        assert isinstance(hello, AuthHello)
        writer.write(
            frame(AuthChallenge("fake", new_nonce(), b"\1" * 32, 0, 0, ""))
            + frame(AuthOk())
            + APP_FRAMES
        )
        try:
            while True:
                heard.append((await read_frame(reader)).message)
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            writer.close()

    server = await asyncio.start_server(fake_listener, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(AuthError, match="fake at 127.0.0.1 does not know the cluster key"):
            await connect("127.0.0.1", port, Identity("client", KEY), handler=handler)
        await asyncio.sleep(0.1)
        assert handler.handled == 0
        assert [type(m) for m in heard] == [Error]  # only the refusal, no proof, no replies
        assert isinstance(heard[0], Error) and heard[0].code == "auth_failed"
    finally:
        server.close()

    # And a real listener with another key: refused by the dialer, nothing handled on either side.
    other_handler = Counter()
    listener = await listen("127.0.0.1", 0, Identity("other", OTHER), handler=other_handler)
    try:
        with pytest.raises(AuthError):
            await connect("127.0.0.1", listener.port, Identity("client", KEY), handler=handler)
        await asyncio.sleep(0.1)
        assert handler.handled == 0 and other_handler.handled == 0
    finally:
        await listener.close()


async def test_the_key_never_appears_in_logs_or_mdns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    os.environ.pop(ENV_KEY, None)
    listener = await listen("127.0.0.1", 0, Identity("server", KEY), handler=Counter())
    try:
        ok = await connect("127.0.0.1", listener.port, Identity("client", KEY))
        await ok.request(Tokens("s", np.arange(2)), Tokens)
        with pytest.raises(AuthError):
            await connect("127.0.0.1", listener.port, Identity("client2", OTHER))
        await ok.close()
    finally:
        await listener.close()
    assert caplog.records, "expected some log output to check"
    assert SECRET not in caplog.text
    txt = to_txt(Advertisement("server", KEY.cluster_id, 7000, 8000, "mem=8G"))
    assert all(SECRET not in v for v in txt.values())
    assert txt["cluster"] == KEY.cluster_id
