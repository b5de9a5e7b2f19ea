"""The mesh: static peers, peer-list gossip, one connection per pair, peer down events."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import numpy as np
import pytest

from transport.auth import ClusterKey
from transport.connection import ConnectionConfig, Context, Identity, PeerInfo, Timing
from transport.mesh import Mesh, MeshConfig, MeshEvent, PeerDown, PeerUp, keep_new
from transport.messages import Tokens
from transport.schema import Message

KEY = ClusterKey.from_secret("mesh-tests")
FAST = ConnectionConfig(timing=Timing(heartbeat_interval=0.1, dead_after=0.5))


def info(node_id: str, dialed: bool) -> PeerInfo:
    return PeerInfo(node_id, "127.0.0.1", 1, 0, "", dialed)


def test_both_ends_keep_the_connection_dialed_by_the_smaller_id() -> None:
    # On "a": the connection "a" dialed beats the one "b" dialed, whichever came first.
    assert keep_new(existing=info("b", dialed=False), new=info("b", dialed=True), local_id="a")
    assert not keep_new(existing=info("b", dialed=True), new=info("b", dialed=False), local_id="a")
    # On "b": the same connection (dialed by "a", so not by "b") wins.
    assert keep_new(existing=info("a", dialed=True), new=info("a", dialed=False), local_id="b")
    assert not keep_new(existing=info("a", dialed=False), new=info("a", dialed=True), local_id="b")
    # Same direction twice (a reconnect race): keep the first.
    assert not keep_new(existing=info("b", dialed=True), new=info("b", dialed=True), local_id="a")


async def echo(msg: Message, ctx: Context) -> Message | None:
    return msg


class Node:
    def __init__(self, name: str, static: tuple[tuple[str, int], ...] = ()) -> None:
        self.events: list[MeshEvent] = []
        self.mesh = Mesh(
            Identity(name, KEY),
            handler=echo,
            config=MeshConfig(static_peers=static, connection=FAST, answer_wait=0.3),
            on_event=self.events.append,
        )

    def ups(self) -> set[str]:
        return {e.peer.node_id for e in self.events if isinstance(e, PeerUp)}

    def downs(self) -> set[str]:
        return {e.node_id for e in self.events if isinstance(e, PeerDown)}


async def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


@pytest.fixture
async def nodes() -> AsyncIterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        await node.mesh.close()


async def start(nodes: list[Node], name: str, *peers: Node) -> Node:
    node = Node(name, tuple(("127.0.0.1", p.mesh.port) for p in peers))
    nodes.append(node)
    await node.mesh.start()
    return node


async def test_static_peers_and_gossip_connect_everyone(nodes: list[Node]) -> None:
    a = await start(nodes, "a")
    b = await start(nodes, "b", a)
    c = await start(nodes, "c", b)  # knows only b; learns a from b's peer list
    assert await wait_for(
        lambda: a.ups() == {"b", "c"} and b.ups() == {"a", "c"} and c.ups() == {"a", "b"}, 3
    ), (a.events, b.events, c.events)
    conn = c.mesh.connection("a")
    assert conn is not None
    reply = await conn.request(Tokens("hi", np.arange(3)), Tokens)
    assert reply.tokens.tolist() == [0, 1, 2]
    assert not (a.downs() | b.downs() | c.downs())


async def test_two_nodes_dialing_each_other_keep_one_connection(nodes: list[Node]) -> None:
    a = await start(nodes, "a")
    b = await start(nodes, "b", a)
    a.mesh.add_peer("127.0.0.1", b.mesh.port)  # now both dial each other, forever
    assert await wait_for(lambda: a.ups() == {"b"} and b.ups() == {"a"}, 3)
    await asyncio.sleep(1.0)  # let the duplicate connections open and resolve
    conn_a, conn_b = a.mesh.connection("b"), b.mesh.connection("a")
    assert conn_a is not None and conn_b is not None and conn_a.peer and conn_b.peer
    # Both ends kept the same connection: the one "a" (the smaller id) dialed.
    assert conn_a.peer.dialed and not conn_b.peer.dialed
    assert conn_a.is_open and conn_b.is_open
    assert [type(e) for e in a.events] == [PeerUp] and [type(e) for e in b.events] == [PeerUp]
    assert await conn_b.ping() > 0


async def test_a_peer_that_leaves_is_reported_down(nodes: list[Node]) -> None:
    a = await start(nodes, "a")
    b = await start(nodes, "b", a)
    assert await wait_for(lambda: a.ups() == {"b"}, 3)
    await b.mesh.close()
    nodes.remove(b)
    assert await wait_for(lambda: a.downs() == {"b"}, 2)
    assert a.mesh.connection("b") is None
