"""`LocalService`: a real single-node `NodeService` serving one model in this process.

It tokenizes the request (chat template or plain prompt), prefills a KV-cache slot, samples each
token with the generator keyed by (seed, absolute position) so a reply is a pure function of
(model, prompt, params), streams text with stop strings cut, and reports usage and metrics.
Forward passes run on one worker thread so the event loop stays free; every backend call
(allocate, forward, free) goes through that thread, which serialises them. `_forward` is the
only method that runs passes: the daemon's batching engine can take its place.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import torch

from agent.metrics import NodeMetrics
from agent.reply_text import ReplyText, prompt_ids
from agent.service import (
    BadRequestError,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    ModelCard,
    OverloadedError,
    TextDelta,
    UnavailableError,
    UnknownModelError,
    Usage,
)
from models.backend import Backend
from models.generate import PREFILL_CHUNK
from models.kv_cache import NoFreeSlotError
from models.sampling import (
    InvalidSamplingParamsError,
    SamplingParams,
    next_token,
    position_generator,
)
from models.tokenizer import Tokenizer

T = TypeVar("T")

# Seeds chosen for requests without one stay below 2**31 so every client library can echo them.
SEED_BOUND = 2**31


def sampling_params(request: GenerationRequest, seed: int) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, seed=seed
        )
    except InvalidSamplingParamsError as exc:
        raise BadRequestError(str(exc)) from exc


def choose_token(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """The token at absolute `position` (its index in prompt + reply): a pure function of the
    logits, the params and the position, whichever node computes it."""
    if params.greedy:
        return int(logits.argmax())
    return next_token(logits, params, position_generator(params.seed, position))


@dataclass
class _Session:
    """Live bookkeeping of one generation, shown by status()."""

    id: int
    model: str
    prompt_tokens: int
    started: float
    completion_tokens: int = 0


class LocalService:
    """Serves one loaded model (tokenizer + backend holding all layers) on this node."""

    def __init__(
        self,
        model_name: str,
        tokenizer: Tokenizer,
        backend: Backend,
        *,
        node_name: str = "local",
        size_bytes: int = 0,
        max_sessions: int | None = None,
        metrics: NodeMetrics | None = None,
    ) -> None:
        n_layers = backend.config.n_layers
        if backend.layers != (0, n_layers):
            raise ValueError(f"LocalService needs all {n_layers} layers, got {backend.layers}")
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.backend = backend
        self.size_bytes = size_bytes
        self.max_sessions = backend.cache.max_slots if max_sessions is None else max_sessions
        if not 1 <= self.max_sessions <= backend.cache.max_slots:
            raise ValueError(
                f"max_sessions must be in 1..{backend.cache.max_slots} (the backend's KV slots)"
            )
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self._node_name = node_name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sled-forward")
        self._sessions: dict[int, _Session] = {}
        self._ids = itertools.count(1)
        self._waiting = 0  # backend calls queued or running on the worker thread
        self._closed = False

    @classmethod
    def load(
        cls,
        model: str,
        *,
        node_name: str = "local",
        backend: str = "auto",
        weights: str = "auto",
        max_sessions: int = 4,
        max_len: int = 2048,
        threads: int = 0,
        metrics: NodeMetrics | None = None,
    ) -> LocalService:
        """Resolve a registry name or .gguf path and load it (blocking; seconds for real models)."""
        from models.backend import load_backend
        from models.registry import resolve_model

        path = resolve_model(model)
        tokenizer = Tokenizer.from_gguf(path)
        loaded = load_backend(
            path,
            backend=backend,
            weights=weights,
            max_slots=max_sessions,
            max_len=max_len,
            threads=threads,
        )
        name = path.stem if Path(model).suffix == ".gguf" else model
        return cls(
            name,
            tokenizer,
            loaded,
            node_name=node_name,
            size_bytes=path.stat().st_size,
            max_sessions=max_sessions,
            metrics=metrics,
        )

    # -- NodeService -----------------------------------------------------------------------------

    @property
    def node_name(self) -> str:
        return self._node_name

    def list_models(self) -> list[ModelCard]:
        return [
            ModelCard(
                name=self.model_name,
                architecture=self.backend.config.arch,
                size_bytes=self.size_bytes,
                chat=self.tokenizer.has_chat_template,
                loaded_on=(self._node_name,),
            )
        ]

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "node": self._node_name,
            "epoch": 0,
            "peers": [],
            "plan": {"target": self.model_name, "verifier": self._node_name, "drafters": {}},
            "roles": ["verifier"],
            "models": [self.model_name],
            "backend": {"name": self.backend.name, "weights": self.backend.weight_format},
            "max_sessions": self.max_sessions,
            "queue_depth": self._waiting,
            "sessions": [
                {
                    "id": s.id,
                    "model": s.model,
                    "prompt_tokens": s.prompt_tokens,
                    "completion_tokens": s.completion_tokens,
                    "age_s": round(now - s.started, 3),
                }
                for s in self._sessions.values()
            ],
        }

    def metrics_text(self) -> str:
        return self.metrics.text()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        if request.model != self.model_name:
            raise UnknownModelError(
                f"model {request.model!r} is not served here (this node serves {self.model_name!r})"
            )
        if self._closed:
            raise UnavailableError(f"node {self._node_name} is shutting down")
        seed = request.seed if request.seed is not None else secrets.randbelow(SEED_BOUND)
        params = sampling_params(request, seed)
        if request.max_tokens < 1:
            raise BadRequestError(f"max_tokens must be >= 1, got {request.max_tokens}")
        prompt = prompt_ids(self.tokenizer, request)
        max_len = self.backend.cache.max_len
        if len(prompt) >= max_len:
            raise BadRequestError(
                f"the prompt has {len(prompt)} tokens; this model serves at most {max_len} "
                "tokens per session (prompt and reply together)"
            )
        if len(self._sessions) >= self.max_sessions:
            raise OverloadedError(
                f"node {self._node_name} is serving its maximum of {self.max_sessions} sessions"
            )
        session = _Session(next(self._ids), request.model, len(prompt), time.monotonic())
        # Registered before the first await so concurrent requests see the bound.
        self._sessions[session.id] = session
        self.metrics.active_sessions.inc()
        slot: int | None = None
        try:
            try:
                slot = await self._call(self.backend.cache.allocate)
            except NoFreeSlotError as exc:
                raise OverloadedError(str(exc)) from exc
            async for event in self._decode(request, params, prompt, slot, session):
                yield event
        finally:
            # Runs on normal end, on error and when the consumer closes the stream early
            # (client gone): the slot goes back after any pass still running on it.
            if slot is not None:
                self._submit(self.backend.cache.free, slot)
            del self._sessions[session.id]
            self.metrics.active_sessions.dec()

    async def _decode(
        self,
        request: GenerationRequest,
        params: SamplingParams,
        prompt: list[int],
        slot: int,
        session: _Session,
    ) -> AsyncIterator[GenerationEvent]:
        model = request.model
        start = time.perf_counter()
        self.metrics.count_prompt(model, len(prompt))
        logits = await self._forward(slot, prompt)
        reply = ReplyText(self.tokenizer.stream_decoder(), request.stop)
        stop_ids = self.tokenizer.stop_ids
        room = self.backend.cache.max_len - len(prompt)
        finish: FinishReason = "length"
        last = start
        for _ in range(request.max_tokens):
            position = len(prompt) + session.completion_tokens
            token = choose_token(logits, params, position)
            now = time.perf_counter()
            if session.completion_tokens == 0:
                self.metrics.observe_first_token(model, now - start)
            else:
                self.metrics.observe_token_gap(model, now - last)
            last = now
            if token in stop_ids:
                finish = "stop"
                break
            session.completion_tokens += 1
            self.metrics.count_generated(model)
            text = reply.push(token)
            if reply.stopped:
                finish = "stop"
                if text:
                    yield TextDelta(text, (token,))
                break
            yield TextDelta(text, (token,))
            if session.completion_tokens >= request.max_tokens or session.completion_tokens > room:
                break  # max_tokens, or the cache is full (the last token is never fed back)
            logits = await self._forward(slot, [token])
        tail = reply.finish()
        if tail:
            yield TextDelta(tail)
        usage = Usage(
            prompt_tokens=len(prompt),
            completion_tokens=session.completion_tokens,
            extra={"node": self._node_name, "seed": params.seed},
        )
        yield Finished(finish, usage)

    # -- the worker thread -------------------------------------------------------------------------

    async def _forward(self, slot: int, ids: Sequence[int]) -> torch.Tensor:
        """Append `ids` to the slot's sequence and return the last position's logits [vocab].

        The one place that runs forward passes (prefill in chunks, as models.generate does, so
        greedy text matches it exactly)."""
        tokens = torch.tensor(list(ids), dtype=torch.int64)
        logits = torch.empty(0)
        for i in range(0, len(tokens), PREFILL_CHUNK):
            chunk = tokens[i : i + PREFILL_CHUNK]
            out = await self._call(partial(self.backend.forward, [slot], [chunk], last_only=True))
            logits = out[0][-1]
        return logits

    async def _call(self, fn: Callable[[], T]) -> T:
        if self._closed:
            raise UnavailableError(f"node {self._node_name} is shutting down")
        self._waiting += 1
        self.metrics.set_queue_depth("forward", self._waiting)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        finally:
            self._waiting -= 1
            self.metrics.set_queue_depth("forward", self._waiting)

    def _submit(self, fn: Callable[..., object], *args: object) -> None:
        """Queue a backend call without waiting (cleanup from finally blocks)."""
        if not self._closed:
            self._executor.submit(fn, *args)

    def close(self) -> None:
        """Stop taking requests and wait for the worker thread to finish its queue."""
        self._closed = True
        self._executor.shutdown(wait=True)
