"""Backend choice: the pure decision over timings, and the cached probe on a tiny model."""

from __future__ import annotations

from pathlib import Path

import pytest

from models.backend import load_backend
from models.backend_choice import BackendTiming, choose_backend, probe_backends, probe_path


def _t(backend: str, weights: str, ms: dict[int, float]) -> BackendTiming:
    return BackendTiming(backend, weights, ms, load_s=1.0)


# Shapes of the curves measured on Qwen here: int4 fastest for one token, bf16 flattest.
TIMINGS = [
    _t("onnx", "int4", {1: 55.0, 2: 80.0, 4: 120.0, 8: 220.0}),
    _t("torch", "bf16", {1: 195.0, 2: 196.0, 4: 200.0, 8: 240.0}),
    _t("torch", "int8", {1: 121.0, 2: 150.0, 4: 220.0, 8: 380.0}),
]


def test_decode_picks_fastest_single_token() -> None:
    assert choose_backend(TIMINGS, "decode") == ("onnx", "int4")


def test_verify_picks_lowest_cost_per_token_at_batch_size() -> None:
    assert choose_backend(TIMINGS, "verify", verify_tokens=8) == ("onnx", "int4")
    flatter = [*TIMINGS[1:], _t("onnx", "int4", {1: 55.0, 2: 110.0, 4: 220.0, 8: 440.0})]
    assert choose_backend(flatter, "verify", verify_tokens=8) == ("torch", "bf16")


def test_choice_errors() -> None:
    with pytest.raises(ValueError, match="no backend timings"):
        choose_backend([], "decode")
    with pytest.raises(ValueError, match="unknown purpose"):
        choose_backend(TIMINGS, "train")  # type: ignore[arg-type]


def test_probe_is_cached_and_drives_auto(
    tiny_paths: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = tiny_paths["qwen2"]
    candidates = [("torch", "fp32"), ("torch", "bf16")]
    timings = probe_backends(path, threads=1, candidates=candidates, log=False)
    assert [(t.backend, t.weights) for t in timings] == candidates
    assert all(t.ms[1] > 0 and sorted(t.ms) == [1, 2, 4, 8, 16] for t in timings)
    assert probe_path(path, 1).is_file()

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("cached timings must not be measured again")

    monkeypatch.setattr("models.backend.load_backend", no_load)
    assert probe_backends(path, threads=1, candidates=candidates, log=False) == timings
    monkeypatch.undo()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    backend = load_backend(path, backend="auto", weights="fp32", threads=1, cache_root=tmp_path)
    assert (backend.name, backend.weight_format) == ("torch", "fp32")
