"""Weight formats for the torch backend: how a dense weight is stored and multiplied.

- ``fp32``: plain float32 (accuracy reference).
- ``bf16``: bfloat16 weights and activations (AVX-512 BF16 GEMMs; cost nearly flat up to ~8 tokens).
- ``int8``: weight-only int8, one scale per output row, bf16 activations
  (``aten._weight_int8pack_mm``).
- ``int4``: weight-only int4, asymmetric, groups of INT4_GROUP along the input dimension, bf16
  activations (``aten._weight_int4pack_mm_for_cpu``); the output head stays int8 for accuracy
  (llama.cpp's Q4_K_M keeps it at 6 bits too).

A linear layer is described by a flat dict of tensors ("packed"), which is what the weight
cache stores, so a cached layer is turned back into a module without any conversion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.gguf_loader import GGUFFile, SegmentWeights

WEIGHT_FORMATS = ("fp32", "bf16", "int8", "int4")
INT4_GROUP = 32
INT4_INNER_K_TILES = 2


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


def quantize_int4(
    weight: torch.Tensor, group: int = INT4_GROUP
) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric grouped int4 packed for the CPU kernel: (packed uint8, bf16 [in/group, out, 2])."""
    w = weight.float()
    out_f, in_f = w.shape
    if in_f % group:
        raise ValueError(f"int4 needs in_features ({in_f}) divisible by the group size {group}")
    groups = w.reshape(-1, group)
    lo, hi = groups.amin(dim=1, keepdim=True), groups.amax(dim=1, keepdim=True)
    scales = ((hi - lo) / 15.0).clamp(min=1e-8)
    q = torch.round((groups - lo) / scales).clamp(0, 15).to(torch.int32).reshape(out_f, in_f)
    # The kernel computes (q - 8) * scale + zero, so zero = lo + 8 * scale.
    zeros = lo + 8.0 * scales
    scales_zeros = (
        torch.cat([scales.reshape(out_f, -1, 1), zeros.reshape(out_f, -1, 1)], dim=2)
        .transpose(0, 1)
        .contiguous()
        .to(torch.bfloat16)
    )
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, INT4_INNER_K_TILES)
    return packed, scales_zeros


def pack_linear(
    weight: torch.Tensor, bias: torch.Tensor | None, fmt: str
) -> dict[str, torch.Tensor]:
    """Convert a dense [out, in] weight (+ bias) to `fmt`'s stored tensors."""
    check_format(fmt)
    packed: dict[str, torch.Tensor] = {}
    act = activation_dtype(fmt)
    if fmt in ("fp32", "bf16"):
        packed["weight"] = weight.to(act).contiguous()
    elif fmt == "int8":
        packed["weight"], packed["scales"] = quantize_int8(weight)
    else:
        packed["weight"], packed["scales_zeros"] = quantize_int4(weight)
        packed["shape"] = torch.tensor(weight.shape, dtype=torch.int64)
    if bias is not None:
        packed["bias"] = bias.to(act).contiguous()
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


def linear_from_packed(packed: Mapping[str, torch.Tensor]) -> nn.Module:
    """Rebuild the module for a packed linear (the format is recognised by its tensors)."""
    bias = packed.get("bias")
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


def pack_block(raw: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """One block's raw tensors (decoder names, float) -> the flat packed dict the decoder loads.

    q/k/v and gate/up are fused so each becomes one GEMM; norms stay float32 (they are tiny and
    applied in float32).
    """
    qkv = torch.cat([raw["wq"], raw["wk"], raw["wv"]], dim=0)
    qkv_bias = torch.cat([raw["bq"], raw["bk"], raw["bv"]]) if "bq" in raw else None
    out = prefixed("qkv", pack_linear(qkv, qkv_bias, fmt))
    out |= prefixed("wo", pack_linear(raw["wo"], None, fmt))
    out |= prefixed("gate_up", pack_linear(torch.cat([raw["w_gate"], raw["w_up"]]), None, fmt))
    out |= prefixed("down", pack_linear(raw["w_down"], None, fmt))
    for name in ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm"):
        if name in raw:
            out[name] = raw[name].float().contiguous()
    return out


def head_format(fmt: str) -> str:
    """The output head's format: int4 models keep an int8 head."""
    return "int8" if fmt == "int4" else fmt


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
    return pack_block(gf.block(index, torch.float32), fmt)


def pack_head(gf: GGUFFile, fmt: str) -> dict[str, torch.Tensor]:
    """Final norm (key "norm") and output head (keys "head.*")."""
    out = prefixed("head", pack_linear(gf.head(torch.float32), None, head_format(fmt)))
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
    """Convert already-loaded float weights to `fmt` (e.g. one fp32 load, several formats)."""
    check_format(fmt)
    head = None
    if raw.head is not None:
        head = pack_linear(raw.head.float(), None, head_format(fmt))
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
