"""Tokenizer built from a GGUF file's metadata with the `tokenizers` library.

Two vocabulary kinds (``tokenizer.ggml.model``) are supported, built the way transformers'
GGUF integration and llama.cpp read them:

- ``gpt2``: byte-level BPE with the merges stored in the file and the split regex named by
  ``tokenizer.ggml.pre`` (Qwen2 and Llama 3 patterns; GPT-2's own for ``default``).
- ``llama``: SentencePiece-style BPE (Gemma 3 and Llama 2 files). The file stores scored pieces
  and no merges, so merges are rebuilt from the vocabulary; spaces become ``▁``; unknown
  characters fall back to the ``<0xNN>`` byte tokens. Gemma files get the two fixes transformers
  applies (pieces of only spaces are stored with real spaces; merge order follows the file
  order, not the scores).

Control tokens (type 3) are special tokens and user-defined tokens (type 4) are added tokens:
both are matched whole in the text, so a rendered chat template's ``<|im_start|>`` is one id.

Decoding goes through a per-token byte table, so that the streaming decoder and `decode` agree
by construction and a UTF-8 character split across tokens is held back until complete.

Base models without ``tokenizer.chat_template`` (gemma3-270m): `apply_chat_template` raises
`ChatTemplateError` saying so; sled does not invent a chat format for a model never tuned on one.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from models.gguf_metadata import read_metadata

SPIECE_SPACE = "\u2581"  # "▁"

# Split patterns for byte-level vocabularies, keyed by tokenizer.ggml.pre (llama.cpp's names).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLIT_PATTERNS: Mapping[str, str] = {
    "qwen2": QWEN2_SPLIT_PATTERN,
    "deepseek-r1-qwen": QWEN2_SPLIT_PATTERN,
    "llama3": LLAMA3_SPLIT_PATTERN,
    "llama-bpe": LLAMA3_SPLIT_PATTERN,
    "llama-v3": LLAMA3_SPLIT_PATTERN,
}
GPT2_DEFAULT_PRE = ("default", "gpt2")

# GGUF token types (llama.cpp llama_token_type).
TYPE_NORMAL = 1
TYPE_UNKNOWN = 2
TYPE_CONTROL = 3
TYPE_USER_DEFINED = 4
TYPE_UNUSED = 5
TYPE_BYTE = 6

# Tokens that end a turn in the chat formats sled knows; generation stops on any present.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|eot_id|>", "<|end|>")

SENTENCEPIECE_FILE_ORDER_ARCHS = ("gemma", "gemma2", "gemma3")


class TokenizerError(ValueError):
    """The GGUF's tokenizer metadata is missing, inconsistent or of an unsupported kind."""


class ChatTemplateError(TokenizerError):
    """A chat request cannot be rendered: no template, bad messages, or the template refused."""


@dataclass(frozen=True)
class TokenizerSpec:
    """What a GGUF file says about its tokenizer (``tokenizer.*`` keys, plus the architecture)."""

    architecture: str
    model: str
    pre: str | None
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...] | None
    merges: tuple[str, ...] | None
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    eot_id: int | None
    add_bos: bool
    add_space_prefix: bool
    chat_template: str | None


