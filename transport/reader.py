"""Splits a byte stream into frame bodies (sans-io, drives asyncio.BufferedProtocol).

Small frames are read many at a time into one reusable scratch buffer and copied out (cheap,
and one recv serves many frames). A frame bigger than `direct_threshold` gets its own buffer as
soon as its length prefix is seen, and the socket reads the rest straight into it, so tensor
payloads land in their final memory. The length prefix is checked against the limit before
that buffer is allocated.

Large buffers are recycled: with a fresh allocation per 1.5 MiB frame the allocator handed
memory back to the kernel and faulted it in again (measured here: ~55 page faults per frame,
more than twice the receiver's system time per frame). A pooled buffer is reused only once
nothing else references it, i.e. once every tensor decoded from it has been dropped; most
recently used first, so that its memory is likely still cached. When every pooled buffer is
in use (`backlogged`), the connection pauses reading until its handlers have run.
"""

from __future__ import annotations

import sys
from typing import Final

import numpy as np

from transport.frames import PREFIX, Body, Limits, body_length

SCRATCH_BYTES: Final = 64 * 1024
DIRECT_THRESHOLD: Final = 16 * 1024
# Bounded in bytes too, since large frames can be 64 MiB.
POOL_BUFFERS: Final = 4
POOL_BYTES: Final = 8 * 1024 * 1024
# References to a free pooled buffer seen by sys.getrefcount inside _allocate: the pool list,
# the local variable and getrefcount's own argument.
_FREE_REFS: Final = 3


class FrameReader:
    def __init__(
        self,
        limits: Limits,
        scratch_bytes: int = SCRATCH_BYTES,
        direct_threshold: int = DIRECT_THRESHOLD,
    ) -> None:
        if direct_threshold + PREFIX.size > scratch_bytes:
            raise ValueError("scratch buffer must hold any frame below the direct threshold")
        self._limits = limits
        self._threshold = direct_threshold
        self._scratch = bytearray(scratch_bytes)
        self._view = memoryview(self._scratch)
        self._start = 0  # unconsumed bytes are scratch[start:end]
        self._end = 0
        self._big: np.ndarray | None = None  # body of a large frame being filled in place
        self._filled = 0
        self._pool: list[np.ndarray] = []  # large buffers, reusable once unreferenced

    def backlogged(self) -> bool:
        """True when the pool is full and every pooled buffer is still referenced: the frames
        read so far have not been handled yet, and the next large frame would need fresh
        memory. The connection then stops reading until its handlers have run."""
        if not self._pool or self._pool_has_room(len(self._pool[-1])):
            return False
        for index in range(len(self._pool)):
            base = self._pool[index]
            if sys.getrefcount(base) == _FREE_REFS:
                return False
        return True

    def _pool_has_room(self, length: int) -> bool:
        pooled = sum(len(b) for b in self._pool)
        return len(self._pool) < POOL_BUFFERS and pooled + length <= POOL_BYTES

    def _allocate(self, length: int) -> np.ndarray:
        # Most recently used first: its memory is likely still in cache.
        for index in range(len(self._pool) - 1, -1, -1):
            base = self._pool[index]
            if length <= len(base) <= 2 * length and sys.getrefcount(base) == _FREE_REFS:
                self._pool.append(self._pool.pop(index))
                return base[:length]
        # np.empty skips the zero-fill that bytearray(length) would pay
        fresh = np.empty(length, dtype=np.uint8)
        if self._pool_has_room(length):
            self._pool.append(fresh)
        return fresh

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Where the next bytes from the socket should go (never empty; sizehint is ignored)."""
        if self._big is not None:
            return memoryview(self._big)[self._filled :]  # type: ignore[arg-type]
        return self._view[self._end :]

    def feed(self, nbytes: int) -> list[Body]:
        """Accounts for `nbytes` written into the last buffer; returns the completed bodies.

        Raises FrameError when a length prefix exceeds the limit; the stream is then unusable.
        """
        if self._big is not None:
            self._filled += nbytes
            if self._filled < len(self._big):
                return []
            done: list[Body] = [self._big]
            self._big = None
            return done
        self._end += nbytes
        return self._split()

    def _split(self) -> list[Body]:
        out: list[Body] = []
        scratch, view = self._scratch, self._view
        max_frame = self._limits.max_frame
        while self._end - self._start >= PREFIX.size:
            start = self._start
            (length,) = PREFIX.unpack_from(scratch, start)
            if length > max_frame:
                body_length(view[start : start + PREFIX.size], self._limits)  # raises FrameError
            have = self._end - start - PREFIX.size
            if have >= length:
                out.append(scratch[start + PREFIX.size : start + PREFIX.size + length])
                self._start = start + PREFIX.size + length
                continue
            if length > self._threshold:
                big = self._allocate(length)
                big[:have] = np.frombuffer(scratch, np.uint8, have, start + PREFIX.size)
                self._big, self._filled = big, have
                self._start = self._end = 0
                return out
            break
        if self._start == self._end:
            self._start = self._end = 0
        elif len(scratch) - self._end < self._threshold + PREFIX.size:
            # Make room for the pending partial frame, which is at most the threshold.
            pending = self._end - self._start
            scratch[:pending] = scratch[self._start : self._end]
            self._start, self._end = 0, pending
        return out
