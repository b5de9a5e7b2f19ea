"""Discovery: TXT records, static peer parsing, zeroconf on 127.0.0.1 (in one process)."""

from __future__ import annotations

import asyncio
import secrets

import pytest

from transport.auth import ClusterKey
from transport.discovery import (
    MAX_TXT_VALUE,
    Advertisement,
    Discovery,
    DiscoveryError,
    DiscoveryEvent,
    PeerGone,
    PeerSeen,
    from_txt,
    parse_peer,
    to_txt,
)
from transport.errors import ConfigError
from transport.frames import PROTOCOL_VERSION


def test_txt_round_trip() -> None:
    ad = Advertisement("node-1", "abcd", 7070, 8080, "mem=8G;models=qwen", addresses=("10.0.0.2",))
    props = {k.encode(): v.encode() for k, v in to_txt(ad).items()}
    assert from_txt(props, ["10.0.0.2"], 7070) == ad
    assert to_txt(ad)["proto"] == str(PROTOCOL_VERSION)


@pytest.mark.parametrize(
    ("props", "port", "text"),
    [
        ({b"node": b"n"}, 7070, "lacks"),
        ({b"node": b"n", b"cluster": b"c", b"proto": b"x", b"api": b"1"}, 7070, "not integers"),
        ({b"node": b"n", b"cluster": b"c", b"proto": b"1", b"api": b"1"}, 0, "ports out of range"),
        (
            {b"node": b"bad id!", b"cluster": b"c", b"proto": b"1", b"api": b"1"},
            1,
            "invalid node id",
        ),
        ({b"node": b"\xff", b"cluster": b"c", b"proto": b"1", b"api": b"1"}, 1, "not UTF-8"),
    ],
)
def test_malformed_txt_records_are_typed_errors(props: dict, port: int, text: str) -> None:
    with pytest.raises(DiscoveryError, match=text):
        from_txt(props, ["10.0.0.2"], port)


def test_capability_summary_must_fit_a_txt_record() -> None:
    with pytest.raises(DiscoveryError, match="at most"):
        Advertisement("n", "c", 1, capabilities="x" * (MAX_TXT_VALUE + 1))


def test_parse_static_peers() -> None:
    assert parse_peer("192.168.1.20:7070") == ("192.168.1.20", 7070)
    assert parse_peer("node.local:1") == ("node.local", 1)
    assert parse_peer("[fe80::1]:7070") == ("fe80::1", 7070)
    for bad in ("nohost", ":7070", "host:", "host:0", "host:70000", "host:x"):
        with pytest.raises(ConfigError, match="expected host:port"):
            parse_peer(bad)


async def wait_for(predicate: object, timeout: float) -> bool:
    for _ in range(int(timeout / 0.02)):
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.02)
    return False


async def test_nodes_of_one_cluster_find_each_other_on_loopback() -> None:
    run = secrets.token_hex(3)  # other test runs may browse 127.0.0.1 at the same time
    key, other = ClusterKey.from_secret(f"disc-{run}"), ClusterKey.from_secret(f"other-{run}")
    seen: dict[str, list[DiscoveryEvent]] = {"a": [], "b": [], "c": []}
    nodes = {
        "a": Discovery(
            Advertisement(f"a-{run}", key.cluster_id, 7001, 8001, "caps-a"),
            seen["a"].append,
            interfaces=["127.0.0.1"],
        ),
        "b": Discovery(
            Advertisement(f"b-{run}", key.cluster_id, 7002, 8002, "caps-b"),
            seen["b"].append,
            interfaces=["127.0.0.1"],
        ),
        "c": Discovery(
            Advertisement(f"c-{run}", other.cluster_id, 7003),
            seen["c"].append,
            interfaces=["127.0.0.1"],
        ),
    }
    try:
        for node in nodes.values():
            await node.start()

        def saw(who: str, node_id: str) -> bool:
            return any(
                isinstance(e, PeerSeen) and e.advertisement.node_id == node_id for e in seen[who]
            )

        assert await wait_for(lambda: saw("a", f"b-{run}") and saw("b", f"a-{run}"), 5)
        event = next(e for e in seen["a"] if isinstance(e, PeerSeen))
        assert event.advertisement == Advertisement(
            f"b-{run}", key.cluster_id, 7002, 8002, "caps-b", PROTOCOL_VERSION, ("127.0.0.1",)
        )
        await asyncio.sleep(0.3)
        assert not saw("a", f"c-{run}") and not saw("c", f"a-{run}")  # other cluster: ignored
        assert not saw("a", f"a-{run}")  # not itself
        await nodes.pop("b").close()
        gone = await wait_for(
            lambda: any(isinstance(e, PeerGone) and e.node_id == f"b-{run}" for e in seen["a"]), 5
        )
        assert gone, "the goodbye of a closed node should arrive as a hint"
    finally:
        for node in nodes.values():
            await node.close()
