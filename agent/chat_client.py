"""`sled chat`: a terminal chat against any node's OpenAI-compatible API.

Reads a line, sends the whole conversation to `/v1/chat/completions` with `stream: true`,
prints the reply as it streams and keeps it in the conversation. `/reset` starts over, `/exit`
(or end of input) quits. Talks HTTP through aiohttp, so a device needs nothing but sled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import aiohttp

DEFAULT_URL = "http://127.0.0.1:8080"
DONE = "[DONE]"
HELP = "commands: /reset (forget the conversation), /exit (quit), /help"


class ChatClientError(Exception):
    """The node could not be reached or answered with an error; the text says which."""


@dataclass(frozen=True)
class Conversation:
    """The messages so far, oldest first, as OpenAI chat messages."""

    messages: tuple[tuple[str, str], ...] = ()

    def add(self, role: str, content: str) -> Conversation:
        return Conversation((*self.messages, (role, content)))

    def as_json(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class ChatOptions:
    model: str | None = None  # None: the first model the node lists
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None
    system: str | None = None
    read_timeout_s: float = 300.0

    def sampling_fields(self) -> dict[str, Any]:
        fields = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
        }
        return {k: v for k, v in fields.items() if v is not None}


def api_base(url: str) -> str:
    """`http://host:port`, `http://host:port/` or `.../v1` all mean the node's /v1 root."""
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


def sse_data(line: bytes) -> str | None:
    """The data of one SSE line, or None for blank lines, comments and other fields."""
    text = line.decode("utf-8").rstrip("\r\n")
    if not text.startswith("data:"):
        return None
    return text[len("data:") :].lstrip(" ")


def chunk_text(data: str) -> str:
    """The new reply text in one chat.completion.chunk (empty for role/finish/usage chunks)."""
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ChatClientError(f"the node sent an event that is not JSON: {data[:200]!r}") from exc
    if not isinstance(payload, dict):
        raise ChatClientError(f"the node sent an unexpected event: {data[:200]!r}")
    if "error" in payload:
        raise ChatClientError(f"the node failed mid-reply: {error_message(payload)}")
    choices = payload.get("choices") or []
    if not choices:
        return ""
    content = (choices[0].get("delta") or {}).get("content")
    return content if isinstance(content, str) else ""


def error_message(body: Any) -> str:
    """The message of an OpenAI-shaped error body (or the body itself)."""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))
    return str(body)[:500]


async def _raise_for_error(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    try:
        body: Any = await resp.json(content_type=None)
    except (json.JSONDecodeError, aiohttp.ClientError, UnicodeDecodeError):
        body = (await resp.read()).decode("utf-8", "replace")
    retry = resp.headers.get("Retry-After")
    hint = f" (retry after {retry} s)" if retry else ""
    raise ChatClientError(f"HTTP {resp.status}: {error_message(body)}{hint}")


async def first_model(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(base + "/models") as resp:
        await _raise_for_error(resp)
        body = await resp.json()
    names = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)]
    if not names or not isinstance(names[0], str):
        raise ChatClientError(f"{base}/models lists no models")
    return names[0]


async def stream_reply(
    http: aiohttp.ClientSession, base: str, model: str, conversation: Conversation,
    options: ChatOptions, usage_out: dict[str, Any] | None = None,
) -> AsyncIterator[str]:  # fmt: skip
    """The assistant's reply to the conversation, piece by piece as the node streams it.
    With `usage_out`, the reply's final usage block (with sled's figures) is stored there."""
    body: dict[str, Any] = {
        "model": model,
        "messages": conversation.as_json(),
        "stream": True,
        **options.sampling_fields(),
    }
    if usage_out is not None:
        body["stream_options"] = {"include_usage": True}
    async with http.post(base + "/chat/completions", json=body) as resp:
        await _raise_for_error(resp)
        finished = False
        async for line in resp.content:
            data = sse_data(line)
            if data is None:
                continue
            if data == DONE:
                finished = True
                break
            if usage_out is not None:
                with contextlib.suppress(ValueError, TypeError, AttributeError):
                    usage = json.loads(data).get("usage")
                    if isinstance(usage, dict):
                        usage_out.update(usage)
            text = chunk_text(data)
            if text:
                yield text
        if not finished:
            raise ChatClientError("the node closed the stream before the reply was complete")


async def run_chat(
    url: str,
    options: ChatOptions,
    read_line: Callable[[], Any],
    out: TextIO,
    prompt: str = "",
) -> Conversation:
    """The chat loop: `read_line` is awaited for each input line ("" at end of input).

    Returns the conversation (for tests and scripting). A failed turn is reported on `out` and
    left out of the conversation; the loop goes on.
    """
    base = api_base(url)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=options.read_timeout_s)
    start = Conversation().add("system", options.system) if options.system else Conversation()
    conversation = start
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            model = options.model or await first_model(http, base)
            while True:
                if prompt:
                    out.write(prompt)
                    out.flush()
                line = await read_line()
                if not line:
                    break  # end of input
                text = line.strip()
                if not text:
                    continue
                if text in ("/exit", "/quit"):
                    break
                if text == "/reset":
                    conversation = start
                    continue
                if text == "/help":
                    out.write(HELP + "\n")
                    continue
                asked = conversation.add("user", text)
                pieces: list[str] = []
                try:
                    async for piece in stream_reply(http, base, model, asked, options):
                        pieces.append(piece)
                        out.write(piece)
                        out.flush()
                except ChatClientError as exc:
                    out.write(f"\n[error] {exc}\n")
                    continue
                out.write("\n")
                out.flush()
                conversation = asked.add("assistant", "".join(pieces))
    except aiohttp.ClientConnectionError as exc:
        raise ChatClientError(f"cannot reach the node at {url}: {exc}") from exc
    except TimeoutError as exc:
        raise ChatClientError(f"the node at {url} did not answer in time") from exc
    return conversation


def _line_reader(stream: TextIO) -> Callable[[], Any]:
    async def read() -> str:
        return await asyncio.to_thread(stream.readline)

    return read


def lines_reader(lines: Iterable[str]) -> Callable[[], Any]:
    """Input from a list of lines (one-shot prompts, tests)."""
    pending = [line if line.endswith("\n") else line + "\n" for line in lines]

    async def read() -> str:
        return pending.pop(0) if pending else ""

    return read


def cmd_chat(args: argparse.Namespace) -> int:
    """`sled chat`: interactive when stdin is a terminal; otherwise each input line is a turn."""
    options = ChatOptions(
        model=args.model,
        temperature=args.temperature,
        top_p=args.top_p,
        max_tokens=args.max_tokens,
        seed=args.seed,
        system=args.system,
        read_timeout_s=args.timeout,
    )
    if args.message:
        reader = lines_reader(args.message)
        prompt = ""
    else:
        reader = _line_reader(sys.stdin)
        prompt = "you> " if sys.stdin.isatty() else ""
        if sys.stdin.isatty():
            print(f"sled chat with {args.url} ({HELP})", file=sys.stderr)
    try:
        asyncio.run(run_chat(args.url, options, reader, sys.stdout, prompt))
    except ChatClientError as exc:
        print(f"sled chat: error: {exc}", file=sys.stderr)
        return 1
    return 0
