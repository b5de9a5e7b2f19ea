"""Decode speed of sled's backends against transformers and llama.cpp, side by side in one run.

Every engine gets the same token ids (a fixed chat prompt tokenized once by sled's GGUF
tokenizer), the same weights file, the same pinned cores and thread count, and runs in its own
child process, one after another. Per engine and weight format it reports: load time (cold and
cached), peak RSS of the child, greedy decode tokens/s (decode phase only, KV cache on, one warm-up
step first; 1 / the median step time), and the cost of one forward pass verifying k = 1, 2, 4, 8, 16 tokens after the
prompt, relative to k = 1.

Headline ratios: sled's fastest (backend, format) over transformers' fastest (dtype fp32 or bf16,
best thread count <= --threads) and over llama.cpp (its default build, --threads threads).
`verify_format` is the sled pair with the lowest cost per token at k = 8 (the largest k <= 8
measured); `verify_cost` is its curve. The last line of output is one JSON object.

Run: `python -m bench.decode [--quick] [--model NAME|PATH.gguf] [--threads N]`.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import (
    BenchError,
    json_line,
    pick_cores,
    pinned_command,
    python_module_command,
    ratio,
    run_child,
    thread_env,
)
from bench.decode_worker import (
    LLAMACPP,
    LLAMACPP_MISSING,
    SLED,
    TRANSFORMERS,
    Job,
    transformers_cache_dir,
    transformers_cached,
)

DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"
VERIFY_KS = (1, 2, 4, 8, 16)
VERIFY_REFERENCE_K = 8  # verify_format: lowest cost per token at this k
CONTENDED_SHARE = 0.8  # a row whose decode got less of its cores than this was slowed by others
SLED_PAIRS = (
    ("torch", "fp32"),
    ("torch", "bf16"),
    ("torch", "int8"),
    ("torch", "int4"),
    ("onnx", "fp32"),
    ("onnx", "int8"),
    ("onnx", "int4"),
)
# --quick: torch int4 decoded fastest and torch bf16 had the flattest verify curve in the full
# runs on this machine (docs/decode-bench.md); onnx int4 is what the design expects to lead.
QUICK_SLED_PAIRS = (("torch", "int4"), ("torch", "bf16"), ("onnx", "int4"))
TRANSFORMERS_DTYPES = ("fp32", "bf16")
# transformers bf16 decoded faster than fp32 in the full runs here (AVX-512 BF16), so it is
# the strongest baseline --quick can afford.
QUICK_TRANSFORMERS_DTYPES = ("bf16",)

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


# -- what the parent runs ----------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One row of the table: an engine and format, and whether its cold load is measured."""

    engine: str
    backend: str
    fmt: str
    measure_cold: bool
    thread_counts: tuple[int, ...]
    verify: bool = True

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
    baseline_verify: bool  # transformers' verify cost (for reference only; slow)
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
    decode_mean_tok_s: float | None = None
    cpu_share: float | None = None
    threads_probe: tuple[tuple[int, float], ...] = ()  # tok/s of a short decode per count
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
        counts = baseline_thread_counts(opts.threads)
        targets.append(Target(TRANSFORMERS, "", dtype, cold, counts, opts.baseline_verify))
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
        "contended": [r.target.label for r in measured if contended(r)],
        "model": opts.model,
        "quick": opts.quick,
    }


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_tables(rows: Sequence[Row], ks: Sequence[int]) -> str:
    """Two plain-text tables: load/memory/decode, and verify cost per k."""
    ref = reference_row(rows)
    head = ["engine/format", "threads (probe tok/s)", "load cold s", "load cached s", "peak RSS MB",
            "cold RSS MB", "decode tok/s", "mean tok/s", "CPU share", f"same tokens as {ref.target.label if ref else '-'}"]  # fmt: skip
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
                _cell(r.decode_mean_tok_s, ".2f"),
                _cell(r.cpu_share, ".2f") + ("*" if contended(r) else ""),
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
    note = ""
    if any(contended(r) for r in rows):
        note = (
            f"\n* used less than {CONTENDED_SHARE:.0%} of its cores while decoding: other work "
            "took them (speeds understated; see the load average) or the engine leaves threads "
            "idle"
        )
    return _table(lines) + note + "\n\n" + _table(verify_lines)


def contended(row: Row) -> bool:
    """The row's decode used clearly less CPU than its threads could (contention or idling)."""
    return row.cpu_share is not None and row.cpu_share < CONTENDED_SHARE


