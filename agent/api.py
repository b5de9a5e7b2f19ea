"""The node's HTTP API (aiohttp): OpenAI and Ollama endpoints over a `NodeService`.

Each generation request is read (body size bounded), parsed by its API's pure parser, admitted
under the concurrency bound, and served from `service.generate`: the first event is awaited
before any byte is sent, so a `ServiceError` still becomes a proper status in the API's own
error shape. Replies stream as SSE (OpenAI) or NDJSON (Ollama), or come as one JSON body. When
the client goes away mid-reply the event stream is closed, which ends the session on the node.

The daemon passes host and port to aiohttp; this module only builds the application.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol

from aiohttp import web

from agent import ollama_format, openai_format
from agent.json_fields import InvalidFieldError
from agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from agent.metrics import NodeMetrics
from agent.service import (
    BadRequestError,
    Finished,
    GenerationEvent,
    GenerationRequest,
    NodeService,
    OverloadedError,
    ServiceError,
    TextDelta,
    UnknownModelError,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 1 << 20  # a long conversation is well under 1 MiB of JSON
DEFAULT_MAX_CONCURRENT = 16
DEFAULT_RETRY_AFTER_S = 1.0
SSE_CONTENT_TYPE = "text/event-stream"
NDJSON_CONTENT_TYPE = "application/x-ndjson"


class BodyTooLargeError(ServiceError):
    status = 413


def _retry_after(exc: ServiceError) -> dict[str, str]:
    if isinstance(exc, OverloadedError):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
    return {}


# -- error shapes --------------------------------------------------------------------------------

OPENAI_ERROR_TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}
OPENAI_ERROR_CODES = {413: "request_too_large", 429: "rate_limit_exceeded"}


def openai_error(
    status: int,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> web.Response:
    body = openai_format.error_json(
        message,
        OPENAI_ERROR_TYPES.get(status, "invalid_request_error"),
        param,
        code or OPENAI_ERROR_CODES.get(status),
    )
    return web.json_response(body, status=status, headers=headers)


def ollama_error(
    status: int,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> web.Response:
    return web.json_response(ollama_format.error_json(message), status=status, headers=headers)


ErrorResponder = Callable[..., web.Response]


def error_response(respond: ErrorResponder, exc: ServiceError) -> web.Response:
    if isinstance(exc, UnknownModelError):
        return respond(exc.status, str(exc), "model", None, "model_not_found")
    param = exc.param if isinstance(exc, InvalidFieldError) else None
    return respond(exc.status, str(exc), param, _retry_after(exc))


def responder_for(path: str) -> ErrorResponder:
    """Routing errors (404, 405) in the shape of the API the path belongs to."""
    return ollama_error if path.startswith("/api/") else openai_error


# -- reply encodings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """perf_counter_ns marks of one request."""

    start: int
    first_token: int
    end: int

    def durations(self) -> ollama_format.Durations:
        return ollama_format.Durations(
            total=self.end - self.start,
            prompt_eval=self.first_token - self.start,
            eval=self.end - self.first_token,
        )


class Encoding(Protocol):
    """How one API writes a reply: stream pieces, or one JSON body."""

    @property
    def content_type(self) -> str: ...

    def opening(self) -> bytes: ...
    def delta(self, text: str) -> bytes: ...
    def closing(self, done: Finished, timing: Timing) -> bytes: ...
    def failure(self, message: str) -> bytes: ...
    def whole(self, text: str, done: Finished, timing: Timing) -> dict[str, Any]: ...


@dataclass(frozen=True)
class OpenAIEncoding:
    reply: openai_format.ChatReply | openai_format.CompletionReply
    content_type: str = SSE_CONTENT_TYPE

    def opening(self) -> bytes:
        first = self.reply.first_chunk()
        return openai_format.sse(first) if first is not None else b""

    def delta(self, text: str) -> bytes:
        return openai_format.sse(self.reply.text_chunk(text))

    def closing(self, done: Finished, timing: Timing) -> bytes:
        chunks = self.reply.last_chunks(done.finish_reason, done.usage)
        return b"".join(openai_format.sse(c) for c in chunks) + openai_format.SSE_DONE

    def failure(self, message: str) -> bytes:
        return openai_format.sse(openai_format.error_json(message, "server_error"))

    def whole(self, text: str, done: Finished, timing: Timing) -> dict[str, Any]:
        return self.reply.body(text, done.finish_reason, done.usage)


@dataclass(frozen=True)
class OllamaEncoding:
    reply: ollama_format.ChatReply | ollama_format.GenerateReply
    content_type: str = NDJSON_CONTENT_TYPE

    def opening(self) -> bytes:
        return b""

    def delta(self, text: str) -> bytes:
        return ollama_format.ndjson(self.reply.line(ollama_format.timestamp(time.time()), text))

    def closing(self, done: Finished, timing: Timing) -> bytes:
        return ollama_format.ndjson(self.whole("", done, timing))

    def failure(self, message: str) -> bytes:
        return ollama_format.ndjson(ollama_format.error_json(message))

    def whole(self, text: str, done: Finished, timing: Timing) -> dict[str, Any]:
        now = ollama_format.timestamp(time.time())
        return self.reply.last(now, text, done.finish_reason, done.usage, timing.durations())


@dataclass(frozen=True)
class Admitted:
    """A parsed generation request, ready to run."""

    generation: GenerationRequest
    stream: bool
    encoding: Encoding


# -- the application -----------------------------------------------------------------------------


class ApiHandlers:
    """Request handlers of one node's API; holds the count of replies in progress."""

    def __init__(
        self,
        service: NodeService,
        max_body_bytes: int,
        max_concurrent: int,
        metrics: NodeMetrics | None,
        retry_after_s: float = DEFAULT_RETRY_AFTER_S,
    ) -> None:
        if max_body_bytes < 1 or max_concurrent < 1:
            raise ValueError("max_body_bytes and max_concurrent must be >= 1")
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.max_concurrent = max_concurrent
        self.metrics = metrics
        self.retry_after_s = retry_after_s
        self.active = 0

    # -- generation endpoints ------------------------------------------------------------------

    async def openai_chat(self, request: web.Request) -> web.StreamResponse:
        def admit(body: Any) -> Admitted:
            parsed = openai_format.parse_chat_request(body)
            reply = openai_format.ChatReply(
                "chatcmpl-" + secrets.token_hex(12),
                int(time.time()),
                parsed.generation.model,
                parsed.include_usage,
            )
            return Admitted(parsed.generation, parsed.stream, OpenAIEncoding(reply))

        return await self._serve(request, "openai.chat", openai_error, admit)

    async def openai_completions(self, request: web.Request) -> web.StreamResponse:
        def admit(body: Any) -> Admitted:
            parsed = openai_format.parse_completion_request(body)
            reply = openai_format.CompletionReply(
                "cmpl-" + secrets.token_hex(12),
                int(time.time()),
                parsed.generation.model,
                parsed.include_usage,
            )
            return Admitted(parsed.generation, parsed.stream, OpenAIEncoding(reply))

        return await self._serve(request, "openai.completions", openai_error, admit)

    async def ollama_chat(self, request: web.Request) -> web.StreamResponse:
        def admit(body: Any) -> Admitted:
            parsed = ollama_format.parse_chat_request(body)
            assert parsed.generation is not None  # chat always generates
            reply = ollama_format.ChatReply(parsed.model)
            return Admitted(parsed.generation, parsed.stream, OllamaEncoding(reply))

        return await self._serve(request, "ollama.chat", ollama_error, admit)

    async def ollama_generate(self, request: web.Request) -> web.StreamResponse:
        def admit(body: Any) -> Admitted | web.Response:
            requested = body.get("model") if isinstance(body, dict) else None
            name = ollama_format.model_name(requested) if isinstance(requested, str) else ""
            card = next((c for c in self.service.list_models() if c.name == name), None)
            parsed = ollama_format.parse_generate_request(body, card is not None and card.chat)
            reply = ollama_format.GenerateReply(parsed.model)
            if parsed.generation is None:  # empty prompt: Ollama's "load the model" call
                if card is None:
                    raise UnknownModelError(f"model {parsed.model!r} not found")
                return web.json_response(reply.loaded(ollama_format.timestamp(time.time())))
            return Admitted(parsed.generation, parsed.stream, OllamaEncoding(reply))

        return await self._serve(request, "ollama.generate", ollama_error, admit)

    async def _serve(
        self,
        request: web.Request,
        api: str,
        respond: ErrorResponder,
        admit: Callable[[Any], Admitted | web.Response],
    ) -> web.StreamResponse:
        start = time.perf_counter_ns()
        status = 500
        try:
            try:
                admitted = admit(await self._read_json(request))
            except ServiceError as exc:
                status = exc.status
                return error_response(respond, exc)
            if isinstance(admitted, web.Response):  # answered without generating
                status = admitted.status
                return admitted
            if self.active >= self.max_concurrent:
                status = 429
                return respond(
                    429,
                    f"this node is serving its maximum of {self.max_concurrent} concurrent "
                    "requests; retry shortly",
                    None,
                    {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))},
                )
            self.active += 1
            try:
                response, status = await self._run(request, admitted, respond, start)
                return response
            finally:
                self.active -= 1
        finally:
            if self.metrics is not None:
                self.metrics.count_request(api, status)

    async def _run(
        self, request: web.Request, admitted: Admitted, respond: ErrorResponder, start: int
    ) -> tuple[web.StreamResponse, int]:
        events = aiter(self.service.generate(admitted.generation))
        try:
            try:
                first = await anext(events)
            except ServiceError as exc:
                return error_response(respond, exc), exc.status
            except StopAsyncIteration:
                log.error("the node's reply stream ended without a Finished event")
                return respond(500, "the node ended the reply without finishing it"), 500
            except Exception:
                log.exception("generation failed before its first event")
                return respond(500, "internal error while starting the reply"), 500
            first_token = time.perf_counter_ns()
            if admitted.stream:
                return await _stream(request, admitted.encoding, first, events, start, first_token)
            try:
                return await _collect(request, admitted.encoding, first, events, start, first_token)
            except ServiceError as exc:  # e.g. no node left to finish the reply
                return error_response(respond, exc), exc.status
        finally:
            # Ends the session on the node when the reply was cut short (client gone, error).
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _read_json(self, request: web.Request) -> Any:
        limit = self.max_body_bytes
        too_large = BodyTooLargeError(f"the request body is larger than the {limit} bytes allowed")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        try:
            raw = await request.read()  # aiohttp enforces client_max_size while reading
        except web.HTTPRequestEntityTooLarge:
            raise too_large from None
        if not raw.strip():
            raise BadRequestError("the request body is empty; send a JSON object")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise BadRequestError(f"the request body is not valid JSON: {exc}") from None

    # -- other endpoints -------------------------------------------------------------------------

    async def openai_models(self, request: web.Request) -> web.Response:
        cards = self.service.list_models()
        return web.json_response(
            openai_format.models_json(cards, int(time.time()), self.service.node_name)
        )

    async def ollama_tags(self, request: web.Request) -> web.Response:
        now = ollama_format.timestamp(time.time())
        return web.json_response(ollama_format.tags_json(self.service.list_models(), now))

    async def ollama_version(self, request: web.Request) -> web.Response:
        try:
            version = metadata.version("sled-edge")
        except metadata.PackageNotFoundError:
            version = "0.0.0"
        return web.json_response({"version": version})

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.service.status())

    async def metrics_text(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.service.metrics_text().encode(),
            headers={"Content-Type": METRICS_CONTENT_TYPE},
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "node": self.service.node_name})


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _stream(
    request: web.Request,
    encoding: Encoding,
    first: GenerationEvent,
    events: AsyncIterator[GenerationEvent],
    start: int,
    first_token: int,
) -> tuple[web.StreamResponse, int]:
    response = web.StreamResponse(
        status=200, headers={"Content-Type": encoding.content_type, "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    try:
        opening = encoding.opening()
        if opening:
            await response.write(opening)
        event: GenerationEvent | None = first
        while event is not None:
            if _gone(request):
                return response, 200  # the caller closes the event stream
            if isinstance(event, Finished):
                timing = Timing(start, first_token, time.perf_counter_ns())
                await response.write(encoding.closing(event, timing))
                break
            if event.text:
                await response.write(encoding.delta(event.text))
            event = await anext(events, None)
        else:
            log.error("the node's reply stream ended without a Finished event")
            await response.write(encoding.failure("the node ended the reply without finishing it"))
    except ConnectionResetError:
        return response, 200  # client gone mid-write
    except ServiceError as exc:
        # Headers are out: the error goes into the stream in the API's own shape.
        await _write_quietly(response, encoding.failure(str(exc)))
    except Exception:
        log.exception("generation failed mid-stream")
        await _write_quietly(response, encoding.failure("internal error while generating"))
    await _write_eof_quietly(response)
    return response, 200


async def _collect(
    request: web.Request,
    encoding: Encoding,
    first: GenerationEvent,
    events: AsyncIterator[GenerationEvent],
    start: int,
    first_token: int,
) -> tuple[web.StreamResponse, int]:
    pieces: list[str] = []
    event: GenerationEvent | None = first
    while isinstance(event, TextDelta):
        if _gone(request):
            return web.Response(status=499), 499  # nobody to answer; the session is closed
        pieces.append(event.text)
        event = await anext(events, None)
    if event is None:
        log.error("the node's reply stream ended without a Finished event")
        raise ServiceError("the node ended the reply without finishing it")
    timing = Timing(start, first_token, time.perf_counter_ns())
    return web.json_response(encoding.whole("".join(pieces), event, timing)), 200


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    with contextlib.suppress(ConnectionResetError):
        await response.write(data)


async def _write_eof_quietly(response: web.StreamResponse) -> None:
    with contextlib.suppress(ConnectionResetError):
        await response.write_eof()


def _error_middleware() -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def errors(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            respond = responder_for(request.path)
            message = f"{exc.reason}: {request.method} {request.path}"
            return respond(exc.status, message, None, None)

    return errors


def create_app(
    service: NodeService,
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    metrics: NodeMetrics | None = None,
) -> web.Application:
    """The API application. Pass the `NodeMetrics` the service updates so request counts by API
    and status show in the same /metrics text."""
    handlers = ApiHandlers(service, max_body_bytes, max_concurrent, metrics)
    app = web.Application(client_max_size=max_body_bytes, middlewares=[_error_middleware()])
    app.add_routes(
        [
            web.post("/v1/chat/completions", handlers.openai_chat),
            web.post("/v1/completions", handlers.openai_completions),
            web.get("/v1/models", handlers.openai_models),
            web.post("/api/chat", handlers.ollama_chat),
            web.post("/api/generate", handlers.ollama_generate),
            web.get("/api/tags", handlers.ollama_tags),
            web.get("/api/version", handlers.ollama_version),
            web.get("/status", handlers.status),
            web.get("/metrics", handlers.metrics_text),
            web.get("/healthz", handlers.healthz),
        ]
    )
    return app
