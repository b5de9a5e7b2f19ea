"""Drafters: things that propose the next tokens of a session for the target to verify.

A `Drafter` opens one `DraftSession` per session. `propose(committed, k)` gets the session's
whole committed token sequence (target token ids) and returns a `Draft` of at most k tokens for
the positions after it. Sessions keep their own incremental state (a KV cache slot, an n-gram
index) and reuse whatever prefix of it still matches `committed`, so rejected draft tokens cost
nothing to forget and accepted ones are not recomputed.

Kinds here: `ngram` (prompt lookup, no model) and `model` (a small model with the target's
tokenizer on any backend: torch, or onnxruntime for devices without torch). The
cross-tokenizer drafter (another vocabulary, drafting through text) and the drafter trained for
the target live in their own modules and follow the same protocol.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

import torch

from models.backend import Backend
from models.generate import feed
from models.sampling import SamplingParams, position_generator, probabilities, sample
from models.speculative import DRAFT_SEED_SALT, Draft, common_prefix

SPARSE_Q = 8  # top-m probabilities sent with a sampled draft token
PROPOSALS = ("coupled", "sampled")  # how a model drafter drafts when the session samples


class DraftSession(Protocol):
    kind: str

    def propose(self, committed: Sequence[int], k: int) -> Draft: ...

    def close(self) -> None: ...


class Drafter(Protocol):
    kind: str

    def open(self, params: SamplingParams) -> DraftSession: ...


# -- prompt lookup ---------------------------------------------------------------------------


def lookup_continuation(
    tokens: Sequence[int], k: int, max_ngram: int = 3, min_ngram: int = 2
) -> list[int]:
    """Prompt lookup: the up-to-k tokens that followed the latest earlier occurrence of the
    sequence's last n tokens (n from max_ngram down to min_ngram); [] when none occurs."""
    if k < 1:
        return []
    n_tokens = len(tokens)
    for n in range(max_ngram, min_ngram - 1, -1):
        if n_tokens <= n:
            continue
        tail = list(tokens[n_tokens - n :])
        # Latest match first: recent text predicts best (and loops in code repeat nearby).
        for start in range(n_tokens - n - 1, -1, -1):
            if tokens[start] == tail[0] and list(tokens[start : start + n]) == tail:
                follow = list(tokens[start + n : start + n + k])
                if follow:
                    return follow
    return []


class NgramSession:
    kind = "ngram"

    def __init__(self, max_ngram: int, min_ngram: int) -> None:
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, committed: Sequence[int], k: int) -> Draft:
        start = time.perf_counter()
        tokens = lookup_continuation(committed, k, self.max_ngram, self.min_ngram)
        return Draft(
            len(committed), tuple(tokens), kind=self.kind, draft_s=time.perf_counter() - start
        )

    def close(self) -> None:
        pass


class NgramDrafter:
    """Prompt-lookup drafting: deterministic (one-hot) proposals, no model."""

    kind = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def open(self, params: SamplingParams) -> NgramSession:
        return NgramSession(self.max_ngram, self.min_ngram)


# -- a small model with the target's tokenizer -----------------------------------------------


def draw_draft(
    logits: torch.Tensor,
    params: SamplingParams,
    position: int,
    proposal: str = "coupled",
    m: int = SPARSE_Q,
) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """A draft token from one row of drafter logits, with the sparse q it was drawn from.

    Greedy: the argmax, q None (one-hot). Sampling, `coupled`: the drafter's distribution under
    the same params, drawn with the position's uniform that the verifier will use for the
    target (`position_generator(seed, position)`), q None. The draft is then a deterministic
    proposal and stands exactly when the target's own draw agrees, which is likely when the
    two distributions are close (inverse-CDF coupling), and the text stays target-only
    sampling's. Sampling, `sampled`: drawn independently from the drafter's top-m
    distribution, renormalised, which is sent as q for min(1, p/q) acceptance."""
    if params.greedy:
        return int(logits.argmax()), None, None
    probs = probabilities(logits, params)
    if proposal == "coupled":
        return int(sample(probs, position_generator(params.seed, position))), None, None
    top = probs.topk(min(m, probs.shape[-1]))
    q = top.values / top.values.sum()
    generator = position_generator(params.seed ^ DRAFT_SEED_SALT, position)
    pick = int(sample(q, generator))
    return int(top.indices[pick]), top.indices.to(torch.int64), q.float()


