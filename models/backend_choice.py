"""Pick an execution backend and weight format by measured speed on this machine.

A probe times one forward pass of k new tokens (k = 1, 2, 4, 8, 16, after a short prefill) for
each candidate (backend, format) on a model, and caches the result per model file and thread
count under ``$XDG_CACHE_HOME/sled/probe/``. The choice itself is a pure function of those
timings and of the purpose: single-stream decode wants the fastest k = 1 pass, a verifier that
batches many sessions wants the lowest cost per token at its batch size; measured here they are
not the same format.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from models.registry import cache_root
from models.weight_cache import file_digest

Purpose = Literal["decode", "verify"]
CANDIDATES: tuple[tuple[str, str], ...] = (
    ("torch", "int4"),
    ("torch", "bf16"),
    ("torch", "int8"),
    ("onnx", "int4"),
)
PROBE_KS = (1, 2, 4, 8, 16)
PROBE_PREFILL = 64
PROBE_VERSION = 2  # 2: torch int4 (the VNNI kernel) is a candidate


@dataclass(frozen=True)
class BackendTiming:
    """Median milliseconds of one pass of k new tokens, for one (backend, weights) pair."""

    backend: str
    weights: str
    ms: dict[int, float]
    load_s: float

    def per_token_ms(self, k: int) -> float:
        return self.ms[k] / k


def choose_backend(
    timings: Sequence[BackendTiming], purpose: Purpose, verify_tokens: int = 8
) -> tuple[str, str]:
    """The (backend, weights) pair that is fastest for `purpose`.

    decode: the lowest time for one new token. verify: the lowest cost per token for a pass of
    `verify_tokens` tokens (a batch of drafts from several sessions).
    """
    if not timings:
        raise ValueError("no backend timings to choose from")
    if purpose == "decode":
        best = min(timings, key=lambda t: t.ms[1])
    elif purpose == "verify":
        k = max((k for k in timings[0].ms if k <= verify_tokens), default=1)
        best = min(timings, key=lambda t: t.per_token_ms(k))
    else:
        raise ValueError(f"unknown purpose {purpose!r} (decode or verify)")
    return best.backend, best.weights


def time_backend(
    backend: object, ks: Sequence[int] = PROBE_KS, repeats: int = 3
) -> dict[int, float]:
    """Median ms of one pass of k tokens on top of a PROBE_PREFILL-token context."""
    cache = backend.cache  # type: ignore[attr-defined]
    vocab = backend.config.vocab_size  # type: ignore[attr-defined]
    g = torch.Generator().manual_seed(0)
    slot = cache.allocate()
    try:
        backend.forward([slot], [torch.randint(0, vocab, (PROBE_PREFILL,), generator=g)])  # type: ignore[attr-defined]
        backend.forward([slot], [torch.randint(0, vocab, (1,), generator=g)])  # type: ignore[attr-defined]  # warm-up
        out: dict[int, float] = {}
        for k in ks:
            times = []
            for _ in range(repeats):
                cache.truncate(slot, PROBE_PREFILL)
                ids = torch.randint(0, vocab, (k,), generator=g)
                start = time.perf_counter()
                backend.forward([slot], [ids])  # type: ignore[attr-defined]
                times.append((time.perf_counter() - start) * 1000)
            out[k] = round(statistics.median(times), 3)
        return out
    finally:
        cache.free(slot)


def probe_path(model_path: Path, threads: int) -> Path:
    name = f"{file_digest(model_path)}-t{threads}-v{PROBE_VERSION}.json"
    return cache_root() / "probe" / name


def probe_backends(
    model_path: Path,
    threads: int = 0,
    candidates: Sequence[tuple[str, str]] = CANDIDATES,
    use_cache: bool = True,
    log: bool = True,
) -> list[BackendTiming]:
    """Timings of every candidate on this model (cached per model file and thread count)."""
    from models.backend import load_backend

    threads = threads or (os.cpu_count() or 1)
    path = probe_path(Path(model_path), threads)
    cached: dict[tuple[str, str], BackendTiming] = {}
    if use_cache and path.is_file():
        try:
            for entry in json.loads(path.read_text()):
                t = BackendTiming(
                    backend=entry["backend"],
                    weights=entry["weights"],
                    ms={int(k): float(v) for k, v in entry["ms"].items()},
                    load_s=float(entry["load_s"]),
                )
                cached[(t.backend, t.weights)] = t
        except (ValueError, KeyError, TypeError):
            cached = {}  # unreadable: measure again
    results = []
    for backend_name, weights in candidates:
        if (backend_name, weights) in cached:
            results.append(cached[(backend_name, weights)])
            continue
        if log:
            print(
                f"probing {backend_name} {weights} on {Path(model_path).name} ...", file=sys.stderr
            )
        start = time.perf_counter()
        backend = load_backend(
            model_path, backend=backend_name, weights=weights, max_slots=1,
            max_len=PROBE_PREFILL + 2 * max(PROBE_KS), threads=threads,
        )  # fmt: skip
        load_s = time.perf_counter() - start
        timing = BackendTiming(backend_name, weights, time_backend(backend), round(load_s, 3))
        results.append(timing)
        cached[(backend_name, weights)] = timing
        del backend
        gc.collect()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps([asdict(t) for t in cached.values()], indent=1))
        os.replace(tmp, path)
    return results


def auto_backend(
    model_path: Path,
    purpose: Purpose,
    threads: int = 0,
    candidates: Sequence[tuple[str, str]] = CANDIDATES,
) -> tuple[str, str]:
    """Measure (once, then cached) and choose the backend and weights for `purpose`."""
    return choose_backend(probe_backends(model_path, threads, candidates), purpose)
