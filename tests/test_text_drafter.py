"""The cross-tokenizer drafter on tiny fixtures: tiny-gemma3 (SentencePiece vocabulary) drafts
for a tiny-qwen2 target (byte-level BPE, ChatML template); and model drafters on onnxruntime."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from models.backend import Backend, load_backend
from models.drafters import ModelDrafter
from models.sampling import SamplingParams
from models.text_drafter import (
    ChatRenderer,
    PrefixEncoder,
    TextDrafter,
    complete_utf8,
    load_text_drafter,
)
from models.tokenizer import TYPE_BYTE, TYPE_CONTROL, Tokenizer

GREEDY = SamplingParams(temperature=0.0)
ONNX_CHUNK = 3  # several ONNX chunks per tiny model


@pytest.fixture(scope="module")
def target_tok(tiny_paths: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_gguf(tiny_paths["qwen2"])


@pytest.fixture(scope="module")
def drafter_tok(tiny_paths: dict[str, Path]) -> Tokenizer:
    return Tokenizer.from_gguf(tiny_paths["gemma3"])


@pytest.fixture(scope="module")
def gemma_fp32(tiny_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Backend:
    root = tmp_path_factory.mktemp("weights")
    return load_backend(
        tiny_paths["gemma3"], weights="fp32", max_slots=4, max_len=512, cache_root=root
    )


@pytest.fixture(scope="module")
def drafter(gemma_fp32: Backend, drafter_tok: Tokenizer, target_tok: Tokenizer) -> TextDrafter:
    return TextDrafter(gemma_fp32, drafter_tok, target_tok)


@pytest.fixture(scope="module")
def onnx_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx_cache")


def chat(tok: Tokenizer, user: str, answer: str = "") -> list[int]:
    ids = tok.encode_chat([{"role": "user", "content": user}])
    return ids + tok.encode(answer, add_bos=False) if answer else ids


def greedy_text(drafter: TextDrafter, context: str, steps: int) -> str:
    """The drafter model's own greedy continuation of context, computed without the session."""
    backend, tok = drafter.backend, drafter.tokenizer
    slot = backend.cache.allocate()
    try:
        ids = tok.encode(context)
        out: list[int] = []
        logits = backend.forward([slot], [torch.tensor(ids)], last_only=True)[0][-1]
        for _ in range(steps):
            token = int(logits.argmax())
            if token in tok.stop_ids:
                break
            out.append(token)
            logits = backend.forward([slot], [torch.tensor([token])], last_only=True)[0][-1]
        return tok.decode(out)
    finally:
        backend.cache.free(slot)


# -- rendering -------------------------------------------------------------------------------


def test_chat_markup_renders_as_plain_turns(target_tok: Tokenizer) -> None:
    ids = chat(target_tok, "Write a function.")
    renderer = ChatRenderer(target_tok)
    text = complete_utf8(renderer.render(ids))
    assert text == "User: Write a function.\nAssistant:"
    assert renderer.state.drafting and renderer.state.fresh
    more = ids + target_tok.encode("The fox", add_bos=False)
    assert complete_utf8(renderer.render(more)) == "User: Write a function.\nAssistant: The fox"
    assert renderer.state.drafting and not renderer.state.fresh
    # No special token leaks as text, and the default system turn is left out.
    for marker in ("<|im_start|>", "<|im_end|>", "system", "helpful"):
        assert marker not in text


def test_rendering_follows_the_committed_prefix(target_tok: Tokenizer) -> None:
    """Rendering a sequence, then a different one with a shared prefix, equals rendering the
    second from scratch (the per-token state is rolled back, not carried over)."""
    a = chat(target_tok, "one", "The quick brown")
    b = chat(target_tok, "one", "The lazy dog")
    renderer = ChatRenderer(target_tok)
    renderer.render(a)
    assert renderer.render(b) == ChatRenderer(target_tok).render(b)


def test_no_draft_outside_the_target_turn(drafter: TextDrafter, target_tok: Tokenizer) -> None:
    ended = chat(target_tok, "Hi", "Hello") + [target_tok.spec.tokens.index("<|im_end|>")]
    mid_user = target_tok.encode_chat([{"role": "user", "content": "Hi"}])[:-3]
    session = drafter.open(GREEDY)
    try:
        for committed in (ended, mid_user):
            draft = session.propose(committed, 4)
            assert draft.tokens == () and draft.position == len(committed)
        assert session.stats.skipped == 2 and session.stats.fed == 0
        assert session.propose(chat(target_tok, "Hi"), 0).tokens == ()
    finally:
        session.close()


# -- re-tokenising for the target -------------------------------------------------------------


