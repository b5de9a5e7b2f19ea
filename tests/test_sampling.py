"""Sampling: filters keep the right tokens, distributions are normalised, seeds reproduce."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.sampling import (
    InvalidSamplingParamsError,
    SamplingParams,
    make_generator,
    next_token,
    probabilities,
    sample,
)

LOGITS = torch.tensor([2.0, 1.0, 0.5, 4.0, -1.0, 3.0])


def test_greedy_is_one_hot_on_argmax() -> None:
    p = probabilities(LOGITS, SamplingParams())
    assert p.tolist() == [0, 0, 0, 1, 0, 0]
    assert next_token(LOGITS, SamplingParams(), make_generator(0)) == 3


def test_temperature_softmax() -> None:
    p = probabilities(LOGITS, SamplingParams(temperature=2.0))
    torch.testing.assert_close(p, torch.softmax(LOGITS / 2.0, -1))


def test_top_k_keeps_k_largest() -> None:
    p = probabilities(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    assert (p > 0).tolist() == [False, False, False, True, False, True]
    expected = torch.softmax(torch.tensor([4.0, 3.0]), -1)
    torch.testing.assert_close(p[[3, 5]], expected)


def test_top_p_keeps_smallest_prefix_reaching_p() -> None:
    full = torch.softmax(LOGITS, -1)  # sorted: 3 (.63), 5 (.23), 0 (.09), ...
    assert full[3] < 0.7 < full[3] + full[5]
    p = probabilities(LOGITS, SamplingParams(temperature=1.0, top_p=0.7))
    assert (p > 0).tolist() == [False, False, False, True, False, True]
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    # A top_p below the top token's mass keeps only that token.
    p = probabilities(LOGITS, SamplingParams(temperature=1.0, top_p=0.1))
    assert p.tolist() == [0, 0, 0, 1, 0, 0]


def test_batched_rows_are_independent() -> None:
    rows = torch.stack([LOGITS, LOGITS.flip(0)])
    params = SamplingParams(temperature=0.7, top_k=3, top_p=0.9)
    p = probabilities(rows, params)
    torch.testing.assert_close(p[0], probabilities(LOGITS, params))
    torch.testing.assert_close(p[1], probabilities(LOGITS.flip(0), params))


def test_seed_reproduces_and_differs() -> None:
    logits = torch.randn(50, generator=make_generator(1))
    params = SamplingParams(temperature=1.0, seed=7)

    def draw(seed: int) -> list[int]:
        g = make_generator(seed)
        return [next_token(logits, params, g) for _ in range(40)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_sample_frequencies_follow_probs() -> None:
    p = probabilities(LOGITS, SamplingParams(temperature=1.0, top_k=3))
    ids = sample(p.expand(20000, -1), make_generator(3))
    freq = torch.bincount(ids, minlength=6).float() / 20000
    torch.testing.assert_close(freq, p, atol=0.015, rtol=0)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-20, 20), min_size=2, max_size=40),
    st.floats(0.05, 3.0),
    st.integers(0, 50),
    st.floats(0.01, 1.0),
)
def test_probabilities_are_a_distribution(
    values: list[float], temperature: float, top_k: int, top_p: float
) -> None:
    logits = torch.tensor(values)
    p = probabilities(logits, SamplingParams(temperature, top_k, top_p))
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    # The most probable token (one of them, if tied in float32) always survives the filters.
    full = torch.softmax(logits / temperature, dim=-1)
    assert p[full == full.max()].sum() > 0
    if 0 < top_k < len(values):
        # At most k tokens survive top-k, more only when several tie at the k-th largest logit.
        kth = logits.sort(descending=True).values[top_k - 1]
        assert int((p > 0).sum()) <= int((logits >= kth).sum())


def test_bad_params() -> None:
    with pytest.raises(InvalidSamplingParamsError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidSamplingParamsError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidSamplingParamsError, match="top_k"):
        SamplingParams(top_k=-2)
