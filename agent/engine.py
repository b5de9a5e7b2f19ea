"""The batched generation engine of a node that holds a model: continuous batching.

One asyncio worker owns the backend. Every step it runs ONE `backend.forward` over all active
sessions (a prefill chunk for sessions still reading their committed tokens, the last sampled
token for decoding ones), on a worker thread so that the event loop keeps answering heartbeats,
then samples the next token of every session whose committed tokens are all in its KV cache.
Sessions join and leave between any two steps.

A session is given its committed tokens (the prompt, plus the tokens already generated when it
comes from a failover) and continues from there. The token at absolute position p (its index in
committed + reply) is drawn with `position_generator(seed, p)`, and prefill runs in
`PREFILL_CHUNK` chunks from the start of the sequence as `models.generate` does, so a reply is
the same whichever node computes it and whatever else shares its batches.

Speculative decoding (the verifier role). A session may have a drafter (`DraftRouter` gives
each session a `DraftChannel`: prompt lookup here, or a drafter node). Once a session has read
all its committed tokens, the engine asks its drafter for k tokens (k from the session's
`DraftPolicy`: adaptive, or fixed) and the session's next pass carries [last token, d_1..d_k];
`verify_draft` keeps the longest acceptable prefix plus one token, and the session's KV cache is
truncated past what stands. Passes never wait for a slow drafter while other sessions are
ready; a session whose draft is late by more than `draft_patience` goes ahead with no draft.
A failing drafter is replaced (another drafter, or none) without changing the text: drafts
only ever save passes, the verifier alone decides tokens.

Feature drafters (models/feature_drafter.py) draft from the target's final-normed hidden states.
When the router may hand one out (or a session has one), passes run with
`backend.forward_features` (the same logits) and each session keeps the features of the
positions in its KV cache, cut back with it on rollback; the channel sends its drafter those
it lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from agent.drafting import DraftChannel, DraftFailed, uses_features
from agent.metrics import NodeMetrics
from agent.service import BadRequestError, OverloadedError, UnavailableError
from agent.wire import SpeculationStats
from models.backend import Backend
from models.generate import PREFILL_CHUNK
from models.sampling import SamplingParams, next_token, position_generator
from models.speculative import Draft, DraftPolicy, PassCostCurve, verify_draft

log = logging.getLogger(__name__)

EngineFinish = Literal["stop", "length"]


def choose_token(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """The token at absolute `position`: a pure function of logits, params and position."""
    if params.greedy:
        return int(logits.argmax())
    return next_token(logits, params, position_generator(params.seed, position))


class TokenStream(Protocol):
    """Generated token ids of one session. Stop ids are never yielded; `finish_reason` is set
    when the stream ends ("stop": a stop id; "length": max_new or the context is full)."""

    finish_reason: EngineFinish | None

    def __aiter__(self) -> AsyncIterator[int]: ...

    async def aclose(self) -> None: ...


class DraftRouter(Protocol):
    """Gives a session a drafter: a channel, or None to verify without drafts. A router whose
    channels may draft from target features says so with a true `uses_features` attribute
    (read every pass), so that sessions keep their features from their first pass on."""

    async def channel(
        self, session_id: str, params: SamplingParams, exclude: Collection[str]
    ) -> DraftChannel | None: ...


DRAFT_PATIENCE_S = 1.0  # how long a caught-up session waits for its draft before going without
NO_DRAFTER = "*"  # in a session's excluded drafters: none is left, stop asking


class TokenSource(Protocol):
    """Something that continues a token sequence: a local engine, or a remote node."""

    def open(self, committed: Sequence[int], params: SamplingParams, max_new: int) -> TokenStream:
        """Starts generating after `committed`. Raises OverloadedError / BadRequestError /
        UnavailableError before any token when it cannot."""
        ...


_END = object()


class FeatureRows:
    """One session's target features by position: rows 0..length-1, grown by doubling so
    that a pass appends without copying what is held. Rows below `length` never change (the
    views handed to drafters stay valid while later passes append)."""

    def __init__(self) -> None:
        self._data: torch.Tensor | None = None
        self.length = 0

    def put(self, rows: torch.Tensor) -> None:
        end = self.length + int(rows.shape[0])
        if self._data is None or end > self._data.shape[0]:
            capacity = max(64, end, 2 * (0 if self._data is None else self._data.shape[0]))
            grown = rows.new_empty(capacity, rows.shape[1])
            if self._data is not None:
                grown[: self.length] = self._data[: self.length]
            self._data = grown
        self._data[self.length : end] = rows
        self.length = end

    def rows(self) -> torch.Tensor:
        assert self._data is not None or self.length == 0
        return self._data[: self.length] if self._data is not None else torch.empty(0, 0)


@dataclass(eq=False)
class _Work:
    """One session inside the engine (touched by the worker only, except `cancelled`)."""

    tokens: list[int]
    params: SamplingParams
    max_new: int
    session_id: str = ""
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    slot: int | None = None
    fed: int = 0  # tokens of `tokens` already in the KV cache
    generated: int = 0
    cancelled: bool = False
    finish_reason: EngineFinish | None = None
    # Speculative decoding.
    policy: DraftPolicy | None = None
    channel: DraftChannel | None = None
    channel_task: asyncio.Task[DraftChannel | None] | None = None
    draft_task: asyncio.Task[Draft] | None = None
    draft_asked: float = 0.0
    draft: Draft | None = None
    excluded: set[str] = field(default_factory=set)
    kind: str = ""
    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0
    asked_k: int = 0
    drafter_failures: int = 0
    # The target's features of the positions in the KV cache (None: some were not kept).
    features: FeatureRows | None = None

    @property
    def caught_up(self) -> bool:
        """Every committed token but the last is in the KV cache (decoding, not prefilling)."""
        return self.fed == len(self.tokens) - 1

    def stats(self) -> SpeculationStats:
        steps = self.verify_steps
        return SpeculationStats(
            kind=self.kind,
            drafted=self.drafted,
            accepted=self.accepted,
            verify_steps=steps,
            draft_k=self.asked_k / steps if steps else 0.0,
        )


class EngineStream:
    """The consumer's end of one engine session (see TokenStream)."""

    def __init__(self, engine: Engine, work: _Work) -> None:
        self._engine = engine
        self._work = work
        self.finish_reason: EngineFinish | None = None
        self._done = False

    def __aiter__(self) -> EngineStream:
        return self

    async def __anext__(self) -> int:
        if self._done:
            raise StopAsyncIteration
        item = await self._work.queue.get()
        if isinstance(item, int):
            return item
        self._done = True
        if item is _END:
            self.finish_reason = self._work.finish_reason
            raise StopAsyncIteration
        assert isinstance(item, BaseException)
        raise item

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._engine._cancel(self._work)

    def stats(self) -> SpeculationStats:
        """This session's speculative-decoding figures so far."""
        return self._work.stats()


