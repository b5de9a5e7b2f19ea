"""Dialing and listening: the two ways a `Connection` comes to exist."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Callable

from transport.auth import check_listen_allowed
from transport.connection import Connection, ConnectionConfig, Handler, Identity, LoadSource
from transport.errors import AuthError, DialError, TransportError
from transport.load import system_load


async def connect(
    host: str,
    port: int,
    identity: Identity,
    *,
    handler: Handler | None = None,
    config: ConnectionConfig | None = None,
    load_source: LoadSource = system_load,
    timeout: float = 5.0,
) -> Connection:
    """Dials a peer and completes the handshake.

    Raises DialError if nothing answers, AuthError if either side fails the cluster-key proof.
    """
    loop = asyncio.get_running_loop()
    conn = Connection(identity, handler, config, dialer=True, host=host, load_source=load_source)
    try:
        await asyncio.wait_for(loop.create_connection(lambda: conn, host, port), timeout)
    except (TimeoutError, OSError) as exc:
        conn.abort()
        raise DialError(f"cannot connect to {host}:{port}: {exc or 'timed out'}") from exc
    try:
        await asyncio.wait_for(conn.wait_ready(), timeout)
    except TimeoutError:
        conn.abort()
        raise DialError(
            f"{host}:{port} accepted but did not finish the handshake in {timeout}s"
        ) from None
    except AuthError:
        raise
    except TransportError as exc:
        raise DialError(f"{host}:{port} closed the connection during the handshake: {exc}") from exc
    return conn


class Listener:
    """A listening socket and the connections it accepted."""

    def __init__(
        self, server: asyncio.AbstractServer, connections: set[Connection], identity: Identity
    ) -> None:
        self._server = server
        self._connections = connections
        self.identity = identity  # with the bound listen_port

    @property
    def port(self) -> int:
        sockets = getattr(self._server, "sockets", None) or ()
        return int(sockets[0].getsockname()[1]) if sockets else 0

    @property
    def connections(self) -> frozenset[Connection]:
        """Accepted connections that are authenticated and still open."""
        return frozenset(c for c in self._connections if c.is_open)

    async def close(self) -> None:
        self._server.close()
        await asyncio.gather(*(c.close() for c in list(self._connections)))
        await self._server.wait_closed()


async def listen(
    host: str,
    port: int,
    identity: Identity,
    *,
    handler: Handler | None = None,
    config: ConnectionConfig | None = None,
    load_source: LoadSource = system_load,
    on_open: Callable[[Connection], None] | None = None,
) -> Listener:
    """Listens for peers. A node without a cluster key may listen on loopback only
    (ConfigError otherwise, saying how to set one). `on_open` sees each authenticated peer."""
    check_listen_allowed(host, identity.key)
    loop = asyncio.get_running_loop()
    connections: set[Connection] = set()

    def opened(conn: Connection) -> None:
        if on_open is not None:
            on_open(conn)

    def make() -> Connection:
        conn = Connection(
            identity, handler, config, dialer=False, load_source=load_source, on_open=opened
        )
        connections.add(conn)
        conn.add_close_callback(connections.discard)
        return conn

    try:
        # Bind first so that the handshake can tell peers the real port when port is 0.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise DialError(f"cannot listen on {host}:{port}: {exc}") from exc
    if identity.listen_port != sock.getsockname()[1]:
        identity = dataclasses.replace(identity, listen_port=sock.getsockname()[1])
    server = await loop.create_server(make, sock=sock)
    return Listener(server, connections, identity)
