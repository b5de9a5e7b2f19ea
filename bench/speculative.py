"""Speculative decoding across peers, measured side by side in one run.

    python -m bench.speculative [--quick]

Every configuration is a real cluster of `sled run` processes started with the harness, the
verifier pinned to one core and the drafter nodes to the other (as separate devices), one
forward thread each; requests go to the verifier's OpenAI API. On this 2-core machine every
drafter process shares the second core.

0. The target's cost of a pass by tokens in it, per weight format (a child pinned to the
   verifier's core); the verifier format is chosen from it for batched verification.
(b) Single session: tokens/s after the first token, target-only (the format fastest for one
   token) vs speculative per drafter kind, greedy and temperature 0.7, over the mixed prompt
   set in bench/speculative_prompts.json (every set-up up at once and asked in turn, prompt
   by prompt, so other load on the machine falls on all alike); acceptance rates; greedy text
   checked against target-only on the verifier's format. llama.cpp target-only vs its own
   prompt lookup on the same prompt ids, same core, for reference.
(a) Capacity: 1..16 concurrent sessions, each drafted on its own drafter process, verified in
   batches; the same sessions verified one by one; a centralized server drafting and verifying
   every session itself. Aggregate tokens/s, p50/p95 per-token latency, and the sessions each
   sustains within a latency bound (2x the SLED verifier's one-session p50 per-token latency).
(c) Memory: one verifier's target for all sessions vs a target per device (peak RSS).

The last line is JSON: {"speedup": {KIND: R}, "speedup_code_edit": {KIND: R},
"acceptance": {KIND: A}, "capacity_vs_centralized": R, "batched_vs_serial_8": R, ...}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from agent.harness import Harness, HarnessState, wait_for_drafters
from bench.common import (
    BenchError,
    json_line,
    last_json_line,
    pinned_command,
    python_module_command,
    ratio,
    run_child,
    thread_env,
    vm_hwm_mb,
)
from bench.speculative_worker import TARGET, load_prompts

VERIFIER_CORE, DRAFTER_CORE = 0, 1
LATENCY_BOUND = 2.0  # x the batched verifier's per-token latency serving one drafted session


# -- clusters -------------------------------------------------------------------------------


def pin(pid: int, core: int) -> None:
    """Pin every thread of a process (torch's pool is made before we can pin at exec)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(task.name), {core})


@dataclass
class Cluster:
    """A harness cluster: node-0 verifies, node-1.. draft (when any)."""

    name: str
    harness: Harness
    state: HarnessState
    drafters: int
    rss_mb: dict[str, float] = field(default_factory=dict)

    @property
    def verifier(self) -> Any:
        return self.state.nodes[0]

    def pin(self) -> None:
        pin(self.state.nodes[0].pid, VERIFIER_CORE)
        for node in self.state.nodes[1:]:
            pin(node.pid, DRAFTER_CORE)

    def record_rss(self) -> None:
        for node in self.state.nodes:
            self.rss_mb[node.name] = max(self.rss_mb.get(node.name, 0.0), vm_hwm_mb(node.pid) or 0)

    def down(self) -> None:
        self.record_rss()
        self.harness.down(timeout=30.0)


def start_cluster(
    name: str,
    root: Path,
    verifier: Mapping[str, str],
    drafters: int = 0,
    drafter: str = "",
    drafter_weights: str = "bf16",
    timeout: float = 900.0,
) -> Cluster:
    harness = Harness(root / name / "state.json")
    common = {
        "threads": "1",
        "backend": "torch",
        "replicas": "1",
        "max_len": "2048",
        "probe": "false",  # one verifier: nothing to rank, and no extra load at start
    }
    options: list[dict[str, str]] = [dict(verifier)]
    for _ in range(drafters):
        options.append(
            {
                "role": "drafter",
                "drafter": drafter,
                "drafter_weights": drafter_weights,
                "memory_budget": "64M",
            }
        )
    print(f"[{name}] starting {1 + drafters} nodes ...", file=sys.stderr)
    start = time.perf_counter()
    state = harness.up(1 + drafters, TARGET, common, options, timeout)
    cluster = Cluster(name, harness, state, drafters)
    try:
        if drafters:
            names = [n.name for n in state.nodes[1:]]
            wait_for_drafters(state.nodes, TARGET, names, timeout)
        cluster.pin()
    except BaseException:
        cluster.down()
        raise
    print(f"[{name}] up in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return cluster


# -- requests -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    kind: str
    text: str
    tokens: int
    first_s: float  # from request to first token
    decode_s: float  # from first to last token
    usage: dict[str, Any]

    @property
    def per_token_s(self) -> float:
        return self.decode_s / (self.tokens - 1) if self.tokens > 1 else float("nan")


async def ask(
    http: aiohttp.ClientSession,
    api: str,
    prompt: Mapping[str, str],
    max_tokens: int,
    temperature: float,
    seed: int,
) -> Reply:
    body = {
        "model": TARGET,
        "messages": [{"role": "user", "content": prompt["prompt"]}],
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = last = None
    pieces: list[str] = []
    usage: dict[str, Any] = {}
    async with http.post(api + "/v1/chat/completions", json=body) as resp:
        if resp.status != 200:
            raise BenchError(f"{api}: HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    now = time.perf_counter()
                    first = now if first is None else first
                    last = now
                    pieces.append(text)
    if first is None or last is None:
        raise BenchError(f"{api}: no tokens for {prompt['prompt'][:40]!r}")
    return Reply(
        prompt["kind"],
        "".join(pieces),
        int(usage.get("completion_tokens", 0)),
        first - start,
        last - first,
        usage,
    )


def run_requests(
    api: str,
    prompts: Sequence[Mapping[str, str]],
    max_tokens: int,
    temperature: float,
    concurrent: bool,
    first_seed: int = 0,
) -> tuple[list[Reply], float]:
    """Replies to the prompts (all at once, or one after another) and the wall time; prompt i
    is sampled with seed first_seed + i."""

    async def go() -> tuple[list[Reply], float]:
        timeout = aiohttp.ClientTimeout(total=3600)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            start = time.perf_counter()
            if concurrent:
                replies = await asyncio.gather(
                    *(
                        ask(http, api, p, max_tokens, temperature, seed=first_seed + i)
                        for i, p in enumerate(prompts)
                    )
                )
            else:
                replies = [
                    await ask(http, api, p, max_tokens, temperature, seed=first_seed + i)
                    for i, p in enumerate(prompts)
                ]
            return list(replies), time.perf_counter() - start

    return asyncio.run(go())


def tokens_per_s(replies: Sequence[Reply], kinds: Sequence[str] | None = None) -> float:
    chosen = [r for r in replies if kinds is None or r.kind in kinds]
    tokens = sum(r.tokens - 1 for r in chosen)
    seconds = sum(r.decode_s for r in chosen)
    return tokens / seconds if seconds > 0 else 0.0


def acceptance(replies: Sequence[Reply]) -> float:
    drafted = accepted = 0
    for r in replies:
        spec = r.usage.get("sled", {}).get("speculative", {})
        drafted += int(spec.get("drafted_tokens", 0))
        accepted += int(spec.get("accepted_tokens", 0))
    return accepted / drafted if drafted else 0.0


def tokens_per_step(replies: Sequence[Reply]) -> float:
    steps = sum(
        int(r.usage.get("sled", {}).get("speculative", {}).get("verify_steps", 0)) for r in replies
    )
    accepted = sum(
        int(r.usage.get("sled", {}).get("speculative", {}).get("accepted_tokens", 0))
        for r in replies
    )
    return (accepted + steps) / steps if steps else 0.0


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(v for v in values if v == v)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


# -- parts ----------------------------------------------------------------------------------


def cost_curves(formats: Sequence[str], repeats: int) -> dict[str, dict[str, float]]:
    out = {}
    for weights in formats:
        command = pinned_command(
            python_module_command(
                "bench.speculative_worker",
                ["cost", "--weights", weights, "--threads", "1", "--repeats", str(repeats)],
            ),
            [VERIFIER_CORE],
        )
        result = run_child(command, env=thread_env(1), timeout_s=1800).last_json()
        out[weights] = {k: float(v) for k, v in result["ms"].items()}
        print(f"[cost] {weights}: {out[weights]}", file=sys.stderr)
    return out


def best_format(curves: Mapping[str, Mapping[str, float]], shape: str) -> str:
    return min(curves, key=lambda w: curves[w][shape])


TYPICAL_ACCEPTANCE = 0.6  # per drafted token, for choosing a single-session verifier format


def best_single_verifier(curves: Mapping[str, Mapping[str, float]]) -> str:
    """The format with the most expected tokens per second for one session drafting k tokens
    (k = 0, 1, 2, 4, 8 at a typical acceptance): verification of a few tokens, not one."""
    from models.speculative import expected_tokens

    def rate(weights: str) -> float:
        ms = curves[weights]
        return max(
            expected_tokens(TYPICAL_ACCEPTANCE, t - 1) / ms[f"1x{t}"]
            for t in (1, 2, 3, 5, 9)
            if f"1x{t}" in ms
        )

    return max(curves, key=rate)


def single_session(
    root: Path,
    prompts: Sequence[Mapping[str, str]],
    kinds: Sequence[str],
    baseline_weights: str,
    verifier_weights: str,
    max_tokens: int,
    temperatures: Sequence[float],
    drafter_weights: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """(b): per kind and temperature, the replies over the prompt set (`extra`: more drafter
    node set-ups by label, e.g. {"old": "feature:PATH"})."""
    configs: dict[str, tuple[dict[str, str], int, str]] = {
        "target": ({"speculative": "false", "weights": baseline_weights, "drafter": "none"}, 0, ""),
        "ngram": ({"weights": verifier_weights, "drafter": "ngram"}, 0, ""),
        "text": ({"weights": verifier_weights, "drafter": "none"}, 1, "text:gemma3-270m"),
        "trained": ({"weights": verifier_weights, "drafter": "none"}, 1, "trained"),
        "feature": ({"weights": verifier_weights, "drafter": "none"}, 1, "feature"),
    }
    for label, spec in (extra or {}).items():  # --kinds LABEL=SPEC: another drafter node
        configs[label] = ({"weights": verifier_weights, "drafter": "none"}, 1, spec)
    if baseline_weights != verifier_weights:  # target-only on the verifier's format too
        configs["target_verifier_format"] = (
            {"speculative": "false", "weights": verifier_weights, "drafter": "none"},
            0,
            "",
        )
    order = [
        "target",
        *kinds,
        *(["target_verifier_format"] if "target_verifier_format" in configs else []),
    ]
    clusters: dict[str, Cluster] = {}
    out: dict[str, Any] = {}
    try:
        for kind in order:  # all set-ups up at once; only the one being asked does any work
            options, drafters, drafter = configs[kind]
            cluster = start_cluster(
                f"single-{kind}", root, options, drafters, drafter, drafter_weights
            )
            clusters[kind] = cluster
            run_requests(cluster.verifier.api, prompts[:1], 8, 0.0, concurrent=False)  # warm-up
            cluster.pin()
        for temperature in temperatures:
            replies: dict[str, list[Reply]] = {kind: [] for kind in order}
            # Prompt by prompt, every set-up in turn: load from other work on the machine falls
            # on all of them alike instead of on whichever set-up was running at the time.
            for i, prompt in enumerate(prompts):
                for kind in order:
                    got, _ = run_requests(
                        clusters[kind].verifier.api, [prompt], max_tokens, temperature, False, i
                    )
                    replies[kind] += got
            for kind in order:
                out.setdefault(kind, {})[str(temperature)] = replies[kind]
                print(
                    f"[single {kind} T={temperature}] {tokens_per_s(replies[kind]):.2f} tok/s, "
                    f"acceptance {acceptance(replies[kind]):.2f}, "
                    f"{tokens_per_step(replies[kind]):.2f} tokens/step",
                    file=sys.stderr,
                )
        for kind, cluster in clusters.items():
            cluster.record_rss()
            out[kind + "_rss_mb"] = dict(cluster.rss_mb)
    finally:
        for cluster in clusters.values():
            cluster.down()
    return out


def capacity(
    root: Path,
    prompts: Sequence[Mapping[str, str]],
    counts: Sequence[int],
    verifier_weights: str,
    drafter: str,
    max_tokens: int,
    drafter_weights: str,
) -> dict[str, Any]:
    """(a): SLED batched, one by one, centralized, at each session count."""
    most = max(counts)
    verifier = {"weights": verifier_weights, "drafter": "none", "max_sessions": str(most)}
    cluster = start_cluster("capacity-sled", root, verifier, most, drafter, drafter_weights)
    try:
        # One by one, the aggregate rate is one session's whatever n is: measured at the
        # smallest count and at 8 sessions (the ratio the issue asks for), not at every n.
        sled, one_by_one = _sweep(cluster, "sled", prompts, counts, max_tokens, (min(counts), 8))
        cluster.record_rss()
        rss = dict(cluster.rss_mb)
    finally:
        cluster.down()
    central = {
        "weights": verifier_weights,
        "drafter": drafter,
        "drafter_weights": drafter_weights,
        "max_sessions": str(most),
    }
    cluster = start_cluster("capacity-centralized", root, central)
    try:
        centralized, _ = _sweep(cluster, "centralized", prompts, counts, max_tokens)
    finally:
        cluster.down()
    rows = {"sled": sled, "one_by_one": one_by_one, "centralized": centralized}
    return {"rows": rows, "rss_mb": rss}


def _sweep(
    cluster: Cluster,
    name: str,
    prompts: Sequence[Mapping[str, str]],
    counts: Sequence[int],
    max_tokens: int,
    serial_at: Sequence[int] = (),
) -> tuple[dict[int, dict[str, float]], dict[int, dict[str, float]]]:
    """n concurrent sessions for each n in counts (and the same n one after another where n
    is in serial_at): a row of figures per n."""
    concurrent: dict[int, dict[str, float]] = {}
    serial: dict[int, dict[str, float]] = {}
    run_requests(cluster.verifier.api, prompts[:1], 8, 0.0, concurrent=False)  # warm-up
    for n in counts:
        batch = [prompts[i % len(prompts)] for i in range(n)]
        cluster.pin()
        replies, wall = run_requests(cluster.verifier.api, batch, max_tokens, 0.0, True)
        concurrent[n] = _row(replies, wall)
        print(f"[capacity {name} n={n}] {concurrent[n]}", file=sys.stderr)
        if n in serial_at:
            replies, wall = run_requests(cluster.verifier.api, batch, max_tokens, 0.0, False)
            serial[n] = _row(replies, wall)
            print(f"[capacity one by one n={n}] {serial[n]}", file=sys.stderr)
    return concurrent, serial


def _row(replies: Sequence[Reply], wall: float) -> dict[str, float]:
    tokens = sum(r.tokens for r in replies)
    latencies = [r.per_token_s for r in replies]
    return {
        "aggregate_tok_s": round(tokens / wall, 3),
        "p50_ms": round(1000 * percentile(latencies, 0.5), 1),
        "p95_ms": round(1000 * percentile(latencies, 0.95), 1),
        "acceptance": round(acceptance(replies), 3),
    }


def sustained(rows: Mapping[int, Mapping[str, float]], bound_ms: float) -> int:
    """The most sessions whose p95 per-token latency stays within the bound."""
    return max((n for n, row in rows.items() if row["p95_ms"] <= bound_ms), default=0)


def capacity_figures(
    rows: Mapping[str, Mapping[int, Mapping[str, float]]],
) -> tuple[float, dict[str, int], float | None]:
    """(latency bound, sessions each set-up sustains within it, SLED over centralized).

    The bound is LATENCY_BOUND x the p50 per-token latency of the SLED verifier serving one
    drafted session: the same latency for both set-ups, so the ratio says how many more
    sessions SLED serves at it."""
    bound = LATENCY_BOUND * rows["sled"][min(rows["sled"])]["p50_ms"]
    held = {name: sustained(r, bound) for name, r in rows.items()}
    return bound, held, ratio(held["sled"], held["centralized"]) if held["centralized"] else None


def rescore(log: Path, out: Path) -> int:
    """Recompute the capacity figures of a finished run from its report (stderr) and headline
    (stdout) with this script's current definitions, and print the headline again."""
    text = log.read_text()
    report = json.loads(text[text.rindex("\n{") + 1 :])
    headline = last_json_line(out.read_text().replace("rc=0", ""))
    rows = {
        name: {int(n): row for n, row in r.items()}
        for name, r in report["capacity"]["rows"].items()
    }
    bound, held, capacity_ratio = capacity_figures(rows)
    print(
        json.dumps({"latency_bound_ms": round(bound, 1), "sessions_within_bound": held}),
        file=sys.stderr,
    )
    print(json_line({**headline, "capacity_vs_centralized": capacity_ratio}))
    return 0


def llamacpp_reference(max_tokens: int, k: int) -> dict[str, Any] | None:
    command = pinned_command(
        python_module_command(
            "bench.speculative_worker",
            ["llamacpp", "--threads", "1", "--max-tokens", str(max_tokens), "--k", str(k)],
        ),
        [VERIFIER_CORE],
    )
    result = run_child(command, env=thread_env(1), timeout_s=3600)
    if result.returncode != 0:
        print(f"[llama.cpp] unavailable: {result.stderr_tail()}", file=sys.stderr)
        return None
    return result.last_json()


def _llama_rate(rows: Sequence[Mapping[str, Any]], kinds: Sequence[str] | None = None) -> float:
    chosen = [r for r in rows if kinds is None or r["kind"] in kinds]
    tokens = sum(int(r["tokens"]) - 1 for r in chosen)
    seconds = sum(
        (int(r["tokens"]) - 1) / float(r["tokens_per_s"]) for r in chosen if r["tokens_per_s"]
    )
    return tokens / seconds if seconds else 0.0


# -- the report -----------------------------------------------------------------------------


def plot(
    path: Path, cap: Mapping[str, Any], speedups: Mapping[str, Mapping[str, float | None]]
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[plot] matplotlib is not installed; no plot", file=sys.stderr)
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in cap["rows"].items():
        ns = sorted(rows)
        left.plot(
            ns, [rows[n]["aggregate_tok_s"] for n in ns], marker="o", label=name.replace("_", " ")
        )
    left.set_xlabel("concurrent sessions")
    left.set_ylabel("aggregate tokens/s")
    left.set_xscale("log", base=2)
    left.set_title("verifier capacity (verifier: 1 core, drafters: 1 core)")
    left.legend()
    labels = list(speedups["mixed"])
    xs = range(len(labels))
    right.bar(
        [x - 0.2 for x in xs], [speedups["mixed"][k] or 0 for k in labels], 0.4, label="mixed set"
    )
    right.bar(
        [x + 0.2 for x in xs],
        [speedups["code_edit"][k] or 0 for k in labels],
        0.4,
        label="code edits",
    )
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xticks(list(xs), labels)
    right.set_ylabel("speedup over target-only")
    right.set_title("single session, greedy")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def missing_drafter_files(kinds: Sequence[str]) -> dict[str, str]:
    """The trained kinds among `kinds` whose drafter file is not at its default path, with why."""
    from models.feature_drafter import default_feature_drafter_path
    from models.trained_drafter import default_drafter_path

    files = {
        "trained": (default_drafter_path(TARGET), ""),
        "feature": (default_feature_drafter_path(TARGET), " --kind feature"),
    }
    return {
        kind: f"no drafter file at {path}: run `sled models train-drafter --target {TARGET}{flag}`"
        for kind, (path, flag) in files.items()
        if kind in kinds and not path.is_file()
    }


def capacity_drafter(kinds: Sequence[str]) -> str:
    """The drafter of (a): the feature drafter, else the trained one, when measured in (b)."""
    return next((k for k in ("feature", "trained") if k in kinds), "text:gemma3-270m")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.speculative", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer prompts, tokens and sessions")
    parser.add_argument(
        "--kinds",
        default="ngram,text,trained,feature",
        help="drafter kinds for (b); LABEL=SPEC adds a drafter node spec (e.g. old=feature:PATH)",
    )
    parser.add_argument("--sessions", default=None, help="session counts for (a), e.g. 1,2,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--formats", default="int4,bf16", help="verifier weight formats to measure")
    parser.add_argument("--drafter-weights", default="int4")
    parser.add_argument("--capacity-drafter", default=None, help="drafter spec for (a)")
    parser.add_argument("--skip", default="", help="parts to skip: single,capacity,llamacpp")
    parser.add_argument("--plot", type=Path, default=Path(__file__).with_name("speculative.png"))
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--rescore",
        nargs=2,
        type=Path,
        metavar=("STDERR", "STDOUT"),
        help="recompute the headline of a finished run from its saved output",
    )
    args = parser.parse_args(argv)
    if args.rescore:
        return rescore(*args.rescore)
    if len(os.sched_getaffinity(0)) < 2:
        raise BenchError("needs 2 cores: the verifier on one, drafters on the other")

    quick = args.quick
    prompts = load_prompts()
    if quick:
        seen: set[str] = set()
        prompts = [p for p in prompts if not (p["kind"] in seen or seen.add(p["kind"]))]  # type: ignore[func-returns-value]
    max_tokens = args.max_tokens or (48 if quick else 64)
    counts = [int(x) for x in (args.sessions or ("1,2,4,8" if quick else "1,2,4,8,16")).split(",")]
    skip = set(filter(None, args.skip.split(",")))
    entries = [k for k in args.kinds.split(",") if k]
    extra = dict(k.split("=", 1) for k in entries if "=" in k)
    kinds = [k.partition("=")[0] for k in entries]
    unknown = sorted(set(kinds) - {"ngram", "text", "trained", "feature"} - set(extra))
    if unknown:
        parser.error(f"unknown drafter kinds {unknown}: use ngram, text, trained, feature")
    for kind, why in missing_drafter_files(kinds).items():
        print(f"[single] skipping {kind}: {why}", file=sys.stderr)
        kinds.remove(kind)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="sled-bench-spec-"))
    started = time.perf_counter()

    for weights in {args.drafter_weights}:  # many drafter nodes load gemma at once: convert once
        command = python_module_command(
            "bench.speculative_worker", ["warm", "--model", "gemma3-270m", "--weights", weights]
        )
        run_child(command, env=thread_env(1), timeout_s=1800).last_json()
    curves = cost_curves(args.formats.split(","), repeats=3 if quick else 5)
    baseline_weights = best_format(curves, "1x1")
    single_weights = best_single_verifier(curves)
    batch_weights = best_format(curves, "8x3")
    print(
        f"[choice] target-only: {baseline_weights}; single-session verifier: {single_weights}; "
        f"batched verifier: {batch_weights}",
        file=sys.stderr,
    )

    report: dict[str, Any] = {"cost_ms": curves}
    speedup: dict[str, float | None] = {}
    speedup_edit: dict[str, float | None] = {}
    speedup_t07: dict[str, float | None] = {}
    accept: dict[str, float] = {}
    temps = [0.0] if quick else [0.0, 0.7]
    if "single" not in skip:
        single = single_session(
            root, prompts, kinds, baseline_weights, single_weights, max_tokens, temps,
            args.drafter_weights, extra,
        )  # fmt: skip
        base = single["target"]["0.0"]
        same_format = single.get("target_verifier_format", single["target"])["0.0"]
        report["single"] = {}
        for kind in kinds:
            greedy = single[kind]["0.0"]
            speedup[kind] = ratio(tokens_per_s(greedy), tokens_per_s(base))
            speedup_edit[kind] = ratio(
                tokens_per_s(greedy, ["code_edit"]), tokens_per_s(base, ["code_edit"])
            )
            accept[kind] = round(acceptance(greedy), 3)
            if "0.7" in single[kind]:
                speedup_t07[kind] = ratio(
                    tokens_per_s(single[kind]["0.7"]), tokens_per_s(single["target"]["0.7"])
                )
            identical = all(a.text == b.text for a, b in zip(greedy, same_format, strict=True))
            report["single"][kind] = {
                "tok_s": round(tokens_per_s(greedy), 3),
                "tok_s_code_edit": round(tokens_per_s(greedy, ["code_edit"]), 3),
                "tokens_per_verify_step": round(tokens_per_step(greedy), 3),
                "greedy_text_identical": identical,
                "rss_mb": single[kind + "_rss_mb"],
            }
        report["single"]["target"] = {
            "weights": baseline_weights,
            "tok_s": round(tokens_per_s(base), 3),
            "tok_s_code_edit": round(tokens_per_s(base, ["code_edit"]), 3),
            "rss_mb": single["target_rss_mb"],
        }
        if speedup_t07:
            report["speedup_temperature_0.7"] = speedup_t07
    if "llamacpp" not in skip:
        ref = llamacpp_reference(max_tokens, k=3)
        if ref is not None:
            rows = ref["results"]
            report["llamacpp"] = {
                "target_tok_s": round(_llama_rate(rows["target"]), 3),
                "prompt_lookup_speedup": ratio(
                    _llama_rate(rows["prompt_lookup"]), _llama_rate(rows["target"])
                ),
                "prompt_lookup_speedup_code_edit": ratio(
                    _llama_rate(rows["prompt_lookup"], ["code_edit"]),
                    _llama_rate(rows["target"], ["code_edit"]),
                ),
            }
            print(f"[llama.cpp] {report['llamacpp']}", file=sys.stderr)

    capacity_ratio = batched_ratio = None
    if "capacity" not in skip:
        drafter = args.capacity_drafter or capacity_drafter(kinds)
        cap = capacity(
            root, prompts, counts, batch_weights, drafter, max_tokens, args.drafter_weights
        )
        bound, held, capacity_ratio = capacity_figures(cap["rows"])
        top = 8 if 8 in counts else max(counts)
        serial = cap["rows"]["one_by_one"]
        serial_top = serial.get(top) or serial[min(counts)]
        batched_ratio = ratio(
            cap["rows"]["sled"][top]["aggregate_tok_s"], serial_top["aggregate_tok_s"]
        )
        verifier_mb = cap["rss_mb"].get("node-0", 0.0)
        drafter_mbs = [v for k, v in cap["rss_mb"].items() if k != "node-0"]
        target_mb = report.get("single", {}).get("target", {}).get("rss_mb", {}).get("node-0")
        report["capacity"] = {
            "drafter": drafter,
            "verifier_weights": batch_weights,
            "latency_bound_ms": round(bound, 1),
            "sessions_within_bound": held,
            "rows": {
                name: {str(n): row for n, row in rows.items()} for name, rows in cap["rows"].items()
            },
        }
        report["memory_mb"] = {
            "verifier": round(verifier_mb, 1),
            "drafter_each": round(statistics.mean(drafter_mbs), 1) if drafter_mbs else None,
            "target_only_node": None if target_mb is None else round(target_mb, 1),
            f"one_target_for_{max(counts)}_sessions": round(verifier_mb, 1),
            f"a_target_per_device_x{max(counts)}": None
            if target_mb is None
            else round(target_mb * max(counts), 1),
        }
        if speedup:
            plotted = plot(args.plot, cap, {"mixed": speedup, "code_edit": speedup_edit})
            report["plot"] = str(args.plot) if plotted else None
    report["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1), file=sys.stderr)
    headline = {
        "speedup": speedup,
        "speedup_code_edit": speedup_edit,
        "acceptance": accept,
        "capacity_vs_centralized": capacity_ratio,
        "batched_vs_serial_8": batched_ratio,
        "llamacpp_prompt_lookup_speedup": report.get("llamacpp", {}).get("prompt_lookup_speedup"),
        "quick": quick,
    }
    print(json_line(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
