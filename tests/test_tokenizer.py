"""Tokenizer on the tiny fixtures: metadata reading, round trips, specials, streaming, chat."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from models import tiny_vocab
from models.gguf_metadata import GGUFMetadataError, read_metadata
from models.tokenizer import (
    ChatTemplateError,
    Tokenizer,
    TokenizerError,
    spec_from_metadata,
    spiece_merges,
)

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n: int) -> int:\n    return n if n < 2 else fibonacci(n - 1)\n",
    "  leading spaces\tand\ttabs\n\n\nthree newlines\r\n",
    "     ",
    "",
    "x",
    "numbers 1234567 3.14159 0xFF 2025-01-31",
    "emoji 😀👍🏽 and 日本語 and Straße, ça va?",
    "I'm sure they'LL say WE'VE done it",
    "a\u0301 combining, \u200b zero width, \u00a0 nbsp",
    "\x00\x01 control bytes",
]

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


@pytest.fixture(scope="module")
def toks(tiny_paths: dict[str, Path]) -> dict[str, Tokenizer]:
    return {arch: Tokenizer.from_gguf(path) for arch, path in tiny_paths.items()}


def _plain(value: object) -> object:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


def test_metadata_reader_matches_gguf_reader(tiny_path: Path) -> None:
    ours = read_metadata(tiny_path)
    reference = gguf.GGUFReader(tiny_path)
    keys = [k for k in reference.fields if not k.startswith("GGUF.")]
    assert sorted(keys) == sorted(ours)
    for key in keys:
        expected = reference.fields[key].contents()
        got = _plain(ours[key])
        if isinstance(expected, float):
            assert got == pytest.approx(expected), key
        else:
            assert got == expected, key


def test_metadata_reader_rejects_bad_files(tmp_path: Path, tiny_paths: dict[str, Path]) -> None:
    not_gguf = tmp_path / "a.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFMetadataError, match="not a GGUF file"):
        read_metadata(not_gguf)
    old = tmp_path / "v1.gguf"
    old.write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(40))
    with pytest.raises(GGUFMetadataError, match="version 1"):
        read_metadata(old)
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(tiny_paths["qwen2"].read_bytes()[:3000])
    with pytest.raises(GGUFMetadataError, match="truncated"):
        read_metadata(truncated)
    empty = tmp_path / "e.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GGUFMetadataError):
        read_metadata(empty)
    with pytest.raises(GGUFMetadataError, match="no such"):
        read_metadata(tmp_path / "missing.gguf")


def test_tiny_vocabularies_are_deterministic_and_small() -> None:
    assert tiny_vocab.gpt2_vocabulary() == tiny_vocab.gpt2_vocabulary()
    assert tiny_vocab.llama_vocabulary() == tiny_vocab.llama_vocabulary()
    for vocab in (tiny_vocab.gpt2_vocabulary(), tiny_vocab.llama_vocabulary()):
        assert 300 <= len(vocab.tokens) <= 1000
        assert len(set(vocab.tokens)) == len(vocab.tokens)
    gpt2 = tiny_vocab.gpt2_vocabulary()
    assert gpt2.merges is not None and len(gpt2.merges) == tiny_vocab.GPT2_MERGES
    assert gpt2.tokens[gpt2.eos_id] == "<|im_end|>"
    llama = tiny_vocab.llama_vocabulary()
    assert llama.tokens[llama.bos_id] == "<bos>" and "<0xFF>" in llama.tokens


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(toks: dict[str, Tokenizer], tiny_arch: str, text: str) -> None:
    tok = toks[tiny_arch]
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_merges_compress_common_text(toks: dict[str, Tokenizer], tiny_arch: str) -> None:
    text = "the function returns the value"
    assert len(toks[tiny_arch].encode(text, add_bos=False)) < len(text) / 2


def test_bos_per_model(toks: dict[str, Tokenizer]) -> None:
    qwen, gemma = toks["qwen2"], toks["gemma3"]
    assert not qwen.add_bos and qwen.encode("hi") == qwen.encode("hi", add_bos=False)
    assert gemma.add_bos
    assert gemma.encode("hi")[0] == gemma.bos_id
    assert gemma.encode("hi", add_bos=False) == gemma.encode("hi")[1:]
    assert gemma.encode_batch(["hi", "yo"]) == [gemma.encode("hi"), gemma.encode("yo")]


def test_specials_in_text_are_single_ids(toks: dict[str, Tokenizer]) -> None:
    qwen = toks["qwen2"]
    ids = qwen.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == qwen.spec.tokens.index("<|im_start|>")
    assert ids[-1] == qwen.spec.tokens.index("<|im_end|>")
    assert qwen.decode(ids) == "user\nhi"  # control tokens are not shown
    gemma = toks["gemma3"]
    ids = gemma.encode("<start_of_turn>model\n", add_bos=False)
    assert ids[0] == gemma.spec.tokens.index("<start_of_turn>")
    assert gemma.spec.tokens.index("\n") in ids  # user-defined newline token


def test_byte_fallback_for_unknown_characters(toks: dict[str, Tokenizer]) -> None:
    gemma = toks["gemma3"]
    ids = gemma.encode("€", add_bos=False)  # not in the tiny vocabulary: 3 UTF-8 bytes
    assert [gemma.token_text(i) for i in ids] == ["<0xE2>", "<0x82>", "<0xAC>"]


def test_stop_ids(toks: dict[str, Tokenizer]) -> None:
    qwen = toks["qwen2"]
    assert {qwen.token_text(i) for i in qwen.stop_ids} == {"<|im_end|>", "<|endoftext|>"}
    gemma = toks["gemma3"]
    assert {gemma.token_text(i) for i in gemma.stop_ids} == {"<eos>", "<end_of_turn>"}


@pytest.mark.parametrize("text", ["emoji 😀👍🏽 日本語 Straße", "€€€ 🇫🇷 a\u0301"])
def test_stream_decoder_never_emits_broken_characters(
    toks: dict[str, Tokenizer], tiny_arch: str, text: str
) -> None:
    tok = toks[tiny_arch]
    ids = tok.encode(text, add_bos=False)
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text == tok.decode(ids)
    assert all("\ufffd" not in piece for piece in pieces)
    # Multi-byte characters really were split across tokens, and held back meanwhile.
    assert "" in pieces[:-1]


def test_stream_decoder_flushes_an_incomplete_tail(toks: dict[str, Tokenizer]) -> None:
    gemma = toks["gemma3"]
    ids = gemma.encode("€", add_bos=False)[:2]  # first two of three bytes
    stream = gemma.stream_decoder()
    assert [stream.push(i) for i in ids] == ["", ""]
    assert stream.flush() == "\ufffd"


def test_chat_template_qwen_style(toks: dict[str, Tokenizer]) -> None:
    qwen = toks["qwen2"]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert qwen.apply_chat_template(CONVERSATION) == expected
    assert qwen.apply_chat_template(CONVERSATION, add_generation_prompt=False) == expected[:-22]
    default_system = qwen.apply_chat_template([{"role": "user", "content": "x"}])
    assert default_system.startswith("<|im_start|>system\nYou are a helpful assistant.")
    ids = qwen.encode_chat(CONVERSATION)
    assert ids == qwen.encode(expected) and ids[0] == qwen.spec.tokens.index("<|im_start|>")


def test_chat_template_gemma_style(toks: dict[str, Tokenizer]) -> None:
    gemma = toks["gemma3"]
    text = gemma.apply_chat_template(CONVERSATION)
    assert text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>\n"
        "<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    ids, bos = gemma.encode_chat(CONVERSATION), gemma.bos_id
    assert bos is not None and ids.count(bos) == 1 and ids[0] == bos  # the template's BOS only
    with pytest.raises(ChatTemplateError, match="alternate"):
        gemma.apply_chat_template([{"role": "assistant", "content": "first"}])


def test_chat_input_errors(toks: dict[str, Tokenizer]) -> None:
    qwen = toks["qwen2"]
    with pytest.raises(ChatTemplateError, match="at least one"):
        qwen.apply_chat_template([])
    with pytest.raises(ChatTemplateError, match="'content'"):
        qwen.apply_chat_template([{"role": "user"}])
    with pytest.raises(ChatTemplateError, match="'role'"):
        qwen.apply_chat_template([{"content": "x"}])
    with pytest.raises(ChatTemplateError, match="Unknown role: robot"):
        qwen.apply_chat_template([{"role": "robot", "content": "x"}])


def test_no_chat_template_is_a_clear_error(toks: dict[str, Tokenizer]) -> None:
    base = Tokenizer(dataclasses.replace(toks["gemma3"].spec, chat_template=None), name="base")
    assert not base.has_chat_template
    with pytest.raises(ChatTemplateError, match="base has no chat template"):
        base.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_sandbox_blocks_unsafe_access(toks: dict[str, Tokenizer]) -> None:
    spec = dataclasses.replace(toks["qwen2"].spec, chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(ChatTemplateError):
        Tokenizer(spec).apply_chat_template([{"role": "user", "content": "x"}])


def test_bad_metadata_errors(tiny_paths: dict[str, Path]) -> None:
    meta = read_metadata(tiny_paths["qwen2"])
    with pytest.raises(TokenizerError, match="no tokenizer metadata"):
        spec_from_metadata({k: v for k, v in meta.items() if k != "tokenizer.ggml.model"})
    with pytest.raises(TokenizerError, match="'bert' is not supported"):
        spec_from_metadata({**meta, "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="needs tokenizer.ggml.merges"):
        spec_from_metadata({k: v for k, v in meta.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(TokenizerError, match="eos_token_id"):
        spec_from_metadata({**meta, "tokenizer.ggml.eos_token_id": 10**6})
    with pytest.raises(TokenizerError, match="pre-tokenizer 'mystery'"):
        Tokenizer(spec_from_metadata({**meta, "tokenizer.ggml.pre": "mystery"}))
    tok = Tokenizer(spec_from_metadata(meta))
    for bad in (10**6, -1):
        with pytest.raises(TokenizerError, match="outside"):
            tok.decode([5, bad])
        with pytest.raises(TokenizerError, match="outside"):
            tok.stream_decoder().push(bad)


def test_spiece_merges_order() -> None:
    tokens = ["a", "b", "c", "ab", "abc", "bc"]
    # Best piece first; among splits of one piece, the longer left part first.
    assert spiece_merges(tokens, [-float(i) for i in range(len(tokens))]) == [
        ("a", "b"),
        ("ab", "c"),
        ("a", "bc"),
        ("b", "c"),
    ]


def test_matches_transformers_on_tiny_files(toks: dict[str, Tokenizer], tiny_dir: Path) -> None:
    """transformers builds its own tokenizer from the same GGUF metadata: ids must agree."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    for arch, tok in toks.items():
        ref = transformers.AutoTokenizer.from_pretrained(str(tiny_dir), gguf_file=f"{arch}.gguf")
        for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>", "<start_of_turn>user\n"]:
            assert tok.encode(text) == ref(text)["input_ids"], (arch, text)
        assert tok.apply_chat_template(CONVERSATION) == ref.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=True
        )
