"""The onnxruntime backend against the torch fp32 reference on tiny models.

Exports take a few seconds per chunk, so each model is exported once per module into a shared
cache directory and the tests reuse it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from models.backend import UnsupportedBackendError, load_backend
from models.onnx_backend import OnnxExportCache, chunk_ranges, load_onnx_backend

CHUNK = 3  # tiny models have 4 (qwen2) and 6 (gemma3) layers: several chunks each


@pytest.fixture(scope="module")
def onnx_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_cache")


def _run_two_steps(backend: object, ids: list[torch.Tensor]) -> list[torch.Tensor]:
    """A ragged prefill, then a ragged second pass on top of the cache; returns all outputs."""
    cache = backend.cache  # type: ignore[attr-defined]
    slots = [cache.allocate() for _ in ids]
    first = backend.forward(slots, ids)  # type: ignore[attr-defined]
    more = [torch.tensor([3]), torch.tensor([4, 5]), torch.tensor([6, 7, 8])][: len(ids)]
    second = backend.forward(slots, more)  # type: ignore[attr-defined]
    return first + second


def _ids(vocab: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (n,), generator=g) for n in (5, 9, 1)]


@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
def test_onnx_fp32_matches_torch_fp32(
    tiny_paths: dict[str, Path], arch: str, onnx_root: Path, tmp_path: Path
) -> None:
    path = tiny_paths[arch]
    ref = load_backend(path, backend="torch", weights="fp32", cache_root=tmp_path / "w")
    ob = load_onnx_backend(path, None, "fp32", cache_root=onnx_root, chunk_layers=CHUNK)
    assert ob.name == "onnx" and ob.layers == (0, ref.config.n_layers)
    ids = _ids(ref.config.vocab_size)
    for r, o in zip(_run_two_steps(ref, ids), _run_two_steps(ob, ids), strict=True):
        assert r.shape == o.shape
        torch.testing.assert_close(o, r, atol=2e-4, rtol=1e-4)


def test_onnx_segments_chain_to_the_whole(tiny_paths: dict[str, Path], onnx_root: Path) -> None:
    """Layers [0, 2) then [2, 6) on gemma3 (a range starting mid-chunk) equal [0, 6)."""
    path = tiny_paths["gemma3"]
    whole = load_onnx_backend(path, None, "fp32", cache_root=onnx_root, chunk_layers=CHUNK)
    head = load_onnx_backend(path, (0, 2), "fp32", cache_root=onnx_root, chunk_layers=CHUNK)
    tail = load_onnx_backend(path, (2, 6), "fp32", cache_root=onnx_root, chunk_layers=CHUNK)
    assert [c for c, _, _ in tail._sessions] == [(2, 3), (3, 6)]
    ids = _ids(whole.config.vocab_size)
    expected = _run_two_steps(whole, ids)
    hs, ts = [head.cache.allocate() for _ in ids], [tail.cache.allocate() for _ in ids]
    got = tail.forward(ts, head.forward(hs, ids))
    more = [torch.tensor([3]), torch.tensor([4, 5]), torch.tensor([6, 7, 8])]
    got += tail.forward(ts, head.forward(hs, more))
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_onnx_int8_agrees_with_fp32(tiny_paths: dict[str, Path], onnx_root: Path) -> None:
    path = tiny_paths["qwen2"]
    ref = load_onnx_backend(path, None, "fp32", cache_root=onnx_root, chunk_layers=CHUNK)
    q8 = load_onnx_backend(path, None, "int8", cache_root=onnx_root, chunk_layers=CHUNK)
    ids = _ids(ref.config.vocab_size)
    r, q = _run_two_steps(ref, ids), _run_two_steps(q8, ids)
    agree = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(r, q, strict=True))
    total = sum(a.shape[0] for a in r)
    assert agree >= 0.9 * total, f"int8 argmax agreement {agree}/{total}"
    # Quantised, so not equal: the test must see a real quantised graph, not the fp32 one.
    assert max(float((a - b).abs().max()) for a, b in zip(r, q, strict=True)) > 1e-4


def test_onnx_cache_hit_is_fast_and_skips_export(
    tiny_paths: dict[str, Path], onnx_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tiny_paths["qwen2"]
    load_onnx_backend(path, None, "fp32", cache_root=onnx_root, chunk_layers=CHUNK)

    def no_export(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached model must not be exported again")

    monkeypatch.setattr(OnnxExportCache, "_make", staticmethod(no_export))
    monkeypatch.setattr("models.onnx_backend.GGUFFile", no_export)
    start = time.perf_counter()
    load_onnx_backend(path, None, "fp32", cache_root=onnx_root, chunk_layers=CHUNK)
    assert time.perf_counter() - start < 10


def test_onnx_through_load_backend_and_bad_format(
    tiny_paths: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(UnsupportedBackendError, match="int4"):
        load_backend(tiny_paths["qwen2"], backend="onnx", weights="bf16", cache_root=tmp_path)
    with pytest.raises(FileNotFoundError):
        load_backend(tmp_path / "missing.gguf", backend="onnx", weights="fp32")


def test_chunk_ranges() -> None:
    assert chunk_ranges((0, 7), 3) == [(0, 3), (3, 6), (6, 7)]
    assert chunk_ranges((2, 4), 7) == [(2, 4)]
    with pytest.raises(ValueError):
        chunk_ranges((0, 4), 0)


def test_int4_follows_the_gguf_precision(tiny_paths: dict[str, Path], onnx_root: Path) -> None:
    """int4 puts 4-bit only where the GGUF tensor is itself ~4-bit (tiny qwen2 mixes Q4_1 with
    Q8_0/F16/...), 8-bit elsewhere; and the graph really holds both kinds of MatMulNBits."""
    import onnx

    from models.gguf_loader import GGUFFile
    from models.onnx_backend import FOUR_BIT_SOURCES, weight_bits

    path = tiny_paths["qwen2"]
    gf = GGUFFile(path)
    bits = weight_bits(gf, (0, gf.config.n_layers), "int4")
    assert set(bits.values()) == {4, 8}
    for prefix, b in bits.items():
        if prefix.startswith("/blocks.0/down/"):
            source = gf.tensors["blk.0.ffn_down.weight"].tensor_type.name
            assert (b == 4) == (source in FOUR_BIT_SOURCES)
    assert set(weight_bits(gf, (0, 2), "int8").values()) == {8}
    load_onnx_backend(path, None, "int4", cache_root=onnx_root, chunk_layers=CHUNK)
    seen = set()
    for chunk in OnnxExportCache(onnx_root).prepare(path, None, "int4", CHUNK)[2]:
        graph = onnx.load(str(chunk.path), load_external_data=False).graph
        for node in graph.node:
            if node.op_type == "MatMulNBits":
                seen.add(next(a.i for a in node.attribute if a.name == "bits"))
    assert seen == {4, 8}