def test_aligned_boundary_takes_the_tokens_after_the_context(
    drafter: TextDrafter, target_tok: Tokenizer
) -> None:
    committed = chat(target_tok, "Tell me", "The quick")
    result = drafter.to_target(committed, " brown fox jumps.")
    assert result.boundary == "aligned"
    assert target_tok.decode(result.tokens) == " brown fox jumps."  # ends in punctuation: kept
    assert result.tokens == tuple(target_tok.encode(" brown fox jumps.", add_bos=False))
    # Stopping inside a word: its last token is not proposed.
    open_word = drafter.to_target(committed, " brown fox jum")
    assert open_word.tokens == tuple(target_tok.encode(" brown fox jum", add_bos=False)[:-1])
    assert " brown fox".startswith(target_tok.decode(open_word.tokens[:2]))
    # The drafter ended its text: the target's end of turn follows.
    im_end = target_tok.spec.tokens.index("<|im_end|>")
    assert drafter.to_target(committed, " brown fox", end=im_end).tokens[-1] == im_end


def test_token_straddling_the_boundary_is_dropped(
    drafter: TextDrafter, target_tok: Tokenizer
) -> None:
    """The context's last word is continued by the draft: "The quick bro" + "wn fox." joins to
    " brown", which the target (having committed " bro...") can no longer produce."""
    committed = chat(target_tok, "Tell me", "The quick bro")
    joint = target_tok.encode("The quick brown fox.", add_bos=False)
    assert target_tok.encode("The quick bro", add_bos=False) != joint[:3]  # really straddles
    result = drafter.to_target(committed, "wn fox.")
    assert result.boundary == "straddled"
    assert target_tok.decode(result.tokens) == "wn fox."
    assert target_tok.decode(committed + list(result.tokens)).endswith("The quick brown fox.")


def test_indentation_straddle_keeps_the_committed_spaces(
    drafter: TextDrafter, target_tok: Tokenizer
) -> None:
    """Committed "\\n   " then "return": jointly the spaces split 2 + " return", a boundary the
    target no longer has; the draft starts at its own boundary with "return"."""
    committed = chat(target_tok, "Go on", "def f():\n   ")
    result = drafter.to_target(committed, "return 1.")
    assert result.boundary == "straddled"
    assert result.tokens == tuple(target_tok.encode("return 1.", add_bos=False))


def test_context_that_does_not_retokenise_drafts_nothing(
    drafter: TextDrafter, target_tok: Tokenizer
) -> None:
    split = target_tok.encode(" qu", add_bos=False) + target_tok.encode("ick", add_bos=False)
    committed = chat(target_tok, "Tell me", "The") + split
    assert split != target_tok.encode(" quick", add_bos=False)  # a non-canonical split
    result = drafter.to_target(committed, " brown fox.")
    assert result == type(result)((), "mismatched")


# -- drafting with the model -----------------------------------------------------------------


def test_drafts_are_target_ids_for_the_drafter_text(
    drafter: TextDrafter, target_tok: Tokenizer
) -> None:
    control = {i for i, kind in enumerate(target_tok.spec.token_types) if kind == TYPE_CONTROL}
    im_end = target_tok.spec.tokens.index("<|im_end|>")
    contexts = [
        ("Write a function", ""),
        ("Count", "def fibonacci(n: int) -> int:\n    if n < 2:"),
        ("Tell me", "The quick brown fox jumps over the"),
        ("Go on", "for i in range(10):\n    print"),
    ]
    proposed = 0
    for user, answer in contexts:
        committed = chat(target_tok, user, answer)
        session = drafter.open(GREEDY)
        try:
            draft = session.propose(committed, 4)
        finally:
            session.close()
        assert draft.position == len(committed) and draft.q_ids is None and draft.k <= 4
        assert all(0 <= t < target_tok.vocab_size for t in draft.tokens)
        body = [t for t in draft.tokens if t != im_end]
        assert not control & set(body)
        context = complete_utf8(ChatRenderer(target_tok).render(committed))
        expected = greedy_text(drafter, context, 12)
        if not answer:
            expected = expected.removeprefix(" ")
        assert expected.startswith(target_tok.decode(body)), (expected, body)
        proposed += len(body)
    assert proposed > 0  # the checks above saw real drafts


class ScriptedBackend:
    """The tiny drafter model with its argmax replaced by a script: a pass of several tokens (a
    prefill) is followed by script[0], each 1-token pass after it by the next script token.
    Passes still run, so the KV cache is real."""

    def __init__(self, backend: Backend, script: list[int]) -> None:
        self._backend = backend
        self.config, self.layers, self.cache = backend.config, backend.layers, backend.cache
        self.name, self.weight_format = "scripted", backend.weight_format
        self._script = script
        self._at = 0

    def forward(
        self, slots: Sequence[int], inputs: Sequence[torch.Tensor], last_only: bool = False
    ) -> list[torch.Tensor]:
        outs = [out.clone() for out in self._backend.forward(slots, inputs, last_only)]
        self._at = 0 if len(inputs[0]) > 1 else min(self._at + 1, len(self._script) - 1)
        for out in outs:
            out[-1] = -1e9
            out[-1, self._script[self._at]] = 1e9
        return outs


