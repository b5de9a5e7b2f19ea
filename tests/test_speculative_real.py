"""Speculative decoding on real weights: the text equals target-only, greedy and seeded.

Gemma 3 270M as the target runs in CI (fp32, prompt lookup); the Qwen target with the Gemma
drafter through text is slow (its fp32 weights take minutes to convert) and marked so."""

from __future__ import annotations

import pytest

from models.backend import load_backend
from models.drafters import NgramDrafter
from models.generate import generate
from models.sampling import SamplingParams
from models.speculative_generate import generate_speculative
from models.tokenizer import Tokenizer
from tests.conftest import real_model_path

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("torch_single_thread")]

# A rewrite: the reply repeats the prompt's words, so prompt lookup has something to find.
REWRITE = (
    "Here is the list again, sorted by name:\n"
    "- apple: 3 kg\n- banana: 5 kg\n- cherry: 1 kg\n- apple: 3 kg\n- banana: 5 kg\n-"
)


@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.95, seed=3)]
)
def test_gemma_target_with_prompt_lookup_equals_target_only(params: SamplingParams) -> None:
    path = real_model_path("gemma3-270m")
    target = load_backend(path, weights="fp32", max_slots=1, max_len=512)
    prompt = Tokenizer.from_gguf(path).encode(REWRITE)
    expected = generate(target, prompt, params, 48).tokens
    result = generate_speculative(target, NgramDrafter(), prompt, params, 48, draft_k=4)
    assert result.tokens == expected
    assert result.speculative.drafted > 0


@pytest.mark.slow
def test_qwen_target_with_gemma_drafting_through_text_equals_target_only() -> None:
    from models.text_drafter import load_text_drafter

    path = real_model_path("qwen2.5-coder-1.5b-instruct")
    tokenizer = Tokenizer.from_gguf(path)
    target = load_backend(path, weights="fp32", max_slots=1, max_len=512)
    drafter = load_text_drafter(path, "gemma3-270m", weights="fp32", max_slots=1, max_len=1024)
    prompt = tokenizer.encode_chat(
        [{"role": "user", "content": "Write a Python function that reverses a string."}]
    )
    expected = generate(target, prompt, SamplingParams(), 40, tokenizer.stop_ids).tokens
    result = generate_speculative(
        target, drafter, prompt, SamplingParams(), 40, tokenizer.stop_ids, draft_k=4
    )
    assert result.tokens == expected
    assert result.speculative.accepted > 0


@pytest.mark.slow
def test_qwen_int4_verify_passes_give_target_only_text() -> None:
    """int4 (int8 activations, bf16 attention): the bench prompt whose greedy text flipped at
    token 35 ('meaning that you' vs 'meaning you') before attention ran token by token."""
    import json
    from pathlib import Path

    path = real_model_path("qwen2.5-coder-1.5b-instruct")
    tokenizer = Tokenizer.from_gguf(path)
    target = load_backend(path, weights="int4", max_slots=1, max_len=1024)
    bench = Path(__file__).resolve().parent.parent / "bench" / "speculative_prompts.json"
    prompts = [p["prompt"] for p in json.loads(bench.read_text())["prompts"]]
    question = next(p for p in prompts if "mutable" in p or "tuple" in p)
    prompt = tokenizer.encode_chat([{"role": "user", "content": question}])
    expected = generate(target, prompt, SamplingParams(), 48, tokenizer.stop_ids).tokens
    result = generate_speculative(
        target, NgramDrafter(), prompt, SamplingParams(), 48, tokenizer.stop_ids, draft_k=4
    )
    assert result.tokens == expected
    assert result.speculative.drafted > 0
