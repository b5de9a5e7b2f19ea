"""`sled chat` against a real node API (LocalService on a tiny model, real server on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import io
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from agent.chat_client import (
    HELP,
    ChatClientError,
    ChatOptions,
    Conversation,
    api_base,
    chunk_text,
    lines_reader,
    run_chat,
    sse_data,
)
from tests.api_server import serve, tiny_service

pytestmark = [pytest.mark.usefixtures("torch_single_thread"), pytest.mark.timeout(60)]

GREEDY = ChatOptions(temperature=0.0, max_tokens=12)


async def answer(base: str, messages: list[dict[str, str]]) -> str:
    """The node's non-streaming reply to a conversation (the reference for the client)."""
    body = {"model": "qwen2", "messages": messages, "temperature": 0, "max_tokens": 12}
    async with (
        aiohttp.ClientSession() as http,
        http.post(base + "v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        return str((await resp.json())["choices"][0]["message"]["content"])


async def test_conversation_is_kept_across_turns(tiny_paths: dict[str, Path]) -> None:
    async with serve(tiny_service(tiny_paths["qwen2"])) as base:
        out = io.StringIO()
        lines = ["hello there", "", "and then?", "/help", "/exit", "never sent"]
        conversation = await run_chat(base, GREEDY, lines_reader(lines), out)
        user1 = {"role": "user", "content": "hello there"}
        a1 = await answer(base, [user1])
        user2 = {"role": "user", "content": "and then?"}
        a2 = await answer(base, [user1, {"role": "assistant", "content": a1}, user2])
        without_history = await answer(base, [user2])
    assert conversation.as_json() == [
        user1, {"role": "assistant", "content": a1}, user2, {"role": "assistant", "content": a2},
    ]  # fmt: skip
    assert a2 != without_history  # so the match above shows the client sent the history
    assert out.getvalue() == f"{a1}\n{a2}\n{HELP}\n"


async def test_reset_system_and_errors(tiny_paths: dict[str, Path]) -> None:
    async with serve(tiny_service(tiny_paths["qwen2"])) as base:
        options = ChatOptions(temperature=0.0, max_tokens=12, system="You are terse.")
        out = io.StringIO()
        conversation = await run_chat(
            base, options, lines_reader(["first", "/reset", "second"]), out
        )
        system = {"role": "system", "content": "You are terse."}
        user = {"role": "user", "content": "second"}
        expected = await answer(base, [system, user])
        assert conversation == Conversation(
            (("system", "You are terse."), ("user", "second"), ("assistant", expected))
        )

        # An error turn is reported and left out; the chat goes on.
        out = io.StringIO()
        wrong = ChatOptions(model="no-such-model", max_tokens=4)
        conversation = await run_chat(base, wrong, lines_reader(["hi"]), out)
        assert conversation.messages == ()
        assert "[error] HTTP 404" in out.getvalue() and "no-such-model" in out.getvalue()

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ChatClientError, match="cannot reach"):
        await run_chat(f"http://127.0.0.1:{port}", GREEDY, lines_reader(["hi"]), io.StringIO())


async def test_sled_chat_command(tiny_paths: dict[str, Path]) -> None:
    async with serve(tiny_service(tiny_paths["qwen2"])) as base:
        expected = await answer(base, [{"role": "user", "content": "hi"}])
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent.cli", "chat", "--url", base.rstrip("/"),
            "--temperature", "0", "--max-tokens", "12",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(proc.communicate(b"hi\n"), timeout=40)
    assert proc.returncode == 0, stderr.decode()
    assert stdout.decode() == expected + "\n"


def test_sse_parsing() -> None:
    assert sse_data(b"data: {}\n") == "{}"
    assert sse_data(b"data:[DONE]\r\n") == "[DONE]"
    assert sse_data(b"\n") is None and sse_data(b": keep-alive\n") is None
    assert chunk_text('{"choices": [{"delta": {"content": "hi"}}]}') == "hi"
    assert chunk_text('{"choices": [{"delta": {"role": "assistant"}}]}') == ""
    assert chunk_text('{"choices": [], "usage": {}}') == ""
    with pytest.raises(ChatClientError, match="mid-reply: boom"):
        chunk_text('{"error": {"message": "boom"}}')
    with pytest.raises(ChatClientError, match="not JSON"):
        chunk_text("{oops")
    assert api_base("http://h:1") == api_base("http://h:1/") == api_base("http://h:1/v1/")
    assert api_base("http://h:1") == "http://h:1/v1"
