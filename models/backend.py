"""The execution-backend interface the rest of sled uses, and `load_backend`.

A backend runs layers [a, b) of one model for many sessions at once. Each session owns a slot
of the backend's KV cache; a pass takes a ragged batch (session i brings T_i new tokens or
hidden states), appends their keys/values to the slots, and returns per-session outputs.
Rolling back rejected draft tokens is `backend.cache.truncate(slot, n)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch

from models.batch_inputs import BadBatchError
from models.config import ModelConfig
from models.kv_cache import KVCache

__all__ = ["BadBatchError", "Backend", "load_backend"]

BACKENDS = ("auto", "torch", "onnx")


class UnsupportedBackendError(ValueError):
    """A backend name that is unknown or not available here."""


@runtime_checkable
class Backend(Protocol):
    config: ModelConfig
    layers: tuple[int, int]
    cache: KVCache
    name: str
    weight_format: str

    def forward(
        self,
        slots: Sequence[int],
        inputs: Sequence[torch.Tensor],
        last_only: bool = False,
        keep: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """One batched pass over several sessions with ragged new-token counts T_i.

        inputs[i] is token ids [T_i] (int64) if layers[0] == 0, else hidden states [T_i, dim].
        Appends each session's keys/values to its slot. Returns per session logits [T_i, vocab]
        (float32) if layers[1] == n_layers, else hidden states [T_i, dim] in the backend's
        activation dtype. With last_only, only the last position's row is returned ([1, ...]),
        which saves the output head's cost on long prefills; `keep[i]` asks for the last
        keep[i] rows of session i instead (a verifier's k+1 rows next to prefill chunks).
        """
        ...


def default_weight_format(backend: str) -> str:
    """What `--weights auto` means for a backend: the format measured fastest for it here
    (int4 for both: torch's on the VNNI kernel decodes ~5x faster than bf16 and verifies up to
    16 sessions x 3 tokens cheaper; bf16 where that kernel cannot be built, its cost staying
    flat for batched verification)."""
    if backend == "torch":
        from models.vnni_matmul import available

        return "int4" if available() else "bf16"
    return "int4"


def load_backend(
    model_path: str | Path,
    layers: tuple[int, int] | None = None,
    backend: str = "torch",
    weights: str = "bf16",
    max_slots: int = 8,
    max_len: int = 2048,
    threads: int = 0,
    cache_root: Path | None = None,
    use_cache: bool = True,
    purpose: Literal["decode", "verify"] = "decode",
) -> Backend:
    """Load layers [a, b) (default: all) of a GGUF model into an execution backend.

    Converted weights come from the on-disk weight cache when present (see models.weight_cache);
    `use_cache=False` converts from the GGUF without reading or writing the cache.
    `backend="auto"` takes the (backend, weights) pair measured fastest for `purpose` on this
    machine (see models.backend_choice; measured once per model, then cached).
    """
    from models.weight_cache import WeightCache
    from models.weight_formats import pack_segment

    if backend not in BACKENDS:
        raise UnsupportedBackendError(
            f"unknown backend {backend!r} (choose from {', '.join(BACKENDS)})"
        )
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if threads > 0:
        torch.set_num_threads(threads)
    path = Path(model_path)
    if backend == "auto":
        from models.backend_choice import CANDIDATES, auto_backend

        candidates = [c for c in CANDIDATES if weights in ("auto", c[1])] or [("torch", weights)]
        backend, weights = auto_backend(path, purpose, threads, candidates)
    fmt = default_weight_format(backend) if weights == "auto" else weights
    if backend == "onnx":
        from models.onnx_backend import load_onnx_backend

        onnx_root = None if cache_root is None else Path(cache_root) / "onnx"
        return load_onnx_backend(
            path, layers, fmt, max_slots=max_slots, max_len=max_len, threads=threads,
            cache_root=onnx_root,
        )  # fmt: skip
    if use_cache:
        segment = WeightCache(cache_root).load_segment(path, layers, fmt)
    else:
        from models.gguf_loader import GGUFFile

        segment = pack_segment(GGUFFile(path), layers, fmt)
    from models.torch_backend import TorchBackend

    return TorchBackend(segment, max_slots=max_slots, max_len=max_len)
