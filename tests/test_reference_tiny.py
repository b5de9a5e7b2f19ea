"""Our decoder against transformers on the tiny GGUF fixtures (fast; every CI run).

The tiny models have random weights, so this checks architecture details, not knowledge: llama's
q/k un-permutation, qwen2's biases, Gemma 3's (1 + w) norms, qk-norm, post-norms, embedding
scale, GELU, and its sliding-window (8) and global layers with their two rope thetas.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.backend import load_backend
from models.tiny import SPECS
from tests.hf_reference import hf_greedy, hf_logits, hf_model, our_greedy, our_logits

pytestmark = pytest.mark.usefixtures("torch_single_thread")

LOGIT_TOL = 1e-4  # float32 on both sides; logits have std ~5


def _reference(path: Path, arch: str) -> object:
    # GGUF has no key for Gemma 3's query_pre_attn_scalar; transformers defaults it to 256 (right
    # for the real models, whose head_dim is 256) and llama.cpp uses head_dim. Tell it.
    overrides = {"query_pre_attn_scalar": SPECS[arch].head_dim} if arch == "gemma3" else {}
    return hf_model(path, **overrides)


def test_logits_and_greedy_match_transformers(tiny_path: Path, tiny_arch: str) -> None:
    ref = _reference(tiny_path, tiny_arch)
    ours = load_backend(tiny_path, weights="fp32", use_cache=False)
    ids = torch.randint(
        0, ours.config.vocab_size, (40,), generator=torch.Generator().manual_seed(0)
    )
    expected = hf_logits(ref, ids.tolist())
    got = our_logits(ours, ids.tolist(), chunk=16)  # 40 > window 8: sliding layers matter
    torch.testing.assert_close(got, expected, atol=LOGIT_TOL, rtol=0)
    prompt = ids[:7].tolist()
    assert our_greedy(ours, prompt, 32) == hf_greedy(ref, prompt, 32)
