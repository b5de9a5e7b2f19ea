"""The generate loop and `sled generate` on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agent.cli import main
from models.backend import Backend, load_backend
from models.generate import generate
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _backend(path: Path, fmt: str = "fp32") -> Backend:
    return load_backend(path, weights=fmt, use_cache=False, max_slots=2, max_len=256)


def _greedy_by_recompute(be: Backend, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding that re-runs the whole sequence each step (no KV cache reuse)."""
    seq = list(prompt)
    for _ in range(n):
        slot = be.cache.allocate()
        logits = be.forward([slot], [torch.tensor(seq)])[0][-1]
        be.cache.free(slot)
        seq.append(int(logits.argmax()))
    return seq[len(prompt) :]


def test_greedy_generate_equals_recompute(tiny_path: Path) -> None:
    be = _backend(tiny_path)
    prompt = [3, 17, 42, 5, 9, 11, 60, 2, 8]
    result = generate(be, prompt, SamplingParams(), max_tokens=20, prefill_chunk=4)
    assert list(result.tokens) == _greedy_by_recompute(be, prompt, 20)
    assert result.stats.stop_reason == "length" and result.stats.generated_tokens == 20
    assert result.stats.decode_steps == 19
    assert be.cache.slots == ()  # the slot was given back


def test_sampling_is_seeded(tiny_paths: dict[str, Path]) -> None:
    be = _backend(tiny_paths["qwen2"])
    prompt = [1, 2, 3, 4]

    def run(seed: int) -> tuple[int, ...]:
        params = SamplingParams(temperature=1.0, top_p=0.95, seed=seed)
        return generate(be, prompt, params, max_tokens=24).tokens

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_stop_ids_and_context_limit(tiny_paths: dict[str, Path]) -> None:
    be = _backend(tiny_paths["llama"])
    prompt = [5, 6, 7]
    first = generate(be, prompt, SamplingParams(), max_tokens=3).tokens
    stopped = generate(be, prompt, SamplingParams(), max_tokens=10, stop_ids={first[1]})
    assert stopped.tokens == first[:1] and stopped.stats.stop_reason == "stop"
    small = load_backend(tiny_paths["llama"], weights="fp32", use_cache=False, max_len=8)
    ctx = generate(small, prompt, SamplingParams(), max_tokens=50)
    assert ctx.stats.stop_reason == "context" and len(ctx.tokens) == 6
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(be, [], SamplingParams(), max_tokens=3)
    with pytest.raises(ValueError, match="at most 8"):
        generate(small, list(range(8)), SamplingParams(), max_tokens=3)
    segment = load_backend(tiny_paths["llama"], layers=(0, 2), weights="fp32", use_cache=False)
    with pytest.raises(ValueError, match="needs all 4 layers"):
        generate(segment, prompt, SamplingParams(), max_tokens=3)


def test_cli_generate_json(
    tiny_paths: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = tiny_paths["qwen2"]
    argv = ["generate", "--model", str(path), "--prompt", "def add(a, b):", "--max-tokens", "12"]
    argv += ["--backend", "torch"]
    assert main([*argv, "--json", "--weights", "fp32"]) == 0
    report = json.loads(capsys.readouterr().out)
    tok = Tokenizer.from_gguf(path)
    be = _backend(path)
    expected = generate(be, tok.encode("def add(a, b):"), SamplingParams(), 12, tok.stop_ids)
    assert report["tokens"] == list(expected.tokens)
    assert report["text"] == tok.decode(expected.tokens)
    assert report["weights"] == "fp32" and report["backend"] == "torch"
    assert report["decode_tokens_per_s"] > 0 and report["load_s"] > 0
    # The weight cache was filled under XDG_CACHE_HOME.
    assert list((tmp_path / "sled" / "weights").glob("*-fp32/block_0000.pt"))

    # Streaming mode, chat template, bf16 from a fresh cache: text on stdout, timings on stderr.
    assert main([*argv, "--chat", "--weights", "bf16", "--threads", "1"]) == 0
    out = capsys.readouterr()
    assert out.out.endswith("\n")
    assert "tok/s" in out.err and "load" in out.err and "torch bf16" in out.err


def test_cli_generate_errors(
    capsys: pytest.CaptureFixture[str], tiny_paths: dict[str, Path]
) -> None:
    assert main(["generate", "--model", "no-such-model", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "qwen2.5-coder-1.5b-instruct" in err
    path = str(tiny_paths["llama"])
    assert main(["generate", "--model", path, "--prompt", "hi", "--top-p", "0"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert main(["generate", "--model", path, "--prompt", "hi", "--weights", "int2"]) == 2
    assert "unknown weight format 'int2'" in capsys.readouterr().err
    assert main(["generate", "--model", path, "--prompt", "hi", "--max-tokens", "0"]) == 2
    assert "--max-tokens must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("draft", ["ngram", "model:LLAMA"])
def test_cli_generate_with_a_drafter_gives_the_same_text(
    tiny_paths: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    draft: str,
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    draft = draft.replace("LLAMA", str(tiny_paths["llama"]))  # shares tiny-qwen2's token ids
    argv = ["generate", "--model", str(tiny_paths["qwen2"]), "--prompt", "a b a b a b a b"]
    argv += ["--max-tokens", "30", "--backend", "torch", "--weights", "fp32", "--json"]
    assert main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*argv, "--draft", draft, "--draft-k", "3"]) == 0
    spec = json.loads(capsys.readouterr().out)
    assert spec["tokens"] == plain["tokens"]
    assert spec["speculative"]["drafted_tokens"] > 0
    assert spec["speculative"]["drafter"] == draft.split(":")[0]
    assert main([*argv, "--draft", "text:"]) == 2
    assert "needs a model" in capsys.readouterr().err
    assert main([*argv, "--draft", "model:" + str(tiny_paths["gemma3"])]) == 2
    assert "another vocabulary" in capsys.readouterr().err
