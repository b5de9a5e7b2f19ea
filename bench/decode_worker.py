"""The child side of bench.decode: load one model on one engine, measure it, print one JSON line.

`python -m bench.decode_worker JOB_JSON` (bench.decode starts it pinned with taskset). Each
engine is driven through the same small `Stepper` interface (prefill, one-token greedy step,
k-token verify pass with logits at every position, KV-cache truncation) on the same token ids,
so the only difference between rows is the engine and its weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench.common import BenchError, json_line, peak_rss_mb

SLED, LLAMACPP, TRANSFORMERS = "sled", "llama.cpp", "transformers"
PROBE_STEPS = 6  # decode steps per thread count when looking for a baseline's best count
LLAMACPP_MISSING = "llama.cpp: missing (pip install llama-cpp-python==0.3.36 builds it, ~15 min)"


@dataclass(frozen=True)
class Job:
    """One child process: load one model on one engine, then (action "run") measure it."""

    engine: str  # SLED, LLAMACPP or TRANSFORMERS
    backend: str  # sled backend ("torch", "onnx"); "" for the others
    fmt: str  # sled weight format, transformers dtype, llama.cpp GGUF file type
    action: str  # "cold": load only; "run": load, decode, verify
    model_path: str
    prompt: tuple[int, ...]
    threads: int
    thread_counts: tuple[int, ...]  # decode is timed at each; verify at the fastest
    decode_tokens: int
    repeats: int
    ks: tuple[int, ...]
    cache_dir: str  # sled: weight cache root ("" = the user's); transformers: converted model

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        raw = json.loads(text)
        for name in ("prompt", "thread_counts", "ks"):
            raw[name] = tuple(raw[name])
        return cls(**raw)

    @property
    def max_len(self) -> int:
        return len(self.prompt) + self.decode_tokens + max(self.ks, default=0) + 8


class Stepper(Protocol):
    """One session on one engine, driven token by token with its KV cache."""

    def prefill(self, ids: Sequence[int]) -> int:
        """Append ids; return the greedy next token."""
        ...

    def step(self, token: int) -> int:
        """Append one token; return the greedy next token."""
        ...

    def verify(self, ids: Sequence[int]) -> None:
        """One pass appending ids, with logits for every position (as a verifier needs)."""
        ...

    def truncate(self, length: int) -> None:
        """Drop cached positions from `length` on."""
        ...


@dataclass(frozen=True)
class DecodeRun:
    """n timed greedy steps: tokens/s from the median step (robust to other work on the
    machine) and from the mean, the share of `threads` cores the process got, the tokens."""

    tok_s: float
    mean_tok_s: float
    cpu_share: float
    tokens: tuple[int, ...]


def decode_run(stepper: Stepper, first: int, n_tokens: int, threads: int) -> DecodeRun:
    """Greedy decode after a prefill that predicted `first`: n_tokens timed steps after one
    untimed warm-up step; the tokens produced include `first`."""
    token = stepper.step(first)
    produced = [first, token]
    steps = []
    cpu_start, start = time.process_time(), time.perf_counter()
    for _ in range(n_tokens):
        step_start = time.perf_counter()
        token = stepper.step(token)
        steps.append(time.perf_counter() - step_start)
        produced.append(token)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu_start
    return DecodeRun(
        tok_s=1.0 / statistics.median(steps),
        mean_tok_s=n_tokens / wall,
        cpu_share=cpu / (wall * threads),
        tokens=tuple(produced),
    )


def draft_tokens(produced: Sequence[int], prompt: Sequence[int], count: int) -> list[int]:
    """`count` tokens to verify: the model's own continuation, padded from the prompt if short."""
    pool = list(produced) + list(prompt)
    return [pool[i % len(pool)] for i in range(count)]


def verify_costs(
    stepper: Stepper, base: int, draft: Sequence[int], ks: Sequence[int], repeats: int
) -> dict[int, float]:
    """Median ms of one pass verifying k draft tokens after `base` cached ones, per k.

    Rounds go over every k in turn (rather than all repeats of one k, then the next), so a
    burst of other work on the machine lands on all k alike and the ratios to k = 1 hold up.
    """
    times: dict[int, list[float]] = {k: [] for k in ks}
    for k in ks:  # warm-up: the first pass of a shape allocates
        stepper.verify(list(draft[:k]))
        stepper.truncate(base)
    for _ in range(repeats):
        for k in ks:
            ids = list(draft[:k])
            start = time.perf_counter()
            stepper.verify(ids)
            times[k].append(time.perf_counter() - start)
            stepper.truncate(base)
    return {k: statistics.median(t) * 1000.0 for k, t in times.items()}


