"""NodeMetrics: own registry per node, updates show in a parseable exposition."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import NodeMetrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_updates_appear_in_text() -> None:
    m = NodeMetrics()
    m.count_request("openai_chat", 200)
    m.count_request("openai_chat", 200)
    m.count_request("ollama_generate", 429)
    m.count_prompt("tiny-llama", 12)
    m.count_generated("tiny-llama", 5)
    m.active_sessions.inc()
    m.set_queue_depth("verify", 3)
    m.observe_first_token("tiny-llama", 0.2)
    m.observe_token_gap("tiny-llama", 0.03)
    m.observe_verify_step(drafted=4, accepted=3, kind="ngram")
    s = _samples(m.text())
    assert s[("sled_requests_total", (("api", "openai_chat"), ("status", "200")))] == 2
    assert s[("sled_requests_total", (("api", "ollama_generate"), ("status", "429")))] == 1
    assert s[("sled_prompt_tokens_total", (("model", "tiny-llama"),))] == 12
    assert s[("sled_generated_tokens_total", (("model", "tiny-llama"),))] == 5
    assert s[("sled_active_sessions", ())] == 1
    assert s[("sled_queue_depth", (("queue", "verify"),))] == 3
    assert s[("sled_time_to_first_token_seconds_count", (("model", "tiny-llama"),))] == 1
    assert (
        s[("sled_time_to_first_token_seconds_bucket", (("le", "0.25"), ("model", "tiny-llama")))]
        == 1
    )
    assert (
        s[("sled_time_to_first_token_seconds_bucket", (("le", "0.1"), ("model", "tiny-llama")))]
        == 0
    )
    assert s[("sled_token_latency_seconds_sum", (("model", "tiny-llama"),))] == pytest.approx(0.03)
    ngram = ("kind", "ngram")
    assert s[("sled_draft_tokens_total", (ngram, ("outcome", "accepted")))] == 3
    assert s[("sled_draft_tokens_total", (ngram, ("outcome", "rejected")))] == 1
    assert s[("sled_draft_acceptance_ratio_sum", (ngram,))] == pytest.approx(0.75)
    assert s[("sled_tokens_per_verify_step_sum", (ngram,))] == 4
    assert s[("sled_draft_length_sum", (ngram,))] == 4


def test_registries_are_independent() -> None:
    a, b = NodeMetrics(), NodeMetrics()
    a.count_generated("m", 7)
    sb = _samples(b.text())
    assert ("sled_generated_tokens_total", (("model", "m"),)) not in sb
    assert _samples(a.text())[("sled_generated_tokens_total", (("model", "m"),))] == 7


def test_bad_verify_figures_rejected() -> None:
    with pytest.raises(ValueError, match="bad verify figures"):
        NodeMetrics().observe_verify_step(drafted=2, accepted=3)
