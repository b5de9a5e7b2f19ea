"""Our tokenizer against transformers' on the real GGUF files (both build from the metadata).

transformers takes 10-15 s to build each reference tokenizer, so they are module-scoped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models.tokenizer import ChatTemplateError, Tokenizer
from tests.conftest import real_model_path

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(600)]

QWEN = "qwen2.5-coder-1.5b-instruct"
GEMMA = "gemma3-270m"

BASE_TEXTS = [
    # code in several languages
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    p, *rest = xs\n"
    "    return quicksort([x for x in rest if x < p]) + [p] + quicksort([x for x in rest if x >= p])\n",
    "class Node:\n\tdef __init__(self, value, next=None):\n\t\tself.value = value\n\t\tself.next = next\n",
    "async function fetchJson(url) {\n  const res = await fetch(url);\n  if (!res.ok) throw new Error(`HTTP ${res.status}`);\n  return res.json();\n}\n",
    '#include <stdio.h>\nint main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n',
    'fn main() {\n    let v: Vec<u32> = (1..=10).map(|x| x * x).collect();\n    println!("{:?}", v);\n}\n',
    'package main\n\nimport "fmt"\n\nfunc main() {\n\tfmt.Println("hello, 世界")\n}\n',
    "SELECT u.id, COUNT(o.id) AS n FROM users u LEFT JOIN orders o ON o.user_id = u.id GROUP BY u.id;",
    '<div class="card">\n  <h1>Title</h1>\n  <p>Some &amp; text</p>\n</div>',
    '{"name": "sled", "version": "0.1.0", "deps": ["aiohttp", "zeroconf"], "ok": true, "n": null}',
    "server:\n  port: 8080\n  hosts:\n    - a.local\n    - b.local\n",
    '#!/usr/bin/env bash\nset -euo pipefail\nfor f in *.txt; do wc -l "$f"; done\n',
    "public static void main(String[] args) { System.out.println(args.length); }",
    "x = [i**2 for i in range(10) if i % 2 == 0]  # squares of evens",
    "    \n\t\n  \t  mixed indentation\n\n\n",
    # prose and contractions
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've done it, but it's not what you'd think.",
    "SHOUTING: I'M NOT SURE THEY'LL AGREE; WE'D BETTER ASK.",
    "Speculative decoding drafts tokens cheaply and verifies them in one pass.",
    # unicode
    "日本語のテキストとカタカナ、ひらがな。",
    "中文：大型语言模型在边缘设备上协同运行。",
    "한국어 문장도 토큰화해야 합니다.",
    "Русский текст с ёлками и щами.",
    "Ελληνικά: αβγδε ΑΒΓΔΕ.",
    "العربية: مرحبا بالعالم",
    "עברית: שלום עולם",
    "हिन्दी में एक वाक्य।",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ",
    "emoji: 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ 🏳️‍🌈",
    "accents: café naïve résumé Straße Ångström",
    "combining: e\u0301 a\u0308 n\u0303 (NFD forms)",
    "zero width:\u200b\u200c\u200d and bidi \u202e marks \u202c",
    "math: ∀x∈ℝ, ∑ᵢ xᵢ² ≥ 0 ∧ √2 ≈ 1.41421356",
    "box drawing ┌─┬─┐ │a│b│ └─┴─┘ and arrows ← → ↑ ↓",
    "\x00\x01\x02\x7f control characters",
    # whitespace
    " ",
    "  ",
    " " * 17,
    "\t",
    "\t\t\t",
    "\n",
    "\n\n\n\n",
    "\r\n",
    "a  b   c    d     e",
    "trailing spaces   ",
    "   leading spaces",
    "line1\nline2\r\nline3\rline4",
    "tabs\tbetween\t\twords",
    "\u00a0non-breaking\u00a0spaces\u3000ideographic space",
    # numbers
    "0",
    "1234567890",
    "3.14159265358979",
    "-42 +17 1e-10 6.02e23",
    "0xDEADBEEF 0b1011 0o755",
    "2025-01-31T12:34:56Z",
    "+1 (555) 123-4567",
    "1,000,000.00 and 1.000.000,00",
    "v1.2.3-rc.4+build.5",
    "127.0.0.1:8080/api/v1/chat?x=1&y=2",
    # chat turns with special tokens
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "<|im_start|><|im_end|>",
    "text<|im_end|>more text",
    "<|im_start",
    '<tool_call>\n{"name": "f"}\n</tool_call>',
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text<eos>",
    "<start_of_turn",
    "<pad><unk><mask>",
    "[multimodal] <start_of_image>",
    "</div></span>\n\n\n",
]


def varied_texts() -> list[str]:
    """A few hundred strings: each base text as is and with common variations."""
    out: list[str] = []
    for text in BASE_TEXTS:
        out += [text, " " + text, text + "\n", text.upper(), text + " " + text[: len(text) // 2]]
    out += [f"{n} {n * 7919} {n / 7:.5f}" for n in range(0, 300, 17)]
    out += ["a" * n for n in (1, 2, 3, 50, 257)] + ["ab" * 100, "🙂" * 30, "-" * 80, "=" * 33]
    return out


def _reference(path: Path) -> Any:
    os.environ["HF_HUB_OFFLINE"] = "1"
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def qwen_path() -> Path:
    return real_model_path(QWEN)


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    return real_model_path(GEMMA)


@pytest.fixture(scope="module")
def qwen(qwen_path: Path) -> Iterator[Tokenizer]:
    start = time.perf_counter()
    tok = Tokenizer.from_gguf(qwen_path)
    print(f"\nQwen tokenizer built from GGUF metadata in {time.perf_counter() - start:.2f} s")
    yield tok


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> Iterator[Tokenizer]:
    start = time.perf_counter()
    tok = Tokenizer.from_gguf(gemma_path)
    print(f"\nGemma tokenizer built from GGUF metadata in {time.perf_counter() - start:.2f} s")
    yield tok


@pytest.fixture(scope="module")
def qwen_ref(qwen_path: Path) -> Any:
    return _reference(qwen_path)


@pytest.fixture(scope="module")
def gemma_ref(gemma_path: Path) -> Any:
    return _reference(gemma_path)


def _compare(ours: Tokenizer, ref: Any) -> None:
    texts = varied_texts()
    assert len(texts) >= 300
    expected = ref(texts)["input_ids"]
    got = ours.encode_batch(texts)
    mismatches = [(t, g, e) for t, g, e in zip(texts, got, expected, strict=True) if g != e]
    assert not mismatches, f"{len(mismatches)} of {len(texts)} differ; first: {mismatches[0]}"


def test_qwen_ids_equal_transformers(qwen: Tokenizer, qwen_ref: Any) -> None:
    assert qwen.vocab_size == 151936
    _compare(qwen, qwen_ref)


def test_gemma_ids_equal_transformers(gemma: Tokenizer, gemma_ref: Any) -> None:
    assert gemma.vocab_size == 262144
    _compare(gemma, gemma_ref)


@pytest.mark.parametrize("model", ["qwen", "gemma"])
def test_real_round_trip_and_streaming(model: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(model)
    for text in varied_texts():
        if "<" in text or "[multimodal]" in text:
            continue  # control tokens are dropped on decode by design
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        stream = tok.stream_decoder()
        pieces = [stream.push(i) for i in ids] + [stream.flush()]
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in text


CONVERSATIONS = [
    [{"role": "user", "content": "Write a Python function that reverses a string."}],
    [
        {"role": "system", "content": "You are a terse code reviewer."},
        {"role": "user", "content": "Review:\n```py\ndef f(x): return x*2\n```"},
        {"role": "assistant", "content": "Fine, but add a docstring and type hints."},
        {"role": "user", "content": "Rewrite it with both, 中文注释 please 🙂"},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "   leading spaces and\ttabs\n\n"},
    ],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_qwen_chat_template_equals_transformers(
    qwen: Tokenizer, qwen_ref: Any, conversation: list[dict[str, str]], generation_prompt: bool
) -> None:
    ours = qwen.apply_chat_template(conversation, add_generation_prompt=generation_prompt)
    theirs = qwen_ref.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=generation_prompt
    )
    assert ours == theirs
    assert (
        qwen.encode_chat(conversation, generation_prompt)
        == qwen_ref(theirs, add_special_tokens=False)["input_ids"]
    )
    if generation_prompt:
        assert ours.endswith("<|im_start|>assistant\n")


def test_qwen_stop_ids(qwen: Tokenizer) -> None:
    assert qwen.stop_ids == {151645, 151643}  # <|im_end|>, <|endoftext|>
    assert not qwen.add_bos


def test_gemma_base_model_has_no_chat(gemma: Tokenizer) -> None:
    assert not gemma.has_chat_template
    with pytest.raises(ChatTemplateError, match="base model"):
        gemma.apply_chat_template([{"role": "user", "content": "hi"}])
    assert gemma.add_bos and gemma.encode("hi")[0] == 2
    assert {gemma.token_text(i) for i in gemma.stop_ids} == {"<eos>", "<end_of_turn>"}


def test_build_time(qwen_path: Path) -> None:
    start = time.perf_counter()
    Tokenizer.from_gguf(qwen_path)
    elapsed = time.perf_counter() - start
    print(f"\nQwen tokenizer rebuilt in {elapsed:.2f} s")
    assert elapsed < 10.0  # measured ~0.8 s here; generous for loaded CI runners
