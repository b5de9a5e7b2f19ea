"""Decode speed of sled's backends against transformers and llama.cpp, side by side in one run.

Every engine gets the same token ids (a fixed chat prompt tokenized once by sled's GGUF
tokenizer), the same weights file, the same pinned cores and thread count, and runs in its own
child process, one after another. Per engine and weight format it reports: load time (cold and
cached), peak RSS of the child, greedy decode tokens/s (decode phase only, KV cache on, one warm-up
step first), and the cost of one forward pass verifying k = 1, 2, 4, 8, 16 tokens after the
prompt, relative to k = 1.

Headline ratios: sled's fastest (backend, format) over transformers' fastest (dtype fp32 or bf16,
best thread count <= --threads) and over llama.cpp (its default build, --threads threads).
`verify_format` is the sled pair with the lowest cost per token at k = 8 (the largest k <= 8
measured); `verify_cost` is its curve. The last line of output is one JSON object.

Run: `python -m bench.decode [--quick] [--model NAME|PATH.gguf] [--threads N]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from bench.common import (
    BenchError,
    json_line,
    peak_rss_mb,
    pick_cores,
    pinned_command,
    python_module_command,
    ratio,
    run_child,
    thread_env,
)

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"
VERIFY_KS = (1, 2, 4, 8, 16)
VERIFY_REFERENCE_K = 8  # verify_format: lowest cost per token at this k
SLED_PAIRS = (
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("torch", "int8"),
    ("torch", "int4"),
    ("onnx", "fp32"),
    ("onnx", "int8"),
    ("onnx", "int4"),
)
# --quick: the pairs that were fastest at decode (int8/int4) and flattest at verify (bf16) in
# the full runs on this machine (see bench/README-decode.md).
QUICK_SLED_PAIRS = (("torch", "bf16"), ("torch", "int8"), ("onnx", "int4"))
TRANSFORMERS_DTYPES = ("fp32", "bf16")
QUICK_TRANSFORMERS_DTYPES = ("fp32",)
LLAMACPP_MISSING = "llama.cpp: missing (pip install llama-cpp-python==0.3.36 builds it, ~15 min)"

SLED, LLAMACPP, TRANSFORMERS = "sled", "llama.cpp", "transformers"

PROMPT_MESSAGES = (
    {"role": "system", "content": "You are a careful senior Python reviewer."},
    {
        "role": "user",
        "content": (
            "Refactor this function: give it type hints, a docstring, and clearer names, "
            "and explain each change briefly.\n\n```python\n"
            "def proc(d, k=None, t=0.5):\n"
            "    r = []\n"
            "    for i in range(len(d)):\n"
            "        x = d[i]\n"
            "        if k is not None and x.get('kind') != k:\n"
            "            continue\n"
            "        s = 0\n"
            "        for v in x['values']:\n"
            "            if v > t:\n"
            "                s = s + v\n"
            "        if s > 0:\n"
            "            r.append((x['name'], s / len(x['values'])))\n"
            "    r.sort(key=lambda p: p[1], reverse=True)\n"
            "    return r\n"
            "```\n"
        ),
    },
)


# -- what a child measures ---------------------------------------------------------------------


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
        return len(self.prompt) + self.decode_tokens + max(self.ks) + 8


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


def decode_run(stepper: Stepper, first: int, n_tokens: int) -> tuple[float, list[int]]:
    """Greedy decode after a prefill that predicted `first`: tokens/s over n_tokens timed steps
    (one untimed warm-up step before them) and the tokens produced, `first` included."""
    token = stepper.step(first)
    produced = [first, token]
    start = time.perf_counter()
    for _ in range(n_tokens):
        token = stepper.step(token)
        produced.append(token)
    return n_tokens / (time.perf_counter() - start), produced


def draft_tokens(produced: Sequence[int], prompt: Sequence[int], count: int) -> list[int]:
    """`count` tokens to verify: the model's own continuation, padded from the prompt if short."""
    pool = list(produced) + list(prompt)
    return [pool[i % len(pool)] for i in range(count)]


def verify_costs(
    stepper: Stepper, base: int, draft: Sequence[int], ks: Sequence[int], repeats: int
) -> dict[int, float]:
    """Median ms of one pass verifying k draft tokens after `base` cached ones, per k."""
    costs: dict[int, float] = {}
    for k in ks:
        ids = list(draft[:k])
        stepper.verify(ids)  # warm-up (first pass of a shape allocates)
        stepper.truncate(base)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            stepper.verify(ids)
            times.append(time.perf_counter() - start)
            stepper.truncate(base)
        costs[k] = statistics.median(times) * 1000.0
    return costs


