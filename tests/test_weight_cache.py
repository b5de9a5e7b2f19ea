"""On-disk cache of converted weights: per layer, keyed by file content, never opens a cached GGUF."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from models import weight_cache
from models.backend import load_backend
from models.gguf_loader import GGUFFile, load_weights
from models.tiny import write_tiny
from models.weight_cache import WeightCache, default_root, file_digest
from models.weight_formats import pack_segment, pack_weights

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _names(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def test_segment_converts_and_stores_only_its_layers(
    tiny_paths: dict[str, Path], tmp_path: Path
) -> None:
    cache = WeightCache(tmp_path)
    seg = cache.load_segment(tiny_paths["qwen2"], (1, 3), "int8")
    directory = cache.directory(tiny_paths["qwen2"], "int8")
    assert _names(directory) == {"config.json", "block_0001.pt", "block_0002.pt"}
    assert seg.embedding is None and seg.head is None and len(seg.blocks) == 2
    last = cache.load_segment(tiny_paths["gemma3"], (5, 6), "bf16")
    gdir = cache.directory(tiny_paths["gemma3"], "bf16")
    assert _names(gdir) == {"config.json", "block_0005.pt", "head.pt"}
    assert last.head is not None and last.final_norm is not None


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
def test_cached_equals_fresh_and_skips_the_gguf(
    tiny_paths: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    path = tiny_paths["llama"]
    fresh = pack_segment(GGUFFile(path), None, fmt)
    WeightCache(tmp_path).load_segment(path, None, fmt)  # cold: converts and stores

    def refuse(*args: object) -> None:
        raise AssertionError("a cached model must not open the GGUF")

    monkeypatch.setattr(weight_cache, "GGUFFile", refuse)
    cached = WeightCache(tmp_path).load_segment(path, None, fmt)
    assert cached.config == fresh.config
    assert cached.embedding is not None and fresh.embedding is not None
    assert torch.equal(cached.embedding, fresh.embedding)
    for a, b in zip(cached.blocks, fresh.blocks, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert cached.head is not None and fresh.head is not None
    for k in fresh.head:
        assert torch.equal(cached.head[k], fresh.head[k])


def test_backend_from_cache_gives_same_logits(tiny_paths: dict[str, Path], tmp_path: Path) -> None:
    path = tiny_paths["gemma3"]
    ids = torch.arange(12)
    outs = []
    for _ in range(2):  # cold, then cached (memory-mapped)
        be = load_backend(path, weights="bf16", cache_root=tmp_path)
        slot = be.cache.allocate()
        outs.append(be.forward([slot], [ids])[0])
    assert torch.equal(outs[0], outs[1])


def test_damaged_part_is_rebuilt(tiny_paths: dict[str, Path], tmp_path: Path) -> None:
    path = tiny_paths["qwen2"]
    cache = WeightCache(tmp_path)
    good = cache.load_segment(path, (0, 2), "fp32")
    part = cache.directory(path, "fp32") / "block_0001.pt"
    part.write_bytes(b"garbage")
    again = cache.load_segment(path, (0, 2), "fp32")
    assert torch.equal(again.blocks[1]["qkv.weight"], good.blocks[1]["qkv.weight"])
    assert part.stat().st_size > 100


def test_key_follows_content_not_name(tiny_paths: dict[str, Path], tmp_path: Path) -> None:
    path = tiny_paths["llama"]
    copy = tmp_path / "renamed.gguf"
    shutil.copy(path, copy)
    assert file_digest(copy) == file_digest(path)
    other = write_tiny("llama", tmp_path / "other.gguf", seed=1)
    assert file_digest(other) != file_digest(path)
    cache = WeightCache(tmp_path / "c")
    assert cache.directory(path, "bf16") != cache.directory(path, "int8")


def test_default_root_respects_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_root() == tmp_path / "sled" / "weights"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_root() == Path.home() / ".cache" / "sled" / "weights"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        WeightCache(tmp_path).load_segment(tmp_path / "nope.gguf", None, "bf16")


@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_packing_loaded_weights_equals_packing_from_file(
    tiny_paths: dict[str, Path], fmt: str
) -> None:
    gf = GGUFFile(tiny_paths["gemma3"])
    a, b = pack_weights(load_weights(gf), fmt), pack_segment(gf, None, fmt)
    assert a.embedding is not None and b.embedding is not None
    assert torch.equal(a.embedding, b.embedding)
    for x, y in zip(a.blocks, b.blocks, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in y)
    assert a.head is not None and b.head is not None
    assert all(torch.equal(a.head[k], b.head[k]) for k in b.head)
