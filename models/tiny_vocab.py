"""Small, deterministic tokenizer vocabularies written into tiny GGUF fixtures.

Two styles mirror the real files sled runs, using the same GGUF metadata keys:

- ``"gpt2"``: byte-level BPE as in Qwen2 GGUFs (``tokenizer.ggml.model = "gpt2"``,
  ``tokenizer.ggml.pre = "qwen2"``): the 256 byte symbols, merges learned from a small built-in
  corpus, ChatML specials and a ChatML chat template.
- ``"llama"``: SentencePiece-style BPE as in Gemma 3 GGUFs (``tokenizer.ggml.model = "llama"``):
  control tokens, user-defined newline tokens, byte-fallback tokens ``<0x00>..<0xFF>``, scored
  pieces with ``▁`` for spaces and a Gemma-style chat template.

Merges are learned with a plain BPE loop whose ties break on the pair itself, so the same
vocabulary comes out on every run and every machine.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import gguf
from tokenizers import Regex, pre_tokenizers

from models.tokenizer import QWEN2_SPLIT_PATTERN, SPIECE_SPACE, byte_symbols

TinyStyle = Literal["gpt2", "llama"]


# GGUF token types (llama.cpp's llama_token_type values, as stored in tokenizer.ggml.token_type).
TOKEN_NORMAL = int(gguf.TokenType.NORMAL)
TOKEN_CONTROL = int(gguf.TokenType.CONTROL)
TOKEN_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)
TOKEN_BYTE = int(gguf.TokenType.BYTE)

GPT2_MERGES = 420
LLAMA_MERGES = 420

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('Unknown role: ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# English prose and code in a few languages: enough variety for merges on words, indentation,
# punctuation and digits.
CORPUS = """\
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs
into the forest. There is a small house at the end of the road where an old man lives with
his cat. Every morning he reads the news, drinks his tea and writes a letter to his friend.
A language model predicts the next token from the tokens that came before it. When several
small devices work together, each one can draft tokens that a stronger one then verifies.
This is how speculative decoding keeps the output of the large model while it runs faster.
Numbers like 42, 3.14159, 2024 and 1000000 appear in text; so do dates such as 2025-01-31.
Questions? Answers! Lists: one, two, three; and "quoted words" or 'single quotes' too.

def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)


class Counter:
    def __init__(self, start: int = 0) -> None:
        self.value = start

    def increment(self, step: int = 1) -> int:
        self.value += step
        return self.value


for i in range(10):
    print(f"value {i}: {fibonacci(i)}")

function add(a, b) {
  return a + b;
}

const items = [1, 2, 3].map((x) => x * 2);
console.log(items.length, JSON.stringify({ name: "sled", ok: true }));

#include <stdio.h>

int main(int argc, char **argv) {
    for (int i = 0; i < argc; i++) {
        printf("%s\\n", argv[i]);
    }
    return 0;
}