def spec_from_metadata(meta: Mapping[str, Any], source: str = "GGUF file") -> TokenizerSpec:
    """Pick the tokenizer fields out of GGUF metadata, checking what the builders rely on."""
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise TokenizerError(f"{source} has no tokenizer metadata (tokenizer.ggml.model)")
    if model not in ("gpt2", "llama"):
        raise TokenizerError(
            f"{source}: tokenizer model {model!r} is not supported (supported: 'gpt2' byte-level "
            "BPE, 'llama' SentencePiece BPE)"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise TokenizerError(f"{source}: tokenizer.ggml.tokens is missing or empty")
    n = len(tokens)
    types_raw = meta.get("tokenizer.ggml.token_type")
    types = (
        tuple(int(t) for t in np.asarray(types_raw).tolist())
        if types_raw is not None
        else (TYPE_NORMAL,) * n
    )
    scores_raw = meta.get("tokenizer.ggml.scores")
    scores = (
        tuple(np.asarray(scores_raw, dtype=np.float64).tolist()) if scores_raw is not None else None
    )
    if len(types) != n or (scores is not None and len(scores) != n):
        raise TokenizerError(f"{source}: token_type/scores arrays do not match {n} tokens")
    merges = meta.get("tokenizer.ggml.merges")
    if model == "gpt2" and not merges:
        raise TokenizerError(f"{source}: a 'gpt2' tokenizer needs tokenizer.ggml.merges")
    if model == "llama" and scores is None:
        raise TokenizerError(f"{source}: a 'llama' tokenizer needs tokenizer.ggml.scores")

    def token_id(key: str) -> int | None:
        value = meta.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if not 0 <= int(value) < n:
            raise TokenizerError(f"{source}: tokenizer.ggml.{key} = {value} is outside 0..{n - 1}")
        return int(value)

    return TokenizerSpec(
        architecture=str(meta.get("general.architecture", "")),
        model=str(model),
        pre=meta.get("tokenizer.ggml.pre"),
        tokens=tuple(tokens),
        token_types=types,
        scores=scores,
        merges=tuple(merges) if merges else None,
        bos_id=token_id("bos_token_id"),
        eos_id=token_id("eos_token_id"),
        pad_id=token_id("padding_token_id"),
        unk_id=token_id("unknown_token_id"),
        eot_id=token_id("eot_token_id"),
        # llama.cpp's defaults when a file does not say: SentencePiece adds BOS, BPE does not.
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama")),
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", model == "llama")),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def byte_symbols() -> dict[int, str]:
    """GPT-2's reversible map from bytes to the printable characters byte-level BPE spells."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def spiece_merges(tokens: Sequence[str], rank_by: Sequence[float]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece BPE vocabulary: every split of a piece into two pieces
    that exist, best piece first (higher ``rank_by``), then longer left part first.

    Same order as transformers' ``generate_merges`` so that both tokenizers agree."""
    vocab = {token: index for index, token in enumerate(tokens)}
    score_of = {token: rank_by[index] for index, token in enumerate(tokens)}
    found: list[tuple[float, int, int, str, str]] = []
    for piece, score in score_of.items():
        local = [
            (piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        local.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found.extend((score, len(left), len(right), left, right) for left, right in local)
    found.sort(key=lambda item: item[:3], reverse=True)
    return [(left, right) for _, _, _, left, right in found]


def _respelled_tokens(spec: TokenizerSpec) -> tuple[str, ...]:
    """Gemma files store pieces made only of spaces with real spaces; the merges and the
    normalizer see them as ▁."""
    if spec.architecture not in SENTENCEPIECE_FILE_ORDER_ARCHS:
        return spec.tokens
    return tuple(SPIECE_SPACE * len(t) if " " in t and not t.strip() else t for t in spec.tokens)


def build_backend(spec: TokenizerSpec) -> BackendTokenizer:
    """A `tokenizers.Tokenizer` that encodes exactly as the GGUF's tokenizer does."""
    if spec.model == "gpt2":
        backend = _byte_level_backend(spec)
        tokens: Sequence[str] = spec.tokens
        in_alphabet = set(byte_symbols().values())
    else:
        backend, tokens = _sentencepiece_backend(spec)
        in_alphabet = None
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, spec.token_types, strict=True)
        if kind == TYPE_CONTROL and (in_alphabet is None or set(token) <= in_alphabet)
    ]
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, spec.token_types, strict=True)
        if kind == TYPE_USER_DEFINED
    ]
    backend.add_special_tokens(control)
    backend.add_tokens(user_defined)
    return backend


def _merge_pair(merge: str) -> tuple[str, str]:
    left, sep, right = merge.partition(" ")
    if not sep:
        raise TokenizerError(f"tokenizer.ggml.merges entry {merge!r} has no space separator")
    return left, right


