"""Weight formats for the torch backend: how a dense weight is stored and multiplied.

- ``fp32``: plain float32 (accuracy reference).
- ``bf16``: bfloat16 weights and activations (AVX-512 BF16 GEMMs; cost nearly flat up to ~8 tokens).
- ``int8``: weight-only int8, one scale per output row, bf16 activations
  (``aten._weight_int8pack_mm``).
- ``int4``: the GGUF's own 4-bit tensors (Q4_0/Q4_1/Q4_K) transcoded exactly (codes and
  per-group scale/offset); tensors the file keeps at higher precision (Q6_K, Q5_0, Q8_0, F16, ...)
  and the output head become 8-bit. Re-quantizing floats to 4 bits was measured to lose too much
  (Gemma 3 270M: 78% top-1 agreement with fp32, perplexity 9.84 vs 7.42), so int4 never
  re-quantizes. Two kernels: sled's AVX-512 VNNI kernel (models/vnni_matmul.py: int8
  activations per group of 32, 8-bit parts as symmetric codes per group) where it builds, else
  torch's int4 kernel (``aten._weight_int4pack_mm_for_cpu``, bf16 activations) with per-row int8
  (``aten._weight_int8pack_mm``) for the 8-bit parts. The two layouts are cached apart.

A linear layer is described by a flat dict of tensors ("packed"), which is what the weight
cache stores, so a cached layer is turned back into a module without any conversion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.gguf_loader import GGUFFile, SegmentWeights
from models.int4_blocks import GROUP as INT4_GROUP
from models.int4_blocks import Int4Groups
from models.vnni_matmul import VnniLinear, pack_codes, pack_codes8
from models.vnni_matmul import available as vnni_available

WEIGHT_FORMATS = ("fp32", "bf16", "int8", "int4")
INT4_INNER_K_TILES = 2

# The fused GEMMs of a block: one output per group of decoder matrices.
FUSED = {
    "qkv": ("wq", "wk", "wv"),
    "wo": ("wo",),
    "gate_up": ("w_gate", "w_up"),
    "down": ("w_down",),
}


class UnsupportedWeightFormatError(ValueError):
    """A weight format name that this backend does not implement."""


def check_format(fmt: str) -> str:
    if fmt not in WEIGHT_FORMATS:
        raise UnsupportedWeightFormatError(
            f"unknown weight format {fmt!r} (torch backend supports: {', '.join(WEIGHT_FORMATS)})"
        )
    return fmt


def activation_dtype(fmt: str) -> torch.dtype:
    """dtype of activations (and of the KV cache) for a weight format."""
    return torch.float32 if check_format(fmt) == "fp32" else torch.bfloat16


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: returns (int8 [out, in], bf16 scales [out])."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-8)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales.to(torch.bfloat16)


def storage_layout(fmt: str) -> str:
    """The name under which a format's converted weights are cached: int4's layout depends on
    which kernel runs it here."""
    return "int4-vnni" if check_format(fmt) == "int4" and vnni_available() else fmt


def pack_int4(groups: Int4Groups) -> dict[str, torch.Tensor]:
    """4-bit codes + per-group affine maps -> the int4 kernel's tensors."""
    if vnni_available():
        return pack_codes(groups.codes, groups.scale, groups.offset, 4)
    out_f = groups.codes.shape[0]
    codes = torch.from_numpy(groups.codes.astype(np.int32))
    scale = torch.from_numpy(np.ascontiguousarray(groups.scale))
    # The kernel computes (q - 8) * scale + zero; ggml's map is q * scale + offset.
    zero = torch.from_numpy(np.ascontiguousarray(groups.offset)) + 8.0 * scale
    scales_zeros = torch.stack([scale, zero], dim=2).transpose(0, 1).contiguous()
    return {
        "weight": torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INT4_INNER_K_TILES),
        "scales_zeros": scales_zeros.to(torch.bfloat16),
        "shape": torch.tensor([out_f, groups.codes.shape[1]], dtype=torch.int64),
    }


