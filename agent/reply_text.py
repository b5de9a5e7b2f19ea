"""The text side of a session: a request's prompt as token ids, and generated ids as reply text.

Independent of where tokens are computed, so the local service and the daemon's home node both
use it: `prompt_ids` applies the chat template (or encodes a plain prompt), and `ReplyText`
streams decoded text while cutting the reply at the first stop string. Text that could be the
start of a stop string is held back until it is clear, so a stop string never leaks to a client.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.service import BadRequestError, GenerationRequest
from models.tokenizer import StreamDecoder, Tokenizer, TokenizerError


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
