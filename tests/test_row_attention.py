"""A token's logits do not depend on the pass it is in: a k-token verify pass (alone, or padded
next to another session) gives each token exactly what k one-token steps give, so greedy
speculative text equals target-only text bit for bit in bf16 and int4, not just in fp32."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models.torch_backend as torch_backend
from models.backend import load_backend

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _differences(path: Path, cache: Path, other_new: int = 3) -> list[float]:
    """Max |logit difference| per token: 6 tokens in one padded pass vs one at a time, after a
    300-token prompt (long enough for the batched attention kernel to round differently). The
    other session in the pass brings `other_new` tokens: up to ROW_ATTENTION_MAX every session
    reads its own cache buffers in place; above it (a prefill chunk) the pass gathers a padded
    past and the 6-token session's rows come from that copy."""
    torch.manual_seed(0)
    backend = load_backend(path, weights="bf16", max_slots=3, max_len=512, cache_root=cache)
    prompt = torch.randint(3, 200, (300,))
    tokens = torch.randint(3, 200, (6,))
    one = backend.cache.allocate()
    backend.forward([one], [prompt], last_only=True)
    steps = [backend.forward([one], [t[None]])[0][-1] for t in tokens]
    together, other = backend.cache.allocate(), backend.cache.allocate()
    backend.forward([together], [prompt], last_only=True)
    backend.forward([other], [prompt[:250]], last_only=True)
    rows = backend.forward([together, other], [tokens, prompt[:other_new]])[0]
    return [float((rows[i] - steps[i]).abs().max()) for i in range(len(tokens))]


def test_a_verify_pass_gives_each_token_its_one_token_logits(
    tiny_path: Path, tmp_path: Path
) -> None:
    assert _differences(tiny_path, tmp_path) == [0.0] * 6


def test_so_does_a_verify_pass_next_to_a_prefill_chunk(tiny_path: Path, tmp_path: Path) -> None:
    assert (
        _differences(tiny_path, tmp_path, other_new=torch_backend.ROW_ATTENTION_MAX + 24)
        == [0.0] * 6
    )


def test_one_batched_attention_call_would_not(
    tiny_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The control: without attention by row the same passes round differently (so the test
    # above can fail).
    monkeypatch.setattr(torch_backend, "ROW_ATTENTION_MAX", 0)
    assert max(_differences(tiny_path, tmp_path)) > 0.0
