"""KV cache: slots, offsets, rollback, padding on gather, bounded memory, clear errors."""

from __future__ import annotations

import pytest
import torch

from models.kv_cache import CacheFullError, KVCache, NoFreeSlotError, UnknownSlotError

L, H, D = 3, 2, 4


def _kv(b: int, t: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    k = base + torch.arange(L * b * H * t * D, dtype=torch.float32).reshape(L, b, H, t, D)
    return k, -k


def test_allocate_free_and_slot_limit() -> None:
    cache = KVCache(L, H, D, max_slots=2, max_len=16, dtype=torch.float32)
    a, b = cache.allocate(), cache.allocate()
    assert (a, b) == (0, 1) and cache.slots == (0, 1)
    with pytest.raises(NoFreeSlotError, match="all 2 KV cache slots are in use"):
        cache.allocate()
    cache.free(a)
    assert cache.allocate() == 0
    with pytest.raises(UnknownSlotError, match="slot 7 is not allocated"):
        cache.length(7)
    cache.free(1)
    with pytest.raises(UnknownSlotError):
        cache.free(1)


def test_write_appends_at_each_slots_own_offset_and_gather_pads() -> None:
    cache = KVCache(L, H, D, max_slots=4, max_len=100, dtype=torch.float32)
    s0, s1 = cache.allocate(), cache.allocate()
    k0, v0 = _kv(1, 5, 0.0)
    cache.write([s0], k0, v0, [5])
    k, v = _kv(2, 3, 1000.0)
    cache.write([s1, s0], k, v, [3, 2])  # slot 1 gets 3 tokens, slot 0 gets 2 more
    assert cache.length(s0) == 7 and cache.length(s1) == 3
    pk, pv = cache.gather([s0, s1], 7)
    assert pk.shape == (L, 2, H, 7, D)
    torch.testing.assert_close(pk[:, 0, :, :5], k0[:, 0])
    torch.testing.assert_close(pk[:, 0, :, 5:7], k[:, 1, :, :2])
    torch.testing.assert_close(pk[:, 1, :, :3], k[:, 0])
    assert pk[:, 1, :, 3:].abs().sum() == 0  # padding is zero
    torch.testing.assert_close(pv, -pk)
    with pytest.raises(ValueError, match="would cut"):
        cache.gather([s0], 6)


def test_single_slot_gather_is_a_view() -> None:
    cache = KVCache(L, H, D, max_slots=1, max_len=100, dtype=torch.float32)
    s = cache.allocate()
    cache.write([s], *_kv(1, 4, 0.0), [4])
    pk, _ = cache.gather([s], 4)
    pk2, _ = cache.gather([s], 4)
    assert pk.data_ptr() == pk2.data_ptr()


def test_truncate_then_rewrite_overwrites() -> None:
    cache = KVCache(L, H, D, max_slots=1, max_len=100, dtype=torch.float32)
    s = cache.allocate()
    cache.write([s], *_kv(1, 6, 0.0), [6])
    cache.truncate(s, 4)
    assert cache.length(s) == 4
    k2, v2 = _kv(1, 2, 500.0)
    cache.write([s], k2, v2, [2])
    pk, _ = cache.gather([s], 6)
    torch.testing.assert_close(pk[:, 0, :, 4:6], k2[:, 0])
    with pytest.raises(ValueError, match="cannot truncate slot 0 of length 6 to 7"):
        cache.truncate(s, 7)


def test_overflow_is_refused_before_any_write() -> None:
    cache = KVCache(L, H, D, max_slots=2, max_len=8, dtype=torch.float32)
    a, b = cache.allocate(), cache.allocate()
    cache.write([a], *_kv(1, 6, 0.0), [6])
    k, v = _kv(2, 3, 0.0)
    with pytest.raises(
        CacheFullError, match="slot 0 holds 6 tokens; 3 more would exceed max_len=8"
    ):
        cache.write([b, a], k, v, [3, 3])
    assert cache.length(b) == 0 and cache.length(a) == 6  # nothing was written
    with pytest.raises(ValueError, match="appears twice"):
        cache.check_room([a, a], [1, 1])


def test_memory_grows_with_use_and_stays_bounded() -> None:
    cache = KVCache(L, H, D, max_slots=2, max_len=200, dtype=torch.bfloat16)
    per_token = 2 * L * H * D * 2
    assert cache.max_nbytes == 2 * 200 * per_token
    s = cache.allocate()
    assert cache.nbytes == 0
    cache.write([s], *_kv(1, 10, 0.0), [10])
    assert 10 * per_token <= cache.nbytes <= 64 * per_token
    for _ in range(19):  # bounded: 200 tokens in all
        cache.write([s], *_kv(1, 10, 0.0), [10])
    assert cache.length(s) == 200
    assert cache.nbytes <= cache.max_nbytes
    with pytest.raises(CacheFullError):
        cache.write([s], *_kv(1, 1, 0.0), [1])


def test_write_checks_shapes() -> None:
    cache = KVCache(L, H, D, max_slots=1, max_len=8, dtype=torch.float32)
    s = cache.allocate()
    with pytest.raises(ValueError, match="do not fit"):
        cache.write([s], torch.zeros(L, 1, H + 1, 2, D), torch.zeros(L, 1, H + 1, 2, D), [2])
    with pytest.raises(ValueError, match="counts"):
        cache.write([s], *_kv(1, 2, 0.0), [3])


def test_buffers_for_gives_room_in_place_and_commit_counts_it() -> None:
    cache = KVCache(L, H, D, max_slots=2, max_len=100, dtype=torch.float32)
    s = cache.allocate()
    cache.write([s], *_kv(1, 4, 0.0), [4])
    keys, values = cache.buffers_for(s, 70)  # grows past the first capacity (64)
    assert keys.shape[2] >= 74 and cache.length(s) == 4
    keys[:, :, 4:6] = 7.0  # what a pass writes in place
    values[:, :, 4:6] = -7.0
    cache.commit([s], [2])
    pk, pv = cache.gather([s], 6)
    assert cache.length(s) == 6 and bool((pk[:, 0, :, 4:6] == 7.0).all())
    assert bool((pv[:, 0, :, 4:6] == -7.0).all())
    with pytest.raises(CacheFullError):
        cache.buffers_for(s, 95)
    with pytest.raises(ValueError, match="do not fit"):
        cache.commit([s], [keys.shape[2]])
    assert cache.length(s) == 6
