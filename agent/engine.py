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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from agent.metrics import NodeMetrics
from agent.service import BadRequestError, OverloadedError, UnavailableError
from models.backend import Backend
from models.generate import PREFILL_CHUNK
from models.sampling import SamplingParams, next_token, position_generator

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


class TokenSource(Protocol):
    """Something that continues a token sequence: a local engine, or a remote node."""

    def open(self, committed: Sequence[int], params: SamplingParams, max_new: int) -> TokenStream:
        """Starts generating after `committed`. Raises OverloadedError / BadRequestError /
        UnavailableError before any token when it cannot."""
        ...


_END = object()


@dataclass(eq=False)
class _Work:
    """One session inside the engine (touched by the worker only, except `cancelled`)."""

    tokens: list[int]
    params: SamplingParams
    max_new: int
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    slot: int | None = None
    fed: int = 0  # tokens of `tokens` already in the KV cache
    generated: int = 0
    cancelled: bool = False
    finish_reason: EngineFinish | None = None


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

    # -- sessions ----------------------------------------------------------------------------

    def open(self, committed: Sequence[int], params: SamplingParams, max_new: int) -> EngineStream:
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
        work = _Work(list(committed), params, max_new)
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
            batch = list(self._active)
            inputs = [self._next_input(w) for w in batch]
            try:
                tokens = await loop.run_in_executor(self._executor, self._step, batch, inputs)
            except Exception as exc:  # a backend failure ends the sessions of this pass only
                log.exception("forward pass over %d sessions failed", len(batch))
                for work in batch:
                    self._finish(work, None, error=exc)
                continue
            self.steps += 1
            self.last_batch = len(batch)
            for work, token in zip(batch, tokens, strict=True):
                if token is not None and not work.cancelled:
                    self._deliver(work, token)

    def _next_input(self, work: _Work) -> list[int]:
        # Chunk boundaries are counted from the start of the sequence, as models.generate does.
        end = min(len(work.tokens), (work.fed // self.prefill_chunk + 1) * self.prefill_chunk)
        return work.tokens[work.fed : end]

    def _step(self, batch: Sequence[_Work], inputs: Sequence[list[int]]) -> list[int | None]:
        """On the worker thread: one pass, then a token for each session that is caught up."""
        assert all(w.slot is not None for w in batch)
        slots = [w.slot for w in batch]
        tensors = [torch.tensor(ids, dtype=torch.int64) for ids in inputs]
        logits = self.backend.forward(slots, tensors, last_only=True)  # type: ignore[arg-type]
        out: list[int | None] = []
        for work, ids, rows in zip(batch, inputs, logits, strict=True):
            work.fed += len(ids)
            if work.fed < len(work.tokens):
                out.append(None)  # still prefilling
            else:
                out.append(choose_token(rows[-1], work.params, len(work.tokens)))
        return out

    def _deliver(self, work: _Work, token: int) -> None:
        if token in self.stop_ids:
            self._finish(work, "stop")
            return
        work.tokens.append(token)
        work.generated += 1
        work.queue.put_nowait(token)
        assert work.slot is not None
        if work.generated >= work.max_new or self.backend.cache.room(work.slot) < 1:
            self._finish(work, "length")

    def _finish(
        self, work: _Work, reason: EngineFinish | None, error: BaseException | None = None
    ) -> None:
        if work in self._active:
            self._active.remove(work)
        if work.slot is not None:
            self.backend.cache.free(work.slot)
            work.slot = None
        work.finish_reason = reason
        work.queue.put_nowait(error if error is not None else _END)
        self._report_queue()

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
            self._active.append(work)
        self._report_queue()

    def _report_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth("engine_waiting", len(self._waiting))
            self.metrics.set_queue_depth("engine_active", len(self._active))
