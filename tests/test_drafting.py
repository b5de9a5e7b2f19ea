"""Drafting over the wire: a DrafterService behind a real authenticated connection, asked by a
RemoteDraftChannel: deltas instead of whole sequences, drafting ahead, restarts and bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from agent.drafting import DrafterService, DraftFailed, RemoteDraftChannel
from agent.wire import BAD_SESSION, NOT_DRAFTING, DraftRequest, connection_config
from models.backend import load_backend
from models.drafters import ModelDrafter, NgramDrafter
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
