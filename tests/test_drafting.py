"""Drafting over the wire: a DrafterService behind a real authenticated connection, asked by a
RemoteDraftChannel: deltas instead of whole sequences, drafting ahead, restarts and bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.drafting import DrafterService, DraftFailed, LocalDraftChannel, RemoteDraftChannel
from agent.wire import (
    BAD_SESSION,
    MISSING_FEATURES,
    NOT_DRAFTING,
    DraftReply,
    DraftRequest,
    connection_config,
)
from models.backend import load_backend
from models.drafters import ModelDrafter, NgramDrafter
from models.feature_drafter import FeatureDrafter
from models.sampling import SamplingParams
from transport.auth import ClusterKey
from transport.connection import Connection, Identity
from transport.endpoint import Listener, connect, listen
from transport.errors import RemoteError

pytestmark = pytest.mark.usefixtures("torch_single_thread")
KEY = ClusterKey.from_secret("drafting-test-key")
CONFIG = connection_config(heartbeat=0.2, dead_after=2.0)


async def _serve(service: DrafterService) -> Listener:
    return await listen(
        "127.0.0.1", 0, Identity("drafter", KEY), handler=service.handle, config=CONFIG
    )  # type: ignore[arg-type]


async def _dial(listener: Listener) -> Connection:
    return await connect("127.0.0.1", listener.port, Identity("verifier", KEY), config=CONFIG)


@pytest.fixture
async def model_service(tiny_paths: dict[str, Path]) -> AsyncIterator[DrafterService]:
    backend = load_backend(tiny_paths["llama"], weights="fp32", use_cache=False, max_slots=4)
    service = DrafterService({"tiny-qwen2": ModelDrafter(backend)})
    yield service
    await service.close()


async def test_drafts_match_local_drafting_and_only_deltas_travel(
    model_service: DrafterService, tiny_paths: dict[str, Path]
) -> None:
    listener = await _serve(model_service)
    conn = await _dial(listener)
    try:
        params = SamplingParams()
        channel = RemoteDraftChannel(conn, "drafter", "s1", "tiny-qwen2", params, vocab_size=1000)
        local = ModelDrafter(
            load_backend(tiny_paths["llama"], weights="fp32", use_cache=False, max_slots=1)
        ).open(params)
        committed = [5, 6, 7, 8, 9]
        for _ in range(6):
            draft = await channel.propose(committed, 3)
            assert draft.position == len(committed) and draft.k == 3
            assert draft.tokens == local.propose(committed, 3).tokens
            assert channel.kind == "model"
            # As if the verifier kept two draft tokens and answered with its own third.
            committed = committed + list(draft.tokens[:2]) + [11]
        assert model_service.requests == 6
        assert model_service.active == 1
        # All drafts accepted plus the guessed bonus token: the drafted-ahead draft is served.
        draft = await channel.propose(committed, 3)
        guess = await channel.propose(committed + list(draft.tokens), 3)
        assert guess.position == len(committed) + 3
        await channel.close()
    finally:
        await conn.close()
        await listener.close()


async def test_drafting_ahead_hits_when_the_whole_draft_stands(
    tiny_paths: dict[str, Path],
) -> None:
    backend = load_backend(tiny_paths["qwen2"], weights="fp32", use_cache=False, max_slots=4)
    service = DrafterService({"tiny-qwen2": ModelDrafter(backend)})  # the target itself
    listener = await _serve(service)
    conn = await _dial(listener)
    try:
        channel = RemoteDraftChannel(
            conn, "drafter", "s1", "tiny-qwen2", SamplingParams(), vocab_size=1000
        )
        target = ModelDrafter(
            load_backend(tiny_paths["qwen2"], weights="fp32", use_cache=False, max_slots=1)
        ).open(SamplingParams())
        committed = [5, 6, 7, 8]
        for _ in range(4):
            draft = await channel.propose(committed, 3)
            # A drafter that is the target: the whole draft stands and the drafter's guess of
            # the token after it is the verifier's answer, so the next draft was made ahead.
            committed = committed + list(draft.tokens)
            committed.append(target.propose(committed, 1).tokens[0])
        assert service.ahead_hits >= 3
    finally:
        await conn.close()
        await listener.close()
        await service.close()


async def test_a_restarted_drafter_gets_the_whole_sequence_again() -> None:
    service = DrafterService({"m": NgramDrafter()})
    listener = await _serve(service)
    conn = await _dial(listener)
    try:
        channel = RemoteDraftChannel(conn, "drafter", "s1", "m", SamplingParams(), 1000)
        seq = [1, 2, 3, 4, 1, 2, 3]
        assert (await channel.propose(seq, 2)).tokens == (4, 1)
        await service.peer_down("verifier")  # forgets our sessions, as a restarted drafter would
        seq = seq + [4, 1, 2, 3]
        assert (await channel.propose(seq, 2)).tokens == (4, 1)
    finally:
        await conn.close()
        await listener.close()


async def test_bad_requests_are_refused_and_the_service_goes_on() -> None:
    service = DrafterService({"m": NgramDrafter()})
    listener = await _serve(service)
    conn = await _dial(listener)
    try:
        ok = dict(
            session_id="s", model="m", keep=0, tokens=np.array([1, 2, 1], dtype=np.int64), k=2,
            temperature=0.0, top_p=1.0, top_k=0, seed=0,
        )  # fmt: skip
        with pytest.raises(RemoteError) as err:
            await conn.request(DraftRequest(**{**ok, "model": "other"}), DraftRequest)
        assert err.value.code == NOT_DRAFTING
        with pytest.raises(RemoteError) as err:
            bad = np.array([[1, 2]], dtype=np.int64)
            await conn.request(DraftRequest(**{**ok, "tokens": bad}), DraftRequest)
        assert err.value.code == BAD_SESSION
        with pytest.raises(RemoteError) as err:
            await conn.request(DraftRequest(**{**ok, "top_p": 0.0}), DraftRequest)
        assert err.value.code == BAD_SESSION
        channel = RemoteDraftChannel(conn, "drafter", "s", "other", SamplingParams(), 1000)
        with pytest.raises(DraftFailed, match="refused"):
            await channel.propose([1, 2, 1], 2)
        good = RemoteDraftChannel(conn, "drafter", "s2", "m", SamplingParams(), 1000)
        assert (await good.propose([1, 2, 3, 1, 2], 2)).tokens == (3, 1)
    finally:
        await conn.close()
        await listener.close()
        await service.close()


async def test_a_vanished_drafter_fails_the_channel() -> None:
    service = DrafterService({"m": NgramDrafter()})
    listener = await _serve(service)
    conn = await _dial(listener)
    channel = RemoteDraftChannel(conn, "drafter", "s", "m", SamplingParams(), 1000)
    assert (await channel.propose([1, 2, 3, 1, 2], 1)).tokens == (3,)
    await listener.close()
    await conn.close()
    with pytest.raises(DraftFailed):
        await channel.propose([1, 2, 3, 1, 2, 3], 1)
    await service.close()


# -- feature drafters: the verifier sends the target's features of the positions they lack ----


@pytest.fixture(scope="module")
def feature_parts(
    tiny_paths: dict[str, Path],
    tiny_feature_drafter: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[FeatureDrafter, torch.Tensor]:
    """A feature drafter for tiny qwen2, and the target's features of TEXT (bf16, as an int4 or
    bf16 verifier sends them)."""
    drafter = FeatureDrafter.load(
        tiny_feature_drafter, tiny_paths["qwen2"], "fp32", max_slots=4, max_len=256,
        cache_root=tmp_path_factory.mktemp("feature_weights"),
    )  # fmt: skip
    target = load_backend(tiny_paths["qwen2"], weights="fp32", use_cache=False, max_slots=1)
    slot = target.cache.allocate()
    _, (features,) = target.forward_features([slot], [torch.tensor(TEXT)])  # type: ignore[attr-defined]
    return drafter, features.to(torch.bfloat16)


TEXT = list(range(5, 60))


async def _serve_recording(service: DrafterService, rows: list[int]) -> Listener:
    async def handle(msg: object, ctx: object) -> object:
        if isinstance(msg, DraftRequest):
            rows.append(-1 if msg.features is None else int(msg.features.shape[0]))
        return await service.handle(msg, ctx)  # type: ignore[arg-type]

    return await listen("127.0.0.1", 0, Identity("drafter", KEY), handler=handle, config=CONFIG)  # type: ignore[arg-type]


async def test_feature_drafts_over_the_wire_match_local_and_only_new_rows_travel(
    feature_parts: tuple[FeatureDrafter, torch.Tensor],
) -> None:
    drafter, features = feature_parts
    service = DrafterService({"tiny-qwen2": drafter})
    rows: list[int] = []
    listener = await _serve_recording(service, rows)
    conn = await _dial(listener)
    try:
        channel = RemoteDraftChannel(
            conn, "drafter", "s1", "tiny-qwen2", SamplingParams(), 1000, uses_features=True
        )
        lengths = [10, 13, 14, 20, 21]
        for m in lengths:
            draft = await channel.propose(TEXT[:m], 3, features[: m - 1])
            fresh = drafter.open(SamplingParams())
            assert draft.tokens == fresh.propose(TEXT[:m], 3, features[: m - 1]).tokens
            assert draft.kind == "feature" and channel.kind == "feature"
            fresh.close()
        # The first request carries every position's features, later ones only the new rows.
        assert rows == [9, 3, 1, 6, 1]
        assert service.ahead_hits == 0  # feature sessions do not draft ahead
        assert all(s.ahead is None for s in service._sessions.values())
        # A restarted drafter: refused as unknown, then everything again from position 0.
        await service.peer_down("verifier")
        draft = await channel.propose(TEXT[:25], 2, features[:24])
        assert rows[-2:] == [4, 24]
        fresh = drafter.open(SamplingParams())
        assert draft.tokens == fresh.propose(TEXT[:25], 2, features[:24]).tokens
        fresh.close()
        with pytest.raises(DraftFailed, match="target features"):
            await channel.propose(TEXT[:26], 2)  # the verifier has no features to give
    finally:
        await conn.close()
        await listener.close()
        await service.close()


async def test_bad_features_are_refused_and_the_service_goes_on(
    feature_parts: tuple[FeatureDrafter, torch.Tensor],
) -> None:
    drafter, features = feature_parts
    service = DrafterService({"tiny-qwen2": drafter})
    listener = await _serve(service)
    conn = await _dial(listener)
    try:
        ok = dict(
            session_id="s", model="tiny-qwen2", keep=0, tokens=np.array(TEXT[:8], dtype=np.int64),
            k=2, temperature=0.0, top_p=1.0, top_k=0, seed=0, features=features[:7],
        )  # fmt: skip
        nan = features[:7].clone()
        nan[3, 5] = float("nan")
        bad = {
            "non-finite": nan,
            "wrong width": features[:7, :-1].contiguous(),
            "not float": torch.ones(7, features.shape[1], dtype=torch.int64),
            "too many rows": features[:9],
            "not 2-d": features[:7].reshape(-1),
        }
        for why, value in bad.items():
            with pytest.raises(RemoteError) as err:
                await conn.request(DraftRequest(**{**ok, "features": value}), DraftReply)
            assert err.value.code == BAD_SESSION, why
        # Too few rows (and none): the drafter lacks positions and says so.
        for value in (features[:5], None):
            with pytest.raises(RemoteError) as err:
                await conn.request(DraftRequest(**{**ok, "features": value}), DraftReply)
            assert err.value.code == MISSING_FEATURES
        reply = await conn.request(DraftRequest(**ok), DraftReply)
        fresh = drafter.open(SamplingParams())
        assert tuple(reply.tokens.tolist()) == fresh.propose(TEXT[:8], 2, features[:7]).tokens
        fresh.close()
        # A held session (7 positions' features) sent only the last of the two new positions'
        # rows: the drafter says what it lacks instead of drafting from misplaced rows.
        gap = DraftRequest(
            **{**ok, "keep": 8, "tokens": np.array(TEXT[8:10], dtype=np.int64),
               "features": features[8:9]}
        )  # fmt: skip
        with pytest.raises(RemoteError) as err:
            await conn.request(gap, DraftReply)
        assert err.value.code == MISSING_FEATURES and "send them from 7" in err.value.text
    finally:
        await conn.close()
        await listener.close()
        await service.close()


async def test_a_local_feature_channel_sends_what_its_session_lacks(
    feature_parts: tuple[FeatureDrafter, torch.Tensor],
) -> None:
    drafter, features = feature_parts
    channel = LocalDraftChannel(drafter.open(SamplingParams()))
    assert channel.uses_features
    with pytest.raises(DraftFailed, match="features"):
        await channel.propose(TEXT[:10], 3)
    for m in (10, 12, 17):
        draft = await channel.propose(TEXT[:m], 3, features[: m - 1])
        fresh = drafter.open(SamplingParams())
        assert draft.tokens == fresh.propose(TEXT[:m], 3, features[: m - 1]).tokens
        fresh.close()
    # Other text than what the session holds features for: it is given them all again.
    other = [7, *TEXT[1:12]]
    ones = torch.ones(11, features.shape[1], dtype=features.dtype)
    draft = await channel.propose(other, 2, ones)
    fresh = drafter.open(SamplingParams())
    assert draft.tokens == fresh.propose(other, 2, ones).tokens
    fresh.close()
    await channel.close()