def measure(stepper: Stepper, job: Job, set_threads: Callable[[int], None]) -> dict[str, Any]:
    """Prefill the prompt; with several thread counts, probe each with a short decode and keep
    the fastest; time the full decode there, then verify (when job.ks is not empty)."""
    base = len(job.prompt)
    first = stepper.prefill(job.prompt)
    probed: dict[int, float] = {}
    if len(job.thread_counts) > 1:
        for threads in job.thread_counts:
            set_threads(threads)
            stepper.truncate(base)
            steps = min(PROBE_STEPS, job.decode_tokens)
            probed[threads] = decode_run(stepper, first, steps, threads).tok_s
    best = max(probed, key=lambda t: probed[t]) if probed else job.thread_counts[0]
    set_threads(best)
    stepper.truncate(base)
    run = decode_run(stepper, first, job.decode_tokens, best)
    costs: dict[int, float] = {}
    if job.ks:
        stepper.truncate(base)
        draft = draft_tokens(run.tokens, job.prompt, max(job.ks))
        costs = verify_costs(stepper, base, draft, job.ks, job.repeats)
    return {
        "decode_tok_s": run.tok_s,
        "decode_mean_tok_s": run.mean_tok_s,
        "cpu_share": run.cpu_share,
        "threads": best,
        "threads_probe_tok_s": {str(t): s for t, s in probed.items()},
        "tokens": list(run.tokens),
        "verify_ms": {str(k): ms for k, ms in costs.items()},
    }


# -- engines (run inside the child) ------------------------------------------------------------


class SledStepper:
    def __init__(self, backend: Any) -> None:
        import torch

        self._torch = torch
        self.backend = backend
        self.slot = backend.cache.allocate()

    def _pass(self, ids: Sequence[int], last_only: bool) -> Any:
        x = self._torch.tensor(list(ids), dtype=self._torch.int64)
        return self.backend.forward([self.slot], [x], last_only=last_only)[0]

    def prefill(self, ids: Sequence[int]) -> int:
        return int(self._pass(ids, last_only=True)[-1].argmax())

    def step(self, token: int) -> int:
        return int(self._pass([token], last_only=True)[-1].argmax())

    def verify(self, ids: Sequence[int]) -> None:
        self._pass(ids, last_only=False)

    def truncate(self, length: int) -> None:
        self.backend.cache.truncate(self.slot, length)


class TransformersStepper:
    def __init__(self, model: Any) -> None:
        import torch
        from transformers import DynamicCache

        self._torch = torch
        self.model = model
        self.cache = DynamicCache(config=model.config)

    def _pass(self, ids: Sequence[int], keep: int) -> Any:
        x = self._torch.tensor([list(ids)], dtype=self._torch.int64)
        with self._torch.inference_mode():
            out = self.model(
                input_ids=x, past_key_values=self.cache, use_cache=True, logits_to_keep=keep
            )
        return out.logits

    def prefill(self, ids: Sequence[int]) -> int:
        return int(self._pass(ids, keep=1)[0, -1].argmax())

    def step(self, token: int) -> int:
        return int(self._pass([token], keep=1)[0, -1].argmax())

    def verify(self, ids: Sequence[int]) -> None:
        self._pass(ids, keep=0)  # 0: logits for every position

    def truncate(self, length: int) -> None:
        self.cache.crop(length - self.cache.get_seq_length())  # crop takes -(tokens to drop)


class LlamaCppStepper:
    """llama.cpp through llama_cpp's C API: one sequence, our own batch (logits where asked)."""

    def __init__(self, llm: Any, max_tokens: int) -> None:
        import llama_cpp
        import numpy as np

        self._lib, self._np = llama_cpp, np
        self.ctx = llm.ctx
        self.n_vocab = int(llm.n_vocab())
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(max_tokens, 0, 1)
        self.max_tokens = max_tokens
        self.n_past = 0

    def _decode(self, ids: Sequence[int], all_logits: bool) -> None:
        if not 0 < len(ids) <= self.max_tokens:
            raise BenchError(f"llama.cpp batch of {len(ids)} tokens (max {self.max_tokens})")
        batch = self.batch
        batch.n_tokens = len(ids)
        for i, token in enumerate(ids):
            batch.token[i] = token
            batch.pos[i] = self.n_past + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = all_logits or i == len(ids) - 1
        status = self._lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise BenchError(f"llama_decode returned {status}")
        self._lib.llama_synchronize(self.ctx)
        self.n_past += len(ids)

    def _last_argmax(self) -> int:
        logits = self._lib.llama_get_logits_ith(self.ctx, -1)
        return int(self._np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())

    def prefill(self, ids: Sequence[int]) -> int:
        self._decode(ids, all_logits=False)
        return self._last_argmax()

    def step(self, token: int) -> int:
        self._decode([token], all_logits=False)
        return self._last_argmax()

    def verify(self, ids: Sequence[int]) -> None:
        self._decode(ids, all_logits=True)

    def truncate(self, length: int) -> None:
        self._lib.llama_memory_seq_rm(self.memory, 0, length, -1)
        self.n_past = length

    def close(self) -> None:
        self._lib.llama_batch_free(self.batch)


