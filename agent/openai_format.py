"""OpenAI API shapes: request bodies to `GenerationRequest`s, replies to OpenAI's JSON and SSE.

Pure functions; ids and timestamps are passed in. Shapes follow OpenAI's chat completions and
(legacy) completions APIs so the official clients work unchanged. Unknown fields are ignored;
fields whose meaning sled cannot honour (n > 1, logprobs, tools, ...) are refused with a 400.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.json_fields import (
    InvalidFieldError,
    optional_bool,
    optional_int,
    optional_number,
    reject_if_set,
    require_object,
    required_str,
    stop_strings,
    type_name,
)
from agent.service import ChatMessage, FinishReason, GenerationRequest, ModelCard, Usage

# OpenAI's documented defaults: temperature 1, top_p 1. Without max_tokens OpenAI runs to the
# context limit; sled bounds a reply by default so a forgotten field cannot hold a node for long.
DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_TOKENS = 1024
MAX_STOP_STRINGS = 4
ROLES = ("system", "developer", "user", "assistant", "tool")

SSE_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class OpenAIRequest:
    generation: GenerationRequest
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carrying usage


def _content_text(content: Any, index: int, role: str) -> str:
    """A message's content: a string, or an array of text parts (images are refused)."""
    param = f"messages[{index}].content"
    if content is None:
        if role == "assistant":  # an assistant turn that only called tools has null content
            return ""
        raise InvalidFieldError(f"'{param}' is required for a {role} message", param)
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidFieldError(
            f"'{param}' must be a string or an array of content parts, got {type_name(content)}",
            param,
        )
    texts = []
    for j, part in enumerate(content):
        part = require_object(part, f"{param}[{j}]")
        if part.get("type") != "text":
            raise InvalidFieldError(
                f"'{param}[{j}]' has type {part.get('type')!r}; only text parts are supported",
                f"{param}[{j}].type",
            )
        texts.append(required_str(part, "text", f"{param}[{j}].text"))
    return "".join(texts)