def scripted(drafter: TextDrafter, text: str, stop: bool) -> TextDrafter:
    tok = drafter.tokenizer
    script = tok.encode(text, add_bos=False) + ([tok.eos_id] if stop and tok.eos_id else [])
    return TextDrafter(ScriptedBackend(drafter.backend, script), tok, drafter.target)


@pytest.mark.parametrize(
    ("answer", "draft_text", "stop", "expected"),
    [
        # Right after "Assistant:": the drafter's leading space is not the target's.
        ("", " The fox.", True, "The fox."),
        ("The quick", " the lazy dog.", True, " the lazy dog."),
        # The drafter starting the next turn ends the draft like its end of text.
        ("", " The fox.\nUser: hi", False, "The fox."),
    ],
)
def test_drafter_end_of_text_becomes_the_target_end_of_turn(
    drafter: TextDrafter,
    target_tok: Tokenizer,
    answer: str,
    draft_text: str,
    stop: bool,
    expected: str,
) -> None:
    im_end = target_tok.spec.tokens.index("<|im_end|>")
    session = scripted(drafter, draft_text, stop).open(GREEDY)
    try:
        draft = session.propose(chat(target_tok, "Go on", answer), 8)
    finally:
        session.close()
    assert draft.tokens == (*target_tok.encode(expected, add_bos=False), im_end)


def test_plain_text_ends_with_the_target_eos(drafter: TextDrafter, target_tok: Tokenizer) -> None:
    committed = target_tok.encode("The quick brown fox jumps over")
    expected = (*target_tok.encode(" the lazy dog."), target_tok.eos_id)
    for k in (8, 2):
        session = scripted(drafter, " the lazy dog.", True).open(GREEDY)
        try:
            assert session.propose(committed, k).tokens == expected[:k]
        finally:
            session.close()


@pytest.mark.parametrize("heal", ["space", "off"])
def test_trailing_spaces_are_healed(drafter: TextDrafter, target_tok: Tokenizer, heal: str) -> None:
    """The target's "\\n   " (its next token brings the fourth space) ends the drafter's text in
    a space token; healing leaves that space to the draft's first token, which must start with
    it, and the draft text is what comes after it."""
    tok = drafter.tokenizer
    script = tok.encode("  return 1.", add_bos=False) + [tok.eos_id or 0]
    healing = TextDrafter(ScriptedBackend(drafter.backend, script), tok, target_tok, heal=heal)
    committed = chat(target_tok, "Go on", "def f():\n   ")
    context = tok.encode(complete_utf8(ChatRenderer(target_tok).render(committed)))
    assert healing.healed_text(context[-1]) == (" " if heal == "space" else "")
    session = healing.open(GREEDY)
    try:
        draft = session.propose(committed, 8)
        assert session.stats.healed == (heal == "space")
    finally:
        session.close()
    im_end = target_tok.spec.tokens.index("<|im_end|>")
    assert draft.tokens[-1] == im_end
    expected = " return 1." if heal == "space" else "  return 1."
    assert target_tok.decode(draft.tokens[:-1]) == expected


def test_best_token_with_prefix(drafter: TextDrafter) -> None:
    logits = torch.randn(
        drafter.backend.config.vocab_size, generator=torch.Generator().manual_seed(0)
    )
    table = drafter.drafter_table
    kinds = drafter.tokenizer.spec.token_types
    for prefix in (" ", "  ", " t", "\n"):
        allowed = [i for i, raw in enumerate(table) if raw.startswith(prefix.encode())]
        allowed = [i for i in allowed if kinds[i] != TYPE_BYTE]
        assert allowed
        best = drafter.best_with_prefix(logits, prefix)
        assert best in allowed
        assert float(logits[best]) == max(float(logits[i]) for i in allowed)


