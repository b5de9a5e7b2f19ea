"""Speculative generation in one process: the baseline of the cross-device algorithm.

The same steps as the verifier in agent/engine.py, for one session: the drafter proposes k
tokens after the committed ones, one target pass over [last committed token, d_1..d_k] gives the
k+1 distributions, `verify_draft` keeps a prefix and picks the next token, and the target's KV
cache is truncated past the kept tokens. k is fixed (`draft_k`) or chosen per step from the
session's acceptance rate and the measured costs of drafting and of target passes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch

from models.backend import Backend
from models.drafters import Drafter
from models.generate import PREFILL_CHUNK, GenerationStats, check_generation, prefill
from models.sampling import SamplingParams, next_token, position_generator
from models.speculative import Draft, DraftPolicy, PassCostCurve, Verdict, verify_draft

DEFAULT_K_MAX = 8


@dataclass(frozen=True)
class SpeculativeStats:
    kind: str
    verify_steps: int
    drafted: int
    accepted: int
    draft_s: float
    verify_s: float
    mean_k: float

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Committed tokens per target pass after the prefill."""
        return (self.accepted + self.verify_steps) / self.verify_steps if self.verify_steps else 0


@dataclass(frozen=True)
class SpeculativeResult:
    tokens: tuple[int, ...]
    stats: GenerationStats
    speculative: SpeculativeStats


def generate_speculative(
    backend: Backend,
    drafter: Drafter,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop_ids: Collection[int] = (),
    draft_k: int | None = None,
    on_token: Callable[[int], None] | None = None,
    k_max: int = DEFAULT_K_MAX,
    prefill_chunk: int = PREFILL_CHUNK,
    verify: Callable[[torch.Tensor, Draft, SamplingParams], Verdict] = verify_draft,
) -> SpeculativeResult:
    """Generate like `models.generate.generate`, with drafts verified by the target.

    `draft_k` fixes the draft length; None adapts it per step. Greedy output equals
    `generate`'s token for token; sampled output follows the same distribution. `verify` is
    replaceable only so a test can break the acceptance rule and watch that test fail.
    """
    check_generation(backend, prompt_ids, max_tokens, prefill_chunk)
    if draft_k is not None and draft_k < 0:
        raise ValueError(f"draft_k must be >= 0, got {draft_k}")
    cache = backend.cache
    slot = cache.allocate()
    session = drafter.open(params)
    curve = PassCostCurve()
    policy = DraftPolicy(curve, draft_k, k_max)
    tracker = policy.tracker
    draft_s = verify_s = 0.0
    ks: list[int] = []
    try:
        committed = list(prompt_ids)
        start = time.perf_counter()
        logits = prefill(backend, slot, committed, prefill_chunk)
        prefill_s = time.perf_counter() - start
        # The first token comes from the prefill, exactly as in target-only generation.
        token = next_token(logits, params, position_generator(params.seed, len(committed)))
        tokens: list[int] = []
        stop_reason = "length"
        start = time.perf_counter()
        steps = 0
        while True:
            if token in stop_ids:
                stop_reason = "stop"
                break
            tokens.append(token)
            committed.append(token)
            if on_token is not None:
                on_token(token)
            if len(tokens) >= max_tokens:
                break
            if cache.room(slot) < 1:
                stop_reason = "context"
                break
            # Draft; never more than the reply or the cache has room for.
            room = min(cache.room(slot) - 1, max_tokens - len(tokens))
            k = policy.next_k(room)
            ks.append(k)
            if k > 0:
                draft = session.propose(committed, k)
                draft_s += draft.draft_s
                policy.observe_draft(k, draft.draft_s)
                draft = draft.first(k)
            else:
                draft = Draft(len(committed), ())
            pass_start = time.perf_counter()
            fed = cache.length(slot)
            inputs = torch.tensor([token, *draft.tokens], dtype=torch.int64)
            rows = backend.forward([slot], [inputs])[0]
            verdict = verify(rows, draft, params)
            cache.truncate(slot, fed + 1 + verdict.accepted)
            elapsed = time.perf_counter() - pass_start
            verify_s += elapsed
            curve.observe(len(inputs), elapsed)
            steps += 1
            policy.observe_verify(draft.k, verdict.accepted)
            done = False
            for t in draft.tokens[: verdict.accepted]:
                if t in stop_ids:
                    stop_reason, done = "stop", True
                    break
                tokens.append(t)
                committed.append(t)
                if on_token is not None:
                    on_token(t)
                if len(tokens) >= max_tokens:
                    done = True
                    break
            if done:
                break
            token = verdict.token
        decode_s = time.perf_counter() - start
    finally:
        session.close()
        cache.free(slot)
    stats = GenerationStats(
        prompt_tokens=len(prompt_ids),
        generated_tokens=len(tokens),
        prefill_s=prefill_s,
        decode_steps=steps,
        decode_s=decode_s,
        stop_reason=stop_reason,
    )
    spec = SpeculativeStats(
        kind=getattr(drafter, "kind", "?"),
        verify_steps=steps,
        drafted=tracker.drafted,
        accepted=tracker.accepted,
        draft_s=draft_s,
        verify_s=verify_s,
        mean_k=sum(ks) / len(ks) if ks else 0.0,
    )
    return SpeculativeResult(tuple(tokens), stats, spec)
