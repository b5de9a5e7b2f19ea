"""Per-session key/value cache, batched across sessions, with rollback.

Each session holds a slot. A slot's keys and values live in their own buffers
[n_layers, n_kv_heads, capacity, head_dim] that grow by doubling up to max_len, so memory follows
the sessions' real lengths and never exceeds max_slots x max_len tokens. `truncate` only moves the
length back (rejected draft tokens are overwritten by the next write).

The cache stores torch tensors but knows nothing about models: a backend gathers a padded batch
of past K/V before a pass and writes each session's new K/V after it (onnxruntime, and torch for
prefill chunks), or takes each session's own buffers (`buffers_for`), lets the pass write and
read them in place and then `commit`s the new length (torch decode steps and verify passes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MIN_CAPACITY = 64


class CacheFullError(RuntimeError):
    """A session would grow past max_len tokens."""


class NoFreeSlotError(RuntimeError):
    """All max_slots slots are taken."""


class UnknownSlotError(KeyError):
    """A slot number that is not allocated."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown slot"


class KVCache:
    def __init__(
        self,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        max_slots: int,
        max_len: int,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if min(n_layers, n_kv_heads, head_dim, max_slots, max_len) < 1:
            raise ValueError("KVCache sizes must all be positive")
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.max_slots, self.max_len, self.dtype = max_slots, max_len, dtype
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._lengths: dict[int, int] = {}

    # -- slots -------------------------------------------------------------------------------

    def allocate(self) -> int:
        """A free slot (lowest number first), empty."""
        for slot in range(self.max_slots):
            if slot not in self._lengths:
                self._lengths[slot] = 0
                self._keys[slot] = self._empty(0)
                self._values[slot] = self._empty(0)
                return slot
        raise NoFreeSlotError(
            f"all {self.max_slots} KV cache slots are in use; free a session or raise max_slots"
        )

    def free(self, slot: int) -> None:
        self._check(slot)
        del self._lengths[slot], self._keys[slot], self._values[slot]

    def length(self, slot: int) -> int:
        self._check(slot)
        return self._lengths[slot]

    def room(self, slot: int) -> int:
        """How many more tokens the slot can take."""
        return self.max_len - self.length(slot)

    def truncate(self, slot: int, n: int) -> None:
        """Keep only the first n tokens (roll back rejected draft tokens)."""
        length = self.length(slot)
        if not 0 <= n <= length:
            raise ValueError(f"cannot truncate slot {slot} of length {length} to {n}")
        self._lengths[slot] = n

    @property
    def slots(self) -> tuple[int, ...]:
        return tuple(sorted(self._lengths))

    @property
    def nbytes(self) -> int:
        """Bytes held now by all slots' buffers."""
        return sum(t.nbytes for t in self._keys.values()) + sum(
            t.nbytes for t in self._values.values()
        )

    @property
    def max_nbytes(self) -> int:
        """The bound: every slot at max_len."""
        per_token = 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype.itemsize
        return self.max_slots * self.max_len * per_token

    # -- batched access ----------------------------------------------------------------------

    def check_room(self, slots: Sequence[int], counts: Sequence[int]) -> None:
        """Raise CacheFullError if any slot cannot take its count of new tokens."""
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one batch: {list(slots)}")
        for slot, count in zip(slots, counts, strict=True):
            if count > self.room(slot):
                raise CacheFullError(
                    f"slot {slot} holds {self.length(slot)} tokens; {count} more would exceed "
                    f"max_len={self.max_len}"
                )

    def gather(self, slots: Sequence[int], upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Past K and V [n_layers, B, n_kv_heads, upto, head_dim], zero-padded past each length."""
        lengths = [self.length(s) for s in slots]
        if upto < max(lengths, default=0):
            raise ValueError(f"gather upto={upto} would cut sessions of lengths {lengths}")
        if len(slots) == 1 and lengths[0] == upto:
            # One session: a view, no copy.
            s = slots[0]
            return self._keys[s][:, None, :, :upto], self._values[s][:, None, :, :upto]
        shape = (self.n_layers, len(slots), self.n_kv_heads, upto, self.head_dim)
        keys = torch.zeros(shape, dtype=self.dtype)
        values = torch.zeros(shape, dtype=self.dtype)
        for i, (s, n) in enumerate(zip(slots, lengths, strict=True)):
            keys[:, i, :, :n] = self._keys[s][:, :, :n]
            values[:, i, :, :n] = self._values[s][:, :, :n]
        return keys, values

    def buffers_for(self, slot: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The slot's own K and V buffers [n_layers, n_kv_heads, capacity, head_dim], with room
        for `count` more tokens: a pass writes its new K/V at [length, length + count) itself
        and reads the past in place (no padded copy); `commit` then counts them."""
        self.check_room([slot], [count])
        self._reserve(slot, self._lengths[slot] + count)
        return self._keys[slot], self._values[slot]

    def commit(self, slots: Sequence[int], counts: Sequence[int]) -> None:
        """Counts `counts[i]` tokens written into slot i's buffers (see buffers_for)."""
        for s, n in zip(slots, counts, strict=True):
            if not 0 <= n <= self._keys[s].shape[2] - self.length(s):
                raise ValueError(f"slot {s}: {n} tokens do not fit its buffers")
        for s, n in zip(slots, counts, strict=True):
            self._lengths[s] += n

    def write(
        self,
        slots: Sequence[int],
        new_k: torch.Tensor,
        new_v: torch.Tensor,
        counts: Sequence[int],
    ) -> None:
        """Append new_k/new_v [n_layers, B, n_kv_heads, T, head_dim]: counts[i] tokens to slot i."""
        expected = (self.n_layers, len(slots), self.n_kv_heads)
        if tuple(new_k.shape[:3]) != expected or new_k.shape != new_v.shape:
            raise ValueError(f"new K/V of shape {tuple(new_k.shape)} do not fit {expected}")
        if max(counts, default=0) > new_k.shape[3] or min(counts, default=0) < 0:
            raise ValueError(f"counts {list(counts)} do not fit {new_k.shape[3]} new tokens")
        self.check_room(slots, counts)
        for i, (s, n) in enumerate(zip(slots, counts, strict=True)):
            start = self._lengths[s]
            self._reserve(s, start + n)
            self._keys[s][:, :, start : start + n] = new_k[:, i, :, :n]
            self._values[s][:, :, start : start + n] = new_v[:, i, :, :n]
            self._lengths[s] = start + n

    # -- internals ---------------------------------------------------------------------------

    def _check(self, slot: int) -> None:
        if slot not in self._lengths:
            raise UnknownSlotError(f"KV cache slot {slot} is not allocated")

    def _empty(self, capacity: int) -> torch.Tensor:
        shape = (self.n_layers, self.n_kv_heads, capacity, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype)

    def _reserve(self, slot: int, needed: int) -> None:
        capacity = self._keys[slot].shape[2]
        if needed <= capacity:
            return
        new_capacity = min(self.max_len, max(MIN_CAPACITY, 2 * capacity, needed))
        for store in (self._keys, self._values):
            grown = self._empty(new_capacity)
            grown[:, :, :capacity] = store[slot]
            store[slot] = grown
