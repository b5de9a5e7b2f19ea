"""Nodes in one event loop (static peers, no mDNS): overload, refusals, a holder that drops out
when no other holder has the model loaded, draining."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from agent.config import NodeConfig
from agent.node import Node
from agent.service import GenerationRequest, OverloadedError, UnavailableError
from tests.node_cluster import MODEL

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("torch_single_thread")]


def config(name: str, budget: str, peers: tuple[str, ...] = (), **extra: Any) -> NodeConfig:
    from agent.config import parse_size

    values: dict[str, Any] = {
        "name": name,
        "peer_port": 0,
        "api_port": 0,
        "peers": peers,
        "mdns": False,
        "models": (MODEL,),
        "memory_budget": parse_size(budget),
        "weights": "fp32",
        "threads": 1,
        "probe": False,  # offers are plannable at once (speeds unmeasured)
        "heartbeat": 0.2,
        "dead_after": 1.0,
        "shutdown_grace": 5.0,
        **extra,
    }
    return NodeConfig(**values)


async def start(*configs: NodeConfig) -> list[Node]:
    nodes: list[Node] = []
    for cfg in configs:
        if nodes and not cfg.peers:
            assert nodes[0].mesh is not None
            cfg = NodeConfig(**{**cfg.__dict__, "peers": (f"127.0.0.1:{nodes[0].mesh.port}",)})
        node = Node(cfg)
        await node.start()
        nodes.append(node)
    return nodes


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def agreed(nodes: list[Node]) -> bool:
    """Same epoch everywhere, all peers alive, and every node knows the holders loaded it."""
    statuses = [n.status() for n in nodes]
    if len({(s["epoch"], s["digest"]) for s in statuses}) != 1:
        return False
    if any(len(n.peers.alive_ids()) != len(nodes) - 1 for n in nodes):
        return False
    holders = statuses[0]["plan"]["models"].get(MODEL, [])
    return bool(holders) and all(
        n.route(MODEL, exclude=[h for h in holders if h != holder]) == holder
        for n in nodes
        for holder in holders
    )


async def tokens(node: Node, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
    from agent.service import Finished, TextDelta

    text, usage = [], {}
    async for event in node.generate(request):
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, Finished):
            usage = dict(event.usage.extra)
    return "".join(text), usage


@pytest.fixture
async def stop_all() -> AsyncIterator[list[Node]]:
    started: list[Node] = []
    yield started
    await asyncio.gather(*(n.stop() for n in started), return_exceptions=True)


async def test_overload_at_the_holder_is_429_at_the_home(stop_all: list[Node]) -> None:
    holder, home = await start(
        config("holder", "1G", max_sessions=1, max_queue=0),
        config("home", "10M"),
    )
    stop_all += [holder, home]
    await until(lambda: agreed([holder, home]))
    long = GenerationRequest(model=MODEL, prompt="a long story", max_tokens=400)
    first = home.generate(long)
    await first.__anext__()  # holds the holder's only slot
    with pytest.raises(OverloadedError, match="busy"):
        await tokens(home, GenerationRequest(model=MODEL, prompt="x", max_tokens=5))
    # Through the HTTP API: 429 with Retry-After, in the OpenAI error shape.
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            home.api_url + "/v1/completions", json={"model": MODEL, "prompt": "x"}
        ) as response,
    ):
        assert response.status == 429
        assert int(response.headers["Retry-After"]) >= 1
        assert "busy" in (await response.json())["error"]["message"]
    await first.aclose()  # the cancel reaches the holder, which frees the slot
    await until(lambda: holder.engine(MODEL) is not None and holder.engine(MODEL).active == 0)  # type: ignore[union-attr]
    text, usage = await tokens(home, GenerationRequest(model=MODEL, prompt="x", max_tokens=5))
    assert usage["served_by"] == ["holder"]


async def test_failover_waits_for_a_new_holder_to_load(stop_all: list[Node]) -> None:
    """replicas=1: only one node holds the model. When its connections drop mid-reply, the plan
    names another node, which loads the model; the home resends the committed tokens there."""
    a, b, home = await start(
        config("a", "1G", replicas=1, role="verifier"),
        config("b", "1G", replicas=1),
        config("home", "10M", replicas=1),
    )
    stop_all += [b, home]
    await until(lambda: agreed([a, b, home]))
    assert home.status()["plan"]["models"][MODEL] == ["a"] and b.status()["loaded"] == []
    request = GenerationRequest(model=MODEL, prompt="the river", max_tokens=150, temperature=0)
    expected, _ = await tokens(home, request)
    stream = home.generate(request)
    pieces = [(await stream.__anext__()).text for _ in range(5)]  # type: ignore[union-attr]
    assert a.mesh is not None
    await a.mesh.close()  # a vanishes from the mesh (its engine stops serving over the wire)
    rest, usage = "", {}
    from agent.service import Finished, TextDelta

    async for event in stream:
        if isinstance(event, TextDelta):
            rest += event.text
        elif isinstance(event, Finished):
            usage = dict(event.usage.extra)
    assert "".join(pieces) + rest == expected
    assert usage["served_by"] == ["a", "b"] and usage["failovers"] == 1
    assert b.status()["loaded"] == [MODEL]
    await a.stop()


async def test_refusals_and_draining(stop_all: list[Node]) -> None:
    holder, home = await start(config("holder", "1G"), config("home", "10M"))
    stop_all += [holder, home]
    await until(lambda: agreed([holder, home]))
    status = home.status()
    assert status["roles"] == ["client"] and status["peers"][0]["name"] == "holder"
    json.dumps(status)  # JSON-ready
    assert [c.name for c in home.list_models()] == [MODEL]
    assert home.list_models()[0].loaded_on == ("holder",)
    await holder.stop()  # graceful: drains, leaves the plan
    await until(lambda: home.status()["plan"]["models"] == {})
    home.holder_wait_s = 0.5  # no holder now: the home waits (bounded), then says so
    with pytest.raises(UnavailableError, match="no live node holds"):
        await tokens(home, GenerationRequest(model=MODEL, prompt="x", max_tokens=3))
    await home.stop()
    with pytest.raises(UnavailableError, match="shutting down"):
        await tokens(home, GenerationRequest(model=MODEL, prompt="x", max_tokens=3))