def pack_int4_wide(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A matrix the int4 format keeps at 8 bits (the file holds it at more than 4 bits)."""
    if vnni_available() and weight.shape[1] % INT4_GROUP == 0:
        return pack_codes8(weight)
    return pack_linear(weight, None, "int8")


def pack_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, fmt: str
) -> dict[str, torch.Tensor]:
    """Convert a dense float [out, in] weight (+ bias) to fp32, bf16 or int8 stored tensors."""
    if check_format(fmt) == "int4":
        raise UnsupportedWeightFormatError("int4 comes only from a file's 4-bit blocks (pack_int4)")
    packed: dict[str, torch.Tensor] = {}
    if fmt == "int8":
        packed["weight"], packed["scales"] = quantize_int8(weight)
    else:
        packed["weight"] = weight.to(activation_dtype(fmt)).contiguous()
    if bias is not None:
        packed["bias"] = bias.to(activation_dtype(fmt)).contiguous()
    return packed


class DenseLinear(nn.Module):
    weight: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class Int8Linear(nn.Module):
    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.weight, self.scales)
        y = y.reshape(*shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias


class Int4Linear(nn.Module):
    weight: torch.Tensor
    scales_zeros: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor,
        scales_zeros: torch.Tensor,
        out_features: int,
        bias: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("scales_zeros", scales_zeros)
        self.register_buffer("bias", bias)
        self.out_features = out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]), self.weight, INT4_GROUP, self.scales_zeros
        )
        y = y.reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class ConcatLinear(nn.Module):
    """Several linears on the same input whose outputs are concatenated (a fused GEMM whose
    parts are stored in different formats, e.g. int4 q/k and an int8 v)."""

    bias: torch.Tensor | None

    def __init__(self, parts: Sequence[nn.Module], bias: torch.Tensor | None) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([part(x) for part in self.parts], dim=-1)
        return y if self.bias is None else y + self.bias


def linear_from_packed(packed: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild the module for a packed linear (the format is recognised by its tensors)."""
    bias = packed.get("bias")
    if "codes" in packed:
        return VnniLinear(packed, bias)
    if "parts" in packed:
        parts = [
            linear_from_packed(split_prefix(packed, str(i))) for i in range(int(packed["parts"]))
        ]
        return ConcatLinear(parts, bias)
    if "scales_zeros" in packed:
        out_features = int(packed["shape"][0])
        return Int4Linear(packed["weight"], packed["scales_zeros"], out_features, bias)
    if "scales" in packed:
        return Int8Linear(packed["weight"], packed["scales"], bias)
    return DenseLinear(packed["weight"], bias)


def split_prefix(flat: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a flat dict under "prefix.", with the prefix removed."""
    start = prefix + "."
    return {k[len(start) :]: v for k, v in flat.items() if k.startswith(start)}


def prefixed(prefix: str, packed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in packed.items()}


def _concat_groups(groups: Sequence[Int4Groups]) -> Int4Groups:
    return Int4Groups(
        np.concatenate([g.codes for g in groups]),
        np.concatenate([g.scale for g in groups]),
        np.concatenate([g.offset for g in groups]),
    )


def _pack_fused(
    names: Sequence[str],
    raw: Mapping[str, torch.Tensor],
    bias: torch.Tensor | None,
    fmt: str,
    int4: Mapping[str, Int4Groups],
) -> dict[str, torch.Tensor]:
    """One fused GEMM over the rows of several matrices; parts only when their formats differ."""
    if fmt != "int4":
        return pack_linear(torch.cat([raw[n] for n in names]), bias, fmt)
    in_int4 = [n in int4 for n in names]
    if all(in_int4):
        packed = pack_int4(_concat_groups([int4[n] for n in names]))
    elif not any(in_int4):
        packed = pack_int4_wide(torch.cat([raw[n] for n in names]))
    else:
        packed = {"parts": torch.tensor(len(names))}
        for i, n in enumerate(names):
            part = pack_int4(int4[n]) if n in int4 else pack_int4_wide(raw[n])
            packed |= prefixed(str(i), part)
    if bias is not None:
        packed["bias"] = bias.to(activation_dtype(fmt)).contiguous()
    return packed


def pack_block(
    raw: Mapping[str, torch.Tensor], fmt: str, int4: Mapping[str, Int4Groups] | None = None
) -> dict[str, torch.Tensor]:
    """One block's tensors (decoder names, float) -> the flat packed dict the decoder loads.

    q/k/v and gate/up are fused so each becomes one GEMM; norms stay float32 (they are tiny and
    applied in float32). For int4, `int4` holds the matrices the file stores in 4-bit blocks.
    """
    if check_format(fmt) == "int4" and int4 is None:
        raise UnsupportedWeightFormatError(
            "int4 transcodes the GGUF's own 4-bit blocks; load int4 from the file (pack_segment)"
        )
    qkv_bias = torch.cat([raw["bq"], raw["bk"], raw["bv"]]) if "bq" in raw else None
    out: dict[str, torch.Tensor] = {}
    for fused, names in FUSED.items():
        bias = qkv_bias if fused == "qkv" else None
        out |= prefixed(fused, _pack_fused(names, raw, bias, fmt, int4 or {}))
    for name in ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm"):
        if name in raw:
            out[name] = raw[name].float().contiguous()
    return out


def pack_head_linear(weight: torch.Tensor, fmt: str) -> dict[str, torch.Tensor]:
    """The output head: int4 models keep it at 8 bits."""
    return pack_int4_wide(weight) if check_format(fmt) == "int4" else pack_linear(weight, None, fmt)


def embedding_dtype(fmt: str) -> torch.dtype:
    """The embedding table is a lookup, not a GEMM: store it in the activation dtype."""
    return activation_dtype(fmt)


@dataclass(frozen=True)
class PackedSegment:
    """Layers [a, b) of a model in one weight format, ready to become a DecoderCore.

    ``embedding`` when a == 0; ``final_norm`` and ``head`` (a packed linear) when b == n_layers.
    """

    config: ModelConfig
    layers: tuple[int, int]
    fmt: str
    embedding: torch.Tensor | None
    blocks: tuple[dict[str, torch.Tensor], ...]
    final_norm: torch.Tensor | None
    head: dict[str, torch.Tensor] | None
    rope_freq_factors: torch.Tensor | None


def pack_embedding(gf: GGUFFile, fmt: str) -> torch.Tensor:
    return gf.embedding(embedding_dtype(fmt)).contiguous()


def pack_gguf_block(gf: GGUFFile, index: int, fmt: str) -> dict[str, torch.Tensor]:
    # Dequantize to float32 (one layer at a time), so norms stay exact and quantizers see floats.
    int4 = gf.block_int4(index) if fmt == "int4" else None
    return pack_block(gf.block(index, torch.float32), fmt, int4)


def pack_head(gf: GGUFFile, fmt: str) -> dict[str, torch.Tensor]:
    """Final norm (key "norm") and output head (keys "head.*")."""
    out = prefixed("head", pack_head_linear(gf.head(torch.float32), fmt))
    out["norm"] = gf.final_norm(torch.float32).contiguous()
    return out


def pack_segment(gf: GGUFFile, layers: tuple[int, int] | None, fmt: str) -> PackedSegment:
    """Read and convert layers [a, b) of an open GGUF file without any cache."""
    check_format(fmt)
    c = gf.config
    a, b = c.check_layers(layers if layers is not None else (0, c.n_layers))
    head = pack_head(gf, fmt) if b == c.n_layers else None
    return PackedSegment(
        config=c,
        layers=(a, b),
        fmt=fmt,
        embedding=pack_embedding(gf, fmt) if a == 0 else None,
        blocks=tuple(pack_gguf_block(gf, i, fmt) for i in range(a, b)),
        final_norm=None if head is None else head.pop("norm"),
        head=None if head is None else split_prefix(head, "head"),
        rope_freq_factors=gf.rope_freq_factors(),
    )


def pack_weights(raw: SegmentWeights, fmt: str) -> PackedSegment:
    """Convert already-loaded float weights to fp32/bf16/int8 (one load, several formats)."""
    check_format(fmt)
    head = None
    if raw.head is not None:
        head = pack_head_linear(raw.head.float(), fmt)
    return PackedSegment(
        config=raw.config,
        layers=raw.layers,
        fmt=fmt,
        embedding=None if raw.embedding is None else raw.embedding.to(embedding_dtype(fmt)),
        blocks=tuple(pack_block(b, fmt) for b in raw.blocks),
        final_norm=None if raw.norm is None else raw.norm.float(),
        head=head,
        rope_freq_factors=raw.rope_freq_factors,
    )