def _threads_cell(row: Row) -> str:
    """The thread count used, and tok/s at each count tried when there were several."""
    if len(row.threads_probe) < 2:
        return str(row.threads)
    tried = ", ".join(f"{t}: {s:.2f}" for t, s in row.threads_probe)
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
            ks=self.opts.ks if target.verify else (),
            cache_dir=cache_dir,
        )

    def child(self, job: Job) -> tuple[dict[str, Any], float]:
        """Run one job; its result and the child's peak RSS (MB)."""
        command = pinned_command(
            python_module_command("bench.decode_worker", [job.to_json()]), self.cores
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
        what = "verify" if target.verify else "no verify"
        log(f"{target.label}: load, decode {self.opts.decode_tokens} tokens, {what}")
        run, rss = self.child(self.job(target, "run", cache_dir))
        if "unavailable" in run:
            return Row(target, note=f"unavailable: {run['unavailable']}")
        cached_s: float | None = float(run["load_s"])
        if run["load_kind"] == "cold":  # nothing was cached: this load was the cold one
            cold_s, cold_rss, cached_s = cached_s, None, None
        return Row(
            target,
            load_cold_s=cold_s,
            load_cached_s=cached_s,
            cold_peak_rss_mb=cold_rss,
            peak_rss_mb=rss,
            decode_tok_s=float(run["decode_tok_s"]),
            decode_mean_tok_s=float(run["decode_mean_tok_s"]),
            cpu_share=float(run["cpu_share"]),
            threads_probe=tuple(
                sorted((int(t), float(s)) for t, s in run["threads_probe_tok_s"].items())
            ),
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
        epilog=textwrap.fill(
            "--quick (about a minute on an idle machine with caches filled) skips: cold loads "
            "(sled loads from the user's caches, reported as cold if it had to convert; "
            "transformers' GGUF conversion runs only when its cache is empty), the sled pairs "
            "other than "
            + ", ".join(f"{b}/{f}" for b, f in QUICK_SLED_PAIRS)
            + ", transformers dtypes other than "
            + "/".join(QUICK_TRANSFORMERS_DTYPES)
            + ", and transformers' verify costs; it times 16 decode tokens and 2 passes per k "
            "(k still up to 16). --smoke: tiny-model settings for tests (4 decode tokens, 1 "
            "repeat, sled torch/fp32, transformers fp32). Threads: sled and llama.cpp run at "
            "--threads; transformers gets its best count <= --threads (each count probed with "
            "a 6-token decode; torch fp32 with MKL can be slower on more threads). Decode tok/s "
            "is 1 / the median step time; the mean and the CPU share the process got are shown "
            "too, since other work on the machine skews single runs."
        ),
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry name or .gguf path")
    parser.add_argument("--threads", type=int, default=2, help="threads (and pinned cores)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the fast subset (see below)")
    mode.add_argument("--smoke", action="store_true", help="tiny-model settings for tests")
    parser.add_argument("--tokens", type=int, help="timed decode steps (default 64, quick 16)")
    parser.add_argument("--repeats", type=int, help="timed passes per k (default 5, quick 2)")
    parser.add_argument("--ks", type=_ks, default=VERIFY_KS, help="verify sizes, e.g. 1,2,4,8,16")
    parser.add_argument("--pairs", type=_pairs, help="sled backend/format list, e.g. torch/int8")
    parser.add_argument("--transformers-dtypes", type=_csv, help="subset of fp32,bf16; '' skips")
    parser.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out")
    parser.add_argument("--no-cold", action="store_true", help="skip cold loads (as --quick)")
    parser.add_argument("--child-timeout", type=float, default=1800.0, help="seconds per child")
    return parser


def options_from(args: argparse.Namespace) -> Options:
    if args.threads < 1:
        raise BenchError(f"--threads must be >= 1, got {args.threads}")
    tokens = args.tokens or (4 if args.smoke else 16 if args.quick else 64)
    repeats = args.repeats or (1 if args.smoke else 2 if args.quick else 5)
    if tokens < 1 or repeats < 1:
        raise BenchError("--tokens and --repeats must be >= 1")
    default_pairs = (
        (("torch", "fp32"),) if args.smoke else QUICK_SLED_PAIRS if args.quick else SLED_PAIRS
    )
    dtypes = (
        args.transformers_dtypes
        if args.transformers_dtypes is not None
        else ("fp32",)  # the exact reference for the tiny model's greedy tokens
        if args.smoke
        else QUICK_TRANSFORMERS_DTYPES
        if args.quick
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
        baseline_verify=not args.quick,
        child_timeout_s=args.child_timeout,
    )


def run_bench(opts: Options) -> dict[str, Any]:
    from models.registry import cache_root, resolve_model

    model_path = resolve_model(opts.model)
    prompt = prompt_ids(model_path)
    transformers_dir = transformers_cache_dir(model_path, cache_root() / "bench")
    cached = all(transformers_cached(transformers_dir, d) for d in opts.transformers_dtypes)
    targets = plan_targets(opts, gguf_file_type(model_path), cached)
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
    from models.registry import RegistryError

    try:
        run_bench(options_from(args))
    except (BenchError, RegistryError) as exc:
        print(f"bench.decode: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