def _byte_level_backend(spec: TokenizerSpec) -> BackendTokenizer:
    symbols = byte_symbols()
    alphabet = set(symbols.values())
    vocab = {
        token if set(token) <= alphabet else "".join(symbols[b] for b in token.encode()): index
        for index, token in enumerate(spec.tokens)
    }
    assert spec.merges is not None  # checked in spec_from_metadata
    merges = [_merge_pair(m) for m in spec.merges]
    backend = BackendTokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    pre = spec.pre or "default"
    if pre in SPLIT_PATTERNS:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(SPLIT_PATTERNS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    elif pre in GPT2_DEFAULT_PRE:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        known = sorted([*SPLIT_PATTERNS, *GPT2_DEFAULT_PRE])
        raise TokenizerError(f"pre-tokenizer {pre!r} is not supported (known: {', '.join(known)})")
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_backend(spec: TokenizerSpec) -> tuple[BackendTokenizer, tuple[str, ...]]:
    tokens = _respelled_tokens(spec)
    if spec.architecture in SENTENCEPIECE_FILE_ORDER_ARCHS:
        # Gemma's scores do not follow its merge order; the file order does (as transformers).
        rank_by: Sequence[float] = [-float(i) for i in range(len(tokens))]
    else:
        assert spec.scores is not None  # checked in spec_from_metadata
        rank_by = spec.scores
    unk = tokens[spec.unk_id] if spec.unk_id is not None else None
    backend = BackendTokenizer(
        models.BPE(
            vocab={token: index for index, token in enumerate(tokens)},
            merges=spiece_merges(tokens, rank_by),
            dropout=None,
            unk_token=unk,
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    if spec.add_space_prefix:
        backend.normalizer = normalizers.Sequence(
            [normalizers.Prepend(SPIECE_SPACE), normalizers.Replace(" ", SPIECE_SPACE)]
        )
    else:
        backend.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    backend.decoder = decoders.Sequence(
        [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return backend, tokens


def token_byte_table(spec: TokenizerSpec, keep_control: bool) -> tuple[bytes, ...]:
    """The bytes each token stands for in decoded text. Control and unused tokens decode to
    nothing unless ``keep_control`` (then to their own spelling)."""
    hidden = (TYPE_CONTROL, TYPE_UNUSED, TYPE_UNKNOWN)
    out: list[bytes] = []
    if spec.model == "gpt2":
        # str.translate + latin-1 maps each byte symbol back to its byte at C speed.
        back = {ord(sym): byte for byte, sym in byte_symbols().items()}
        alphabet = set(byte_symbols().values())
        for token, kind in zip(spec.tokens, spec.token_types, strict=True):
            if kind in hidden:
                out.append(token.encode() if keep_control else b"")
            elif set(token) <= alphabet:
                out.append(token.translate(back).encode("latin-1"))
            else:
                out.append(token.encode())
        return tuple(out)
    for token, kind in zip(_respelled_tokens(spec), spec.token_types, strict=True):
        if kind in hidden:
            out.append(token.encode() if keep_control else b"")
        elif kind == TYPE_BYTE:
            out.append(bytes([int(token[3:-1], 16)]))
        else:
            out.append(token.replace(SPIECE_SPACE, " ").encode())
    return tuple(out)


class StreamDecoder:
    """Turns token ids into text one id at a time; holds back an incomplete UTF-8 character
    until its remaining bytes arrive, so no broken character is ever emitted."""

    def __init__(self, table: Sequence[bytes]) -> None:
        self._table = table
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if not 0 <= token_id < len(self._table):
            raise TokenizerError(f"token id {token_id} is outside 0..{len(self._table) - 1}")
        return self._utf8.decode(self._table[token_id])

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox with the helpers templates expect (as transformers)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template does not compile: {exc}") from exc


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if not messages:
        raise ChatTemplateError("a chat request needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {i} is not an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise ChatTemplateError(f"message {i} has no 'role' string")
        if not isinstance(content, str):
            raise ChatTemplateError(f"message {i} ({role}) has no 'content' string")
        out.append(dict(message))
    return out


class Tokenizer:
    """Encode, decode, stream-decode and chat-format text for one GGUF model."""

    def __init__(self, spec: TokenizerSpec, name: str = "model") -> None:
        self.spec = spec
        self.name = name
        self._backend = build_backend(spec)
        self._table = token_byte_table(spec, keep_control=False)
        self._template = compile_chat_template(spec.chat_template) if spec.chat_template else None
        ends = {spec.tokens.index(t) for t in END_OF_TURN_TOKENS if t in set(spec.tokens)}
        self.stop_ids: frozenset[int] = frozenset(
            ends | {i for i in (spec.eos_id, spec.eot_id) if i is not None}
        )

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """Build from a GGUF file's metadata only (tensors are never read)."""
        path = Path(path)
        return cls(spec_from_metadata(read_metadata(path), source=str(path)), name=path.stem)

    @property
    def vocab_size(self) -> int:
        return len(self.spec.tokens)

    @property
    def bos_id(self) -> int | None:
        return self.spec.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.spec.eos_id

    @property
    def add_bos(self) -> bool:
        return self.spec.add_bos

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in the text become their ids. A BOS is
        prepended when ``add_bos`` (default: the file's ``tokenizer.ggml.add_bos_token``)."""
        return self._bos_prefix(add_bos) + self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
        """`encode` over many texts (the backend spreads them over threads)."""
        batch = self._backend.encode_batch(list(texts), add_special_tokens=False)
        prefix = self._bos_prefix(add_bos)
        return [prefix + e.ids for e in batch]

    def _bos_prefix(self, add_bos: bool | None) -> list[int]:
        wanted = self.spec.add_bos if add_bos is None else add_bos
        return [self.spec.bos_id] if wanted and self.spec.bos_id is not None else []

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` with control tokens (BOS, ``<|im_end|>``, ...) left out."""
        ids = list(ids)
        if ids and (min(ids) < 0 or max(ids) >= len(self._table)):
            bad = [i for i in ids if not 0 <= i < len(self._table)]
            raise TokenizerError(f"token ids {bad[:5]} are outside 0..{len(self._table) - 1}")
        return b"".join([self._table[i] for i in ids]).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self._table)

    def token_text(self, token_id: int) -> str:
        """A token's spelling in the vocabulary (for display and debugging)."""
        return self.spec.tokens[token_id]

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render a conversation with the model's own ``tokenizer.chat_template``."""
        if self._template is None:
            raise ChatTemplateError(
                f"{self.name} has no chat template (it is a base model, not chat-tuned); "
                "send a plain prompt without --chat, or use an instruction-tuned model such as "
                "qwen2.5-coder-1.5b-instruct"
            )
        spec = self.spec

        def spelled(token_id: int | None) -> str | None:
            return spec.tokens[token_id] if token_id is not None else None

        try:
            return self._template.render(
                messages=_check_messages(messages),
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                bos_token=spelled(spec.bos_id),
                eos_token=spelled(spec.eos_id),
                unk_token=spelled(spec.unk_id),
                pad_token=spelled(spec.pad_id),
            )
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template refused the conversation: {exc}") from exc

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Ids of a rendered conversation. The template writes its own BOS where it wants one;
        if the model adds BOS and the template did not, one is prepended (as llama.cpp does)."""
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt), add_bos=False)
        bos = self.spec.bos_id
        if self.spec.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids
