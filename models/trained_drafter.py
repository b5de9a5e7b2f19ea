"""A drafter trained for one target model: its file format, loading, and drafting sessions.

Shape (Kangaroo-style shallow sub-network): the target's own first L layers (frozen, read from
the target's GGUF at load time), one trained adapter block with the target's block architecture
(initialised from a target layer), a trained final norm and a reduced-vocabulary head: the V'
target tokens seen most in the target's own generations, initialised from the target's output
rows. The untrained first-L-layers + full head agreed 0.4-5% with the target (measured), and the
full 151936-row head alone is ~15% of a target step, hence the trained adapter and the cut head.

The drafter file is a GGUF holding only the trained tensors, the reduced vocabulary's target ids
and metadata (`sled.drafter.*`, including the target file's sha256, checked at load). Frozen
layers plus the adapter run as one torch backend (one KV cache slot per session, one pass per
step), so the drafter never holds the rest of the target.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import torch

from models.config import ModelConfig
from models.decoder import rms_norm
from models.drafters import ModelSession, draw_draft
from models.sampling import SamplingParams
from models.torch_backend import TorchBackend
from models.weight_formats import check_format, pack_linear

FORMAT_VERSION = 1
ARCH = "sled_drafter"
KEY = "sled.drafter."
# The adapter's tensors, in the decoder's packed (fused) naming: see models.weight_formats.FUSED.
ADAPTER_LINEARS = ("qkv", "wo", "gate_up", "down")
ADAPTER_NORMS = ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")


class DrafterFileError(ValueError):
    """A drafter file that cannot be read (missing, truncated, not a sled drafter)."""


class DrafterTargetMismatchError(ValueError):
    """A drafter file trained for another target model than the one given."""


def default_drafter_path(target_name: str, root: Path | None = None) -> Path:
    """Where `sled models train-drafter` saves a target's drafter and where nodes look for it:
    ``<sled cache>/drafters/<target-name>.drafter.gguf``."""
    from models.registry import cache_root

    name = Path(target_name).name.removesuffix(".gguf")
    return (root if root is not None else cache_root()) / "drafters" / f"{name}.drafter.gguf"


def target_sha256(path: Path) -> str:
    """sha256 of the target GGUF; the registry's verified stamp is used when it still matches."""
    from models.registry import Stamp

    stat = path.stat()
    stamp = Stamp.read(path.with_name(path.name + ".sha256.json"))
    if stamp is not None and (stamp.size, stamp.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
        return stamp.sha256
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class DrafterWeights:
    """The trained part of a drafter (float32 tensors) and what it was trained for."""

    target_sha256: str
    target_name: str
    layers: int  # the target's first `layers` layers run frozen before the adapter
    vocab_ids: torch.Tensor  # [V'] int64: the target id of each reduced-head row
    adapter: dict[str, torch.Tensor]  # packed block tensors ("qkv.weight", "attn_norm", ...)
    final_norm: torch.Tensor  # [dim]
    head: torch.Tensor  # [V', dim]
    info: dict[str, float]  # training facts (seconds, tokens, agreement): metadata only

    def __post_init__(self) -> None:
        v = int(self.vocab_ids.shape[0])
        if self.head.dim() != 2 or self.head.shape[0] != v:
            raise DrafterFileError(
                f"head {tuple(self.head.shape)} does not match {v} vocabulary ids"
            )
        if self.final_norm.shape != (self.head.shape[1],):
            raise DrafterFileError("final norm and head widths differ")
        if self.layers < 1:
            raise DrafterFileError(f"layers must be >= 1, got {self.layers}")


def check_drafter_target(
    path: Path, target_path: Path, sha256: str, target_name: str, train_flags: str = ""
) -> None:
    """DrafterTargetMismatchError unless the target file is the one the drafter was trained for."""
    target_path = Path(target_path)
    sha = target_sha256(target_path)
    if sha != sha256:
        raise DrafterTargetMismatchError(
            f"{path} was trained for target {target_name} (sha256 {sha256[:12]}...), not for "
            f"{target_path.name} (sha256 {sha[:12]}...); train one with "
            f"`sled models train-drafter{train_flags}`"
        )


def write_drafter_file(
    path: Path,
    arch: str,
    key: str,
    meta: Mapping[str, str | int],
    info: Mapping[str, float],
    tensors: Mapping[str, torch.Tensor],
) -> Path:
    """Write a drafter GGUF atomically: `meta` (strings and uint32s) and `info` (float32s)
    under `key`, matrices as float16, vectors (norms, biases) as float32, int tensors as int32."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for name, value in meta.items():
        if isinstance(value, str):
            writer.add_string(key + name, value)
        else:
            writer.add_uint32(key + name, int(value))
    for name, number in sorted(info.items()):
        writer.add_float32(key + "info." + name, float(number))
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            t = tensor.to(torch.int32)
        else:
            t = tensor.float() if tensor.dim() == 1 else tensor.to(torch.float16)
        writer.add_tensor(name, t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(path)
    return path


def read_drafter_file(
    path: Path, key: str, version: int, what: str = "drafter"
) -> tuple[dict[str, object], dict[str, torch.Tensor], dict[str, float]]:
    """(fields, tensors, info) of a drafter GGUF written with `key` and format `version`;
    DrafterFileError (with the path) when it is missing, unreadable or another format."""
    path = Path(path)
    if not path.is_file():
        raise DrafterFileError(f"{what} file not found: {path}")
    try:
        reader = gguf.GGUFReader(path, "r")
        fields = {name: f.contents() for name, f in reader.fields.items()}
        if fields.get(key + "format") != version:
            raise DrafterFileError(
                f"{path} is not a sled {what} file of format {version} "
                f"(found {fields.get(key + 'format')!r})"
            )
        tensors = {
            t.name: torch.from_numpy(
                np.array(t.data, copy=True).reshape([int(d) for d in reversed(t.shape)])
            )
            for t in reader.tensors
        }
    except DrafterFileError:
        raise
    except (ValueError, OSError, IndexError, KeyError, TypeError) as exc:
        raise DrafterFileError(f"{path} is not a readable {what} file ({exc})") from exc
    info = {
        name.removeprefix(key + "info."): float(value)
        for name, value in fields.items()
        if name.startswith(key + "info.")
    }
    return fields, tensors, info


def save_drafter(weights: DrafterWeights, path: Path) -> Path:
    """Write the drafter file atomically (matrices as float16, norms float32)."""
    meta: dict[str, str | int] = {
        "format": FORMAT_VERSION,
        "target_sha256": weights.target_sha256,
        "target_name": weights.target_name,
        "layers": weights.layers,
    }
    tensors = {
        "vocab_ids": weights.vocab_ids,
        "output_norm": weights.final_norm,
        "output": weights.head,
    } | {"adapter." + name: t for name, t in sorted(weights.adapter.items())}
    return write_drafter_file(path, ARCH, KEY, meta, weights.info, tensors)


def load_drafter_weights(path: Path) -> DrafterWeights:
    """Read a drafter file; DrafterFileError (with the path) when it is not a whole one."""
    fields, tensors, info = read_drafter_file(path, KEY, FORMAT_VERSION)
    try:
        return DrafterWeights(
            target_sha256=str(fields[KEY + "target_sha256"]),
            target_name=str(fields[KEY + "target_name"]),
            layers=int(fields[KEY + "layers"]),  # type: ignore[call-overload]
            vocab_ids=tensors["vocab_ids"].to(torch.int64).reshape(-1),
            adapter={
                name.removeprefix("adapter."): t.float()
                for name, t in tensors.items()
                if name.startswith("adapter.")
            },
            final_norm=tensors["output_norm"].float().reshape(-1),
            head=tensors["output"].float(),
            info=info,
        )
    except KeyError as exc:
        raise DrafterFileError(f"{path} lacks {exc} (truncated or not a drafter)") from exc


def pack_adapter(adapter: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """The adapter's float tensors in the backend's format (int4 has no source blocks: bf16)."""
    fmt = "bf16" if check_format(fmt) == "int4" else fmt
    out: dict[str, torch.Tensor] = {}
    for name in ADAPTER_LINEARS:
        packed = pack_linear(adapter[f"{name}.weight"], adapter.get(f"{name}.bias"), fmt)
        out |= {f"{name}.{k}": v for k, v in packed.items()}
    for name in ADAPTER_NORMS:
        if name in adapter:
            out[name] = adapter[name].float().contiguous()
    return out


def check_adapter(adapter: Mapping[str, torch.Tensor], config: ModelConfig) -> None:
    """The adapter must have the target's block shapes (it runs as one more target block)."""
    c = config
    expected = {
        "qkv.weight": (c.q_dim + 2 * c.kv_dim, c.dim),
        "wo.weight": (c.dim, c.q_dim),
        "gate_up.weight": (2 * c.ffn_dim, c.dim),
        "down.weight": (c.dim, c.ffn_dim),
        "attn_norm": (c.dim,),
        "ffn_norm": (c.dim,),
    }
    for name, shape in expected.items():
        got = adapter.get(name)
        if got is None or tuple(got.shape) != shape:
            found = None if got is None else tuple(got.shape)
            raise DrafterFileError(f"adapter tensor {name}: expected {shape}, found {found}")


class TrainedDrafter:
    """Drafts with a trained drafter: frozen target layers + adapter block + reduced head."""

    kind = "trained"

    def __init__(
        self,
        backend: TorchBackend,
        final_norm: torch.Tensor,
        head: torch.Tensor,
        vocab_ids: torch.Tensor,
        prefill_chunk: int = 256,
        weights: DrafterWeights | None = None,
    ) -> None:
        self.backend = backend
        self.final_norm = final_norm.float()
        self.head = head.to(backend.dtype).contiguous()
        self.vocab_ids = vocab_ids.to(torch.int64)
        self.prefill_chunk = prefill_chunk
        self.weights = weights

    @classmethod
    def load(
        cls,
        path: Path,
        target_path: Path,
        weights: str = "bf16",
        max_slots: int = 8,
        max_len: int = 2048,
        cache_root: Path | None = None,
        check_target: bool = True,
    ) -> TrainedDrafter:
        """Load a drafter file against the target GGUF it was trained for."""
        trained = load_drafter_weights(path)
        target_path = Path(target_path)
        if check_target:
            check_drafter_target(path, target_path, trained.target_sha256, trained.target_name)
        return cls.from_weights(trained, target_path, weights, max_slots, max_len, cache_root)

    @classmethod
    def from_weights(
        cls,
        trained: DrafterWeights,
        target_path: Path,
        weights: str = "bf16",
        max_slots: int = 8,
        max_len: int = 2048,
        cache_root: Path | None = None,
    ) -> TrainedDrafter:
        from models.weight_cache import WeightCache

        frozen = WeightCache(cache_root).load_segment(
            Path(target_path), (0, trained.layers), weights
        )
        config = frozen.config
        if trained.layers >= config.n_layers:
            raise DrafterFileError(
                f"drafter runs {trained.layers} frozen layers; the target has {config.n_layers}"
            )
        if int(trained.vocab_ids.max()) >= config.vocab_size or int(trained.vocab_ids.min()) < 0:
            raise DrafterFileError("drafter vocabulary ids fall outside the target's vocabulary")
        if trained.head.shape[1] != config.dim:
            raise DrafterFileError(f"drafter width {trained.head.shape[1]} != target {config.dim}")
        check_adapter(trained.adapter, config)
        # The adapter runs as one more block after the frozen ones, in the same pass and cache.
        segment = replace(
            frozen,
            layers=(0, trained.layers + 1),
            blocks=frozen.blocks + (pack_adapter(trained.adapter, weights),),
        )
        backend = TorchBackend(segment, max_slots=max_slots, max_len=max_len)
        return cls(backend, trained.final_norm, trained.head, trained.vocab_ids, weights=trained)

    @property
    def config(self) -> ModelConfig:
        return self.backend.config

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Reduced-vocabulary logits [..., V'] (float32) from adapter outputs [..., dim]."""
        with torch.inference_mode():
            normed = rms_norm(hidden.to(self.head.dtype), self.final_norm, self.config.norm_eps)
            return torch.nn.functional.linear(normed, self.head).float()

    def next_token_ids(self, tokens: Sequence[int]) -> list[int]:
        """The drafter's argmax target id after every prefix of `tokens` (teacher forcing)."""
        slot = self.backend.cache.allocate()
        try:
            out: list[int] = []
            for i in range(0, len(tokens), self.prefill_chunk):
                part = torch.tensor(list(tokens[i : i + self.prefill_chunk]), dtype=torch.int64)
                hidden = self.backend.forward([slot], [part])[0]
                out.extend(self.vocab_ids[self.logits(hidden).argmax(dim=-1)].tolist())
            return out
        finally:
            self.backend.cache.free(slot)

    def open(self, params: SamplingParams) -> TrainedSession:
        return TrainedSession(self, params)


class TrainedSession(ModelSession):
    """One session's drafting state: a KV slot (frozen layers + adapter) and the tokens in it.
    The backend gives hidden states; the reduced head makes logits over the drafter's
    vocabulary, whose indices map back to target ids."""

    _drafter: TrainedDrafter

    def __init__(self, drafter: TrainedDrafter, params: SamplingParams) -> None:
        super().__init__(drafter, params)

    def _logits(self, row: torch.Tensor) -> torch.Tensor:
        return self._drafter.logits(row)

    def _draw(
        self, logits: torch.Tensor, position: int
    ) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
        vocab_ids = self._drafter.vocab_ids
        index, q_idx, q_probs = draw_draft(logits, self._params, position, "sampled")
        # Reduced-head rows -> target ids.
        q_ids = None if q_idx is None else vocab_ids[q_idx]
        return int(vocab_ids[index]), q_ids, q_probs
