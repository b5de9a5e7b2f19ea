"""Speculative decoding, the pure part: drafts, lossless verification, draft-length choice.

A `Draft` is k proposed tokens for positions position..position+k-1 of a session, with the
distribution q the drafter drew them from: sparse (top-m ids and probabilities per token) or
absent, which means a deterministic proposal (q is one-hot on the drafted token: n-gram lookup,
greedy model drafts, cross-tokenizer drafts).

`verify_draft` takes the target's logits for the k+1 positions (the rows of one forward pass
over [last committed token, d_1..d_k]) and returns how many draft tokens stand and the next
token (Leviathan et al. 2023):
- greedy (temperature 0): accept while d_i is the target's argmax, then the argmax; the text is
  exactly target-only greedy;
- sampling, sparse proposal q: accept d_i with probability min(1, p(d_i)/q(d_i)); on the first
  rejection draw from the residual max(0, p - q) renormalised; when all k stand, draw a bonus
  token from p_{k+1}. The accepted tokens then follow p exactly, whatever q is;
- sampling, deterministic proposal (q one-hot on d_i): the same rule is min(1, p(d_i)) = p(d_i)
  and the residual is p without d_i. It is carried out with the position's own uniform: x_i is
  the token target-only sampling draws at that position (inverse CDF, `models.sampling.sample`);
  d_i stands iff d_i == x_i (probability p(d_i)), else x_i is the answer (distributed as the
  residual). So with deterministic drafts the text is token for token target-only sampling's,
  whichever drafter drafted and however long its drafts were: failover and drafter changes
  cannot change a seeded reply.
Randomness is keyed by absolute position (`position_generator`), so a verifier that replays a
session draws the same numbers, and a step with no draft tokens draws exactly what
target-only sampling draws.

`choose_draft_length` is the adaptive-k rule: the k that maximises expected tokens per second
given a session's acceptance rate, its drafter's cost per token and the verifier's measured cost
of a pass as a function of the tokens in it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from models.sampling import SamplingParams, position_generator, probabilities, sample

DRAFT_SEED_SALT = 0x5D1ED  # drafters' randomness must be independent of the verifier's


class BadDraftError(ValueError):
    """A draft that cannot be verified (shapes, ids out of range, tokens outside their q)."""


@dataclass(frozen=True, eq=False)
class Draft:
    """k proposed tokens for absolute positions position, position+1, ...

    q_ids/q_probs ([k, m], int64/float32) hold the sparse proposal distribution each token was
    drawn from (zero-probability padding allowed); None means a deterministic proposal.
    """

    position: int
    tokens: tuple[int, ...]
    q_ids: torch.Tensor | None = None
    q_probs: torch.Tensor | None = None
    kind: str = ""
    draft_s: float = 0.0  # the drafter's own compute time for this draft

    @property
    def k(self) -> int:
        return len(self.tokens)

    def first(self, k: int) -> Draft:
        """The first k tokens of this draft (all of it when it has no more)."""
        if self.k <= k:
            return self
        q_ids = None if self.q_ids is None else self.q_ids[:k]
        q_probs = None if self.q_probs is None else self.q_probs[:k]
        return Draft(self.position, self.tokens[:k], q_ids, q_probs, self.kind, self.draft_s)

    def after(self, position: int) -> Draft:
        """The part of this draft from absolute `position` on (an empty draft past its end)."""
        skip = min(max(0, position - self.position), self.k)
        if skip == 0:
            return self
        q_ids = None if self.q_ids is None else self.q_ids[skip:]
        q_probs = None if self.q_probs is None else self.q_probs[skip:]
        return Draft(
            self.position + skip, self.tokens[skip:], q_ids, q_probs, self.kind, self.draft_s
        )


def check_draft(draft: Draft, vocab_size: int) -> None:
    """Raise BadDraftError unless the draft is verifiable against a vocabulary of that size."""
    if draft.position < 0:
        raise BadDraftError(f"draft position must be >= 0, got {draft.position}")
    if any(not 0 <= t < vocab_size for t in draft.tokens):
        raise BadDraftError(f"draft token ids must be in [0, {vocab_size})")
    if (draft.q_ids is None) != (draft.q_probs is None):
        raise BadDraftError("a draft needs both q_ids and q_probs, or neither")
    if draft.q_ids is None or draft.q_probs is None:
        return
    if draft.q_ids.dim() != 2 or draft.q_ids.shape != draft.q_probs.shape:
        raise BadDraftError(
            f"q_ids {tuple(draft.q_ids.shape)} and q_probs {tuple(draft.q_probs.shape)} "
            "must both be [k, m]"
        )
    if draft.q_ids.shape[0] != draft.k:
        raise BadDraftError(f"q has {draft.q_ids.shape[0]} rows for {draft.k} draft tokens")
    if draft.k == 0:
        return
    if int(draft.q_ids.min()) < 0 or int(draft.q_ids.max()) >= vocab_size:
        raise BadDraftError(f"q_ids must be in [0, {vocab_size})")
    probs = draft.q_probs.float()
    if not bool(torch.isfinite(probs).all()) or float(probs.min()) < 0:
        raise BadDraftError("q_probs must be finite and >= 0")
    if float((probs.sum(dim=-1) - 1).abs().max()) > 1e-3:
        raise BadDraftError("each row of q_probs must sum to 1")
    for i, token in enumerate(draft.tokens):
        if _q_of(draft, i, token) <= 0:
            raise BadDraftError(f"draft token {token} at row {i} has no probability in its q")


def _q_of(draft: Draft, i: int, token: int) -> float:
    if draft.q_ids is None or draft.q_probs is None:
        return 1.0
    hits = draft.q_ids[i] == token
    return float(draft.q_probs[i][hits].float().sum())


def _q_dense(draft: Draft, i: int, vocab: int) -> torch.Tensor:
    q = torch.zeros(vocab)
    if draft.q_ids is None or draft.q_probs is None:
        q[draft.tokens[i]] = 1.0
    else:
        q.index_add_(0, draft.q_ids[i].long(), draft.q_probs[i].float())
    return q


@dataclass(frozen=True)
class Verdict:
    accepted: int  # how many draft tokens stand
    token: int  # the token after them: the correction on a rejection, else the bonus


AcceptRule = Callable[[float, float], float]


def lossless_acceptance(p: float, q: float) -> float:
    """Probability of keeping a draft token with target probability p, proposal probability q."""
    return min(1.0, p / q)


def verify_draft(
    logits: torch.Tensor,
    draft: Draft,
    params: SamplingParams,
    accept: AcceptRule = lossless_acceptance,
    residual: bool = True,
) -> Verdict:
    """Verify a draft against target logits [k+1, vocab] (row i predicts draft.position + i).

    `accept` and `residual` exist so a test can break the rule and see the distribution move
    (keep them at their defaults for lossless decoding)."""
    k = draft.k
    if logits.dim() != 2 or logits.shape[0] != k + 1:
        raise BadDraftError(f"need {k + 1} rows of logits for {k} draft tokens, got {logits.shape}")
    if params.greedy:
        best = logits.argmax(dim=-1).tolist()
        n = 0
        while n < k and draft.tokens[n] == best[n]:
            n += 1
        return Verdict(n, int(best[n]))
    p = probabilities(logits, params)
    vocab = p.shape[-1]
    if draft.q_ids is None and accept is lossless_acceptance and residual:
        # Deterministic proposal: the coupled form of the same rule (see the module text).
        for i, token in enumerate(draft.tokens):
            x = int(sample(p[i], position_generator(params.seed, draft.position + i)))
            if x != token:
                return Verdict(i, x)
        x = int(sample(p[k], position_generator(params.seed, draft.position + k)))
        return Verdict(k, x)
    for i, token in enumerate(draft.tokens):
        generator = position_generator(params.seed, draft.position + i)
        u = float(torch.rand(1, generator=generator))
        if u < accept(float(p[i, token]), _q_of(draft, i, token)):
            continue
        row = p[i]
        if residual:
            rest = (row - _q_dense(draft, i, vocab)).clamp(min=0)
            total = float(rest.sum())
            row = rest / total if total > 0 else row
        return Verdict(i, int(sample(row, generator)))
    # All k stand: the bonus token, drawn exactly as target-only sampling draws position+k.
    return Verdict(k, int(sample(p[k], position_generator(params.seed, draft.position + k))))


# -- adaptive draft length -------------------------------------------------------------------


def expected_tokens(acceptance: float, k: int) -> float:
    """Expected tokens a verify step yields with k drafted tokens, if each stands independently
    with probability `acceptance`: 1 + a + a^2 + ... + a^k (the last is the bonus/correction)."""
    a = min(max(acceptance, 0.0), 1.0)
    if a >= 1.0:
        return float(k + 1)
    return (1.0 - a ** (k + 1)) / (1.0 - a)


def choose_draft_length(
    acceptance: float,
    draft_s: float | Callable[[int], float],
    pass_s: Callable[[int], float],
    other_tokens: int = 0,
    k_max: int = 8,
) -> int:
    """The k in [0, k_max] with the most expected tokens per second for one session.

    `draft_s` is the drafter's time for a draft of k tokens (a function of k, or seconds per
    token); `pass_s(t)` is the verifier's cost of a pass holding t tokens in all; this session
    adds k + 1 of them to the `other_tokens` that other sessions bring to the same pass."""

    def drafting(k: int) -> float:
        if k == 0:
            return 0.0
        return draft_s(k) if callable(draft_s) else k * draft_s

    best_k, best_rate = 0, -1.0
    for k in range(k_max + 1):
        seconds = drafting(k) + pass_s(other_tokens + k + 1)
        rate = expected_tokens(acceptance, k) / max(seconds, 1e-9)
        if rate > best_rate * (1 + 1e-9):
            best_k, best_rate = k, rate
    return best_k


class AcceptanceTracker:
    """A session's running acceptance rate: per drafted token, exponentially weighted so it
    follows the text (code edits accept more than open questions)."""

    def __init__(self, prior: float = 0.5, weight: float = 0.1) -> None:
        self.rate = prior
        self.weight = weight
        self.drafted = 0
        self.accepted = 0
        self.steps = 0
        self.produced = 0  # tokens committed by verify steps (accepted + next token)

    def observe(self, drafted: int, accepted: int, produced: int) -> None:
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.produced += produced
        # Every drafted token up to and including the first rejection is one observation.
        seen = min(drafted, accepted + 1)
        for i in range(seen):
            hit = 1.0 if i < accepted else 0.0
            self.rate += self.weight * (hit - self.rate)

    @property
    def acceptance(self) -> float:
        """Accepted over drafted tokens so far (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.produced / self.steps if self.steps else 0.0


class DraftPolicy:
    """A session's draft length: fixed, or adapted from its acceptance rate, its drafter's
    measured time per draft and the verifier's pass-cost curve (shared by the verifier's
    sessions). It maximises this session's tokens per second: a remote drafter's time does not
    hold up other sessions' passes, but it does delay this session's next one. After
    `probe_every` steps at k=0 it drafts one token, so an estimate made on unlucky text can
    recover."""

    def __init__(
        self,
        curve: PassCostCurve,
        fixed_k: int | None = None,
        k_max: int = 8,
        probe_every: int = 8,
    ) -> None:
        if fixed_k is not None and fixed_k < 0:
            raise ValueError(f"draft k must be >= 0, got {fixed_k}")
        self.curve = curve
        self.fixed_k = fixed_k
        self.k_max = k_max
        self.probe_every = probe_every
        self.tracker = AcceptanceTracker()
        # Seconds a draft of k tokens takes to arrive (a fixed part per request, for a remote
        # drafter the round trip, plus a part per token), measured; free until measured.
        self.draft_cost = PassCostCurve(one_token_s=0.0)
        self.last_k = 0
        self._idle_steps = 0
        self._drafts_seen = 0

    def next_k(self, room: int, other_tokens: int = 0) -> int:
        if self.fixed_k is not None:
            k = self.fixed_k
        else:
            k = choose_draft_length(
                self.tracker.rate, self.draft_cost, self.curve, other_tokens, self.k_max
            )
            if k == 0:
                self._idle_steps += 1
                if self._idle_steps >= self.probe_every:
                    self._idle_steps, k = 0, 1
            else:
                self._idle_steps = 0
        self.last_k = max(0, min(k, room))
        return self.last_k

    def observe_draft(self, k: int, seconds: float) -> None:
        # The first draft of a session also reads the whole prompt into the drafter: not what
        # the next drafts will cost.
        self._drafts_seen += 1
        if k > 0 and self._drafts_seen > 1:
            self.draft_cost.observe(k, seconds)

    def observe_verify(self, drafted: int, accepted: int) -> None:
        self.tracker.observe(drafted, accepted, accepted + 1)


class PassCostCurve:
    """The measured seconds of a verifier pass as a function of the tokens in it.

    Keeps an exponentially weighted mean per token count and interpolates between measured
    counts; past the largest it extrapolates along the last segment (or a prior slope)."""

    def __init__(self, one_token_s: float = 0.05, prior_slope: float = 0.1) -> None:
        self._means: dict[int, float] = {}
        self._prior = (one_token_s, prior_slope)

    def observe(self, tokens: int, seconds: float, weight: float = 0.2) -> None:
        if tokens < 1 or not math.isfinite(seconds) or seconds <= 0:
            return
        old = self._means.get(tokens)
        self._means[tokens] = seconds if old is None else old + weight * (seconds - old)

    def __call__(self, tokens: int) -> float:
        if not self._means:
            base, slope = self._prior
            return base * (1 + slope * (tokens - 1))
        xs = sorted(self._means)
        if tokens in self._means:
            return self._means[tokens]
        if len(xs) == 1:
            base = self._means[xs[0]] / (1 + self._prior[1] * (xs[0] - 1))
            return base * (1 + self._prior[1] * (tokens - 1))
        if tokens < xs[0]:
            lo, hi = xs[0], xs[1]
        elif tokens > xs[-1]:
            lo, hi = xs[-2], xs[-1]
        else:
            hi = next(x for x in xs if x > tokens)
            lo = max(x for x in xs if x < tokens)
        y0, y1 = self._means[lo], self._means[hi]
        slope = max(0.0, (y1 - y0) / (hi - lo))
        return max(1e-6, y0 + slope * (tokens - lo))

    def snapshot(self) -> dict[int, float]:
        return dict(sorted(self._means.items()))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
