"""Converted weights cached on disk, per layer, so restarts load in seconds.

Layout: ``$XDG_CACHE_HOME/sled/weights/<key>-<format>/`` holding ``config.json``,
``embedding.pt``, ``block_NNNN.pt`` per layer, ``head.pt`` (final norm + output head) and
``rope_freqs.pt`` when the model has rope frequency factors. A node hosting layers [a, b) reads
(and converts, on a miss) only the files it needs. Files are loaded with ``torch.load(mmap=True)``,
so the page cache, not a copy, backs the weights.

The key hashes the GGUF's size and the first and last few MiB of its bytes (header, metadata and
some tensor data) plus the torch version and this cache's layout version: a copied or touched
file still hits, a different model or finetune misses. The GGUF itself is opened only on a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from models.config import ModelConfig
from models.gguf_loader import GGUFFile
from models.registry import cache_root
from models.weight_formats import (
    PackedSegment,
    pack_embedding,
    pack_gguf_block,
    pack_head,
    split_prefix,
    storage_layout,
)

CACHE_LAYOUT_VERSION = 1
HASH_HEAD_BYTES = 4 << 20
HASH_TAIL_BYTES = 1 << 20

Part = dict[str, torch.Tensor]


def default_root() -> Path:
    return cache_root() / "weights"


def file_digest(path: Path) -> str:
    """sha256 over the size and the first/last bytes of a file (fast even for GBs)."""
    size = path.stat().st_size
    h = hashlib.sha256(f"{size}:{CACHE_LAYOUT_VERSION}:{torch.__version__}".encode())
    with path.open("rb") as f:
        h.update(f.read(HASH_HEAD_BYTES))
        if size > HASH_HEAD_BYTES:
            f.seek(max(HASH_HEAD_BYTES, size - HASH_TAIL_BYTES))
            h.update(f.read(HASH_TAIL_BYTES))
    return h.hexdigest()[:24]


def _save_atomic(obj: object, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class WeightCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()

    def directory(self, gguf_path: Path, fmt: str) -> Path:
        return self.root / f"{file_digest(Path(gguf_path))}-{storage_layout(fmt)}"

    def load_segment(
        self, gguf_path: Path, layers: tuple[int, int] | None, fmt: str
    ) -> PackedSegment:
        """Layers [a, b) in `fmt`, from the cache; missing parts are converted and stored."""
        gguf_path = Path(gguf_path)
        if not gguf_path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
        directory = self.directory(gguf_path, fmt)
        directory.mkdir(parents=True, exist_ok=True)
        opened: list[GGUFFile] = []

        def gguf_file() -> GGUFFile:
            if not opened:
                opened.append(GGUFFile(gguf_path))
            return opened[0]

        config = self._config(directory, gguf_file)
        a, b = config.check_layers(layers if layers is not None else (0, config.n_layers))

        def part(name: str, make: Callable[[], Part]) -> Part:
            return self._part(directory / f"{name}.pt", make)

        embedding = None
        if a == 0:
            embedding = part("embedding", lambda: {"weight": pack_embedding(gguf_file(), fmt)})[
                "weight"
            ]
        blocks = tuple(
            part(f"block_{i:04d}", lambda i=i: pack_gguf_block(gguf_file(), i, fmt))  # type: ignore[misc]
            for i in range(a, b)
        )
        head = part("head", lambda: pack_head(gguf_file(), fmt)) if b == config.n_layers else None
        rope = None
        if config.has_rope_freq_factors:
            rope = part("rope_freqs", lambda: {"weight": _rope_factors(gguf_file())})["weight"]
        return PackedSegment(
            config=config,
            layers=(a, b),
            fmt=fmt,
            embedding=embedding,
            blocks=blocks,
            final_norm=None if head is None else head["norm"],
            head=None if head is None else split_prefix(head, "head"),
            rope_freq_factors=rope,
        )

    @staticmethod
    def _config(directory: Path, gguf_file: Callable[[], GGUFFile]) -> ModelConfig:
        path = directory / "config.json"
        if path.is_file():
            try:
                return ModelConfig.from_dict(json.loads(path.read_text()))
            except (ValueError, TypeError, KeyError):
                pass  # unreadable or from another layout: rebuild below
        config = gguf_file().config
        tmp = path.with_name(f".config.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(config.to_dict(), indent=1))
        os.replace(tmp, path)
        return config

    @staticmethod
    def _part(path: Path, make: Callable[[], Part]) -> Part:
        if path.is_file():
            try:
                loaded = torch.load(path, mmap=True, weights_only=True)
                if isinstance(loaded, dict):
                    return loaded
            except (RuntimeError, OSError, EOFError, ValueError):
                pass  # a damaged file: convert again and replace it
        tensors = make()
        _save_atomic(tensors, path)
        return tensors


def _rope_factors(gf: GGUFFile) -> torch.Tensor:
    factors = gf.rope_freq_factors()
    assert factors is not None
    return factors
