"""kill -9 of the node serving a session, mid-stream: the home re-plans and finishes the reply
on another holder, with text identical to an uninterrupted run (greedy and seeded sampling)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.harness import Harness
from tests.node_cluster import (
    HOLDS,
    MODEL,
    TOO_SMALL,
    collect,
    kill,
    node,
    sled_generate,
    start_harness,
    statuses,
    stream_completion,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)
HOME = "node-3"  # cannot hold the model: every token comes over the wire


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    # Three nodes could hold the model, the plan names two (replicas=2).
    running = start_harness(tmp_path_factory.mktemp("failover"), [HOLDS, HOLDS, HOLDS, TOO_SMALL])
    try:
        yield running
    finally:
        running.down(timeout=15.0)


def holders(harness: Harness) -> list[str]:
    return list(statuses(harness)[HOME]["plan"]["models"].get(MODEL, []))


def kill_server_mid_stream(harness: Harness, body: dict[str, object]) -> tuple[str, dict, str]:
    """Stream from the home; after the first tokens, kill -9 the node serving the session."""
    api = node(harness, HOME).api
    chunks = stream_completion(api, body)
    first = [next(chunks) for _ in range(3)]
    server = statuses(harness)[HOME]["sessions"][0]["served_by"][-1]
    kill(node(harness, server).pid)
    rest, usage = collect(chunks)
    return "".join(c["choices"][0]["text"] for c in first) + rest, usage, server


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0}, {"temperature": 0.9, "top_p": 0.95, "seed": 77}],
    ids=["greedy", "seeded"],
)
def test_kill_9_of_the_serving_node_mid_stream(harness: Harness, sampling: dict) -> None:
    wait_for(lambda: len(holders(harness)) == 2, timeout=30)  # after the previous kill too
    wait_for(
        lambda: all(MODEL in statuses(harness)[n]["loaded"] for n in holders(harness)),
        timeout=30,
    )
    body = {"model": MODEL, "prompt": "the old ship sailed", "max_tokens": 300, **sampling}
    expected, whole = collect(stream_completion(node(harness, HOME).api, body))
    assert whole["completion_tokens"] >= 50  # long enough to be cut in the middle
    text, usage, killed = kill_server_mid_stream(harness, body)
    assert text == expected
    served_by = usage["sled"]["served_by"]
    assert served_by[0] == killed and len(served_by) == 2 and killed not in served_by[1:]
    assert usage["sled"]["failovers"] == 1
    assert usage["completion_tokens"] == whole["completion_tokens"]
    if not sampling.get("temperature"):
        assert text == sled_generate("the old ship sailed", 300)
    # Everyone re-planned without the dead node.
    wait_for(
        lambda: all(killed not in s["plan"]["members"] for s in statuses(harness).values()),
        timeout=10,
    )
