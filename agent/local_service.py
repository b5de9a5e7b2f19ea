"""`LocalService`: a real single-node `NodeService` serving one model in this process.

The text side is `reply_text.reply_events` (chat template, position-keyed sampling params,
stop strings, usage, metrics); tokens come from an `agent.engine.Engine` over a backend that
holds the whole model (continuous batching on a worker thread, so the event loop stays free).
It is what a node with one model and no peers does, and what the API tests run against.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.engine import Engine
from agent.metrics import NodeMetrics
from agent.reply_text import reply_events
from agent.service import (
    GenerationEvent,
    GenerationRequest,
    ModelCard,
    TextDelta,
    UnknownModelError,
)
from models.tokenizer import Tokenizer


@dataclass
class _Session:
    """Live bookkeeping of one reply, shown by status()."""

    id: int
    model: str
    started: float
    completion_tokens: int = 0


class LocalService:
    """Serves one loaded model (tokenizer + engine over a full-model backend) on this node."""

    def __init__(
        self,
        model_name: str,
        tokenizer: Tokenizer,
        engine: Engine,
        *,
        node_name: str = "local",
        size_bytes: int = 0,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.model_name = model_name
        self.tokenizer = tokenizer
        self.engine = engine
        self.size_bytes = size_bytes
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self._node_name = node_name
        self._sessions: dict[int, _Session] = {}
        self._ids = itertools.count(1)

    @classmethod
    def load(
        cls,
        model: str,
        *,
        node_name: str = "local",
        backend: str = "auto",
        weights: str = "auto",
        max_sessions: int = 4,
        max_queue: int = 16,
        max_len: int = 2048,
        threads: int = 0,
        use_cache: bool = True,
        metrics: NodeMetrics | None = None,
    ) -> LocalService:
        """Resolve a registry name or .gguf path and load it (blocking; seconds for real models).

        `max_sessions` sessions decode together (KV slots); up to `max_queue` more wait for one.
        """
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
            use_cache=use_cache,
        )
        name = path.stem if Path(model).suffix == ".gguf" else model
        metrics = metrics if metrics is not None else NodeMetrics()
        engine = Engine(
            loaded, stop_ids=tokenizer.stop_ids, model=name, metrics=metrics, max_queue=max_queue
        )
        return cls(
            name,
            tokenizer,
            engine,
            node_name=node_name,
            size_bytes=path.stat().st_size,
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
                architecture=self.engine.backend.config.arch,
                size_bytes=self.size_bytes,
                chat=self.tokenizer.has_chat_template,
                loaded_on=(self._node_name,),
            )
        ]

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        backend = self.engine.backend
        return {
            "node": self._node_name,
            "epoch": 0,
            "peers": [],
            "plan": {"target": self.model_name, "verifier": self._node_name, "drafters": {}},
            "roles": ["verifier"],
            "models": [self.model_name],
            "backend": {"name": backend.name, "weights": backend.weight_format},
            "engine": {
                "active": self.engine.active,
                "queued": self.engine.queued,
                "steps": self.engine.steps,
                "max_slots": backend.cache.max_slots,
            },
            "sessions": [
                {
                    "id": s.id,
                    "model": s.model,
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
        events = reply_events(
            request, self.tokenizer, self.engine, node_name=self._node_name, metrics=self.metrics
        )
        session = _Session(next(self._ids), request.model, time.monotonic())
        self._sessions[session.id] = session
        self.metrics.active_sessions.inc()
        try:
            async for event in events:
                if isinstance(event, TextDelta):
                    session.completion_tokens += len(event.token_ids)
                yield event
        finally:
            # Also runs when the consumer stops early (client gone): closing `events` closes
            # the engine stream, which frees the KV slot at the engine's next step.
            await events.aclose()
            del self._sessions[session.id]
            self.metrics.active_sessions.dec()

    async def close(self, grace: float = 0.0) -> None:
        """Refuse new requests; let running ones finish for up to `grace` seconds."""
        await self.engine.close(grace)