SELECT name, count(*) FROM users WHERE active = 1 GROUP BY name ORDER BY name;
"""


@dataclass(frozen=True)
class Vocabulary:
    """A complete tokenizer vocabulary in GGUF terms, ready to be written."""

    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...] | None
    merges: tuple[str, ...] | None
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int | None


def learn_merges(words: Counter[tuple[str, ...]], n_merges: int) -> list[tuple[str, str]]:
    """Classic BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    merges: list[tuple[str, str]] = []
    current = dict(words)
    for _ in range(n_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in current.items():
            for left, right in zip(word, word[1:], strict=False):
                pairs[(left, right)] += count
        if not pairs:
            break
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merges.append(best)
        current = {_merge_word(word, best): count for word, count in current.items()}
    return merges


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def _merged_tokens(merges: Iterable[tuple[str, str]], known: set[str]) -> list[str]:
    """New tokens in merge order; a merge whose result already exists adds no token."""
    out: list[str] = []
    for left, right in merges:
        joined = left + right
        if joined not in known:
            known.add(joined)
            out.append(joined)
    return out


def gpt2_vocabulary(corpus: str = CORPUS, n_merges: int = GPT2_MERGES) -> Vocabulary:
    """Qwen2-like byte-level BPE vocabulary with ChatML specials."""
    splitter = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words = Counter(tuple(piece) for piece, _ in splitter.pre_tokenize_str(corpus))
    merges = learn_merges(words, n_merges)
    base = list(byte_symbols().values())  # printable bytes first, as GPT-2/Qwen list them
    tokens = base + _merged_tokens(merges, set(base))
    types = [TOKEN_NORMAL] * len(tokens)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    first_special = len(tokens)
    tokens += specials
    types += [TOKEN_CONTROL] * len(specials)
    return Vocabulary(
        tokens=tuple(tokens),
        token_types=tuple(types),
        scores=None,
        merges=tuple(f"{left} {right}" for left, right in merges),
        bos_id=first_special,  # Qwen2: bos = pad = <|endoftext|>, eos = <|im_end|>
        eos_id=first_special + 2,
        pad_id=first_special,
        unk_id=None,
    )


def _spiece_words(corpus: str) -> Counter[tuple[str, ...]]:
    """Words as SentencePiece sees them: newlines removed (they are user-defined tokens),
    spaces shown as ▁ and each word starting at its ▁."""
    words: Counter[tuple[str, ...]] = Counter()
    for line in corpus.split("\n"):
        text = line.replace(" ", SPIECE_SPACE)
        for word in re.findall(f"{SPIECE_SPACE}*[^{SPIECE_SPACE}]+|{SPIECE_SPACE}+", text):
            words[tuple(word)] += 1
    return words


def llama_vocabulary(corpus: str = CORPUS, n_merges: int = LLAMA_MERGES) -> Vocabulary:
    """Gemma-3-like SentencePiece BPE vocabulary: scores rank the pieces, bytes fall back."""
    control = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    user_defined = ["\n", "\n\n", "\n\n\n"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokens = control + user_defined + byte_tokens
    types = (
        [TOKEN_CONTROL] * len(control)
        + [TOKEN_USER_DEFINED] * len(user_defined)
        + [TOKEN_BYTE] * len(byte_tokens)
    )
    scores = [-1000.0] * (len(control) + len(user_defined)) + [0.0] * len(byte_tokens)

    words = _spiece_words(corpus)
    chars = sorted({c for word in words for c in word} | {SPIECE_SPACE})
    merged = _merged_tokens(learn_merges(words, n_merges), set(chars))
    # As in SentencePiece BPE models: merged pieces by rank, then single characters, with
    # score -rank so that a higher score means an earlier merge.
    pieces = merged + chars
    tokens += pieces
    types += [TOKEN_NORMAL] * len(pieces)
    scores += [-float(rank) for rank in range(len(pieces))]
    return Vocabulary(
        tokens=tuple(tokens),
        token_types=tuple(types),
        scores=tuple(scores),
        merges=None,
        bos_id=control.index("<bos>"),
        eos_id=control.index("<eos>"),
        pad_id=control.index("<pad>"),
        unk_id=control.index("<unk>"),
    )


def add_tokenizer(writer: gguf.GGUFWriter, style: TinyStyle) -> int:
    """Write complete tokenizer metadata of the given style; return the vocabulary size."""
    if style == "gpt2":
        vocab = gpt2_vocabulary()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML_TEMPLATE)
    elif style == "llama":
        vocab = llama_vocabulary()
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_add_bos_token(True)
        writer.add_add_eos_token(False)
        writer.add_add_sep_token(False)
        writer.add_add_space_prefix(False)
        writer.add_chat_template(GEMMA_TEMPLATE)
    else:
        raise ValueError(f"unknown tokenizer style {style!r}; expected 'gpt2' or 'llama'")
    writer.add_token_list(list(vocab.tokens))
    writer.add_token_types(list(vocab.token_types))
    if vocab.scores is not None:
        writer.add_token_scores(list(vocab.scores))
    if vocab.merges is not None:
        writer.add_token_merges(list(vocab.merges))
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_pad_token_id(vocab.pad_id)
    if vocab.unk_id is not None:
        writer.add_unk_token_id(vocab.unk_id)
    return len(vocab.tokens)
