"""The text side of a session: a request in, `TextDelta`s and one `Finished` out.

Independent of where tokens are computed: `reply_events` drives any `TokenSource` (the local
engine, or a remote node with failover), so the local service and the daemon's home node share
it. `prompt_ids` applies the chat template (or encodes a plain prompt); `ReplyText` streams
decoded text and cuts the reply at the first stop string, holding back text that could still
become one, so a stop string never leaks to a client.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncGenerator, Sequence

from agent.engine import TokenSource
from agent.metrics import NodeMetrics
from agent.service import (
    BadRequestError,
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    TextDelta,
    Usage,
)
from models.sampling import InvalidSamplingParamsError, SamplingParams
from models.tokenizer import StreamDecoder, Tokenizer, TokenizerError

# Seeds chosen for requests without one stay below 2**31 so every client library can echo them.
SEED_BOUND = 2**31


def sampling_params(request: GenerationRequest, seed: int) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=request.temperature, top_k=request.top_k, top_p=request.top_p, seed=seed
        )
    except InvalidSamplingParamsError as exc:
        raise BadRequestError(str(exc)) from exc


def prompt_ids(tokenizer: Tokenizer, request: GenerationRequest) -> list[int]:
    """Token ids to prefill: the chat template over the messages, or the plain prompt."""
    try:
        if request.messages is not None:
            return tokenizer.encode_chat(
                [{"role": m.role, "content": m.content} for m in request.messages]
            )
        ids = tokenizer.encode(request.prompt or "")
    except TokenizerError as exc:  # no chat template, template refused the roles, ...
        raise BadRequestError(str(exc)) from exc
    if not ids:
        raise BadRequestError("the prompt is empty: it encodes to no tokens")
    return ids


def split_at_stop(pending: str, stops: Sequence[str]) -> tuple[str, str, bool]:
    """Split not-yet-sent text into (send now, hold back, a stop string was hit).

    On a hit, everything from the earliest stop string on is dropped. Otherwise the longest
    tail that is a proper prefix of some stop string is held back (it may still become one).
    """
    hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
    if hit >= 0:
        return pending[:hit], "", True
    longest = max((len(s) for s in stops), default=0)
    for size in range(min(len(pending), longest - 1), 0, -1):
        tail = pending[-size:]
        if any(s.startswith(tail) for s in stops):
            return pending[:-size], tail, False
    return pending, "", False


class ReplyText:
    """Generated token ids in, text safe to send out; stops at the first stop string."""

    def __init__(self, decoder: StreamDecoder, stops: Sequence[str] = ()) -> None:
        self._decoder = decoder
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False  # a stop string was found; later tokens add no text

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        return self._release(self._decoder.push(token_id))

    def finish(self) -> str:
        """The held-back text at the end of generation (it did not become a stop string)."""
        if self.stopped:
            return ""
        text = self._release(self._decoder.flush())
        tail, self._held = self._held, ""
        return text + tail

    def _release(self, new_text: str) -> str:
        send, self._held, self.stopped = split_at_stop(self._held + new_text, self._stops)
        return send


async def reply_events(
    request: GenerationRequest,
    tokenizer: Tokenizer,
    source: TokenSource,
    *,
    node_name: str,
    metrics: NodeMetrics | None = None,
) -> AsyncGenerator[GenerationEvent, None]:
    """Serve one request from `source`: text deltas, then one Finished with usage.

    Errors the source raises on open (overload, too long, unavailable) surface before the first
    event. Closing this iterator early (client gone) closes the token stream, which frees the
    session's KV slot wherever it lives.
    """
    if request.max_tokens < 1:
        raise BadRequestError(f"max_tokens must be >= 1, got {request.max_tokens}")
    seed = request.seed if request.seed is not None else secrets.randbelow(SEED_BOUND)
    params = sampling_params(request, seed)
    prompt = prompt_ids(tokenizer, request)
    start = time.perf_counter()
    stream = source.open(prompt, params, request.max_tokens)
    model = request.model
    if metrics is not None:
        metrics.count_prompt(model, len(prompt))
    reply = ReplyText(tokenizer.stream_decoder(), request.stop)
    generated = 0
    finish: FinishReason | None = None
    try:
        last = start
        async for token in stream:
            generated += 1
            now = time.perf_counter()
            if metrics is not None:
                metrics.count_generated(model)
                if generated == 1:
                    metrics.observe_first_token(model, now - start)
                else:
                    metrics.observe_token_gap(model, now - last)
            last = now
            text = reply.push(token)
            if text or not reply.stopped:
                yield TextDelta(text, (token,))
            if reply.stopped:
                finish = "stop"
                break
    finally:
        await stream.aclose()
    if finish is None:
        finish = "stop" if stream.finish_reason == "stop" else "length"
    tail = reply.finish()
    if tail:
        yield TextDelta(tail)
    usage = Usage(len(prompt), generated, {"node": node_name, "seed": seed})
    yield Finished(finish, usage)
