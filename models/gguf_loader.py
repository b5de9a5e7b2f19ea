"""Read a GGUF file: its config, and the weights of one layer range, dequantized to a torch dtype.

Conventions undone here so the decoder sees one layout for every architecture:
- numpy shapes are ggml dims reversed, so a weight reads as ``[out_features, in_features]``
  (what ``F.linear`` wants) without transposing;
- llama.cpp's converter permutes the rows of llama q/k weights for its interleaved ("NORM") rope;
  we undo that and use the half-split ("NEOX") rope everywhere, like qwen2 and gemma3 files;
- Gemma norm weights in GGUF already include the ``+1`` of Gemma's ``(1 + w)`` RMSNorm, so every
  RMSNorm here is a plain ``x * w``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from models.config import ModelConfig, UnsupportedModelError, config_from_metadata
from models.int4_blocks import INT4_SOURCE_TYPES, Int4Groups, int4_groups

# GGUF per-block tensor names (after "blk.N.") -> the decoder's names. Optional ones depend on
# the architecture (biases for qwen2, q/k norms and post-norms for gemma3).
BLOCK_TENSORS: Mapping[str, str] = {
    "attn_norm.weight": "attn_norm",
    "attn_q.weight": "wq",
    "attn_k.weight": "wk",
    "attn_v.weight": "wv",
    "attn_output.weight": "wo",
    "attn_q.bias": "bq",
    "attn_k.bias": "bk",
    "attn_v.bias": "bv",
    "attn_q_norm.weight": "q_norm",
    "attn_k_norm.weight": "k_norm",
    "post_attention_norm.weight": "post_attn_norm",
    "ffn_norm.weight": "ffn_norm",
    "ffn_gate.weight": "w_gate",
    "ffn_up.weight": "w_up",
    "ffn_down.weight": "w_down",
    "post_ffw_norm.weight": "post_ffn_norm",
}


class UnsupportedQuantizationError(ValueError):
    """A tensor is stored in a ggml type this loader cannot dequantize."""


class GGUFFormatError(ValueError):
    """The file is not a readable GGUF or lacks a tensor the config says it must have."""


@dataclass(frozen=True)
class SegmentWeights:
    """Weights for layers [a, b) of a model.

    ``embedding`` is present when a == 0; ``norm``/``head`` when b == n_layers (for a tied model
    the head IS the embedding matrix, loaded even when a > 0). ``blocks[i]`` holds layer a + i
    under the decoder's names (see BLOCK_TENSORS).
    """

    config: ModelConfig
    layers: tuple[int, int]
    embedding: torch.Tensor | None
    blocks: tuple[dict[str, torch.Tensor], ...]
    norm: torch.Tensor | None
    head: torch.Tensor | None
    rope_freq_factors: torch.Tensor | None


def block_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes (numpy order) the decoder expects for one block's tensors under this config."""
    c = config
    shapes: dict[str, tuple[int, ...]] = {
        "attn_norm": (c.dim,),
        "wq": (c.q_dim, c.dim),
        "wk": (c.kv_dim, c.dim),
        "wv": (c.kv_dim, c.dim),
        "wo": (c.dim, c.q_dim),
        "ffn_norm": (c.dim,),
        "w_gate": (c.ffn_dim, c.dim),
        "w_up": (c.ffn_dim, c.dim),
        "w_down": (c.dim, c.ffn_dim),
    }
    if c.qkv_bias:
        shapes |= {"bq": (c.q_dim,), "bk": (c.kv_dim,), "bv": (c.kv_dim,)}
    if c.qk_norm:
        shapes |= {"q_norm": (c.head_dim,), "k_norm": (c.head_dim,)}
    if c.post_norms:
        shapes |= {"post_attn_norm": (c.dim,), "post_ffn_norm": (c.dim,)}
    return shapes


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's llama q/k permutation (rows, per head: interleaved -> halves)."""
    head_dim = weight.shape[0] // n_heads
    rest = weight.shape[1:]
    return (
        weight.reshape(n_heads, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape).copy()
    )


def _field_value(field: gguf.ReaderField) -> object:
    return field.contents()