def _cache_files(root: Path) -> frozenset[tuple[str, int]]:
    """(path, size) of every file under a cache root: a load that changes them missed."""
    if not root.is_dir():
        return frozenset()
    return frozenset(
        (str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file()
    )


def run_sled(job: Job) -> dict[str, Any]:
    import torch

    from models.backend import UnsupportedBackendError, load_backend
    from models.registry import cache_root
    from models.weight_formats import UnsupportedWeightFormatError

    # A given root, or the user's caches (each backend keeps its own under $XDG_CACHE_HOME/sled).
    root = Path(job.cache_dir) if job.cache_dir else None
    watched = root if root is not None else cache_root()
    before = _cache_files(watched)
    start = time.perf_counter()
    try:
        backend = load_backend(
            job.model_path,
            backend=job.backend,
            weights=job.fmt,
            max_slots=1,
            max_len=job.max_len,
            threads=job.threads,
            cache_root=root,
        )
    except (UnsupportedBackendError, UnsupportedWeightFormatError) as exc:
        return {"unavailable": str(exc)}
    load_s = time.perf_counter() - start
    result: dict[str, Any] = {
        "load_s": load_s,
        "load_kind": "cached" if _cache_files(watched) == before else "cold",
    }
    if job.action == "run":
        result |= measure(SledStepper(backend), job, torch.set_num_threads)
    return result


def transformers_cache_dir(model_path: Path, root: Path) -> Path:
    """Where the bench keeps transformers' conversions of a GGUF: one safetensors model per
    dtype, in `<this>/<dtype>/`."""
    from models.weight_cache import file_digest

    return root / "transformers" / file_digest(model_path)


def transformers_cached(directory: Path, dtype: str) -> bool:
    return (directory / dtype / "config.json").is_file()


def _save_transformers(model: Any, directory: Path) -> None:
    """save_pretrained into `directory` atomically (written aside, then renamed)."""
    # The weights are plain tensors by now; only the GGUF quantizer marker blocks saving.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as non-optional)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = directory.with_name(f".{directory.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.replace(directory)


def run_transformers(job: Job) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if job.fmt not in dtypes:
        raise BenchError(f"transformers dtype {job.fmt!r} (choose from {', '.join(dtypes)})")
    torch.set_num_threads(job.threads)
    root = Path(job.cache_dir)
    cached = job.action == "run" and transformers_cached(root, job.fmt)
    gguf = Path(job.model_path)
    start = time.perf_counter()
    if cached:
        model = AutoModelForCausalLM.from_pretrained(root / job.fmt, dtype=dtypes[job.fmt])
    else:  # the cold path: transformers dequantizes the GGUF itself
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=dtypes[job.fmt]
        )
    load_s = time.perf_counter() - start
    result: dict[str, Any] = {"load_s": load_s, "load_kind": "cached" if cached else "cold"}
    if not cached:
        # Keep the conversion so later runs load in seconds: a cold job stores every dtype
        # (fp32 first, then cast down), a run that found no cache only its own.
        root.mkdir(parents=True, exist_ok=True)
        wanted = [job.fmt] + ([d for d in dtypes if d != job.fmt] if job.action == "cold" else [])
        for dtype in wanted:
            if not transformers_cached(root, dtype):
                model = model.to(dtypes[dtype])  # type: ignore[arg-type]  # (stubs miss .to(dtype))
                _save_transformers(model, root / dtype)
    if job.action == "run":
        model.eval()
        result |= measure(TransformersStepper(model), job, torch.set_num_threads)
    return result


def run_llamacpp(job: Job) -> dict[str, Any]:
    try:
        import llama_cpp
    except ImportError:
        return {"unavailable": LLAMACPP_MISSING}
    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=job.model_path,
        n_ctx=job.max_len,
        n_batch=max(512, len(job.prompt)),
        n_threads=job.threads,
        n_threads_batch=job.threads,
        verbose=False,
    )
    result: dict[str, Any] = {"load_s": time.perf_counter() - start, "load_kind": "cached"}
    if job.action == "run":
        stepper = LlamaCppStepper(llm, max(len(job.prompt), max(job.ks, default=1)))

        def set_threads(threads: int) -> None:
            llama_cpp.llama_set_n_threads(llm.ctx, threads, threads)

        try:
            result |= measure(stepper, job, set_threads)
        finally:
            stepper.close()
    return result


ENGINES: Mapping[str, Callable[[Job], dict[str, Any]]] = {
    SLED: run_sled,
    TRANSFORMERS: run_transformers,
    LLAMACPP: run_llamacpp,
}


def worker_main(job_json: str) -> int:
    job = Job.from_json(job_json)
    result = ENGINES[job.engine](job)
    result["self_peak_rss_mb"] = peak_rss_mb()
    print(json_line(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m bench.decode_worker JOB_JSON", file=sys.stderr)
        return 2
    return worker_main(args[0])


if __name__ == "__main__":
    sys.exit(main())
