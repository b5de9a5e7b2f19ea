"""What this node can do: memory, cores, the offered models on disk and how fast it runs them.

`probe_node` is quick (no weights loaded): memory and cores from the OS, each offered model's
size and estimated resident memory from its GGUF metadata. `measure_speed` then times a
forward pass of 1 and of 4 new tokens with `models.backend_choice.probe_backends`, whose
results are cached per model file and thread count, so restarts are fast; a model whose
estimate does not fit the memory budget is never loaded, not even to be measured.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

from transport.load import available_memory

log = logging.getLogger(__name__)

# Offer states, as peers see them.
READY: Final = "ready"  # measured (or measuring disabled): may be planned
PROBING: Final = "probing"  # being measured; not planned yet
MISSING: Final = "missing"  # not on disk here (fetch it with `sled models fetch`)
TOO_BIG: Final = "too_big"  # does not fit this node's memory budget
BROKEN: Final = "broken"  # on disk but unreadable or unsupported

# Bytes per weight for each format, counted generously (scales, int8 head of int4 models).
BYTES_PER_WEIGHT: Final = {"fp32": 4.0, "bf16": 2.0, "int8": 1.1, "int4": 0.7}
RUNTIME_OVERHEAD: Final = 64 * 2**20  # activations and per-model bookkeeping
VERIFY_K: Final = 4  # tokens per pass for the verify speed figure


@dataclass(frozen=True)
class ModelOffer:
    """One model this node offers to hold, as advertised to peers."""

    name: str
    status: str
    architecture: str = ""
    file_bytes: int = 0
    need_bytes: int = 0  # estimated resident memory when loaded for serving
    chat: bool = False
    decode_tps: float = 0.0  # tokens/s of single-token passes (0: not measured)
    verify_tps: float = 0.0  # tokens/s of VERIFY_K-token passes


@dataclass(frozen=True)
class DraftOffer:
    """This node drafts for `target` with a drafter of `kind` (ngram, model, text, trained,
    feature: a verifier sends a feature drafter the target's features with each request)."""

    target: str
    kind: str


@dataclass(frozen=True)
class Capabilities:
    """A node's capability summary, exchanged at connect and whenever it changes."""

    cores: int
    memory_total: int
    memory_available: int
    memory_budget: int
    role: str
    backend: str
    weights: str
    models: tuple[ModelOffer, ...] = ()
    drafts: tuple[DraftOffer, ...] = ()

    def offer(self, name: str) -> ModelOffer | None:
        return next((m for m in self.models if m.name == name), None)

    def summary(self) -> str:
        """A short text for mDNS TXT records and the handshake (at most ~200 bytes)."""
        ready = ",".join(m.name for m in self.models if m.status == READY)
        text = f"role={self.role};mem={self.memory_budget >> 20}M;cores={self.cores};models={ready}"
        return text[:200]


def total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def weight_count(meta: dict[str, object]) -> int:
    """Parameters of a decoder from GGUF metadata alone (head counted as untied: an upper bound)."""
    arch = str(meta["general.architecture"])

    def num(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise KeyError(f"{arch}.{key}")
        return int(value)  # type: ignore[call-overload]

    layers, dim, ffn = num("block_count"), num("embedding_length"), num("feed_forward_length")
    heads = num("attention.head_count")
    kv_heads = num("attention.head_count_kv", heads)
    head_dim = num("attention.key_length", dim // heads)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = len(tokens) if isinstance(tokens, (tuple, list)) else num("vocab_size")
    attention = 2 * dim * heads * head_dim + 2 * dim * kv_heads * head_dim
    return 2 * vocab * dim + layers * (attention + 3 * dim * ffn)


def kv_bytes(meta: dict[str, object], weights: str, sessions: int, max_len: int) -> int:
    arch = str(meta["general.architecture"])
    layers = int(meta[f"{arch}.block_count"])  # type: ignore[call-overload]
    heads = int(meta[f"{arch}.attention.head_count"])  # type: ignore[call-overload]
    kv_heads = int(meta.get(f"{arch}.attention.head_count_kv", heads))  # type: ignore[call-overload]
    dim = int(meta[f"{arch}.embedding_length"])  # type: ignore[call-overload]
    head_dim = int(meta.get(f"{arch}.attention.key_length", dim // heads))  # type: ignore[call-overload]
    context = int(meta.get(f"{arch}.context_length", max_len))  # type: ignore[call-overload]
    itemsize = 4 if weights == "fp32" else 2
    return sessions * min(max_len, context) * 2 * layers * kv_heads * head_dim * itemsize


def need_bytes(meta: dict[str, object], weights: str, sessions: int, max_len: int) -> int:
    """Estimated resident memory of a model loaded for serving `sessions` sessions."""
    per_weight = BYTES_PER_WEIGHT.get(weights, 2.0)
    return int(
        weight_count(meta) * per_weight
        + kv_bytes(meta, weights, sessions, max_len)
        + RUNTIME_OVERHEAD
    )


def locate(model: str) -> Path | None:
    """The model's GGUF on this disk (a path, or a registry name that is cached), else None.

    Generated (tiny) registry models are written on first use: that takes milliseconds."""
    from models.registry import RegistryError, default_store, lookup

    candidate = Path(model).expanduser()
    if candidate.suffix == ".gguf":
        return candidate if candidate.is_file() else None
    try:
        entry = lookup(model)
    except RegistryError:
        return None
    store = default_store(progress=False)
    if store.is_cached(model) or entry.generated:
        try:
            return Path(store.fetch(model))
        except (RegistryError, OSError) as exc:
            log.warning("model %s: %s", model, exc)
    return None


def model_name(model: str) -> str:
    """The name a model is served under: its registry name, or a GGUF file's stem."""
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else model


def describe_offer(
    model: str, weights: str, sessions: int, max_len: int, budget: int
) -> tuple[ModelOffer, Path | None]:
    """The offer for one model before measuring (no weights loaded), and its file."""
    from models.gguf_metadata import GGUFMetadataError, read_metadata

    name = model_name(model)
    path = locate(model)
    if path is None:
        return ModelOffer(name, MISSING), None
    try:
        meta = read_metadata(path)
        need = need_bytes(meta, weights, sessions, max_len)
    except (GGUFMetadataError, KeyError, ValueError, TypeError, OSError) as exc:
        log.warning("model %s at %s is unusable: %s", name, path, exc)
        return ModelOffer(name, BROKEN), None
    offer = ModelOffer(
        name=name,
        status=PROBING if need <= budget else TOO_BIG,
        architecture=str(meta.get("general.architecture", "")),
        file_bytes=path.stat().st_size,
        need_bytes=need,
        chat="tokenizer.chat_template" in meta,
    )
    return offer, path


def probe_node(
    models: Sequence[str],
    *,
    role: str,
    backend: str,
    weights: str,
    sessions: int,
    max_len: int,
    memory_budget: int | None,
) -> tuple[Capabilities, dict[str, Path]]:
    """Capabilities with every offer PROBING/TOO_BIG/MISSING/BROKEN, and the files found."""
    available = available_memory()
    budget = memory_budget if memory_budget is not None else available
    if role in ("client", "drafter"):
        budget = min(budget, 0)  # never holds a model for serving
    offers: list[ModelOffer] = []
    paths: dict[str, Path] = {}
    for model in models:
        offer, path = describe_offer(model, weights, sessions, max_len, budget)
        offers.append(offer)
        if path is not None:
            paths[offer.name] = path
    caps = Capabilities(
        cores=os.cpu_count() or 1,
        memory_total=total_memory(),
        memory_available=available,
        memory_budget=budget,
        role=role,
        backend=backend,
        weights=weights,
        models=tuple(offers),
    )
    return caps, paths


def measure_speed(
    offer: ModelOffer, path: Path, backend: str, weights: str, threads: int
) -> ModelOffer:
    """The offer with measured speeds (blocking: loads the model once unless cached)."""
    from models.backend_choice import CANDIDATES, choose_backend, probe_backends

    if offer.status != PROBING:
        return offer
    try:
        if backend == "auto":  # measure every candidate, keep the best for batched verifying
            timings = probe_backends(path, threads, CANDIDATES, log=False)
            best = choose_backend(timings, "verify")
            timing = next(t for t in timings if (t.backend, t.weights) == best)
        else:
            (timing,) = probe_backends(path, threads, [(backend, weights)], log=False)
    except Exception as exc:  # a model that cannot load here is not offered
        log.warning("measuring %s failed: %s", offer.name, exc)
        return replace(offer, status=BROKEN)
    decode_ms = timing.ms.get(1, 0.0)
    verify_ms = timing.ms.get(VERIFY_K, 0.0)
    return replace(
        offer,
        status=READY,
        decode_tps=round(1000.0 / decode_ms, 1) if decode_ms > 0 else 0.0,
        verify_tps=round(1000.0 * VERIFY_K / verify_ms, 1) if verify_ms > 0 else 0.0,
    )


def unmeasured(offer: ModelOffer) -> ModelOffer:
    """An offer made plannable without measuring (probe disabled)."""
    return replace(offer, status=READY) if offer.status == PROBING else offer
