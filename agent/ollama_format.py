"""Ollama API shapes: `/api/chat` and `/api/generate` bodies in, NDJSON lines or one object out.

Pure functions; timestamps and durations are passed in. Field names and defaults follow
Ollama's API documentation (options temperature 0.8, top_k 40, top_p 0.9; num_predict -1 runs
to the context limit; streaming unless `"stream": false`). Model names may carry Ollama's
`:latest` tag. Unknown options are ignored; features sled lacks (images, tools, JSON format)
are refused with a 400.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.json_fields import (
    InvalidFieldError,
    optional_bool,
    optional_int,
    optional_number,
    optional_str,
    reject_if_set,
    require_object,
    required_str,
    stop_strings,
    type_name,
)
from agent.service import ChatMessage, FinishReason, GenerationRequest, ModelCard, Usage

DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.9
# num_predict < 0 means "until the context is full": the service stops there with "length".
UNBOUNDED_TOKENS = 1 << 30
LATEST = ":latest"
ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class OllamaRequest:
    generation: GenerationRequest | None  # None: an empty /api/generate prompt (load only)
    model: str  # as the client wrote it (echoed in replies)
    stream: bool


def model_name(requested: str) -> str:
    """The served model a client means: Ollama clients add the default tag `:latest`."""
    return requested[: -len(LATEST)] if requested.endswith(LATEST) else requested


def tag_name(name: str) -> str:
    return name if ":" in name else name + LATEST


def _options(body: Mapping[str, Any]) -> dict[str, Any]:
    raw = body.get("options")
    options = {} if raw is None else require_object(raw, "options")

    def p(key: str) -> str:
        return f"options.{key}"

    temperature = optional_number(options, "temperature", p("temperature"), minimum=0.0)
    top_p = optional_number(options, "top_p", p("top_p"), minimum=0.0, maximum=1.0)
    top_k = optional_int(options, "top_k", p("top_k"), minimum=0)
    num_predict = optional_int(options, "num_predict", p("num_predict"))
    if num_predict == 0:
        raise InvalidFieldError(
            "'options.num_predict' must be >= 1, or -1 for no limit", "options.num_predict"
        )
    seed = optional_int(options, "seed", p("seed"))
    top_p = DEFAULT_TOP_P if top_p is None else top_p
    temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
    if top_p == 0.0:
        temperature, top_p = 0.0, 1.0  # the smallest nucleus: the most likely token alone
    return {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": DEFAULT_TOP_K if top_k is None else top_k,
        "max_tokens": UNBOUNDED_TOKENS if num_predict is None or num_predict < 0 else num_predict,
        "seed": seed,
        "stop": stop_strings(options.get("stop"), p("stop")),
    }


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    reject_if_set(body, "images", "sled serves text models only")
    reject_if_set(body, "tools", "sled does not call tools")
    reject_if_set(body, "format", "sled does not constrain output to JSON or a schema")


def _messages(value: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(value, list) or not value:
        raise InvalidFieldError("'messages' must be a non-empty array of messages", "messages")
    out = []
    for i, raw in enumerate(value):
        message = require_object(raw, f"messages[{i}]")
        role = required_str(message, "role", f"messages[{i}].role")
        if role not in ROLES:
            raise InvalidFieldError(
                f"'messages[{i}].role' must be one of {', '.join(ROLES)}; got {role!r}",
                f"messages[{i}].role",
            )
        reject_if_set(message, "images", "sled serves text models only", f"messages[{i}].images")
        content = message.get("content", "")
        if not isinstance(content, str):
            raise InvalidFieldError(
                f"'messages[{i}].content' must be a string, got {type_name(content)}",
                f"messages[{i}].content",
            )
        out.append(ChatMessage(role, content))
    return tuple(out)


def parse_chat_request(raw: Any) -> OllamaRequest:
    """A `POST /api/chat` body."""
    body = require_object(raw)
    requested = required_str(body, "model")
    _refuse_unsupported(body)
    messages = _messages(body.get("messages"))
    stream = optional_bool(body, "stream")
    generation = GenerationRequest(model=model_name(requested), messages=messages, **_options(body))
    return OllamaRequest(generation, requested, stream is not False)


def parse_generate_request(raw: Any, chat_template: bool) -> OllamaRequest:
    """A `POST /api/generate` body. As in Ollama, the prompt goes through the model's chat
    template (with `system` as the system message) unless `raw` is true or the model has none."""
    body = require_object(raw)
    requested = required_str(body, "model")
    _refuse_unsupported(body)
    reject_if_set(body, "suffix", "sled does not insert text (no fill-in-the-middle)")
    reject_if_set(body, "context", "continue with /api/chat and the conversation's messages")
    reject_if_set(body, "template", "sled always uses the model's own chat template")
    prompt = optional_str(body, "prompt") or ""
    system = optional_str(body, "system")
    raw_prompt = bool(optional_bool(body, "raw"))
    stream = optional_bool(body, "stream") is not False
    options = _options(body)
    if not prompt:
        # Ollama answers an empty prompt by loading the model and returning done at once.
        return OllamaRequest(None, requested, stream)
    name = model_name(requested)
    if raw_prompt or not chat_template:
        text = prompt if system is None or raw_prompt else f"{system}\n\n{prompt}"
        generation = GenerationRequest(model=name, prompt=text, **options)
    else:
        messages = (ChatMessage("system", system),) if system else ()
        generation = GenerationRequest(
            model=name, messages=(*messages, ChatMessage("user", prompt)), **options
        )
    return OllamaRequest(generation, requested, stream)


# -- replies -------------------------------------------------------------------------------------


def timestamp(seconds: float) -> str:
    """Ollama's `created_at`: RFC 3339 in UTC."""
    when = datetime.fromtimestamp(seconds, tz=UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ndjson(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode() + b"\n"


@dataclass(frozen=True)
class Durations:
    """Nanoseconds, as Ollama reports them."""

    total: int
    prompt_eval: int  # request start to the first token (tokenizing + prefill)
    eval: int  # first token to the end


def _final(finish: FinishReason, usage: Usage, durations: Durations) -> dict[str, Any]:
    out: dict[str, Any] = {
        "done": True,
        "done_reason": finish,
        "total_duration": durations.total,
        "load_duration": 0,  # the model stays loaded between requests
        "prompt_eval_count": usage.prompt_tokens,
        "prompt_eval_duration": durations.prompt_eval,
        "eval_count": usage.completion_tokens,
        "eval_duration": durations.eval,
    }
    if usage.extra:
        out["sled"] = dict(usage.extra)
    return out


@dataclass(frozen=True)
class ChatReply:
    """`/api/chat` lines: each has the assistant message's new content; the last says done."""

    model: str

    def line(self, created_at: str, text: str) -> dict[str, Any]:
        return {
            "model": self.model,
            "created_at": created_at,
            "message": {"role": "assistant", "content": text},
            "done": False,
        }

    def last(
        self, created_at: str, text: str, finish: FinishReason, usage: Usage, d: Durations
    ) -> dict[str, Any]:
        return {**self.line(created_at, text), **_final(finish, usage, d)}


@dataclass(frozen=True)
class GenerateReply:
    """`/api/generate` lines: each has new `response` text; the last says done."""

    model: str

    def line(self, created_at: str, text: str) -> dict[str, Any]:
        return {"model": self.model, "created_at": created_at, "response": text, "done": False}

    def last(
        self, created_at: str, text: str, finish: FinishReason, usage: Usage, d: Durations
    ) -> dict[str, Any]:
        return {**self.line(created_at, text), **_final(finish, usage, d)}

    def loaded(self, created_at: str) -> dict[str, Any]:
        """The answer to an empty prompt."""
        return {**self.line(created_at, ""), "done": True, "done_reason": "load"}


def tags_json(cards: Sequence[ModelCard], modified_at: str) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": tag_name(card.name),
                "model": tag_name(card.name),
                "modified_at": modified_at,
                "size": card.size_bytes,
                "digest": "",
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": card.architecture,
                    "families": [card.architecture],
                    "parameter_size": "",
                    "quantization_level": "",
                },
            }
            for card in cards
        ]
    }


def error_json(message: str) -> dict[str, Any]:
    return {"error": message}
