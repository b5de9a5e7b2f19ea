"""The continuous-batching engine: same tokens as the single-session loop, whatever the batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from agent.engine import Engine
from agent.metrics import NodeMetrics
from agent.service import BadRequestError, OverloadedError, UnavailableError
from models.backend import Backend, load_backend
from models.generate import generate
from models.sampling import SamplingParams, next_token, position_generator
from models.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = (
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "a" * 40,
    "one two three",
    "x",
)


def load(path: Path, slots: int = 4, max_len: int = 512) -> Backend:
    # fp32: bf16 logits tie often enough that a different batch composition can flip an argmax.
    return load_backend(path, backend="torch", weights="fp32", max_slots=slots, max_len=max_len)


def reference(
    backend: Backend, prompt: list[int], params: SamplingParams, n: int, stop_ids: frozenset[int]
) -> list[int]:
    """Single-session loop sampling the token at position p with position_generator(seed, p)."""
    slot = backend.cache.allocate()
    try:
        logits = backend.forward([slot], [torch.tensor(prompt)], last_only=True)[0][-1]
        out: list[int] = []
        while len(out) < n:
            position = len(prompt) + len(out)
            token = next_token(logits, params, position_generator(params.seed, position))
            if token in stop_ids:
                break
            out.append(token)
            logits = backend.forward([slot], [torch.tensor([token])])[0][-1]
        return out
    finally:
        backend.cache.free(slot)


async def collect(engine: Engine, prompt: list[int], params: SamplingParams, n: int) -> list[int]:
    stream = engine.open(prompt, params, n)
    return [t async for t in stream]


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gemma3"])
async def test_greedy_batched_equals_generate(tiny_paths: dict[str, Path], arch: str) -> None:
    path = tiny_paths[arch]
    tok = Tokenizer.from_gguf(path)
    backend = load(path)
    prompts = [tok.encode(p) for p in PROMPTS]
    expected = [list(generate(backend, p, SamplingParams(), 30).tokens) for p in prompts]
    engine = Engine(backend, model=arch)

    async def staggered(i: int, prompt: list[int]) -> list[int]:
        await asyncio.sleep(0.003 * i)  # join while others are mid-generation
        return await collect(engine, prompt, SamplingParams(), 30)

    try:
        got = await asyncio.gather(*(staggered(i, p) for i, p in enumerate(prompts)))
    finally:
        await engine.close()
    assert got == expected
    # More sessions than slots: some waited, and passes carried several sessions at once.
    assert engine.steps < sum(len(e) for e in expected)
    assert backend.cache.slots == ()


async def test_seeded_sampling_is_position_keyed(tiny_paths: dict[str, Path]) -> None:
    backend = load(tiny_paths["qwen2"])
    tok = Tokenizer.from_gguf(tiny_paths["qwen2"])
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s) for s in (1, 2, 3)]
    expected = [
        reference(backend, p, q, 25, frozenset()) for p, q in zip(prompts, params, strict=True)
    ]
    engine = Engine(backend)
    try:
        got = await asyncio.gather(
            *(collect(engine, p, q, 25) for p, q in zip(prompts, params, strict=True))
        )
    finally:
        await engine.close()
    assert got == expected
    assert len({tuple(g) for g in got}) == 3


async def test_continuing_from_committed_tokens_gives_the_rest(
    tiny_paths: dict[str, Path],
) -> None:
    """What failover relies on: prompt + k generated tokens, continued elsewhere, gives the same
    remaining tokens as the uninterrupted run (greedy and seeded)."""
    backend = load(tiny_paths["llama"])
    prompt = Tokenizer.from_gguf(tiny_paths["llama"]).encode(PROMPTS[1])
    engine = Engine(backend)
    try:
        for params in (SamplingParams(), SamplingParams(temperature=1.0, top_k=20, seed=7)):
            full = await collect(engine, prompt, params, 24)
            for k in (1, 9, 23):
                rest = await collect(engine, prompt + full[:k], params, 24 - k)
                assert full[:k] + rest == full, (params, k)
    finally:
        await engine.close()


async def test_long_prompt_prefills_in_chunks(tiny_paths: dict[str, Path]) -> None:
    backend = load(tiny_paths["qwen2"])
    prompt = [(i * 37) % 600 + 1 for i in range(300)]  # longer than one PREFILL_CHUNK (256)
    expected = list(generate(backend, prompt, SamplingParams(), 12).tokens)
    engine = Engine(backend)
    try:
        other = asyncio.ensure_future(collect(engine, [5, 6, 7], SamplingParams(), 40))
        assert await collect(engine, prompt, SamplingParams(), 12) == expected
        await other
    finally:
        await engine.close()


async def test_stop_ids_end_the_stream_unseen(tiny_paths: dict[str, Path]) -> None:
    backend = load(tiny_paths["qwen2"])
    prompt = Tokenizer.from_gguf(tiny_paths["qwen2"]).encode(PROMPTS[0])
    free = list(generate(backend, prompt, SamplingParams(), 20).tokens)
    stop = free[5]
    cut = free.index(stop)
    engine = Engine(backend, stop_ids={stop})
    try:
        stream = engine.open(prompt, SamplingParams(), 20)
        got = [t async for t in stream]
        assert got == free[:cut]
        assert stream.finish_reason == "stop"
        stream = engine.open(prompt, SamplingParams(), 3)
        assert [t async for t in stream] == free[: min(3, cut)]
        assert stream.finish_reason == ("length" if cut >= 3 else "stop")
    finally:
        await engine.close()


async def test_context_full_ends_with_length(tiny_paths: dict[str, Path]) -> None:
    backend = load(tiny_paths["qwen2"], max_len=16)
    engine = Engine(backend)
    try:
        stream = engine.open(list(range(1, 11)), SamplingParams(), 100)
        got = [t async for t in stream]
        assert stream.finish_reason == "length"
        assert len(got) == 16 - 10 + 1  # as models.generate: until the slot has no room left
        with pytest.raises(BadRequestError, match="at most 16"):
            engine.open(list(range(1, 17)), SamplingParams(), 1)
        with pytest.raises(BadRequestError, match="token ids"):
            engine.open([10**6], SamplingParams(), 1)
        with pytest.raises(BadRequestError, match="empty"):
            engine.open([], SamplingParams(), 1)
    finally:
        await engine.close()


async def test_overload_and_cancel(tiny_paths: dict[str, Path]) -> None:
    backend = load(tiny_paths["qwen2"], slots=1)
    metrics = NodeMetrics()
    engine = Engine(backend, max_queue=1, metrics=metrics)
    try:
        first = engine.open([1, 2, 3], SamplingParams(), 400)  # the slot
        second = engine.open([4, 5, 6], SamplingParams(), 5)  # the one queue place
        with pytest.raises(OverloadedError):
            engine.open([7, 8, 9], SamplingParams(), 5)
        assert await first.__anext__() >= 0
        await first.aclose()  # cancelled mid-stream: its slot goes to the waiting one
        assert len([t async for t in second]) == 5
        assert 'sled_queue_depth{queue="engine_waiting"} 0.0' in metrics.text()
        assert backend.cache.slots == ()
    finally:
        await engine.close()


async def test_close_ends_unfinished_sessions(tiny_paths: dict[str, Path]) -> None:
    backend = load(tiny_paths["qwen2"], slots=1)
    engine = Engine(backend)
    running = engine.open([1, 2, 3], SamplingParams(), 400)
    waiting = engine.open([4, 5], SamplingParams(), 400)
    await running.__anext__()
    await engine.close(grace=0.05)
    with pytest.raises(UnavailableError):
        async for _ in running:
            pass
    with pytest.raises(UnavailableError):
        async for _ in waiting:
            pass
    with pytest.raises(UnavailableError):
        engine.open([1], SamplingParams(), 1)