class SlotDrafter(Protocol):
    """A model drafter that drafts on a backend holding one KV slot per session."""

    @property
    def kind(self) -> str: ...

    @property
    def backend(self) -> Backend: ...

    @property
    def prefill_chunk(self) -> int: ...


class ModelSession:
    """One session's drafting state on a model backend: a KV slot and the tokens in it.

    Subclasses change how a row of the backend's output becomes logits (`_logits`) and how a
    drafted index becomes a target token id (`_draw`); the slot handling is shared."""

    def __init__(self, drafter: SlotDrafter, params: SamplingParams) -> None:
        self.kind = drafter.kind
        self._drafter = drafter
        self._backend = drafter.backend
        self._params = params
        self._slot = self._backend.cache.allocate()
        self._fed: list[int] = []  # token ids whose K/V sit in the slot, in order

    def _logits(self, row: torch.Tensor) -> torch.Tensor:
        return row

    def _draw(
        self, logits: torch.Tensor, position: int
    ) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        """The drafted target token id at `position` and the sparse q it came from."""
        proposal = getattr(self._drafter, "proposal", "coupled")
        return draw_draft(logits, self._params, position, proposal)

    def _feed(self, ids: Sequence[int]) -> torch.Tensor:
        """Append ids to the slot; the logits after the last one."""
        row = feed(self._backend, self._slot, ids, self._drafter.prefill_chunk)
        self._fed.extend(ids)
        return self._logits(row)

    def propose(self, committed: Sequence[int], k: int) -> Draft:
        start = time.perf_counter()
        cache = self._backend.cache
        # A session longer than this drafter's context gets empty drafts (target-only steps).
        k = min(k, cache.max_len - len(committed))
        if k < 1 or not committed:
            return Draft(len(committed), (), kind=self.kind)
        # Reuse the longest prefix already in the slot; always re-feed the last committed token
        # so its logits exist.
        keep = min(common_prefix(self._fed, committed), len(committed) - 1)
        cache.truncate(self._slot, keep)
        del self._fed[keep:]
        logits = self._feed(committed[keep:])
        tokens: list[int] = []
        ids_rows: list[torch.Tensor] = []
        prob_rows: list[torch.Tensor] = []
        position = len(committed)
        while True:
            token, q_ids, q_probs = self._draw(logits, position + len(tokens))
            tokens.append(token)
            if q_ids is not None and q_probs is not None:
                ids_rows.append(q_ids)
                prob_rows.append(q_probs)
            if len(tokens) >= k:
                break
            logits = self._feed([token])
        sparse = bool(ids_rows)  # a sampled proposal: every token came with its q
        return Draft(
            position,
            tuple(tokens),
            torch.stack(ids_rows) if sparse else None,
            torch.stack(prob_rows) if sparse else None,
            kind=self.kind,
            draft_s=time.perf_counter() - start,
        )

    def close(self) -> None:
        if self._slot in self._backend.cache.slots:
            self._backend.cache.free(self._slot)


class ModelDrafter:
    """Drafts with a small model that shares the target's token ids, on any Backend."""

    def __init__(
        self,
        backend: Backend,
        kind: str = "model",
        prefill_chunk: int = 256,
        proposal: str = "coupled",
    ) -> None:
        if backend.layers != (0, backend.config.n_layers):
            raise ValueError("a drafter backend must hold all layers of its model")
        if proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}, got {proposal!r}")
        self.proposal = proposal
        self.backend = backend
        self.kind = kind
        self.prefill_chunk = prefill_chunk

    def open(self, params: SamplingParams) -> ModelSession:
        return ModelSession(self, params)