class _PlainArrayReader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map.

    The reader slices its buffer once per metadata element (~790k times for Gemma's 262k-token
    vocabulary); slicing an ``np.memmap`` subclass costs several times more than slicing a plain
    ndarray (measured: opening Gemma 3 270M took 16.2 s, 5.9 s with this; Qwen 13.7 s vs 2.9 s).
    The view keeps the map alive and tensors stay zero-copy views into the file.
    """

    @property  # type: ignore[override]
    def data(self) -> np.ndarray:
        return self._plain_data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._plain_data = value.view(np.ndarray)


class GGUFFile:
    """An open GGUF file (memory-mapped by gguf.GGUFReader); reads tensors on demand.

    Opening parses all metadata, which takes seconds for large vocabularies; the weight cache
    avoids opening the file at all once converted weights exist.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {self.path}")
        try:
            self.reader = _PlainArrayReader(self.path, "r")
        except (ValueError, OSError, IndexError, KeyError) as exc:
            raise GGUFFormatError(f"{self.path} is not a readable GGUF file: {exc}") from exc
        self.tensors = {t.name: t for t in self.reader.tensors}
        # The tokenizer's arrays are large and not needed for the config.
        fields = {
            name: _field_value(f)
            for name, f in self.reader.fields.items()
            if not name.startswith("tokenizer.")
        }
        shapes = {
            name: tuple(int(d) for d in reversed(t.shape)) for name, t in self.tensors.items()
        }
        self.config = config_from_metadata(fields, shapes)

    def array(self, name: str) -> np.ndarray:
        """The named tensor dequantized to float32 in numpy order (still in GGUF row layout)."""
        tensor = self.tensors.get(name)
        if tensor is None:
            raise GGUFFormatError(f"{self.path.name} has no tensor {name!r}")
        shape = tuple(int(d) for d in reversed(tensor.shape))
        try:
            # gguf knows every ggml type it can expand (F32, F16, BF16, Q4_0..Q8_0, K-quants, ...).
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise UnsupportedQuantizationError(
                f"tensor {name!r} in {self.path.name} is stored as {tensor.tensor_type.name}, "
                f"which the gguf package cannot dequantize"
            ) from exc
        return np.asarray(data, dtype=np.float32).reshape(shape)

    def tensor(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        return _to_torch(self.array(name), dtype)

    def embedding(self, dtype: torch.dtype) -> torch.Tensor:
        return self.tensor("token_embd.weight", dtype)

    def block(self, index: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Layer `index` under the decoder's names, with llama's rope permutation undone."""
        c = self.config
        if not 0 <= index < c.n_layers:
            raise ValueError(f"layer {index} is outside [0, {c.n_layers})")
        expected = block_tensor_shapes(c)
        out: dict[str, torch.Tensor] = {}
        for suffix, ours in BLOCK_TENSORS.items():
            if ours not in expected:
                continue
            arr = self.array(f"blk.{index}.{suffix}")
            if arr.shape != expected[ours]:
                raise GGUFFormatError(
                    f"blk.{index}.{suffix} has shape {arr.shape}, expected {expected[ours]}"
                )
            if c.qk_permuted and ours in ("wq", "bq"):
                arr = unpermute_rope_rows(arr, c.n_heads)
            elif c.qk_permuted and ours in ("wk", "bk"):
                arr = unpermute_rope_rows(arr, c.n_kv_heads)
            out[ours] = _to_torch(arr, dtype)
        return out

    def int4_groups(self, name: str) -> Int4Groups | None:
        """The tensor's own 4-bit codes and group maps, if it is stored in a 4-bit block type."""
        tensor = self.tensors.get(name)
        if tensor is None:
            raise GGUFFormatError(f"{self.path.name} has no tensor {name!r}")
        if tensor.tensor_type not in INT4_SOURCE_TYPES:
            return None
        shape = tuple(int(d) for d in reversed(tensor.shape))
        if len(shape) != 2:
            raise GGUFFormatError(f"{name} has shape {shape}, expected a matrix")
        return int4_groups(tensor.tensor_type, tensor.data, (shape[0], shape[1]))

    def block_int4(self, index: int) -> dict[str, Int4Groups]:
        """Layer `index`'s matrices that the file stores in 4-bit blocks (decoder names)."""
        c = self.config
        out: dict[str, Int4Groups] = {}
        for suffix, ours in BLOCK_TENSORS.items():
            if not suffix.endswith(".weight") or ours not in (
                "wq",
                "wk",
                "wv",
                "wo",
                "w_gate",
                "w_up",
                "w_down",
            ):
                continue
            groups = self.int4_groups(f"blk.{index}.{suffix}")
            if groups is None:
                continue
            if c.qk_permuted and ours in ("wq", "wk"):
                heads = c.n_heads if ours == "wq" else c.n_kv_heads
                rows = np.arange(groups.codes.shape[0])[:, None]
                groups = groups.take_rows(unpermute_rope_rows(rows, heads)[:, 0])
            out[ours] = groups
        return out

    def final_norm(self, dtype: torch.dtype) -> torch.Tensor:
        return self.tensor("output_norm.weight", dtype)

    def head(self, dtype: torch.dtype) -> torch.Tensor:
        name = "token_embd.weight" if self.config.tied_output else "output.weight"
        return self.tensor(name, dtype)

    def rope_freq_factors(self) -> torch.Tensor | None:
        if not self.config.has_rope_freq_factors:
            return None
        return self.tensor("rope_freqs.weight", torch.float32)


def _to_torch(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    # Copy out of the read-only memory map so the tensor owns writable memory.
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).to(dtype)


def read_config(path: str | Path) -> ModelConfig:
    """The model config of a GGUF file (raises UnsupportedModelError for unknown models)."""
    return GGUFFile(path).config


def load_weights(
    path: str | Path | GGUFFile,
    layers: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> SegmentWeights:
    """Load only what layers [a, b) need: embedding if a == 0, head (+ final norm) if b == n."""
    gf = path if isinstance(path, GGUFFile) else GGUFFile(path)
    c = gf.config
    a, b = c.check_layers(layers if layers is not None else (0, c.n_layers))
    embedding = gf.embedding(dtype) if a == 0 else None
    head: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    if b == c.n_layers:
        norm = gf.final_norm(dtype)
        head = embedding if (c.tied_output and embedding is not None) else gf.head(dtype)
    return SegmentWeights(
        config=c,
        layers=(a, b),
        embedding=embedding,
        blocks=tuple(gf.block(i, dtype) for i in range(a, b)),
        norm=norm,
        head=head,
        rope_freq_factors=gf.rope_freq_factors(),
    )


__all__ = [
    "GGUFFile",
    "GGUFFormatError",
    "SegmentWeights",
    "UnsupportedModelError",
    "UnsupportedQuantizationError",
    "load_weights",
    "read_config",
]
