"""Three `sled run` processes on loopback (harness), tiny-qwen2, only two able to hold it.

One harness for the module; tests that change the cluster (a join, a SIGTERM) come last.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.harness import Harness
from tests.node_cluster import (
    HOLDS,
    MODEL,
    TOO_SMALL,
    collect,
    exit_status,
    kill,
    node,
    post_json,
    sled_generate,
    start_harness,
    state_of,
    statuses,
    stream_completion,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    running = start_harness(tmp_path_factory.mktemp("harness"), [HOLDS, HOLDS, TOO_SMALL])
    try:
        yield running
    finally:
        running.down(timeout=15.0)


def test_every_node_reports_the_same_plan_and_epoch(harness: Harness) -> None:
    seen = statuses(harness)
    assert sorted(seen) == ["node-0", "node-1", "node-2"]
    assert len({json.dumps(s["plan"], sort_keys=True) for s in seen.values()}) == 1
    assert len({(s["epoch"], s["digest"]) for s in seen.values()}) == 1
    plan = seen["node-0"]["plan"]
    assert plan["members"] == ["node-0", "node-1", "node-2"]
    assert sorted(plan["models"][MODEL]) == ["node-0", "node-1"]
    assert plan["drafters"] == {}
    # node-2's budget cannot hold the model: it never loads it, and says why.
    offers = seen["node-2"]["capabilities"]["models"]
    assert len(offers) == 1, seen["node-2"]
    offer = offers[0]
    assert offer["status"] == "too_big" and offer["need_bytes"] > 10 * 2**20
    assert seen["node-2"]["loaded"] == [] and seen["node-2"]["roles"] == ["client"]
    for name in ("node-0", "node-1"):
        assert seen[name]["loaded"] == [MODEL] and seen[name]["roles"] == ["verifier"]
    for status in seen.values():  # each node learned every peer's capabilities
        for peer in status["peers"]:
            assert peer["alive"] and [m["name"] for m in peer["models"]] == [MODEL], status
            assert peer["memory_budget"] in (2**30, 10 * 2**20)


def test_non_holder_serves_greedy_text_equal_to_sled_generate(harness: Harness) -> None:
    api = node(harness, "node-2").api
    reply = post_json(
        api + "/v1/chat/completions",
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "tell me about the sea"}],
            "max_tokens": 40,
            "temperature": 0,
        },
    )
    expected = sled_generate("tell me about the sea", 40, chat=True)
    assert reply["choices"][0]["message"]["content"] == expected
    sled = reply["usage"]["sled"]
    assert sled["node"] == "node-2"
    assert sled["served_by"] and sled["served_by"][0] in ("node-0", "node-1")


def test_non_holder_serves_seeded_sampling_like_a_single_process(harness: Harness) -> None:
    """Seeded sampling through the cluster equals `sled generate` with the same seed (and does
    not depend on which holder serves it): both key randomness by token position."""
    prompt, seed = "once upon a time", 1234
    expected = sled_generate(prompt, 50, temperature=0.8, top_p=0.9, seed=seed)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 50, "temperature": 0.8}
    for api in (node(harness, "node-2").api, node(harness, "node-0").api):
        reply = post_json(api + "/v1/completions", {**body, "top_p": 0.9, "seed": seed})
        assert reply["choices"][0]["text"] == expected


def test_openai_package_streams_from_a_non_holder(harness: Harness) -> None:
    import openai

    client = openai.OpenAI(base_url=node(harness, "node-2").api + "/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=12,
        temperature=0,
        stream=True,
    )
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == sled_generate("hi", 12, chat=True)
    assert [m.id for m in client.models.list()] == [MODEL]


def test_unknown_model_is_404_everywhere(harness: Harness) -> None:
    import urllib.error

    for name in ("node-0", "node-2"):
        with pytest.raises(urllib.error.HTTPError) as info:
            post_json(node(harness, name).api + "/v1/completions", {"model": "nope", "prompt": "x"})
        assert info.value.code == 404


def test_sled_status_prints_the_cluster(harness: Harness) -> None:
    api = node(harness, "node-2").api
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "status", "--url", api],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["NODE", "ALIVE", "ROLES", "MODELS", "LOAD", "EPOCH"]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert set(rows) == {"node-0", "node-1", "node-2"}
    assert "client" in rows["node-2"] and "verifier" in rows["node-0"]
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "harness", "status", "--json", "--state",
         str(harness.state_path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    out = json.loads(done.stdout)
    assert [n["name"] for n in out["nodes"]] == ["node-0", "node-1", "node-2"]
    # The cluster key reached the daemons by environment only: not in output, argv or logs.
    key = state_of(harness).cluster_key
    assert key not in done.stdout
    for proc in state_of(harness).nodes:
        assert key.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert key not in Path(proc.log).read_text()


def test_a_join_changes_the_epoch_on_all_nodes_within_2_s(harness: Harness) -> None:
    before = statuses(harness)
    old_epoch = before["node-0"]["epoch"]
    added = harness.add({"memory_budget": TOO_SMALL}, timeout=90)  # returns once it is ready
    start = time.monotonic()
    names = [n.name for n in state_of(harness).nodes]

    def agreed() -> bool:
        seen = statuses(harness)
        return (
            len(seen) == len(names)
            and len({s["epoch"] for s in seen.values()}) == 1
            and all(s["epoch"] > old_epoch for s in seen.values())
            and all(added.name in s["plan"]["members"] for s in seen.values())
        )

    wait_for(agreed, timeout=10.0)
    assert time.monotonic() - start <= 2.0


def test_sigterm_lets_the_home_finish_its_sessions(harness: Harness) -> None:
    """SIGTERM node-3 (a home, added by the test above) while it streams a reply: the reply
    completes, equal to the uninterrupted text, and the process exits 0."""
    home = node(harness, "node-3")
    body = {"model": MODEL, "prompt": "the lighthouse keeper", "max_tokens": 200, "temperature": 0}
    expected, _ = collect(stream_completion(node(harness, "node-2").api, body))
    chunks = stream_completion(home.api, body)
    first = next(chunks)
    kill(home.pid, signal.SIGTERM)
    rest, usage = collect(chunks)
    text = first["choices"][0]["text"] + rest
    assert text == expected
    assert usage["completion_tokens"] > 20
    assert exit_status(home.pid, timeout=30) == 0
    # The others see it leave and re-plan without it.
    wait_for(
        lambda: all("node-3" not in s["plan"]["members"] for s in statuses(harness).values()),
        timeout=10,
    )


def test_sigterm_of_a_serving_node_finishes_what_it_serves(harness: Harness) -> None:
    body = {"model": MODEL, "prompt": "a quiet harbour", "max_tokens": 200, "temperature": 0}
    api = node(harness, "node-2").api
    expected, _ = collect(stream_completion(api, body))
    chunks = stream_completion(api, body)
    first = next(chunks)
    server = statuses(harness)["node-2"]["sessions"][0]["served_by"][-1]
    kill(node(harness, server).pid, signal.SIGTERM)
    rest, usage = collect(chunks)
    assert first["choices"][0]["text"] + rest == expected
    # The draining node finished the session itself: no failover was needed.
    assert usage["sled"]["served_by"] == [server] and usage["sled"]["failovers"] == 0
    assert exit_status(node(harness, server).pid, timeout=30) == 0
