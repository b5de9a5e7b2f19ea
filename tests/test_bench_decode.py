"""bench/decode.py: its decisions, its child runner, and a smoke run on a tiny GGUF model."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from bench.common import BenchError, last_json_line, pick_cores, run_child
from bench.decode import (
    VERIFY_KS,
    Row,
    Target,
    baseline_thread_counts,
    best_row,
    build_parser,
    format_tables,
    headline,
    main,
    options_from,
    pick_verify_row,
)
from bench.decode_worker import (
    LLAMACPP,
    SLED,
    TRANSFORMERS,
    Job,
    SledStepper,
    draft_tokens,
    measure,
)
from models.backend import load_backend

HAS_LLAMACPP = importlib.util.find_spec("llama_cpp") is not None


def _row(engine: str, fmt: str, tok_s: float, verify: dict[int, float], backend: str = "") -> Row:
    target = Target(engine, backend, fmt, False, (2,))
    return Row(
        target,
        load_cached_s=1.0,
        peak_rss_mb=100.0,
        decode_tok_s=tok_s,
        threads=2,
        verify_ms=tuple(verify.items()),
        tokens=(1, 2, 3, 4),
    )


def test_baseline_thread_counts() -> None:
    assert baseline_thread_counts(1) == (1,)
    assert baseline_thread_counts(2) == (1, 2)
    assert baseline_thread_counts(6) == (1, 2, 4, 6)


def test_draft_tokens_pads_from_prompt() -> None:
    assert draft_tokens([7, 8, 9], [1, 2], 4) == [7, 8, 9, 1]
    assert draft_tokens([7, 8], [1], 5) == [7, 8, 1, 7, 8]


def test_job_round_trips_through_json() -> None:
    job = Job(SLED, "torch", "int8", "run", "/m.gguf", (1, 2, 3), 2, (1, 2), 8, 3, VERIFY_KS, "")
    assert Job.from_json(job.to_json()) == job
    assert job.max_len >= 3 + 8 + 16


def test_headline_picks_fastest_decoder_and_cheapest_verifier() -> None:
    rows = [
        _row(LLAMACPP, "Q4_K_M", 20.0, {1: 40.0, 8: 240.0}),
        _row(SLED, "int8", 10.0, {1: 100.0, 8: 300.0}, backend="torch"),
        _row(SLED, "bf16", 5.0, {1: 200.0, 8: 260.0}, backend="torch"),
        _row(TRANSFORMERS, "fp32", 2.0, {1: 500.0, 8: 900.0}),
        _row(TRANSFORMERS, "bf16", 4.0, {1: 300.0, 8: 700.0}),
        Row(Target(SLED, "onnx", "int4", False, (2,)), note="unavailable: not built"),
    ]
    opts = options_from(build_parser().parse_args(["--ks", "1,8"]))
    figures = headline(rows, opts)
    assert figures["decode_vs_transformers"] == 2.5  # 10 over transformers' best (4)
    assert figures["decode_vs_llamacpp"] == 0.5
    assert figures["decode_format"] == "torch/int8"
    assert figures["verify_format"] == "torch/bf16"  # 260 ms at k=8 beats 300 ms
    assert figures["verify_cost"] == {"1": 1.0, "8": 1.3}
    assert figures["transformers_best"] == "bf16 @2 threads"
    assert "sled onnx/int4" not in figures["peak_rss_mb"]
    assert figures["contended"] == []
    assert best_row(rows, "nothing") is None
    assert pick_verify_row(rows[:1], (1, 8)) is None  # no sled row measured


def test_rows_slowed_by_other_work_are_flagged() -> None:
    busy = dataclasses.replace(_row(SLED, "int8", 10.0, {1: 100.0}, backend="torch"), cpu_share=0.4)
    quiet = dataclasses.replace(_row(LLAMACPP, "Q4_K_M", 20.0, {1: 40.0}), cpu_share=0.97)
    figures = headline([busy, quiet], options_from(build_parser().parse_args([])))
    assert figures["contended"] == ["sled torch/int8"]
    text = format_tables([busy, quiet], (1,))
    assert "0.40*" in text and "0.97*" not in text and "understated" in text


def test_headline_without_baselines_gives_null_ratios() -> None:
    rows = [_row(SLED, "int8", 10.0, {1: 100.0, 8: 300.0}, backend="torch")]
    figures = headline(rows, options_from(build_parser().parse_args([])))
    assert figures["decode_vs_transformers"] is None
    assert figures["decode_vs_llamacpp"] is None


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--pairs", "torch"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--ks", "2,4"])  # no k = 1 to compare against
    with pytest.raises(BenchError, match="transformers dtypes"):
        options_from(build_parser().parse_args(["--transformers-dtypes", "fp16"]))
    with pytest.raises(BenchError, match="cores"):
        pick_cores(10_000)


def test_last_json_line_errors() -> None:
    assert last_json_line('log\n{"a": 1}\n\n') == {"a": 1}
    with pytest.raises(BenchError, match="not JSON"):
        last_json_line('{"a": 1}\ntrailing words')
    with pytest.raises(BenchError, match="no output"):
        last_json_line("  \n")


def test_run_child_reports_the_childs_own_peak_rss() -> None:
    # 200 MiB written (so resident), held a little longer than one poll of the runner.
    grow = "import time; b = b'x' * (200 << 20); time.sleep(0.3); print('{\"ok\": true}')"
    big = run_child([sys.executable, "-c", grow], timeout_s=60)
    small = run_child([sys.executable, "-c", "print('{}')"], timeout_s=60)
    assert big.last_json() == {"ok": True}
    assert big.peak_rss_mb > 200 > small.peak_rss_mb
    failed = run_child([sys.executable, "-c", "raise SystemExit('bad input')"], timeout_s=60)
    with pytest.raises(BenchError, match="status 1.*bad input"):
        failed.last_json()
    slow = run_child([sys.executable, "-c", "import time; time.sleep(30)"], timeout_s=0.5)
    assert slow.timed_out and slow.wall_s < 10
    with pytest.raises(BenchError, match="timed out"):
        slow.last_json()


def test_measure_restores_the_cache_and_decodes_greedily(tiny_paths: dict[str, Path]) -> None:
    backend = load_backend(tiny_paths["qwen2"], weights="fp32", max_slots=2, use_cache=False)
    stepper = SledStepper(backend)
    prompt = tuple(range(3, 40))
    job = Job(SLED, "torch", "fp32", "run", "", prompt, 1, (1,), 6, 2, (1, 2, 4), "")
    result = measure(stepper, job, torch.set_num_threads)
    assert backend.cache.length(stepper.slot) == len(prompt)  # verify passes were rolled back
    assert set(result["verify_ms"]) == {"1", "2", "4"}
    assert all(ms > 0 for ms in result["verify_ms"].values())
    tokens = result["tokens"]
    assert len(tokens) == 6 + 2
    assert result["threads"] == 1 and result["threads_probe_tok_s"] == {}
    # The same greedy continuation from one full pass over prompt + tokens (no cache tricks).
    slot = backend.cache.allocate()
    logits = backend.forward([slot], [torch.tensor(list(prompt) + tokens[:-1])])[0]
    assert logits[len(prompt) - 1 :].argmax(dim=-1).tolist() == tokens


def test_smoke_run_on_tiny_model(
    tiny_paths: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # children inherit it
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["--model", str(tiny_paths["qwen2"]), "--smoke", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    figures = json.loads(out.strip().splitlines()[-1])
    for key in ("decode_vs_transformers", "decode_vs_llamacpp", "verify_cost", "load_s"):
        assert key in figures
    assert figures["verify_cost"]["1"] == 1.0
    assert set(figures["verify_cost"]) == {str(k) for k in VERIFY_KS}
    assert figures["verify_format"] == "torch/fp32"
    assert figures["decode_vs_transformers"] > 0
    loads = figures["load_s"]
    assert loads["sled torch/fp32"]["cold"] > 0 and loads["sled torch/fp32"]["cached"] > 0
    assert loads["transformers fp32"]["cold"] > 0 and loads["transformers fp32"]["cached"] > 0
    assert all(mb > 50 for mb in figures["peak_rss_mb"].values())
    # Every engine decodes the same greedy tokens from the same weights (fp32 reference).
    assert figures["greedy_match"]["reference"] == "transformers fp32"
    assert figures["greedy_match"]["sled torch/fp32"] == 1.0
    if HAS_LLAMACPP:
        assert figures["decode_vs_llamacpp"] > 0
        assert figures["greedy_match"]["llama.cpp Q8_0"] == 1.0
    else:
        assert figures["decode_vs_llamacpp"] is None
        assert "llama.cpp: missing" in out
    assert "decode tok/s" in out and "k=16 ms" in out
    # transformers' conversion was cached (every dtype) under the temporary XDG cache only.
    (converted,) = (tmp_path / "cache" / "sled" / "bench" / "transformers").iterdir()
    assert sorted(p.name for p in converted.iterdir()) == ["bf16", "fp32"]
    assert "CPU share" in out


def test_worker_refuses_a_bad_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.decode_worker import main as worker_main

    assert worker_main([]) == 2
    assert "usage" in capsys.readouterr().err


def test_measure_probes_thread_counts_and_can_skip_verify(tiny_paths: dict[str, Path]) -> None:
    backend = load_backend(tiny_paths["qwen2"], weights="fp32", max_slots=1, use_cache=False)
    job = Job(SLED, "torch", "fp32", "run", "", tuple(range(3, 20)), 2, (1, 2), 4, 1, (), "")
    result = measure(SledStepper(backend), job, torch.set_num_threads)
    assert set(result["threads_probe_tok_s"]) == {"1", "2"}
    assert result["threads"] in (1, 2) and result["verify_ms"] == {}
    assert result["decode_tok_s"] > 0 and result["cpu_share"] > 0