def test_second_propose_feeds_only_new_tokens(drafter: TextDrafter, target_tok: Tokenizer) -> None:
    committed = chat(target_tok, "Tell me a story", "The quick brown fox jumps over the lazy dog.")
    cache = drafter.backend.cache
    session = drafter.open(GREEDY)
    try:
        first = session.propose(committed, 3)
        stats = session.stats
        context_ids = drafter.tokenizer.encode(
            complete_utf8(ChatRenderer(target_tok).render(committed))
        )
        assert stats.prefilled == len(context_ids)
        assert cache.length(session.slot) == stats.fed
        fed_before = stats.fed
        grown = committed + target_tok.encode(" The dog sleeps.", add_bos=False)
        session.propose(grown, 3)
        new_ids = len(drafter.tokenizer.encode(" The dog sleeps.", add_bos=False))
        # Only the new text (and the drafter token at the old end, which may re-tokenise) is fed;
        # the draft tokens of the first call that the new text does not repeat are dropped.
        assert stats.prefilled - len(context_ids) <= new_ids + 1
        assert cache.length(session.slot) <= fed_before - first.k + new_ids + stats.steps + 2
        assert cache.length(session.slot) < stats.fed  # some K/V was kept, not refed
    finally:
        session.close()


def test_close_frees_the_slot(drafter: TextDrafter, target_tok: Tokenizer) -> None:
    cache = drafter.backend.cache
    before = cache.slots
    session = drafter.open(GREEDY)
    assert session.slot in cache.slots and len(cache.slots) == len(before) + 1
    session.propose(chat(target_tok, "Hi"), 2)
    session.close()
    assert cache.slots == before
    session.close()  # twice is harmless


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_prefix_encoder_matches_full_tokenisation(tiny_paths: dict[str, Path], arch: str) -> None:
    tok = Tokenizer.from_gguf(tiny_paths[arch])
    encoder = PrefixEncoder(tok, min_chunk=64, margin=16)
    lines = [f"line {i}: the quick brown fox\n    indented {i * 7}\n\n" for i in range(30)]
    text = ""
    full_chars = 0
    for line in lines:
        text += line
        full_chars += len(text)
        assert encoder.encode(text) == tok.encode(text)
    assert encoder.frozen_text and text.startswith(encoder.frozen_text)
    assert encoder.encoded_chars < full_chars / 3  # the frozen prefix is not re-tokenised
    # A text that does not extend the frozen prefix starts over, still correct.
    assert encoder.encode("other text\n") == tok.encode("other text\n")


def test_load_text_drafter(
    tiny_paths: dict[str, Path], target_tok: Tokenizer, tmp_path: Path
) -> None:
    loaded = load_text_drafter(
        tiny_paths["qwen2"], str(tiny_paths["gemma3"]), weights="fp32", max_slots=2,
        max_len=256, cache_root=tmp_path,
    )  # fmt: skip
    assert loaded.target.vocab_size == target_tok.vocab_size
    assert loaded.backend.cache.max_slots == 2 and loaded.kind == "text"


# -- onnxruntime ---------------------------------------------------------------------------


def test_model_drafter_on_onnx_matches_torch(
    tiny_paths: dict[str, Path], onnx_root: Path, tmp_path: Path
) -> None:
    """Greedy drafts of a ModelDrafter over onnxruntime fp32 equal those over torch fp32
    (logits agree to ~1e-4, far inside the margins of the argmaxes here)."""
    path = tiny_paths["qwen2"]
    ref = ModelDrafter(load_backend(path, weights="fp32", cache_root=tmp_path))
    onnx = ModelDrafter(load_backend(path, backend="onnx", weights="fp32", cache_root=onnx_root))
    assert onnx.backend.name == "onnx"
    tok = Tokenizer.from_gguf(path)
    for text in ("The quick brown fox", "def fibonacci(n: int) -> int:\n"):
        committed = tok.encode(text)
        sessions = [ref.open(GREEDY), onnx.open(GREEDY)]
        try:
            a, b = (s.propose(committed, 6) for s in sessions)
            assert a.tokens == b.tokens and a.k == 6
            grown = committed + list(a.tokens[:2])  # KV reuse after accepting two tokens
            assert sessions[0].propose(grown, 4).tokens == sessions[1].propose(grown, 4).tokens
        finally:
            for s in sessions:
                s.close()


def test_text_drafter_on_onnx_matches_torch(
    drafter: TextDrafter, tiny_paths: dict[str, Path], target_tok: Tokenizer, onnx_root: Path
) -> None:
    onnx_backend = load_backend(
        tiny_paths["gemma3"], backend="onnx", weights="fp32", cache_root=onnx_root
    )
    onnx = TextDrafter(onnx_backend, drafter.tokenizer, target_tok)
    for answer in ("The quick brown fox jumps over the", "def add(a, b):\n    return"):
        committed = chat(target_tok, "Go on", answer)
        sessions = [drafter.open(GREEDY), onnx.open(GREEDY)]
        try:
            a, b = (s.propose(committed, 4) for s in sessions)
            assert a.tokens == b.tokens
        finally:
            for s in sessions:
                s.close()
