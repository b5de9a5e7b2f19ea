"""Exact conversion of ggml's 4-bit blocks (Q4_0, Q4_1, Q4_K) into per-group int4 form.

Every one of these formats stores, per group of 32 weights, 4-bit codes q in 0..15 and an affine
map ``w = q * scale + offset``. Reading the codes and the map straight out of the blocks gives
torch's int4 kernel the very weights llama.cpp uses, instead of re-quantizing dequantized floats
(which, measured on Qwen's Q4_K tensors, adds a 4.2% relative weight error).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np

Q = gguf.GGMLQuantizationType
GROUP = 32
INT4_SOURCE_TYPES = frozenset({Q.Q4_0, Q.Q4_1, Q.Q4_K})


@dataclass(frozen=True)
class Int4Groups:
    """codes uint8 [out, in] (0..15); scale and offset float32 [out, in / 32]."""

    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray

    def dequantize(self) -> np.ndarray:
        out, n = self.codes.shape
        groups = self.codes.reshape(out, n // GROUP, GROUP).astype(np.float32)
        return (groups * self.scale[..., None] + self.offset[..., None]).reshape(out, n)

    def take_rows(self, order: np.ndarray) -> Int4Groups:
        return Int4Groups(self.codes[order], self.scale[order], self.offset[order])


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per 32 weights -> codes: low nibbles are weights 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def int4_groups(
    qtype: gguf.GGMLQuantizationType, data: np.ndarray, shape: tuple[int, int]
) -> Int4Groups:
    """Codes and affine maps of a [out, in] tensor stored as Q4_0, Q4_1 or Q4_K blocks."""
    out, n = shape
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(out, -1)
    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    if qtype == Q.Q4_0:  # 18 bytes: f16 d, 16 bytes codes; w = d * (q - 8)
        blocks: np.ndarray = raw.reshape(out, n // 32, 18)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        codes = _nibbles(blocks[..., 2:])
        scale, offset = d, -8.0 * d
    elif qtype == Q.Q4_1:  # 20 bytes: f16 d, f16 m, 16 bytes codes; w = d * q + m
        blocks = raw.reshape(out, n // 32, 20)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        codes = _nibbles(blocks[..., 4:])
        scale, offset = d, m
    elif qtype == Q.Q4_K:  # 144 bytes per 256: f16 d, f16 dmin, 12 bytes 6-bit scales/mins, codes
        blocks = raw.reshape(-1, 144)
        d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [nb, 1]
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16])  # [nb, 8] each
        qs = blocks[:, 16:].reshape(-1, 4, 32)
        # Each 32-byte chunk holds two sub-blocks: low nibbles first, then high nibbles.
        codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(out, n // 32, 32)
        scale = (d * sc.astype(np.float32)).reshape(out, n // 32)
        offset = (-dmin * mn.astype(np.float32)).reshape(out, n // 32)
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit ggml block type")
    return Int4Groups(codes.reshape(out, n).astype(np.uint8), scale, offset)
