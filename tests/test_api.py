"""The HTTP API against a real LocalService on tiny models, over a real server on 127.0.0.1.

The official `openai` client and raw HTTP requests; replies are compared with
`models.generate.generate` for the same model, prompt and parameters.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import models.generate
from models.backend import load_backend
from models.generate import generate
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer
from tests.api_server import serve, tiny_service

pytestmark = [pytest.mark.usefixtures("torch_single_thread"), pytest.mark.timeout(60)]

MESSAGES = [{"role": "user", "content": "Write a haiku about small computers."}]


def reference(
    path: Path, params: SamplingParams, max_tokens: int, *, chat: str | None = None,
    prompt: str | None = None,
) -> tuple[str, int, int, str]:  # fmt: skip
    """(text, prompt tokens, completion tokens, stop reason) from models.generate."""
    tok = Tokenizer.from_gguf(path)
    ids = tok.encode_chat([{"role": "user", "content": chat}]) if chat else tok.encode(prompt or "")
    backend = load_backend(path, weights="fp32", use_cache=False, max_slots=1, max_len=512)
    result = generate(backend, ids, params, max_tokens, tok.stop_ids)
    stream = tok.stream_decoder()
    text = "".join(stream.push(t) for t in result.tokens) + stream.flush()
    return text, len(ids), len(result.tokens), result.stats.stop_reason


def client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base + "v1", api_key="x", max_retries=0, timeout=30)


async def sse_events(resp: aiohttp.ClientResponse) -> list[str]:
    """The data fields of a server-sent event stream, in order."""
    body = (await resp.read()).decode()
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events), events[:3]
    return [e[len("data: ") :] for e in events]


# -- OpenAI ----------------------------------------------------------------------------------------


async def test_openai_chat_matches_generate(tiny_paths: dict[str, Path]) -> None:
    path = tiny_paths["qwen2"]
    content = MESSAGES[0]["content"]
    expected, n_prompt, n_completion, _ = reference(path, SamplingParams(), 24, chat=content)
    async with serve(tiny_service(path)) as base:
        api = client(base)
        reply = await api.chat.completions.create(
            model="qwen2",
            messages=MESSAGES,
            max_tokens=24,
            temperature=0,  # type: ignore[arg-type]
        )
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].message.role == "assistant"
        assert reply.choices[0].finish_reason == "length"
        assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
        assert reply.usage is not None
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (n_prompt, 24)
        assert reply.usage.total_tokens == n_prompt + 24
        assert reply.usage.model_extra == {"sled": {"node": "test-node", "seed": reply.usage.model_extra["sled"]["seed"]}}  # fmt: skip

        # Streaming through the official client: the same text, OpenAI's chunk sequence.
        stream = await api.chat.completions.create(
            model="qwen2", messages=MESSAGES, max_tokens=24, temperature=0, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [chunk async for chunk in stream]
        await api.close()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"
    assert [c.choices[0].finish_reason for c in chunks[-2:-1]] == ["length"]
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == n_completion == 24


async def test_openai_raw_sse_shape_and_completions(tiny_paths: dict[str, Path]) -> None:
    path = tiny_paths["llama"]
    prompt = "The quick brown fox"
    expected, n_prompt, _, _ = reference(path, SamplingParams(), 16, prompt=prompt)
    async with serve(tiny_service(path)) as base, aiohttp.ClientSession() as http:
        body = {"model": "llama", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        async with http.post(base + "v1/completions", json=body) as resp:
            assert resp.status == 200
            whole = await resp.json()
        assert whole["object"] == "text_completion" and whole["id"].startswith("cmpl-")
        assert whole["choices"][0]["text"] == expected
        assert whole["usage"]["prompt_tokens"] == n_prompt

        async with http.post(base + "v1/completions", json={**body, "stream": True}) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            data = await sse_events(resp)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
        assert "".join(c["choices"][0]["text"] for c in chunks) == expected
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_seeded_sampling_is_reproducible(tiny_paths: dict[str, Path]) -> None:
    path = tiny_paths["qwen2"]
    async with serve(tiny_service(path)) as base:
        api = client(base)

        async def ask(seed: int) -> str:
            reply = await api.completions.create(
                model="qwen2", prompt="Once upon a time", max_tokens=20, temperature=1.0,
                top_p=0.95, seed=seed,
            )  # fmt: skip
            assert reply.usage is not None
            assert reply.usage.model_extra == {"sled": {"node": "test-node", "seed": seed}}
            return reply.choices[0].text

        first, again, other = await ask(7), await ask(7), await ask(8)
        await api.close()
    assert first == again
    assert first != other


@pytest.mark.skipif(
    "position_generator" not in inspect.getsource(models.generate),
    reason="models.generate does not use position-keyed sampling yet",
)
async def test_seeded_sampling_matches_generate(tiny_paths: dict[str, Path]) -> None:
    path = tiny_paths["gemma3"]
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=20, seed=11)
    expected, _, _, _ = reference(path, params, 20, prompt="Hello")
    async with serve(tiny_service(path)) as base, aiohttp.ClientSession() as http:
        body = {
            "model": "gemma3", "prompt": "Hello", "stream": False,
            "options": {"temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": 11, "num_predict": 20},
        }  # fmt: skip
        async with http.post(base + "api/generate", json={**body, "raw": True}) as resp:
            assert (await resp.json())["response"] == expected


async def test_stop_strings_cut_the_reply(tiny_paths: dict[str, Path]) -> None:
    path = tiny_paths["qwen2"]
    content = MESSAGES[0]["content"]
    full, _, _, _ = reference(path, SamplingParams(), 40, chat=content)
    stop = full[10:13]  # somewhere in the middle of the greedy reply
    assert len(stop) == 3 and full.find(stop) >= 0
    async with serve(tiny_service(path)) as base:
        api = client(base)
        reply = await api.chat.completions.create(
            model="qwen2", messages=MESSAGES, max_tokens=40, temperature=0, stop=[stop, "\x00never"],  # type: ignore[arg-type]
        )  # fmt: skip
        stream = await api.chat.completions.create(
            model="qwen2", messages=MESSAGES, max_tokens=40, temperature=0, stop=stop, stream=True,  # type: ignore[arg-type]
        )  # fmt: skip
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream])
        await api.close()
    assert reply.choices[0].message.content == full[: full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    assert streamed == full[: full.find(stop)]


async def test_models_status_health(tiny_paths: dict[str, Path]) -> None:
    async with serve(tiny_service(tiny_paths["gemma3"])) as base, aiohttp.ClientSession() as http:
        api = client(base)
        models = await api.models.list()
        await api.close()
        assert [m.id for m in models.data] == ["gemma3"]
        async with http.get(base + "api/tags") as resp:
            tags = await resp.json()
        assert tags["models"][0]["name"] == "gemma3:latest"
        assert tags["models"][0]["details"]["family"] == "gemma3"
        assert tags["models"][0]["size"] == tiny_paths["gemma3"].stat().st_size
        async with http.get(base + "api/version") as resp:
            assert isinstance((await resp.json())["version"], str)
        async with http.get(base + "status") as resp:
            status = await resp.json()
        assert status["node"] == "test-node" and status["sessions"] == []
        assert {"epoch", "peers", "plan"} <= set(status)
        async with http.get(base + "healthz") as resp:
            assert resp.status == 200 and (await resp.json())["status"] == "ok"


# -- Ollama ----------------------------------------------------------------------------------------


async def ndjson_lines(resp: aiohttp.ClientResponse) -> list[dict[str, Any]]:
    body = (await resp.read()).decode()
    assert body.endswith("\n")
    return [json.loads(line) for line in body.splitlines()]


async def test_ollama_chat_and_generate(tiny_paths: dict[str, Path]) -> None:
    path = tiny_paths["qwen2"]
    content = MESSAGES[0]["content"]
    expected, n_prompt, _, _ = reference(path, SamplingParams(), 12, chat=content)
    options = {"temperature": 0, "num_predict": 12}
    async with serve(tiny_service(path)) as base, aiohttp.ClientSession() as http:
        chat = {"model": "qwen2:latest", "messages": MESSAGES, "options": options}
        async with http.post(base + "api/chat", json=chat) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("application/x-ndjson")
            lines = await ndjson_lines(resp)
        assert all(not line["done"] for line in lines[:-1]) and lines[-1]["done"] is True
        assert all(line["model"] == "qwen2:latest" for line in lines)
        assert all(line["created_at"].endswith("Z") for line in lines)
        assert "".join(line["message"]["content"] for line in lines) == expected
        last = lines[-1]
        assert last["done_reason"] == "length"
        assert (last["prompt_eval_count"], last["eval_count"]) == (n_prompt, 12)
        assert last["total_duration"] >= last["eval_duration"] > 0
        assert last["total_duration"] >= last["prompt_eval_duration"] > 0

        async with http.post(base + "api/chat", json={**chat, "stream": False}) as resp:
            one = await resp.json()
        assert one["done"] is True and one["message"] == {"role": "assistant", "content": expected}

        # /api/generate applies the chat template unless raw, as Ollama does.
        gen = {"model": "qwen2", "prompt": content, "options": options, "stream": False}
        async with http.post(base + "api/generate", json=gen) as resp:
            assert (await resp.json())["response"] == expected
        raw_expected, _, _, _ = reference(path, SamplingParams(), 12, prompt=content)
        async with http.post(
            base + "api/generate", json={**gen, "raw": True, "stream": True}
        ) as resp:
            lines = await ndjson_lines(resp)
        assert "".join(line["response"] for line in lines) == raw_expected
        assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 12

        async with http.post(base + "api/generate", json={"model": "qwen2"}) as resp:
            loaded = await resp.json()
        assert loaded["done"] is True and loaded["done_reason"] == "load"


# -- errors and limits -----------------------------------------------------------------------------


def assert_openai_error(body: dict[str, Any], param: str | None, code: str | None = None) -> None:
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param and error["code"] == code


async def test_bad_requests_get_4xx_in_each_shape(tiny_paths: dict[str, Path]) -> None:
    chat_url, ollama_url = "v1/chat/completions", "api/chat"
    ok = {"model": "llama", "messages": MESSAGES}
    cases_openai = [
        ({**ok, "temperature": "hot"}, "temperature"),
        ({**ok, "max_tokens": True}, "max_tokens"),
        ({**ok, "max_tokens": 0}, "max_tokens"),
        ({**ok, "messages": "hi"}, "messages"),
        ({**ok, "messages": [{"role": "user"}]}, "messages[0].content"),
        ({**ok, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({**ok, "stop": [1, 2]}, "stop"),
        ({**ok, "n": 3}, "n"),
        ({**ok, "stream": "yes"}, "stream"),
        ({"messages": MESSAGES}, "model"),
        ([1, 2, 3], None),
    ]
    cases_ollama = [
        {**ok, "options": {"top_k": "x"}},
        {**ok, "options": "fast"},
        {**ok, "messages": [{"role": "user", "content": 5}]},
        {**ok, "format": "json"},
    ]
    async with serve(tiny_service(tiny_paths["llama"])) as base, aiohttp.ClientSession() as http:
        for body, param in cases_openai:
            async with http.post(base + chat_url, json=body) as resp:
                assert resp.status == 400, body
                assert_openai_error(await resp.json(), param)
        for body in cases_ollama:
            async with http.post(base + ollama_url, json=body) as resp:
                assert resp.status == 400, body
                error = await resp.json()
                assert set(error) == {"error"} and error["error"]

        for url in (chat_url, ollama_url, "api/generate", "v1/completions"):
            async with http.post(base + url, data=b'{"model": "llama", ') as resp:
                assert resp.status == 400
                body = await resp.json()
                assert "not valid JSON" in json.dumps(body)
        async with http.post(base + chat_url, data=b"") as resp:
            assert resp.status == 400
        too_long = {"model": "llama", "prompt": "quick brown fox " * 400}  # > 512 tokens
        async with http.post(base + "v1/completions", json=too_long) as resp:
            assert resp.status == 400
            assert_openai_error(await resp.json(), None)

        async with http.post(base + chat_url, json={**ok, "model": "gpt-9"}) as resp:
            assert resp.status == 404
            assert_openai_error(await resp.json(), "model", "model_not_found")
        async with http.post(base + ollama_url, json={**ok, "model": "gpt-9"}) as resp:
            assert resp.status == 404 and "gpt-9" in (await resp.json())["error"]
        async with http.post(base + "api/generate", json={"model": "gpt-9", "prompt": ""}) as resp:
            assert resp.status == 404

        async with http.get(base + "v1/nothing") as resp:
            assert resp.status == 404
            assert_openai_error(await resp.json(), None)
        async with http.get(base + "api/chat") as resp:
            assert resp.status == 405 and "error" in await resp.json()

        # The official client sees the same statuses as typed exceptions.
        api = client(base)
        with pytest.raises(openai.NotFoundError):
            await api.chat.completions.create(model="gpt-9", messages=MESSAGES)  # type: ignore[arg-type]
        with pytest.raises(openai.BadRequestError):
            await api.chat.completions.create(model="llama", messages=MESSAGES, temperature=7)  # type: ignore[arg-type]
        await api.close()


async def test_oversize_body_gets_413(tiny_paths: dict[str, Path]) -> None:
    big = {"model": "llama", "messages": [{"role": "user", "content": "x" * 5000}]}
    async with (
        serve(tiny_service(tiny_paths["llama"]), max_body_bytes=4096) as base,
        aiohttp.ClientSession() as http,
    ):
        async with http.post(base + "v1/chat/completions", json=big) as resp:
            assert resp.status == 413
            assert_openai_error(await resp.json(), None, "request_too_large")
        async with http.post(base + "api/chat", json=big) as resp:
            assert resp.status == 413 and "4096" in (await resp.json())["error"]

        async def chunked() -> Any:  # no Content-Length: the bound holds while reading
            for _ in range(5):
                yield b" " * 1000
            yield json.dumps(big).encode()

        async with http.post(base + "api/generate", data=chunked()) as resp:
            assert resp.status == 413 and "error" in await resp.json()
        small = {"model": "llama", "messages": MESSAGES, "max_tokens": 2}
        async with http.post(base + "v1/chat/completions", json=small) as resp:
            assert resp.status == 200


async def test_concurrency_bound_answers_429(tiny_paths: dict[str, Path]) -> None:
    long = {"model": "qwen2", "messages": MESSAGES, "max_tokens": 460, "temperature": 0, "stream": True}  # fmt: skip
    async with (
        serve(tiny_service(tiny_paths["qwen2"]), max_concurrent=1) as base,
        aiohttp.ClientSession() as http,
    ):
        held = await http.post(base + "v1/chat/completions", json=long)
        assert held.status == 200
        await held.content.readuntil(b"\n\n")  # the stream is open: one session in progress
        async with http.post(base + "v1/chat/completions", json={**long, "stream": False}) as resp:
            assert resp.status == 429
            assert int(resp.headers["Retry-After"]) >= 1
            assert_openai_error(await resp.json(), None, "rate_limit_exceeded")
        async with http.post(base + "api/generate", json={"model": "qwen2", "prompt": "x"}) as resp:
            assert resp.status == 429 and "Retry-After" in resp.headers
            assert set(await resp.json()) == {"error"}
        data = await sse_events(held)  # the held stream still completes
        held.release()
        assert data[-1] == "[DONE]"
        async with http.post(base + "api/generate", json={"model": "qwen2", "prompt": "x", "options": {"num_predict": 2}}) as resp:  # fmt: skip
            assert resp.status == 200  # the bound is free again


async def test_service_overload_and_unavailable(tiny_paths: dict[str, Path]) -> None:
    # The API allows more than the engine holds: the engine's OverloadedError becomes a 429.
    service = tiny_service(tiny_paths["qwen2"], max_sessions=1, max_queue=0)
    long = {"model": "qwen2", "messages": MESSAGES, "options": {"num_predict": 460, "temperature": 0}}  # fmt: skip
    async with serve(service, max_concurrent=8) as base, aiohttp.ClientSession() as http:
        held = await http.post(base + "api/chat", json=long)
        assert held.status == 200
        await held.content.readline()
        async with http.post(base + "api/chat", json=long) as resp:
            assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
            assert "error" in await resp.json()
        held.close()
        await service.close()  # shutting down: new requests are refused with 503
        async with http.post(base + "v1/chat/completions", json={"model": "qwen2", "messages": MESSAGES}) as resp:  # fmt: skip
            assert resp.status == 503
            assert (await resp.json())["error"]["type"] == "server_error"


async def test_client_disconnect_ends_the_session(tiny_paths: dict[str, Path]) -> None:
    max_new = 460
    for url, body in (
        ("v1/chat/completions", {"model": "qwen2", "messages": MESSAGES, "max_tokens": max_new, "temperature": 0, "stream": True}),
        ("api/chat", {"model": "qwen2", "messages": MESSAGES, "options": {"num_predict": max_new, "temperature": 0}}),
    ):  # fmt: skip
        service = tiny_service(tiny_paths["qwen2"])
        cache = service.engine.backend.cache
        async with serve(service) as base, aiohttp.ClientSession() as http:
            resp = await http.post(base + url, json=body)
            await resp.content.readline()
            assert len(service.status()["sessions"]) == 1 and cache.slots != ()
            resp.close()  # the client goes away mid-reply
            deadline = time.monotonic() + 10
            while (service.status()["sessions"] or cache.slots) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert service.status()["sessions"] == [] and cache.slots == ()
            assert service.engine.active == 0
            # It stopped early: far fewer tokens than the reply would have had.
            assert generated_tokens(service.metrics_text()) < max_new // 4


def generated_tokens(text: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "sled_generated_tokens_total":
                return sample.value
    return 0.0


async def test_metrics_parse_and_count(tiny_paths: dict[str, Path]) -> None:
    async with serve(tiny_service(tiny_paths["llama"])) as base, aiohttp.ClientSession() as http:
        body = {"model": "llama", "messages": MESSAGES, "max_tokens": 5, "temperature": 0}
        async with http.post(base + "v1/chat/completions", json=body) as resp:
            assert resp.status == 200
        async with http.post(base + "v1/chat/completions", json={**body, "model": "x"}) as resp:
            assert resp.status == 404
        async with http.get(base + "metrics") as resp:
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            text = await resp.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("sled_requests_total", (("api", "openai.chat"), ("status", "200")))] == 1
    assert samples[("sled_requests_total", (("api", "openai.chat"), ("status", "404")))] == 1
    assert samples[("sled_generated_tokens_total", (("model", "llama"),))] == 5
    assert samples[("sled_time_to_first_token_seconds_count", (("model", "llama"),))] == 1
    assert samples[("sled_token_latency_seconds_count", (("model", "llama"),))] == 4
    assert samples[("sled_active_sessions", ())] == 0


async def test_error_mid_stream_arrives_in_the_stream(tiny_paths: dict[str, Path]) -> None:
    """A node shutting down mid-reply: the stream ends with an error event in the API's shape."""
    for url, body in (
        ("v1/chat/completions", {"model": "qwen2", "messages": MESSAGES, "max_tokens": 460, "temperature": 0, "stream": True}),
        ("api/chat", {"model": "qwen2", "messages": MESSAGES, "options": {"num_predict": 460, "temperature": 0}}),
    ):  # fmt: skip
        service = tiny_service(tiny_paths["qwen2"])
        async with serve(service) as base, aiohttp.ClientSession() as http:
            resp = await http.post(base + url, json=body)
            await resp.content.readline()
            await service.close()  # ends running sessions with UnavailableError
            rest = (await resp.read()).decode().strip().splitlines()
            last = json.loads(rest[-1].removeprefix("data: "))
            if url.startswith("v1"):
                assert last["error"]["type"] == "server_error" and "[DONE]" not in rest
            else:
                assert set(last) == {"error"} and "shut down" in last["error"]