class Engine:
    """Continuous batching over one backend that holds all layers of a model."""

    def __init__(
        self,
        backend: Backend,
        *,
        stop_ids: Collection[int] = (),
        model: str = "model",
        metrics: NodeMetrics | None = None,
        max_queue: int = 16,
        prefill_chunk: int = PREFILL_CHUNK,
        drafts: DraftRouter | None = None,
        draft_k: int | None = None,
        k_max: int = 8,
        draft_patience: float = DRAFT_PATIENCE_S,
    ) -> None:
        n_layers = backend.config.n_layers
        if backend.layers != (0, n_layers):
            raise ValueError(f"the engine needs all {n_layers} layers, got {backend.layers}")
        if max_queue < 0 or prefill_chunk < 1:
            raise ValueError("max_queue must be >= 0 and prefill_chunk >= 1")
        self.backend = backend
        self.model = model
        self.stop_ids = frozenset(stop_ids)
        self.metrics = metrics
        self.max_queue = max_queue
        self.prefill_chunk = prefill_chunk
        self._waiting: deque[_Work] = deque()
        self._active: list[_Work] = []
        self._wake = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sled-engine")
        self._closing = False
        self.steps = 0  # forward passes run (tests and /status)
        self.last_batch = 0  # sessions in the latest pass
        self.drafts = drafts
        self._ids = itertools.count(1)  # session ids for callers that give none
        self.draft_k = draft_k
        self.k_max = k_max
        self.draft_patience = draft_patience
        # The measured cost of a pass by tokens in it, shared by all sessions' draft policies.
        self.pass_cost = PassCostCurve()
        # Feature drafters need a backend that returns its features (torch, whole model).
        self.feature_capable = drafts is not None and callable(
            getattr(backend, "forward_features", None)
        )
        self.feature_passes = 0  # passes run with features (tests and /status)

    # -- figures -----------------------------------------------------------------------------

    @property
    def max_len(self) -> int:
        return self.backend.cache.max_len

    @property
    def queued(self) -> int:
        """Sessions waiting for a KV slot."""
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Sessions holding a KV slot."""
        return len(self._active)

    def sessions_json(self) -> list[dict[str, object]]:
        """The sessions verified here now, with their drafting figures (for /status)."""
        return [
            {
                "id": w.session_id,
                "tokens": len(w.tokens),
                "generated": w.generated,
                "drafter_node": w.channel.node if w.channel is not None else "",
                "draft_k_now": w.policy.last_k if w.policy is not None else 0,
                **w.stats().to_json(),
            }
            for w in self._active
        ]

    # -- sessions ----------------------------------------------------------------------------

    def open(
        self,
        committed: Sequence[int],
        params: SamplingParams,
        max_new: int,
        session_id: str = "",
    ) -> EngineStream:
        if self._closing:
            raise UnavailableError("this node's engine is shutting down")
        if not committed:
            raise BadRequestError("nothing to continue: the token sequence is empty")
        if max_new < 1:
            raise BadRequestError(f"max_new must be >= 1, got {max_new}")
        if len(committed) >= self.max_len:
            raise BadRequestError(
                f"the sequence has {len(committed)} tokens; this node holds at most "
                f"{self.max_len} per session (prompt and reply together)"
            )
        vocab = self.backend.config.vocab_size
        if min(committed) < 0 or max(committed) >= vocab:
            raise BadRequestError(f"token ids must be in [0, {vocab})")
        capacity = self.backend.cache.max_slots + self.max_queue
        if len(self._active) + len(self._waiting) >= capacity:
            raise OverloadedError(
                f"{self.model}: {len(self._active)} sessions running and {len(self._waiting)} "
                "waiting; try again shortly",
                retry_after=1.0,
            )
        work = _Work(list(committed), params, max_new, session_id or f"engine-{next(self._ids)}")
        if self.drafts is not None:
            work.policy = DraftPolicy(self.pass_cost, self.draft_k, self.k_max)
        self._waiting.append(work)
        self._report_queue()
        self._ensure_worker()
        self._wake.set()
        return EngineStream(self, work)

    def _cancel(self, work: _Work) -> None:
        work.cancelled = True
        self._wake.set()

    # -- life cycle --------------------------------------------------------------------------

    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def close(self, grace: float = 0.0) -> None:
        """Refuse new sessions, let running ones finish for up to `grace` seconds, then end the
        rest with UnavailableError and stop the worker thread."""
        self._closing = True
        deadline = time.monotonic() + grace
        while (self._active or self._waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        error = UnavailableError("this node's engine shut down before the reply was complete")
        for work in list(self._waiting) + self._active:
            work.cancelled = True
            work.queue.put_nowait(error)
        self._wake.set()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    # -- the worker --------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._retire_cancelled()
            self._admit()
            if not self._active:
                self._wake.clear()
                await self._wake.wait()
                continue
            self._start_drafting()
            batch = self._ready()
            if not batch:
                await self._wait_for_drafts()
                continue
            inputs = [self._next_input(w) for w in batch]
            drafts = [self._take_draft(w) for w in batch]
            features = self._wants_features()
            try:
                out = await loop.run_in_executor(
                    self._executor, self._step, batch, inputs, drafts, features
                )
            except Exception as exc:  # a backend failure ends the sessions of this pass only
                log.exception("forward pass over %d sessions failed", len(batch))
                for work in batch:
                    self._finish(work, None, error=exc)
                continue
            self.steps += 1
            self.last_batch = len(batch)
            if self.metrics is not None:
                self.metrics.verify_batch.observe(len(batch))
            for work, draft, tokens in zip(batch, drafts, out, strict=True):
                if tokens is None or work.cancelled:
                    continue
                self._count(work, draft, len(tokens) - 1)
                for token in tokens:
                    if not self._deliver(work, token):
                        break

    def _next_input(self, work: _Work) -> list[int]:
        # Chunk boundaries are counted from the start of the sequence, as models.generate does.
        end = min(len(work.tokens), (work.fed // self.prefill_chunk + 1) * self.prefill_chunk)
        return work.tokens[work.fed : end]

    def _wants_features(self) -> bool:
        """Whether the next pass keeps features: only when a feature drafter may use them."""
        if not self.feature_capable:
            return False
        return uses_features(self.drafts) or any(uses_features(w.channel) for w in self._active)

    def _step(
        self,
        batch: Sequence[_Work],
        inputs: Sequence[list[int]],
        drafts: Sequence[Draft | None],
        features: bool = False,
    ) -> list[list[int] | None]:
        """On the worker thread: one pass; for each session that has read all its committed
        tokens, the tokens it gains (accepted draft tokens, then one more)."""
        assert all(w.slot is not None for w in batch)
        slots = [w.slot for w in batch]
        fed = [
            ids + list(d.tokens) if d is not None else ids
            for ids, d in zip(inputs, drafts, strict=True)
        ]
        tensors = [torch.tensor(ids, dtype=torch.int64) for ids in fed]
        keep = [1 + (d.k if d is not None else 0) for d in drafts]
        start = time.perf_counter()
        feats: list[torch.Tensor] | None = None
        if features:
            forward_features = self.backend.forward_features  # type: ignore[attr-defined]
            rows, feats = forward_features(slots, tensors, keep=keep)
            self.feature_passes += 1
        else:
            rows = self.backend.forward(slots, tensors, keep=keep)  # type: ignore[arg-type]
        self.pass_cost.observe(sum(len(ids) for ids in fed), time.perf_counter() - start)
        out: list[list[int] | None] = []
        for i, (work, ids, draft, logits) in enumerate(
            zip(batch, inputs, drafts, rows, strict=True)
        ):
            before = work.fed
            out.append(self._advance(work, ids, draft, logits))
            if work.features is not None:
                if feats is None or work.features.length != before:
                    work.features = None  # a pass without them: this session has none from now
                else:
                    # Rows of the positions that stand (the KV cache was cut past the rest).
                    work.features.put(feats[i][: work.fed - before])
        return out

    def _advance(
        self, work: _Work, ids: list[int], draft: Draft | None, logits: torch.Tensor
    ) -> list[int] | None:
        """A session's part of a pass: None while prefilling, else the tokens it gains."""
        assert work.slot is not None
        work.fed += len(ids)
        if work.fed < len(work.tokens):
            return None  # still prefilling
        if draft is None or draft.k == 0:
            return [choose_token(logits[-1], work.params, len(work.tokens))]
        verdict = verify_draft(logits, draft, work.params)
        self.backend.cache.truncate(work.slot, work.fed + verdict.accepted)
        work.fed += verdict.accepted
        return [*draft.tokens[: verdict.accepted], verdict.token]

    # -- drafting ------------------------------------------------------------------------------

    def _start_drafting(self) -> None:
        """Ask for drafts for caught-up sessions that have none coming."""
        if self.drafts is None:
            return
        for work in self._active:
            policy = work.policy
            if policy is None or work.cancelled:
                continue
            self._collect(work)  # a drafter chosen since the last pass drafts for this one
            if work.channel is None:
                if work.channel_task is None and NO_DRAFTER not in work.excluded:
                    work.channel_task = asyncio.get_running_loop().create_task(
                        self.drafts.channel(work.session_id, work.params, set(work.excluded))
                    )
                    work.channel_task.add_done_callback(lambda _: self._wake.set())
                continue
            if not work.caught_up or work.draft is not None or work.draft_task is not None:
                continue
            assert work.slot is not None
            room = min(
                self.backend.cache.room(work.slot) - 1,  # the last committed token goes in too
                work.max_new - work.generated - 1,  # the pass adds one token beyond the draft
            )
            others = sum(1 + w.policy.last_k for w in self._active if w is not work and w.policy)
            k = policy.next_k(room, others)
            if k < 1:
                continue
            committed = list(work.tokens)
            if uses_features(work.channel):
                if work.features is None or work.features.length != work.fed:
                    self._lacks_features(work)
                    continue
                propose = work.channel.propose(committed, k, work.features.rows())
            else:
                propose = work.channel.propose(committed, k)
            work.draft_asked = time.monotonic()
            task = asyncio.get_running_loop().create_task(propose)
            task.add_done_callback(lambda _: self._wake.set())
            work.draft_task = task

    def _collect(self, work: _Work) -> None:
        """Take in finished channel and draft tasks."""
        if work.channel_task is not None and work.channel_task.done():
            channel_task, work.channel_task = work.channel_task, None
            failed = channel_task.cancelled() or channel_task.exception() is not None
            channel = None if failed else channel_task.result()
            if channel is None:
                work.excluded.add(NO_DRAFTER)  # verify this session without drafts
            else:
                work.channel = channel
        if work.draft_task is not None and work.draft_task.done():
            draft_task, work.draft_task = work.draft_task, None
            assert work.policy is not None
            if draft_task.cancelled():
                return
            exc = draft_task.exception()
            if exc is None:
                draft = draft_task.result()
                work.draft = draft
                work.kind = draft.kind or work.kind
                work.policy.observe_draft(draft.k, time.monotonic() - work.draft_asked)
            else:
                self._drafter_failed(work, exc)

    def _lacks_features(self, work: _Work) -> None:
        """A feature drafter for a session whose features were not all kept (it started before
        one could be had): ask for another drafter."""
        channel, work.channel = work.channel, None
        if channel is not None:
            work.excluded.add(channel.node or "local")
            asyncio.get_running_loop().create_task(_close_quietly(channel))
            log.info(
                "session %s: no target features kept for its %s drafter; drafting elsewhere",
                work.session_id,
                channel.kind,
            )

    def _drafter_failed(self, work: _Work, exc: BaseException) -> None:
        channel, work.channel = work.channel, None
        if channel is not None:
            work.excluded.add(channel.node or "local")
            asyncio.get_running_loop().create_task(_close_quietly(channel))
        work.drafter_failures += 1
        if self.metrics is not None:
            self.metrics.drafter_failovers.inc()
        level = logging.WARNING if isinstance(exc, DraftFailed) else logging.ERROR
        log.log(level, "session %s: drafter failed (%s); drafting elsewhere", work.session_id, exc)

    def _ready(self) -> list[_Work]:
        """Sessions to put in the next pass: all but those waiting (within patience) for a
        draft or for their drafter to be chosen."""
        now = time.monotonic()
        ready = []
        for work in self._active:
            self._collect(work)
            if not work.caught_up or work.draft is not None:
                ready.append(work)
            elif work.draft_task is not None:
                if now - work.draft_asked > self.draft_patience:
                    ready.append(work)  # late draft: go without it (it is aligned if it comes)
            elif work.channel_task is None:
                ready.append(work)
        return ready

    async def _wait_for_drafts(self) -> None:
        waiting = [w for w in self._active if w.draft_task is not None]
        timeout = self.draft_patience
        if waiting:
            oldest = min(w.draft_asked for w in waiting)
            timeout = max(0.0, oldest + self.draft_patience - time.monotonic()) + 0.001
        self._wake.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _take_draft(self, work: _Work) -> Draft | None:
        """The session's draft for this pass, aligned to its position; None when it has none."""
        draft, work.draft = work.draft, None
        if draft is None or not work.caught_up:
            if draft is not None:
                work.draft = draft  # keep it for when the prefill is through
            return None
        position = len(work.tokens)
        if draft.position != position:
            skip = position - draft.position
            if skip < 0 or list(draft.tokens[:skip]) != work.tokens[draft.position : position]:
                return None  # drafted for text that did not happen
            draft = draft.after(position)
        assert work.slot is not None
        limit = min(self.backend.cache.room(work.slot) - 1, work.max_new - work.generated - 1)
        if draft.k > limit:
            draft = draft.first(max(0, limit))
        return draft if draft.k else None

    def _count(self, work: _Work, draft: Draft | None, accepted: int) -> None:
        if work.policy is None:
            return
        drafted = draft.k if draft is not None else 0
        work.verify_steps += 1
        work.drafted += drafted
        work.accepted += accepted
        work.asked_k += drafted
        work.policy.observe_verify(drafted, accepted)
        if self.metrics is not None:
            self.metrics.observe_verify_step(drafted, accepted, work.kind or "none")

    def _deliver(self, work: _Work, token: int) -> bool:
        """Commit one token; False when the session ended."""
        if token in self.stop_ids:
            self._finish(work, "stop")
            return False
        work.tokens.append(token)
        work.generated += 1
        work.queue.put_nowait(token)
        assert work.slot is not None
        if work.generated >= work.max_new or self.backend.cache.room(work.slot) < 1:
            self._finish(work, "length")
            return False
        return True

    def _finish(
        self, work: _Work, reason: EngineFinish | None, error: BaseException | None = None
    ) -> None:
        if work in self._active:
            self._active.remove(work)
        self._stop_drafting(work)
        if work.slot is not None:
            self.backend.cache.free(work.slot)
            work.slot = None
        work.finish_reason = reason
        work.queue.put_nowait(error if error is not None else _END)
        self._report_queue()

    def _stop_drafting(self, work: _Work) -> None:
        for task in (work.draft_task, work.channel_task):
            if task is not None and not task.done():
                task.cancel()
        work.draft_task = None
        work.draft = None
        if work.channel_task is not None and work.channel_task.done():
            self._collect(work)
        work.channel_task = None
        channel, work.channel = work.channel, None
        if channel is not None:
            asyncio.get_running_loop().create_task(_close_quietly(channel))

    def _retire_cancelled(self) -> None:
        for work in [w for w in self._active if w.cancelled]:
            self._finish(work, None)
        if any(w.cancelled for w in self._waiting):
            self._waiting = deque(w for w in self._waiting if not w.cancelled)
            self._report_queue()

    def _admit(self) -> None:
        cache = self.backend.cache
        while self._waiting and len(self._active) < cache.max_slots:
            work = self._waiting.popleft()
            work.slot = cache.allocate()
            if self.feature_capable:
                work.features = FeatureRows()
            self._active.append(work)
        self._report_queue()

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth("engine_waiting", len(self._waiting))
            self.metrics.set_queue_depth("engine_active", len(self._active))


async def _close_quietly(channel: DraftChannel) -> None:
    try:
        await channel.close()
    except Exception:  # closing is a courtesy to the drafter; it drops idle sessions anyway
        log.debug("closing a %s draft channel failed", channel.kind, exc_info=True)
