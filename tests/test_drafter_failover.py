"""Drafters and the verifier in separate processes: sessions are drafted on drafter nodes and
verified in batches on the verifier; kill -9 of the drafter serving a session mid-reply, and
the session goes on (another drafter, or none) with text identical to target-only. Twice:
with model drafters (tiny-llama) and with feature drafters (the verifier sends them the
target's features with each request)."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.harness import Harness, per_node_options
from tests.node_cluster import (
    COMMON,
    HOLDS,
    MODEL,
    TOO_SMALL,
    collect,
    kill,
    node,
    sled_generate,
    statuses,
    stream_completion,
    wait_for,
)

pytestmark = pytest.mark.timeout(300)
VERIFIER, DRAFTERS, HOME = "node-0", ("node-1", "node-2"), "node-3"
PROMPT = "the old ship sailed"


def _feature_drafter_file(directory: Path) -> Path:
    """An (untrained) feature drafter for the tiny-qwen2 file the nodes load."""
    import torch

    from models.feature_drafter import initial_feature_weights, save_feature_drafter
    from models.gguf_loader import GGUFFile
    from models.registry import fetch

    target = fetch(MODEL)
    vocab = GGUFFile(target).config.vocab_size
    weights = initial_feature_weights(target, torch.arange(vocab), target_name=MODEL)
    return save_feature_drafter(weights, directory / f"{MODEL}.feature.gguf")


@pytest.fixture(scope="module", params=["model", "feature"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory, kind: str) -> Iterator[Harness]:
    directory = tmp_path_factory.mktemp("drafters")
    running = Harness(directory / "state.json")
    lists = {"memory_budget": ",".join([HOLDS, TOO_SMALL, TOO_SMALL, TOO_SMALL])}
    # tiny-llama shares tiny-qwen2's token ids; a feature drafter drafts from its features.
    spec = "model:tiny-llama" if kind == "model" else f"feature:{_feature_drafter_file(directory)}"
    sets = [
        "0:drafter=none",  # the verifier has no drafter of its own: target-only when none left
        "0:draft_k=4",
        "1:role=drafter",
        f"1:drafter={spec}",
        "2:role=drafter",
        f"2:drafter={spec}",
        "3:role=client",
    ]
    running.up(4, MODEL, {**COMMON, "replicas": "1"}, per_node_options(4, lists, sets), 90.0)
    try:
        yield running
    finally:
        running.down(timeout=15.0)


def _drafters_planned(harness: Harness) -> bool:
    plan = statuses(harness).get(VERIFIER, {}).get("plan", {})
    return sorted(plan.get("drafters", {}).get(MODEL, [])) == list(DRAFTERS)


def _metric(api: str, name: str) -> float:
    with urllib.request.urlopen(api + "/metrics", timeout=5) as response:
        text = response.read().decode()
    total = 0.0
    for line in text.splitlines():
        if re.match(rf"{name}(\{{.*\}})? ", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _serving_drafter(harness: Harness) -> str:
    sessions = statuses(harness)[VERIFIER]["verifying"]
    return str(sessions[0]["drafter_node"]) if sessions else ""


def test_sessions_are_drafted_on_drafter_nodes(harness: Harness, kind: str) -> None:
    wait_for(lambda: _drafters_planned(harness), timeout=60)
    roles = {name: st["roles"] for name, st in statuses(harness).items()}
    assert roles[VERIFIER] == ["verifier"]
    assert all(roles[d] == ["drafter"] for d in DRAFTERS)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 120, "temperature": 0}
    text, usage = collect(stream_completion(node(harness, HOME).api, body))
    spec: dict[str, Any] = usage["sled"]["speculative"]
    assert spec["drafter"] == kind and spec["drafted_tokens"] > 0
    assert 0.0 <= spec["acceptance_rate"] <= 1.0
    assert spec["verify_steps"] < usage["completion_tokens"] + 1
    assert text == sled_generate(PROMPT, 120)
    drafting = [statuses(harness)[d]["drafting"] for d in DRAFTERS]
    assert sum(d["requests"] for d in drafting) > 0
    assert _metric(node(harness, VERIFIER).api, "sled_draft_tokens_total") > 0
    with urllib.request.urlopen(node(harness, VERIFIER).api + "/metrics", timeout=5) as response:
        assert f'kind="{kind}"' in response.read().decode()


def test_kill_9_of_the_drafter_mid_reply_changes_no_token(harness: Harness) -> None:
    wait_for(lambda: _drafters_planned(harness), timeout=60)
    verifier_api = node(harness, VERIFIER).api
    failovers_before = _metric(verifier_api, "sled_drafter_failovers_total")
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 400, "temperature": 0}
    expected = sled_generate(PROMPT, 400)
    chunks = stream_completion(node(harness, HOME).api, body)
    first = [next(chunks) for _ in range(3)]
    wait_for(lambda: _serving_drafter(harness) in DRAFTERS, timeout=10, step=0.01)
    victim = _serving_drafter(harness)
    kill(node(harness, victim).pid)
    rest, usage = collect(chunks)
    text = "".join(c["choices"][0]["text"] for c in first) + rest
    assert text == expected
    assert usage["sled"]["served_by"] == [VERIFIER]  # only the drafter changed
    assert _metric(verifier_api, "sled_drafter_failovers_total") > failovers_before
    # The survivor drafts the next session; the dead one leaves the plan.
    wait_for(
        lambda: (
            statuses(harness)[VERIFIER]["plan"]["drafters"].get(MODEL)
            == [d for d in DRAFTERS if d != victim]
        ),
        timeout=10,
    )
    again, usage = collect(stream_completion(node(harness, HOME).api, {**body, "max_tokens": 60}))
    assert again == sled_generate(PROMPT, 60)
    assert usage["sled"]["speculative"]["drafted_tokens"] > 0