def parse_messages(value: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidFieldError("'messages' must be a non-empty array of messages", "messages")
    messages = []
    for i, raw in enumerate(value):
        message = require_object(raw, f"messages[{i}]")
        role = required_str(message, "role", f"messages[{i}].role")
        if role not in ROLES:
            raise InvalidFieldError(
                f"'messages[{i}].role' must be one of {', '.join(ROLES)}; got {role!r}",
                f"messages[{i}].role",
            )
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        messages.append(
            ChatMessage(
                "system" if role == "developer" else role,
                _content_text(message.get("content"), i, role),
            )
        )
    return tuple(messages)


def _common(body: Mapping[str, Any]) -> dict[str, Any]:
    """Sampling and length fields shared by both endpoints."""
    reject_if_set(body, "logprobs", "sled does not return log probabilities")
    reject_if_set(body, "top_logprobs", "sled does not return log probabilities")
    n = optional_int(body, "n", minimum=1)
    if n not in (None, 1):
        raise InvalidFieldError("'n' must be 1: sled returns one choice per request", "n")
    temperature = optional_number(body, "temperature", minimum=0.0, maximum=2.0)
    top_p = optional_number(body, "top_p", minimum=0.0, maximum=1.0)
    max_tokens = optional_int(body, "max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens", minimum=1)
    seed = optional_int(body, "seed")
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    if top_p == 0.0:
        # The smallest nucleus is the most likely token alone: greedy decoding.
        temperature, top_p = 0.0, 1.0
    return {
        "temperature": temperature,
        "top_p": 1.0 if top_p is None else top_p,
        "max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        "seed": seed,
        "stop": stop_strings(body.get("stop"), "stop", MAX_STOP_STRINGS),
    }


def _stream_flags(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = bool(optional_bool(body, "stream"))
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        options = require_object(options, "stream_options")
        include_usage = bool(
            optional_bool(options, "include_usage", "stream_options.include_usage")
        )
    return stream, include_usage and stream


def parse_chat_request(raw: Any) -> OpenAIRequest:
    """A `POST /v1/chat/completions` body."""
    body = require_object(raw)
    model = required_str(body, "model")
    messages = parse_messages(body.get("messages"))
    reject_if_set(body, "tools", "sled does not call tools")
    reject_if_set(body, "functions", "sled does not call functions")
    response_format = body.get("response_format")
    if response_format is not None:
        kind = require_object(response_format, "response_format").get("type")
        if kind != "text":
            raise InvalidFieldError(
                f"'response_format' type {kind!r} is not supported (only 'text')",
                "response_format",
            )
    stream, include_usage = _stream_flags(body)
    generation = GenerationRequest(model=model, messages=messages, **_common(body))
    return OpenAIRequest(generation, stream, include_usage)


def parse_completion_request(raw: Any) -> OpenAIRequest:
    """A `POST /v1/completions` body (one prompt string)."""
    body = require_object(raw)
    model = required_str(body, "model")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidFieldError(
            "'prompt' must be a string (token arrays and batches of prompts are not supported)",
            "prompt",
        )
    reject_if_set(body, "echo", "sled does not echo the prompt")
    reject_if_set(body, "suffix", "sled does not insert text (no fill-in-the-middle)")
    best_of = optional_int(body, "best_of", minimum=1)
    if best_of not in (None, 1):
        raise InvalidFieldError("'best_of' must be 1", "best_of")
    stream, include_usage = _stream_flags(body)
    generation = GenerationRequest(model=model, prompt=prompt, **_common(body))
    return OpenAIRequest(generation, stream, include_usage)


# -- replies -------------------------------------------------------------------------------------


def usage_json(usage: Usage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
    if usage.extra:
        out["sled"] = dict(usage.extra)
    return out


def sse(payload: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


@dataclass(frozen=True)
class ChatReply:
    """Formats one chat completion (`chatcmpl-...`) as chunks or as one body."""

    id: str
    created: int
    model: str
    include_usage: bool = False

    def _chunk(self, delta: Mapping[str, Any], finish: FinishReason | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "delta": dict(delta), "logprobs": None, "finish_reason": finish}
            ],
        }
        if self.include_usage:
            chunk["usage"] = None  # OpenAI sends null usage on every chunk but the last
        return chunk

    def first_chunk(self) -> dict[str, Any]:
        return self._chunk({"role": "assistant", "content": ""}, None)

    def text_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk({"content": text}, None)

    def last_chunks(self, finish: FinishReason, usage: Usage) -> list[dict[str, Any]]:
        chunks = [self._chunk({}, finish)]
        if self.include_usage:
            chunks.append(
                {
                    "id": self.id,
                    "object": "chat.completion.chunk",
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": usage_json(usage),
                }
            )
        return chunks

    def body(self, text: str, finish: FinishReason, usage: Usage) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage_json(usage),
        }


@dataclass(frozen=True)
class CompletionReply:
    """Formats one text completion (`cmpl-...`) as chunks or as one body."""

    id: str
    created: int
    model: str
    include_usage: bool = False

    def _chunk(self, text: str, finish: FinishReason | None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
        }
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def first_chunk(self) -> None:
        return None  # completions have no role chunk

    def text_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk(text, None)

    def last_chunks(self, finish: FinishReason, usage: Usage) -> list[dict[str, Any]]:
        chunks = [self._chunk("", finish)]
        if self.include_usage:
            chunks.append(
                {
                    "id": self.id,
                    "object": "text_completion",
                    "created": self.created,
                    "model": self.model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": usage_json(usage),
                }
            )
        return chunks

    def body(self, text: str, finish: FinishReason, usage: Usage) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "usage": usage_json(usage),
        }


def error_json(
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def models_json(cards: Sequence[ModelCard], created: int, owner: str) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {"id": card.name, "object": "model", "created": created, "owned_by": owner}
            for card in cards
        ],
    }
