"""Model hyper-parameters decoded from GGUF metadata into one frozen dataclass.

`config_from_metadata` is pure: it takes the GGUF key/value fields and the tensor shapes
(numpy order, i.e. ``[rows, cols]`` = ``[out_features, in_features]``) and decides everything the
decoder needs, so that the daemon can plan layer ranges without touching any weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

SUPPORTED_ARCHS = ("llama", "qwen2", "gemma3")

Activation = Literal["silu", "gelu_tanh"]

# Gemma 3 (llama.cpp `set_swa_pattern(6)`, transformers `sliding_window_pattern=6`): five sliding
# layers, then one global layer.
GEMMA3_SWA_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0


class UnsupportedModelError(ValueError):
    """The GGUF describes a model this decoder cannot run (architecture, missing or odd fields)."""


@dataclass(frozen=True)
class ModelConfig:
    """Everything about a decoder-only transformer that is not a weight."""

    arch: str
    n_layers: int
    dim: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    context_length: int
    norm_eps: float
    rope_theta: float
    # Theta used by sliding-window layers (Gemma 3: 10000); equals rope_theta elsewhere.
    rope_theta_local: float
    # "none" or "linear" (positions divided by the factor; Gemma 3 4B+ uses linear 8 on global layers).
    rope_scaling: str
    rope_scaling_factor: float
    # Tokens a sliding-window layer sees (itself included); 0 = no sliding layers.
    sliding_window: int
    # One flag per layer: True where the layer uses the sliding window (and the local rope theta).
    sliding_layers: tuple[bool, ...]
    qkv_bias: bool
    qk_norm: bool
    # Gemma 3's extra RMSNorms after attention and after the MLP (before the residual add).
    post_norms: bool
    # Multiplier on the token embedding (Gemma: sqrt(dim); 1.0 elsewhere).
    embed_scale: float
    activation: Activation
    tied_output: bool
    # Scale applied to q·k (1/sqrt(head_dim) unless the file says otherwise).
    attn_scale: float
    # llama.cpp permutes llama q/k rows for its interleaved rope; the loader must undo it.
    qk_permuted: bool
    # Per-frequency divisors from a `rope_freqs.weight` tensor (Llama 3.1 style), if present.
    has_rope_freq_factors: bool = False

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> ModelConfig:
        """Inverse of to_dict (JSON turns the tuple of flags into a list)."""
        values = dict(data)
        values["sliding_layers"] = tuple(bool(f) for f in values["sliding_layers"])  # type: ignore[attr-defined]
        return cls(**values)  # type: ignore[arg-type]

    def check_layers(self, layers: tuple[int, int]) -> tuple[int, int]:
        """Validate a layer range [a, b); returns it so calls can be chained."""
        a, b = layers
        if not (0 <= a < b <= self.n_layers):
            raise ValueError(
                f"layer range [{a}, {b}) is not inside [0, {self.n_layers}) with a < b "
                f"({self.arch} has {self.n_layers} layers)"
            )
        return layers


def _get(fields: Mapping[str, object], key: str) -> object:
    if key not in fields:
        raise UnsupportedModelError(f"GGUF metadata lacks required key {key!r}")
    return fields[key]


def _int(fields: Mapping[str, object], key: str, default: int | None = None) -> int:
    value = fields.get(key, default) if default is not None else _get(fields, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UnsupportedModelError(f"GGUF key {key!r} should be an integer, got {value!r}")
    return value


def _float(fields: Mapping[str, object], key: str, default: float | None = None) -> float:
    value = fields.get(key, default) if default is not None else _get(fields, key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnsupportedModelError(f"GGUF key {key!r} should be a number, got {value!r}")
    return float(value)


def _sliding_layers(fields: Mapping[str, object], arch: str, n_layers: int) -> tuple[bool, ...]:
    if arch != "gemma3":
        return (False,) * n_layers
    pattern = fields.get(f"{arch}.attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
    if isinstance(pattern, Sequence) and not isinstance(pattern, str):
        flags = tuple(bool(p) for p in pattern)
        if len(flags) != n_layers:
            raise UnsupportedModelError(
                f"{arch}.attention.sliding_window_pattern has {len(flags)} entries for {n_layers} layers"
            )
        return flags
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise UnsupportedModelError(f"bad sliding_window_pattern {pattern!r}")
    # Every pattern-th layer (1-based) is global, as in llama.cpp's set_swa_pattern.
    return tuple((i % pattern) < pattern - 1 for i in range(n_layers))


def config_from_metadata(
    fields: Mapping[str, object], tensor_shapes: Mapping[str, Sequence[int]]
) -> ModelConfig:
    """Decide a ModelConfig from GGUF fields and the tensors' shapes (numpy order).

    Raises UnsupportedModelError with the reason for anything this decoder cannot run.
    """
    arch = fields.get("general.architecture")
    if not isinstance(arch, str):
        raise UnsupportedModelError("GGUF metadata has no general.architecture string")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(
            f"architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    if "token_embd.weight" not in tensor_shapes:
        raise UnsupportedModelError("GGUF has no token_embd.weight tensor")
    n_layers = _int(fields, f"{arch}.block_count")
    dim = _int(fields, f"{arch}.embedding_length")
    n_heads = _int(fields, f"{arch}.attention.head_count")
    n_kv_heads = _int(fields, f"{arch}.attention.head_count_kv", n_heads)
    if n_layers < 1 or dim < 1 or n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads:
        raise UnsupportedModelError(
            f"inconsistent sizes: {n_layers} layers, dim {dim}, {n_heads} heads, {n_kv_heads} kv heads"
        )
    head_dim = _int(fields, f"{arch}.attention.key_length", dim // n_heads)
    value_dim = _int(fields, f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(f"key_length {head_dim} != value_length {value_dim}")
    embd_shape = tuple(tensor_shapes["token_embd.weight"])
    if len(embd_shape) != 2 or embd_shape[1] != dim:
        raise UnsupportedModelError(
            f"token_embd.weight has shape {embd_shape}, expected [vocab, {dim}]"
        )
    vocab_size = _int(fields, f"{arch}.vocab_size", int(embd_shape[0]))
    rope_dims = _int(fields, f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise UnsupportedModelError(
            f"partial rotary embeddings ({rope_dims} of {head_dim}) are not supported"
        )

    scaling = str(fields.get(f"{arch}.rope.scaling.type", "none"))
    scaling_factor = _float(fields, f"{arch}.rope.scaling.factor", 1.0)
    if scaling not in ("none", "linear") or (scaling == "linear" and scaling_factor <= 0):
        raise UnsupportedModelError(
            f"rope scaling {scaling!r} (factor {scaling_factor}) is not supported"
        )
    if scaling == "none":
        scaling_factor = 1.0

    gemma = arch == "gemma3"
    rope_theta = _float(fields, f"{arch}.rope.freq_base", 10000.0)
    sliding_layers = _sliding_layers(fields, arch, n_layers)
    sliding_window = _int(fields, f"{arch}.attention.sliding_window", 0) if gemma else 0
    if any(sliding_layers) and sliding_window < 1:
        raise UnsupportedModelError(f"{arch} has sliding layers but no attention.sliding_window")
    if "blk.0.attn_q.weight" not in tensor_shapes and n_layers > 0:
        raise UnsupportedModelError(
            "GGUF has no blk.0.attn_q.weight tensor (fused qkv is not supported)"
        )

    return ModelConfig(
        arch=arch,
        n_layers=n_layers,
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        head_dim=head_dim,
        ffn_dim=_int(fields, f"{arch}.feed_forward_length"),
        vocab_size=vocab_size,
        context_length=_int(fields, f"{arch}.context_length", 2048),
        norm_eps=_float(fields, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=rope_theta,
        rope_theta_local=_float(
            fields, f"{arch}.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_THETA if gemma else rope_theta
        ),
        rope_scaling=scaling,
        rope_scaling_factor=scaling_factor,
        sliding_window=sliding_window,
        sliding_layers=sliding_layers,
        qkv_bias="blk.0.attn_q.bias" in tensor_shapes,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_shapes,
        post_norms="blk.0.post_attention_norm.weight" in tensor_shapes,
        embed_scale=math.sqrt(dim) if gemma else 1.0,
        activation="gelu_tanh" if gemma else "silu",
        tied_output="output.weight" not in tensor_shapes,
        attn_scale=_float(fields, f"{arch}.attention.scale", 1.0 / math.sqrt(head_dim)),
        qk_permuted=arch == "llama",
        has_rope_freq_factors="rope_freqs.weight" in tensor_shapes,
    )
