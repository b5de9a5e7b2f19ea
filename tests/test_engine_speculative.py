"""The verifier engine with drafts: batches of sessions that join at different times, each
drafted, give target-only text token for token, whatever the drafter, draft length or batch;
a drafter failing mid-session changes nothing but the speed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import pytest
import torch

from agent.drafting import DraftChannel, DraftFailed, LocalDraftChannel, LocalDraftRouter
from agent.engine import Engine
from agent.metrics import NodeMetrics
from models.backend import Backend, load_backend
from models.drafters import Drafter, ModelDrafter, NgramDrafter
from models.feature_drafter import FeatureDrafter
from models.generate import generate
from models.sampling import SamplingParams
from models.speculative import Draft
from models.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = (
    "hello world",
    "the quick brown fox jumps over the lazy dog",
    "a b a b a b a b",
    "one two three",
    "x",
    "def f(x): return x + 1",
    "lorem ipsum dolor sit amet",
    "1 2 3 4 5 6 7 8 9",
)


def _load(path: Path, slots: int = 8) -> Backend:
    return load_backend(path, weights="fp32", use_cache=False, max_slots=slots, max_len=256)


@pytest.fixture(scope="module")
def target(tiny_paths: dict[str, Path]) -> Backend:
    return _load(tiny_paths["qwen2"])


@pytest.fixture(scope="module")
def prompts(tiny_paths: dict[str, Path]) -> list[list[int]]:
    tok = Tokenizer.from_gguf(tiny_paths["qwen2"])
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def expected(target: Backend, prompts: list[list[int]]) -> list[list[int]]:
    return [list(generate(target, p, SamplingParams(), 40).tokens) for p in prompts]


@pytest.fixture(scope="module")
def drafters(
    tiny_paths: dict[str, Path],
    tiny_feature_drafter: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Drafter]:
    return {
        "ngram": NgramDrafter(),
        "model": ModelDrafter(_load(tiny_paths["llama"])),
        "self": ModelDrafter(_load(tiny_paths["qwen2"]), kind="self"),
        "feature": FeatureDrafter.load(
            tiny_feature_drafter,
            tiny_paths["qwen2"],
            "fp32",
            max_slots=8,
            max_len=256,
            cache_root=tmp_path_factory.mktemp("feature_weights"),
        ),  # fmt: skip
    }


async def _run_sessions(
    engine: Engine, prompts: Sequence[list[int]], n: int, params: SamplingParams
) -> list[list[int]]:
    async def one(i: int, prompt: list[int]) -> list[int]:
        await asyncio.sleep(0.004 * i)  # join while others are mid-generation
        stream = engine.open(prompt, params, n, session_id=f"s{i}")
        return [t async for t in stream]

    try:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
    finally:
        await engine.close()


@pytest.mark.parametrize("kind", ["ngram", "model", "self", "feature"])
@pytest.mark.parametrize("k", [1, 3, 8, None])
@pytest.mark.parametrize("sessions", [1, 3, 8])
async def test_batched_verification_equals_target_only(
    target: Backend,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    expected: list[list[int]],
    kind: str,
    k: int | None,
    sessions: int,
) -> None:
    router = LocalDraftRouter(drafters[kind])
    metrics = NodeMetrics()
    engine = Engine(target, drafts=router, draft_k=k, metrics=metrics)
    got = await _run_sessions(engine, prompts[:sessions], 40, SamplingParams())
    router.close()
    assert got == expected[:sessions]
    assert target.cache.slots == ()
    # Passes carry features only where a drafter drafts from them.
    assert (engine.feature_passes == engine.steps) == (kind == "feature")
    if kind == "feature":
        assert "feature" in metrics.text()
    if kind == "self" and k is not None:
        # Every draft of the target's own copy stands: far fewer passes than tokens.
        assert engine.steps < sum(len(e) for e in expected[:sessions]) / 1.5
        assert "sled_draft_tokens_total" in metrics.text()


async def test_sampled_output_is_reproducible_with_drafts(
    target: Backend, drafters: dict[str, Drafter], prompts: list[list[int]]
) -> None:
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=5)
    runs = []
    for _ in range(2):
        engine = Engine(target, drafts=LocalDraftRouter(drafters["model"]), draft_k=3)
        runs.append(await _run_sessions(engine, prompts[:3], 30, params))
    assert runs[0] == runs[1]
    assert all(len(r) > 0 for r in runs[0])


class _DyingChannel:
    """A drafter that drafts a few times and then is gone (like a killed drafter node)."""

    remote = True

    def __init__(self, inner: LocalDraftChannel, lives: int, node: str) -> None:
        self.kind = inner.kind
        self.node = node
        self.uses_features = inner.uses_features
        self._inner = inner
        self._lives = lives

    async def propose(
        self, committed: Sequence[int], k: int, features: torch.Tensor | None = None
    ) -> Draft:
        if self._lives <= 0:
            raise DraftFailed(f"lost drafter {self.node}")
        self._lives -= 1
        return await self._inner.propose(committed, k, features)

    async def close(self) -> None:
        await self._inner.close()


class _FailingRouter:
    """Hands out a dying drafter first, then a healthy one, then none."""

    def __init__(self, drafter: Drafter) -> None:
        self.drafter = drafter
        self.uses_features = getattr(drafter, "uses_features", False)
        self.asked: list[tuple[str, frozenset[str]]] = []

    async def channel(
        self, session_id: str, params: SamplingParams, exclude: Collection[str]
    ) -> DraftChannel | None:
        self.asked.append((session_id, frozenset(exclude)))
        inner = LocalDraftChannel(self.drafter.open(params))
        if "dying" not in exclude:
            return _DyingChannel(inner, lives=3, node="dying")
        if "healthy" not in exclude:
            return _DyingChannel(inner, lives=10**6, node="healthy")
        return None


@pytest.mark.parametrize("kind", ["self", "feature"])
async def test_a_failing_drafter_is_replaced_and_the_text_is_unchanged(
    target: Backend,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    expected: list[list[int]],
    kind: str,
) -> None:
    router = _FailingRouter(drafters[kind])
    metrics = NodeMetrics()
    engine = Engine(target, drafts=router, draft_k=2, metrics=metrics)
    got = await _run_sessions(engine, prompts[:2], 40, SamplingParams())
    assert got == expected[:2]
    # Each session asked for a drafter twice: the dying one, then (excluding it) the healthy one.
    for session in ("s0", "s1"):
        asks = [ex for sid, ex in router.asked if sid == session]
        assert asks[:2] == [frozenset(), frozenset({"dying"})]
    assert "sled_drafter_failovers_total 2.0" in metrics.text()


async def test_a_slow_drafter_does_not_stall_other_sessions(
    target: Backend,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    expected: list[list[int]],
) -> None:
    class SlowRouter:
        async def channel(
            self, session_id: str, params: SamplingParams, exclude: Collection[str]
        ) -> DraftChannel | None:
            inner = LocalDraftChannel(drafters["ngram"].open(params))
            return _SlowChannel(inner, delay=5.0 if session_id == "s0" else 0.0)

    engine = Engine(target, drafts=SlowRouter(), draft_k=2, draft_patience=0.2)
    start = time.monotonic()
    got = await asyncio.wait_for(_run_sessions(engine, prompts[:2], 20, SamplingParams()), 60)
    assert got == [e[:20] for e in expected[:2]]
    # s0's drafter takes 5 s per draft; nobody waited for it beyond the patience.
    assert time.monotonic() - start < 4.5


class _SlowChannel:
    remote = True
    node = "slow"

    def __init__(self, inner: LocalDraftChannel, delay: float) -> None:
        self.kind = inner.kind
        self._inner = inner
        self._delay = delay

    async def propose(self, committed: Sequence[int], k: int) -> Draft:
        await asyncio.sleep(self._delay)
        return await self._inner.propose(committed, k)


class _RecordingRouter:
    """Local drafting that records the features each draft was asked with."""

    def __init__(self, drafter: Drafter, advertise: bool = True) -> None:
        self.inner = LocalDraftRouter(drafter)
        self.uses_features = advertise and self.inner.uses_features
        self.seen: dict[str, list[tuple[list[int], torch.Tensor]]] = {}

    async def channel(
        self, session_id: str, params: SamplingParams, exclude: Collection[str]
    ) -> DraftChannel | None:
        if "local" in exclude:
            return None
        channel = await self.inner.channel(session_id, params, exclude)
        assert channel is not None
        seen = self.seen.setdefault(session_id, [])

        class Recording:
            kind = channel.kind
            node = channel.node
            remote = False
            uses_features = channel.uses_features

            async def propose(
                self, committed: Sequence[int], k: int, features: torch.Tensor | None = None
            ) -> Draft:
                assert features is not None
                seen.append((list(committed), features.clone()))
                return await channel.propose(committed, k, features)

            async def close(self) -> None:
                await channel.close()

        return Recording()


async def test_feature_drafts_get_the_targets_features_of_what_stands(
    target: Backend,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    expected: list[list[int]],
) -> None:
    """The features a session keeps (cut back with its KV cache when drafts are rejected)
    are the target's features of its committed text, whatever else shares the passes."""
    router = _RecordingRouter(drafters["feature"])
    engine = Engine(target, drafts=router, draft_k=3)
    got = await _run_sessions(engine, prompts[:3], 40, SamplingParams())
    assert got == expected[:3]
    forward_features = target.forward_features  # type: ignore[attr-defined]
    for i, prompt in enumerate(prompts[:3]):
        seen = router.seen[f"s{i}"]
        assert len(seen) > 5
        slot = target.cache.allocate()
        try:
            text = torch.tensor(prompt + expected[i])
            _, (reference,) = forward_features([slot], [text])
        finally:
            target.cache.free(slot)
        for committed, features in seen:
            assert committed == (prompt + expected[i])[: len(committed)]
            assert features.shape == (len(committed) - 1, target.config.dim)
            torch.testing.assert_close(features, reference[: len(committed) - 1])


async def test_a_feature_drafter_without_the_features_of_a_session_is_replaced(
    target: Backend,
    drafters: dict[str, Drafter],
    prompts: list[list[int]],
    expected: list[list[int]],
) -> None:
    """A router that did not say its drafter uses features: the first session's first pass
    kept none, so its feature drafter is given up (never asked) and the text is unchanged.
    (The second may keep its features from its first pass on, once the first has a feature
    drafter, which depends on timing.)"""
    router = _RecordingRouter(drafters["feature"], advertise=False)
    engine = Engine(target, drafts=router, draft_k=3)
    got = await _run_sessions(engine, prompts[:2], 30, SamplingParams())
    assert got == [e[:30] for e in expected[:2]]
    assert router.seen.get("s0", []) == []

    async def close(self) -> None:
        await self._inner.close()
