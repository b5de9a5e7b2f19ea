"""What a node offers its HTTP API: the seam between the API layer and the daemon.

The API (agent/api.py) parses OpenAI/Ollama requests into a `GenerationRequest`, asks the node's
`NodeService` for a stream of `TextDelta`s ending in one `Finished`, and formats them (SSE,
NDJSON or one JSON body). Everything about where the tokens are computed (locally, on the peer
that holds the target model, drafted on other peers) stays behind `NodeService.generate`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]


class ServiceError(Exception):
    """A request the node cannot serve; the API maps each kind to its HTTP status."""

    status = 500


class BadRequestError(ServiceError):
    status = 400


class UnknownModelError(ServiceError):
    status = 404


class OverloadedError(ServiceError):
    """Too many concurrent sessions; the client should retry after `retry_after` seconds."""

    status = 429

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class UnavailableError(ServiceError):
    """No live node holds the model right now (all failed or still loading)."""

    status = 503


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class GenerationRequest:
    """One completion or chat request, already validated by the API layer.

    Exactly one of `prompt` (plain completion) and `messages` (chat: the model's chat template
    is applied) is set. `seed` None means a fresh random seed chosen by the home node.
    """

    model: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise BadRequestError("give exactly one of a prompt or chat messages")


@dataclass(frozen=True)
class TextDelta:
    """New text of the reply (may be empty when a token ends inside a UTF-8 character)."""

    text: str
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    # Per-session figures the API passes through in its usage block (e.g. drafting:
    # acceptance rate, tokens per verify step, draft length, drafter kind; the serving node).
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Finished:
    finish_reason: FinishReason
    usage: Usage


GenerationEvent = TextDelta | Finished


@dataclass(frozen=True)
class ModelCard:
    """A model the cluster can serve (listed by /v1/models and /api/tags)."""

    name: str
    architecture: str
    size_bytes: int
    chat: bool  # has a chat template
    loaded_on: tuple[str, ...] = ()  # node names holding it now


class NodeService(Protocol):
    """The daemon, as its HTTP API sees it."""

    @property
    def node_name(self) -> str: ...

    def list_models(self) -> list[ModelCard]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Stream the reply. Raises a ServiceError subclass before the first event when the
        request cannot be served (unknown model, overload, no node holds the model)."""
        ...

    def status(self) -> dict[str, Any]:
        """JSON for /status: at least node, epoch, peers [{name, alive, ...}], plan, roles,
        sessions."""
        ...

    def metrics_text(self) -> str:
        """Prometheus text exposition for /metrics."""
        ...