def measure(stepper: Stepper, job: Job, set_threads: Callable[[int], None]) -> dict[str, Any]:
    """Prefill the prompt, time decode at each thread count, then verify at the fastest."""
    base = len(job.prompt)
    first = stepper.prefill(job.prompt)
    speeds: dict[int, float] = {}
    produced: dict[int, list[int]] = {}
    for threads in job.thread_counts:
        set_threads(threads)
        stepper.truncate(base)
        speeds[threads], produced[threads] = decode_run(stepper, first, job.decode_tokens)
    best = max(speeds, key=lambda t: speeds[t])
    set_threads(best)
    stepper.truncate(base)
    draft = draft_tokens(produced[best], job.prompt, max(job.ks))
    costs = verify_costs(stepper, base, draft, job.ks, job.repeats)
    return {
        "decode_tok_s": {str(t): s for t, s in speeds.items()},
        "threads": best,
        "tokens": produced[best],
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
    """(path, size) of every file under a weight cache root: a load that changes it missed."""
    if not root.is_dir():
        return frozenset()
    return frozenset((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*.pt"))


def run_sled(job: Job) -> dict[str, Any]:
    import torch

    from models.backend import UnsupportedBackendError, load_backend
    from models.weight_cache import default_root
    from models.weight_formats import UnsupportedWeightFormatError

    root = Path(job.cache_dir) if job.cache_dir else default_root()
    before = _cache_files(root)
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
        "load_kind": "cached" if _cache_files(root) == before else "cold",
    }
    if job.action == "run":
        result |= measure(SledStepper(backend), job, torch.set_num_threads)
    return result


def transformers_cache_dir(model_path: Path, root: Path) -> Path:
    """Where the bench keeps transformers' conversion of a GGUF (safetensors, fp32)."""
    from models.weight_cache import file_digest

    return root / "transformers" / file_digest(model_path)


def run_transformers(job: Job) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if job.fmt not in dtypes:
        raise BenchError(f"transformers dtype {job.fmt!r} (choose from {', '.join(dtypes)})")
    torch.set_num_threads(job.threads)
    saved = Path(job.cache_dir)
    cached = job.action == "run" and (saved / "config.json").is_file()
    gguf = Path(job.model_path)
    start = time.perf_counter()
    if cached:
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=dtypes[job.fmt])
    else:  # the cold path: transformers dequantizes the GGUF itself
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=dtypes[job.fmt]
        )
    load_s = time.perf_counter() - start
    result: dict[str, Any] = {"load_s": load_s, "load_kind": "cached" if cached else "cold"}
    if not cached and job.fmt == "fp32" and not (saved / "config.json").is_file():
        # Keep the exact fp32 conversion so later runs load it in seconds; rename = atomic.
        # The weights are plain fp32 tensors now; only the GGUF marker blocks save_pretrained.
        setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as non-optional)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tmp = saved.with_name(f".{saved.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tmp.replace(saved)
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
        stepper = LlamaCppStepper(llm, max(len(job.prompt), max(job.ks)))

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


# -- what the parent runs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One row of the table: an engine and format, and whether its cold load is measured."""

    engine: str
    backend: str
    fmt: str
    measure_cold: bool
    thread_counts: tuple[int, ...]

    @property
    def label(self) -> str:
        return (
            f"{self.engine} {self.backend}/{self.fmt}"
            if self.backend
            else f"{self.engine} {self.fmt}"
        )


@dataclass(frozen=True)
class Options:
    model: str
    threads: int
    quick: bool
    decode_tokens: int
    repeats: int
    ks: tuple[int, ...]
    sled_pairs: tuple[tuple[str, str], ...]
    transformers_dtypes: tuple[str, ...]
    llamacpp: bool
    cold: bool
    child_timeout_s: float


@dataclass(frozen=True)
class Row:
    """The measured figures of one target (None where not measured); `note` says why not."""

    target: Target
    load_cold_s: float | None = None
    load_cached_s: float | None = None
    cold_peak_rss_mb: float | None = None
    peak_rss_mb: float | None = None
    decode_tok_s: float | None = None
    decode_by_threads: tuple[tuple[int, float], ...] = ()
    threads: int | None = None
    verify_ms: tuple[tuple[int, float], ...] = ()
    tokens: tuple[int, ...] = ()
    note: str = ""

    @property
    def verify(self) -> dict[int, float]:
        return dict(self.verify_ms)


def baseline_thread_counts(threads: int) -> tuple[int, ...]:
    """Thread counts a baseline is tried at: 1, the powers of two below `threads`, `threads`."""
    counts = {1, threads}
    power = 2
    while power < threads:
        counts.add(power)
        power *= 2
    return tuple(sorted(counts))


def plan_targets(opts: Options, gguf_type: str, transformers_cached: bool) -> list[Target]:
    """Rows in run order: llama.cpp, sled's pairs, transformers' dtypes (slowest last)."""
    same = (opts.threads,)
    targets = []
    if opts.llamacpp:
        targets.append(Target(LLAMACPP, "", gguf_type, False, same))
    for backend, fmt in opts.sled_pairs:
        targets.append(Target(SLED, backend, fmt, opts.cold, same))
    for i, dtype in enumerate(opts.transformers_dtypes):
        # Only the first (fp32 if asked) measures the GGUF conversion; it also fills the cache.
        cold = i == 0 and (opts.cold or not transformers_cached)
        targets.append(Target(TRANSFORMERS, "", dtype, cold, baseline_thread_counts(opts.threads)))
    return targets


def pick_verify_row(rows: Sequence[Row], ks: Sequence[int]) -> tuple[Row, int] | None:
    """The sled row a verifier would pick: lowest cost per token at k = 8 (or the largest k
    below it that was measured), and that k."""
    below = [k for k in ks if k <= VERIFY_REFERENCE_K]
    if not below:
        return None
    k = max(below)
    measured = [r for r in rows if r.target.engine == SLED and k in r.verify and 1 in r.verify]
    if not measured:
        return None
    return min(measured, key=lambda r: r.verify[k]), k


def best_row(rows: Sequence[Row], engine: str) -> Row | None:
    """The engine's row with the fastest decode."""
    measured = [r for r in rows if r.target.engine == engine and r.decode_tok_s is not None]
    return max(measured, key=lambda r: r.decode_tok_s or 0.0) if measured else None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def greedy_match(row: Row, ref: Row) -> float:
    """Leading greedy tokens shared with the reference row, as a share of the shorter run."""
    n = min(len(row.tokens), len(ref.tokens))
    return round(common_prefix(row.tokens, ref.tokens) / n, 3) if n else 0.0


def reference_row(rows: Sequence[Row]) -> Row | None:
    """Tokens to compare against: transformers fp32 (exact dequantized weights), else llama.cpp."""
    for engine, fmt in ((TRANSFORMERS, "fp32"), (LLAMACPP, None)):
        for r in rows:
            if r.target.engine == engine and (fmt is None or r.target.fmt == fmt) and r.tokens:
                return r
    return None


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def headline(rows: Sequence[Row], opts: Options) -> dict[str, Any]:
    """The JSON figures: ratios, verify curve, loads and memory per row."""
    ours = best_row(rows, SLED)
    theirs = best_row(rows, TRANSFORMERS)
    llama = best_row(rows, LLAMACPP)
    ours_speed = ours.decode_tok_s if ours else None
    picked = pick_verify_row(rows, opts.ks)
    verify_cost: dict[str, float] | None = None
    verify_format = None
    if picked is not None:
        row, _ = picked
        verify_format = f"{row.target.backend}/{row.target.fmt}"
        verify_cost = {str(k): round(ms / row.verify[1], 3) for k, ms in row.verify_ms}
    measured = [r for r in rows if not r.note]
    ref = reference_row(rows)
    return {
        "decode_vs_transformers": ratio(ours_speed, theirs.decode_tok_s if theirs else None),
        "decode_vs_llamacpp": ratio(ours_speed, llama.decode_tok_s if llama else None),
        "verify_cost": verify_cost,
        "verify_format": verify_format,
        "decode_format": f"{ours.target.backend}/{ours.target.fmt}" if ours else None,
        "transformers_best": (
            f"{theirs.target.fmt} @{theirs.threads} threads" if theirs and theirs.threads else None
        ),
        "threads": opts.threads,
        "decode_tok_s": {r.target.label: _rounded(r.decode_tok_s, 2) for r in measured},
        "load_s": {
            r.target.label: {
                "cold": _rounded(r.load_cold_s, 2),
                "cached": _rounded(r.load_cached_s, 2),
            }
            for r in measured
        },
        "peak_rss_mb": {r.target.label: _rounded(r.peak_rss_mb, 0) for r in measured},
        # Share of greedy tokens equal to the reference's before the first difference: a fast
        # but wrong decoder shows here (quantized formats may part ways after a while).
        "greedy_match": {
            "reference": ref.target.label if ref else None,
            **{
                r.target.label: greedy_match(r, ref)
                for r in measured
                if ref is not None and r is not ref and r.tokens
            },
        },
        "model": opts.model,
        "quick": opts.quick,
    }


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_tables(rows: Sequence[Row], ks: Sequence[int]) -> str:
    """Two plain-text tables: load/memory/decode, and verify cost per k."""
    ref = reference_row(rows)
    head = ["engine/format", "threads (tok/s)", "load cold s", "load cached s", "peak RSS MB",
            "cold RSS MB", "decode tok/s", f"same tokens as {ref.target.label if ref else '-'}"]  # fmt: skip
    lines = [head]
    for r in rows:
        if r.note:
            lines.append([r.target.label, r.note])
            continue
        match = "-"
        if ref is not None and r is not ref and r.tokens:
            n = min(len(r.tokens), len(ref.tokens))
            match = f"{common_prefix(r.tokens, ref.tokens)}/{n}"
        lines.append(
            [
                r.target.label,
                _threads_cell(r),
                _cell(r.load_cold_s, ".2f"),
                _cell(r.load_cached_s, ".2f"),
                _cell(r.peak_rss_mb, ".0f"),
                _cell(r.cold_peak_rss_mb, ".0f"),
                _cell(r.decode_tok_s, ".2f"),
                match,
            ]
        )
    verify_head = ["engine/format"] + [f"k={k} ms" for k in ks] + [f"x{k}" for k in ks if k != 1]
    verify_lines = [verify_head]
    for r in rows:
        if not r.verify_ms:
            continue
        cost = r.verify
        verify_lines.append(
            [r.target.label]
            + [f"{cost[k]:.1f}" for k in ks]
            + [_cell(ratio(cost[k], cost.get(1), 2), ".2f") for k in ks if k != 1]
        )
    return _table(lines) + "\n\n" + _table(verify_lines)


def _threads_cell(row: Row) -> str:
    """The thread count used, and tok/s at each count tried when there were several."""
    if len(row.decode_by_threads) < 2:
        return str(row.threads)
    tried = ", ".join(f"{t}: {s:.2f}" for t, s in row.decode_by_threads)
    return f"{row.threads} ({tried})"


def _table(lines: Sequence[Sequence[str]]) -> str:
    width = max(len(line) for line in lines)
    widths = [
        max((len(line[i]) for line in lines if len(line) == width and i < len(line)), default=0)
        for i in range(width)
    ]
    out = []
    for line in lines:
        if len(line) < width:  # a note row spans the rest
            out.append("  ".join([line[0].ljust(widths[0]), *line[1:]]))
        else:
            out.append("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
    return "\n".join(out).rstrip()


class Runner:
    """Runs the children of one bench: pinned to the same cores, one at a time."""

    def __init__(self, opts: Options, model_path: Path, prompt: tuple[int, ...]) -> None:
        self.opts = opts
        self.model_path = model_path
        self.prompt = prompt
        self.cores = pick_cores(opts.threads)
        self.env = thread_env(opts.threads)
        self.env["HF_HUB_OFFLINE"] = "1"
        self.env["TRANSFORMERS_OFFLINE"] = "1"

    def job(self, target: Target, action: str, cache_dir: str) -> Job:
        return Job(
            engine=target.engine,
            backend=target.backend,
            fmt=target.fmt,
            action=action,
            model_path=str(self.model_path),
            prompt=self.prompt,
            threads=self.opts.threads,
            thread_counts=target.thread_counts,
            decode_tokens=self.opts.decode_tokens,
            repeats=self.opts.repeats,
            ks=self.opts.ks,
            cache_dir=cache_dir,
        )

    def child(self, job: Job) -> tuple[dict[str, Any], float]:
        """Run one job; its result and the child's peak RSS (MB)."""
        command = pinned_command(
            python_module_command("bench.decode", ["--worker", job.to_json()]), self.cores
        )
        done = run_child(command, env=self.env, timeout_s=self.opts.child_timeout_s)
        result = done.last_json()
        # The poll can miss a peak in the last moments; the child's own VmHWM cannot.
        return result, max(done.peak_rss_mb, float(result.get("self_peak_rss_mb", 0.0)))

    def measure(self, target: Target, transformers_dir: Path) -> Row:
        try:
            if target.engine == SLED and target.measure_cold:
                with tempfile.TemporaryDirectory(prefix="sled-bench-cold-") as root:
                    return self._measure(target, root)  # the run re-loads from this fresh cache
            cache_dir = str(transformers_dir) if target.engine == TRANSFORMERS else ""
            return self._measure(target, cache_dir)
        except BenchError as exc:
            return Row(target, note=f"failed: {exc}")

    def _measure(self, target: Target, cache_dir: str) -> Row:
        cold_s = cold_rss = None
        if target.measure_cold:
            log(f"{target.label}: cold load")
            cold, cold_rss = self.child(self.job(target, "cold", cache_dir))
            if "unavailable" in cold:
                return Row(target, note=f"unavailable: {cold['unavailable']}")
            cold_s = float(cold["load_s"])
        log(f"{target.label}: load, decode {self.opts.decode_tokens} tokens, verify")
        run, rss = self.child(self.job(target, "run", cache_dir))
        if "unavailable" in run:
            return Row(target, note=f"unavailable: {run['unavailable']}")
        cached_s: float | None = float(run["load_s"])
        if run["load_kind"] == "cold":  # nothing was cached: this load was the cold one
            cold_s, cold_rss, cached_s = cached_s, None, None
        speeds = {int(t): float(s) for t, s in run["decode_tok_s"].items()}
        return Row(
            target,
            load_cold_s=cold_s,
            load_cached_s=cached_s,
            cold_peak_rss_mb=cold_rss,
            peak_rss_mb=rss,
            decode_tok_s=max(speeds.values()),
            decode_by_threads=tuple(sorted(speeds.items())),
            threads=int(run["threads"]),
            verify_ms=tuple((int(k), float(ms)) for k, ms in run["verify_ms"].items()),
            tokens=tuple(int(t) for t in run["tokens"]),
        )


def log(message: str) -> None:
    print(f"[bench.decode] {message}", file=sys.stderr, flush=True)


def gguf_file_type(path: Path) -> str:
    """The GGUF's file type as llama.cpp names it (e.g. Q4_K_M)."""
    import gguf

    from models.gguf_metadata import read_metadata

    value = read_metadata(path).get("general.file_type")
    try:
        return gguf.LlamaFileType(int(value)).name.removeprefix("MOSTLY_")  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "gguf"


def prompt_ids(path: Path) -> tuple[int, ...]:
    """The fixed chat prompt in the model's own tokens (plain text when it has no template)."""
    from models.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(path)
    if tokenizer.has_chat_template:
        return tuple(tokenizer.encode_chat(PROMPT_MESSAGES))
    return tuple(tokenizer.encode("\n\n".join(m["content"] for m in PROMPT_MESSAGES)))


def _csv(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _pairs(text: str) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in _csv(text):
        backend, sep, fmt = item.partition("/")
        if not sep or not backend or not fmt:
            raise argparse.ArgumentTypeError(f"{item!r}: write backend/format, e.g. torch/int8")
        pairs.append((backend, fmt))
    return tuple(pairs)


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(sorted({int(k) for k in _csv(text)}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write k values as 1,2,4,8,16") from None
    if not ks or ks[0] < 1 or 1 not in ks:
        raise argparse.ArgumentTypeError(f"{text!r}: k values must be >= 1 and include 1")
    return ks


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "--quick (under two minutes with caches filled): 24 decode tokens, 3 repeats per k "
            "(k still up to 16), sled pairs "
            + ", ".join(f"{b}/{f}" for b, f in QUICK_SLED_PAIRS)
            + ", transformers "
            + "/".join(QUICK_TRANSFORMERS_DTYPES)
            + " only, and no cold loads (sled loads from the user's weight cache; transformers' "
            "GGUF conversion runs only when its cache is empty). --smoke: tiny-model settings "
            "for tests (4 decode tokens, 1 repeat, sled torch/fp32 and torch/int8, transformers "
            "fp32). Transformers is given its best thread count <= --threads (tried at 1 and "
            "--threads); sled and llama.cpp run at --threads."
        ),
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry name or .gguf path")
    parser.add_argument("--threads", type=int, default=2, help="threads (and pinned cores)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the fast subset (see below)")
    mode.add_argument("--smoke", action="store_true", help="tiny-model settings for tests")
    parser.add_argument("--tokens", type=int, help="timed decode steps (default 64, quick 24)")
    parser.add_argument("--repeats", type=int, help="timed passes per k (default 5, quick 3)")
    parser.add_argument("--ks", type=_ks, default=VERIFY_KS, help="verify sizes, e.g. 1,2,4,8,16")
    parser.add_argument("--pairs", type=_pairs, help="sled backend/format list, e.g. torch/int8")
    parser.add_argument("--transformers-dtypes", type=_csv, help="subset of fp32,bf16; '' skips")
    parser.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--no-cold", action="store_true", help="skip cold loads (as --quick)")
    parser.add_argument("--child-timeout", type=float, default=1800.0, help="seconds per child")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def options_from(args: argparse.Namespace) -> Options:
    if args.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {args.threads}")
    light = args.quick or args.smoke
    tokens = args.tokens or (4 if args.smoke else 24 if args.quick else 64)
    repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 5)
    if tokens < 1 or repeats < 1:
        raise BenchError("--tokens and --repeats must be >= 1")
    default_pairs = (
        (("torch", "fp32"), ("torch", "int8"))
        if args.smoke
        else QUICK_SLED_PAIRS
        if args.quick
        else SLED_PAIRS
    )
    dtypes = (
        args.transformers_dtypes
        if args.transformers_dtypes is not None
        else QUICK_TRANSFORMERS_DTYPES
        if light
        else TRANSFORMERS_DTYPES
    )
    bad = [d for d in dtypes if d not in TRANSFORMERS_DTYPES]
    if bad:
        raise BenchError(
            f"transformers dtypes {bad} (choose from {', '.join(TRANSFORMERS_DTYPES)})"
        )
    return Options(
        model=args.model,
        threads=args.threads,
        quick=args.quick,
        decode_tokens=tokens,
        repeats=repeats,
        ks=args.ks,
        sled_pairs=args.pairs or default_pairs,
        transformers_dtypes=dtypes,
        llamacpp=not args.no_llamacpp,
        cold=not (args.no_cold or args.quick),
        child_timeout_s=args.child_timeout,
    )


def run_bench(opts: Options) -> dict[str, Any]:
    from models.registry import cache_root, resolve_model

    model_path = resolve_model(opts.model)
    prompt = prompt_ids(model_path)
    transformers_dir = transformers_cache_dir(model_path, cache_root() / "bench")
    transformers_dir.parent.mkdir(parents=True, exist_ok=True)
    targets = plan_targets(
        opts, gguf_file_type(model_path), (transformers_dir / "config.json").is_file()
    )
    runner = Runner(opts, model_path, prompt)
    log(
        f"{model_path.name}: prompt {len(prompt)} tokens, {opts.threads} threads on cores "
        f"{','.join(map(str, runner.cores))}, {len(targets)} rows"
    )
    load_before = os.getloadavg()[0]
    rows = []
    for i, target in enumerate(targets, 1):
        log(f"[{i}/{len(targets)}] {target.label}")
        row = runner.measure(target, transformers_dir)
        if row.note:
            log(f"{target.label}: {row.note}")
        rows.append(row)
    if opts.llamacpp and any(LLAMACPP_MISSING in r.note for r in rows):
        print(LLAMACPP_MISSING)
    load_avg = (round(load_before, 2), round(os.getloadavg()[0], 2))
    print(f"model {model_path.name}, prompt {len(prompt)} tokens, {opts.decode_tokens} decode "
          f"tokens, {opts.repeats} repeats per k, {opts.threads} threads on cores "
          f"{','.join(map(str, runner.cores))}; load average {load_avg[0]} before, "
          f"{load_avg[1]} after ({os.cpu_count()} cores: other work skews the figures)")  # fmt: skip
    print(format_tables(rows, opts.ks))
    figures = headline(rows, opts) | {"load_avg": load_avg}
    print()
    print(f"decode_vs_transformers {figures['decode_vs_transformers']} "
          f"(sled {figures['decode_format']} over transformers {figures['transformers_best']})")  # fmt: skip
    print(f"decode_vs_llamacpp {figures['decode_vs_llamacpp']}")
    print(f"verify_format {figures['verify_format']}: verify_cost {figures['verify_cost']}")
    print(json_line(figures))
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    from models.registry import RegistryError

    try:
        run_bench(options_from(args))
    except (BenchError, RegistryError) as exc:
        print(f"bench.decode: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
