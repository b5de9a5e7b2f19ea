"""The API over real models: replies equal `models.generate.generate` on the same backend."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import openai
import pytest
import torch

from agent.engine import Engine
from agent.local_service import LocalService
from models.backend import load_backend
from models.generate import generate
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer
from tests.api_server import serve
from tests.conftest import real_model_path

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(900)]


def service_and_reference(
    path: Path, tokenizer: Tokenizer, name: str, ids: list[int], max_tokens: int
) -> tuple[LocalService, str]:
    """A LocalService on `path` and the greedy text models.generate gives on the same backend."""
    backend = load_backend(path, weights="bf16", max_slots=1, max_len=512)
    result = generate(backend, ids, SamplingParams(), max_tokens, tokenizer.stop_ids)
    stream = tokenizer.stream_decoder()
    expected = "".join(stream.push(t) for t in result.tokens) + stream.flush()
    engine = Engine(backend, stop_ids=tokenizer.stop_ids, model=name)
    service = LocalService(
        name, tokenizer, engine, node_name="real", size_bytes=path.stat().st_size
    )
    return service, expected


async def test_gemma_completion(torch_single_thread: None) -> None:
    path = real_model_path("gemma3-270m")
    prompt = "def fibonacci(n):"
    tokenizer = Tokenizer.from_gguf(path)  # seconds: build it once
    ids = tokenizer.encode(prompt)
    service, expected = service_and_reference(path, tokenizer, "gemma3-270m", ids, 12)
    async with serve(service) as base, aiohttp.ClientSession() as http:
        body = {"model": "gemma3-270m:latest", "prompt": prompt, "raw": True, "stream": False,
                "options": {"temperature": 0, "num_predict": 12}}  # fmt: skip
        async with http.post(base + "api/generate", json=body) as resp:
            reply = await resp.json()
    assert reply["response"] == expected
    assert reply["eval_count"] == 12 and reply["prompt_eval_count"] == len(ids)


@pytest.mark.slow
async def test_qwen_chat_through_openai_client() -> None:
    path = real_model_path("qwen2.5-coder-1.5b-instruct")
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    tokenizer = Tokenizer.from_gguf(path)
    ids = tokenizer.encode_chat(messages)
    service, expected = service_and_reference(path, tokenizer, "qwen", ids, 32)
    async with serve(service) as base:
        api = openai.AsyncOpenAI(base_url=base + "v1", api_key="x", max_retries=0, timeout=600)
        start = time.perf_counter()
        stream = await api.chat.completions.create(
            model="qwen", messages=messages, max_tokens=32, temperature=0, stream=True,  # type: ignore[arg-type]
        )  # fmt: skip
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        seconds = time.perf_counter() - start
        await api.close()
    print(f"qwen via API: 32 tokens in {seconds:.2f} s ({torch.get_num_threads()} threads)")
    assert text == expected
    assert "def" in text
