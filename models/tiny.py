"""Tiny random-weight GGUF models (llama, qwen2, gemma3) for tests and fast local clusters.

They use the real architectures' metadata keys and tensor names, so the real loader runs on
them, and store their tensors in a mix of ggml types (F32, F16, BF16, Q8_0, Q5_0, Q4_0, Q4_1)
so dequantization is exercised and the int4 format has 4-bit blocks to transcode. (gguf's Python
code cannot quantize K-quants; the real-model tests cover Q4_K/Q6_K.) Weights are seeded and scaled so that logits are peaked: greedy argmax is
decided by real margins, not float noise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from models.tiny_vocab import add_tokenizer

Q = gguf.GGMLQuantizationType

TINY_ARCHS = ("llama", "qwen2", "gemma3")


@dataclass(frozen=True)
class TinySpec:
    arch: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    context_length: int
    rope_theta: float
    norm_eps: float
    tokenizer_style: str
    tied_output: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    post_norms: bool = False
    sliding_window: int = 0
    # Gemma's post-norms set the size of each layer's residual update; a larger weight keeps the
    # sqrt(dim)-scaled embedding from dominating the tied head (which would just echo the input).
    post_norm_weight: float = 1.0


SPECS: dict[str, TinySpec] = {
    "llama": TinySpec(
        arch="llama", n_layers=4, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=160,
        context_length=512, rope_theta=10000.0, norm_eps=1e-5, tokenizer_style="gpt2",
        tied_output=False,
    ),
    "qwen2": TinySpec(
        arch="qwen2", n_layers=4, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=160,
        context_length=512, rope_theta=1000000.0, norm_eps=1e-6, tokenizer_style="gpt2",
        tied_output=False, qkv_bias=True,
    ),
    # Six layers so the pattern (five sliding, then one global) has both kinds; a head_dim that
    # is not dim / n_heads, as in the real Gemma 3 (640 wide, 4 x 256 heads).
    "gemma3": TinySpec(
        arch="gemma3", n_layers=6, dim=64, n_heads=4, n_kv_heads=2, head_dim=32, ffn_dim=128,
        context_length=512, rope_theta=1000000.0, norm_eps=1e-6, tokenizer_style="llama",
        tied_output=True, qk_norm=True, post_norms=True, sliding_window=8, post_norm_weight=6.0,
    ),
}  # fmt: skip

# Types cycled over the 7 matrices of each block (the cycle of 8 shifts by one type per layer), so
# every type appears in every model, and some fused groups (layer 3's q/k/v) are all 4-bit while
# others mix 4-bit and wider types, as in real Q4_K_M files.
MATRIX_TYPES = (Q.Q8_0, Q.F16, Q.BF16, Q.Q5_0, Q.F32, Q.Q4_0, Q.Q4_1, Q.Q4_0)

# Init scales. The embedding/head scale makes logits peaked (std ~5 over the vocabulary).
EMBED_STD = 0.6
HEAD_STD = 0.6
MATRIX_GAIN = 0.8


@dataclass(frozen=True)
class TinyTensor:
    name: str
    values: np.ndarray  # float32, numpy order [out, in]
    qtype: gguf.GGMLQuantizationType


def tiny_tensors(arch: str, vocab_size: int, seed: int = 0) -> Iterator[TinyTensor]:
    """The float tensors of a tiny model (before quantization), in a fixed seeded order."""
    spec = _spec(arch)
    rng = np.random.default_rng(seed)
    q_dim, kv_dim = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim

    def matrix(out_f: int, in_f: int) -> np.ndarray:
        return (rng.standard_normal((out_f, in_f)) * MATRIX_GAIN / math.sqrt(in_f)).astype(
            np.float32
        )

    def norm(n: int, center: float = 1.0) -> np.ndarray:
        # Around 1, as real norm weights (Gemma's already include its +1).
        return (center * (1.0 + 0.1 * rng.standard_normal(n))).astype(np.float32)

    def bias(n: int) -> np.ndarray:
        return (0.1 * rng.standard_normal(n)).astype(np.float32)

    embd = (rng.standard_normal((vocab_size, spec.dim)) * EMBED_STD).astype(np.float32)
    yield TinyTensor("token_embd.weight", embd, Q.Q8_0)
    types = iter(MATRIX_TYPES * spec.n_layers)
    for i in range(spec.n_layers):
        p = f"blk.{i}."
        yield TinyTensor(p + "attn_norm.weight", norm(spec.dim), Q.F32)
        yield TinyTensor(p + "attn_q.weight", matrix(q_dim, spec.dim), next(types))
        yield TinyTensor(p + "attn_k.weight", matrix(kv_dim, spec.dim), next(types))
        yield TinyTensor(p + "attn_v.weight", matrix(kv_dim, spec.dim), next(types))
        yield TinyTensor(p + "attn_output.weight", matrix(spec.dim, q_dim), next(types))
        if spec.qkv_bias:
            yield TinyTensor(p + "attn_q.bias", bias(q_dim), Q.F32)
            yield TinyTensor(p + "attn_k.bias", bias(kv_dim), Q.F32)
            yield TinyTensor(p + "attn_v.bias", bias(kv_dim), Q.F32)
        if spec.qk_norm:
            yield TinyTensor(p + "attn_q_norm.weight", norm(spec.head_dim), Q.F32)
            yield TinyTensor(p + "attn_k_norm.weight", norm(spec.head_dim), Q.F32)
        if spec.post_norms:
            yield TinyTensor(
                p + "post_attention_norm.weight", norm(spec.dim, spec.post_norm_weight), Q.F32
            )
            yield TinyTensor(
                p + "post_ffw_norm.weight", norm(spec.dim, spec.post_norm_weight), Q.F32
            )
        yield TinyTensor(p + "ffn_norm.weight", norm(spec.dim), Q.F32)
        yield TinyTensor(p + "ffn_gate.weight", matrix(spec.ffn_dim, spec.dim), next(types))
        yield TinyTensor(p + "ffn_up.weight", matrix(spec.ffn_dim, spec.dim), next(types))
        yield TinyTensor(p + "ffn_down.weight", matrix(spec.dim, spec.ffn_dim), next(types))
    yield TinyTensor("output_norm.weight", norm(spec.dim), Q.F32)
    if not spec.tied_output:
        head = (rng.standard_normal((vocab_size, spec.dim)) * HEAD_STD).astype(np.float32)
        yield TinyTensor("output.weight", head, Q.F16)


def _spec(arch: str) -> TinySpec:
    if arch not in SPECS:
        raise ValueError(
            f"no tiny model for architecture {arch!r} (known: {', '.join(TINY_ARCHS)})"
        )
    return SPECS[arch]


def _add_hparams(writer: gguf.GGUFWriter, spec: TinySpec, vocab_size: int) -> None:
    writer.add_name(f"sled tiny {spec.arch}")
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_context_length(spec.context_length)
    writer.add_embedding_length(spec.dim)
    writer.add_block_count(spec.n_layers)
    writer.add_feed_forward_length(spec.ffn_dim)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    if spec.arch == "llama":
        writer.add_vocab_size(vocab_size)
        writer.add_rope_dimension_count(spec.head_dim)
    if spec.arch == "gemma3":
        writer.add_key_length(spec.head_dim)
        writer.add_value_length(spec.head_dim)
        writer.add_sliding_window(spec.sliding_window)


def write_tiny(arch: str, path: Path, seed: int = 0) -> Path:
    """Write a tiny seeded `arch` model ("llama", "qwen2", "gemma3") to `path`; returns `path`."""
    spec = _spec(arch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, spec.arch)
    try:
        vocab_size = add_tokenizer(writer, spec.tokenizer_style)  # type: ignore[arg-type]
        _add_hparams(writer, spec, vocab_size)
        for t in tiny_tensors(arch, vocab_size, seed):
            writer.add_tensor(t.name, gguf.quants.quantize(t.values, t.qtype), raw_dtype=t.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    return path
