"""Token sampling: pure, seeded; exposes the processed distribution for speculative verification.

`probabilities` turns logits into the distribution actually sampled from (temperature, then
top-k, then top-p, renormalised); greedy decoding (temperature 0) is the one-hot distribution on
the argmax, so the rejection-sampling verifier needs no special case. `sample` draws from such a
distribution with an explicit `torch.Generator`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class InvalidSamplingParamsError(ValueError):
    """Sampling parameters out of range (negative temperature, top_p outside (0, 1], ...)."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    seed: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidSamplingParamsError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidSamplingParamsError(
                f"top_k must be >= 0 (0 disables it), got {self.top_k}"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidSamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def position_generator(seed: int, position: int) -> torch.Generator:
    """The generator for the token at absolute `position` of a seeded session.

    Keying the randomness by (seed, position) instead of one running generator makes a reply a
    pure function of (model, prompt, params): a node that takes over a session mid-stream, or a
    verifier that samples several positions in one pass, draws exactly what an uninterrupted
    single-process run would have drawn.
    """
    mixed = (seed * 0x9E3779B97F4A7C15 + position * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)
    return torch.Generator().manual_seed(mixed)


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution to sample from, float32, same shape as logits [..., vocab]."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    scaled = logits / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = scaled.topk(params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop_sorted = before >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one token id per row of probs [..., vocab] by inverse CDF: one uniform per row from
    `generator`, the first id whose cumulative probability passes it. Returns int64 [...].

    Spelled out (not torch.multinomial) because speculative verification relies on it: with
    the position's uniform, the verifier computes the very token target-only sampling would
    draw, so a deterministic draft stands exactly when it equals that token."""
    flat = probs.reshape(-1, probs.shape[-1]).double()
    u = torch.rand(flat.shape[0], 1, generator=generator, dtype=torch.float64)
    cdf = flat.cumsum(dim=-1)
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    # Never land past the last token with mass (rounding at the top of the CDF).
    last = (flat > 0).to(torch.int64).cumsum(dim=-1).argmax(dim=-1, keepdim=True)
    ids = torch.minimum(ids, last)
    return ids.reshape(probs.shape[:-1])


def next_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Sample one token from a single row of logits [vocab]."""
    if params.greedy:
        return int(logits.argmax())
    return int(sample(probabilities(logits, params), generator))
