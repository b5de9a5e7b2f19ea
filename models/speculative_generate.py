"""Speculative generation in one process: the baseline of the cross-device algorithm.

The same steps as the verifier in agent/engine.py, for one session: the drafter proposes k
tokens after the committed ones, one target pass over [last committed token, d_1..d_k] gives the
k+1 distributions, `verify_draft` keeps a prefix and picks the next token, and the target's KV
cache is truncated past the kept tokens. k is fixed (`draft_k`) or chosen per step from the
session's acceptance rate and the measured costs of drafting and of target passes.

A feature drafter (models/feature_drafter.py) drafts from the target's features: then every
target pass is `backend.forward_features` (the same logits), and the features of the positions
that stand go to the drafter with its next request.
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


class _TargetPasses:
    """The target's passes for one session, keeping the features a feature drafter has not had
    yet (`pending`: positions held..fed-1 of the slot) when it needs them."""

    def __init__(self, backend: Backend, slot: int, features: bool) -> None:
        forward_features = getattr(backend, "forward_features", None)
        if features and not callable(forward_features):
            raise ValueError(
                f"a feature drafter needs the target's features: the {backend.name} backend "
                "does not give them (use --backend torch)"
            )
        self.backend, self.slot = backend, slot
        self._forward_features = forward_features if features else None
        self.pending: torch.Tensor | None = None
        self._last = torch.empty(0)  # the features of the latest verify pass

    def _keep(self, rows: torch.Tensor) -> None:
        self.pending = rows if self.pending is None else torch.cat([self.pending, rows])

    def prefill(self, ids: Sequence[int], chunk: int) -> torch.Tensor:
        """Logits after the prompt (chunked as models.generate.prefill does)."""
        if self._forward_features is None:
            return prefill(self.backend, self.slot, ids, chunk)
        if len(ids) >= self.backend.cache.room(self.slot):
            return prefill(self.backend, self.slot, ids, chunk)  # raises its ValueError
        row = torch.empty(0)
        for i in range(0, len(ids), chunk):
            part = torch.tensor(list(ids[i : i + chunk]), dtype=torch.int64)
            logits, features = self._forward_features([self.slot], [part])
            row = logits[0][-1]
            self._keep(features[0])
        return row

    def verify(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of every row of a verify pass; `stand(n)` then keeps the first n rows."""
        if self._forward_features is None:
            return self.backend.forward([self.slot], [inputs])[0]
        logits, features = self._forward_features([self.slot], [inputs], keep=[len(inputs)])
        self._last = features[0]
        return logits[0]

    def stand(self, n: int) -> None:
        if self._forward_features is not None:
            self._keep(self._last[:n])

    def take(self) -> torch.Tensor | None:
        """The features the drafter has not had (None unless drafting from features)."""
        pending, self.pending = self.pending, None
        return pending


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
    features = bool(getattr(session, "uses_features", False))
    try:
        passes = _TargetPasses(backend, slot, features)
    except ValueError:
        session.close()
        cache.free(slot)
        raise
    curve = PassCostCurve()
    policy = DraftPolicy(curve, draft_k, k_max)
    tracker = policy.tracker
    draft_s = verify_s = 0.0
    ks: list[int] = []
    try:
        committed = list(prompt_ids)
        start = time.perf_counter()
        logits = passes.prefill(committed, prefill_chunk)
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
            if k > 0 and features:
                rows = passes.take()
                held = len(committed) - 1 - (0 if rows is None else int(rows.shape[0]))
                draft = session.propose(committed, k, rows, held)  # type: ignore[call-arg]
                draft_s += draft.draft_s
                policy.observe_draft(k, draft.draft_s)
                draft = draft.first(k)
            elif k > 0:
                draft = session.propose(committed, k)
                draft_s += draft.draft_s
                policy.observe_draft(k, draft.draft_s)
                draft = draft.first(k)
            else:
                draft = Draft(len(committed), ())
            pass_start = time.perf_counter()
            fed = cache.length(slot)
            inputs = torch.tensor([token, *draft.tokens], dtype=torch.int64)
            logits_rows = passes.verify(inputs)
            verdict = verify(logits_rows, draft, params)
            cache.truncate(slot, fed + 1 + verdict.accepted)
            passes.stand(1 + verdict.accepted)
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
