"""Cross-tokenizer drafting: a small model with another vocabulary drafts through text.

The drafter (gemma3-270m, a SentencePiece base model) cannot propose the target's (Qwen's) token
ids directly, so a session works in three steps:

1. Render: the target's committed ids become text the drafter understands. Plain text decodes
   as is; chat markup (``<|im_start|>user\\n ...<|im_end|>``, ``<start_of_turn>model\\n``)
   becomes "User: ...\\nAssistant: ..." and the system turn is left out: a base model was never
   tuned on the markup, and special tokens must not leak into its text.
2. Draft: the rendered text, tokenised with the drafter's tokenizer, runs through the drafter
   model (any Backend: torch, or onnxruntime for devices without torch) in a KV slot that keeps
   the longest common prefix of drafter ids already fed; greedy drafter tokens follow until they
   cover k target tokens, the drafter ends its text, or it starts a new turn. When the text
   ends in a run of spaces (Qwen writes indentation as "\\n   " + " return"), that drafter
   token is left out of the context and the first drafted token must start with it (token
   healing): Gemma, seeing a three-space token, would otherwise write a newline, not code.
3. Re-tokenise: the tail of the target's own text (its last few committed tokens) and the draft
   text are tokenised jointly with the target's tokenizer. The tokens that cover exactly the
   context must equal the committed ones (the target is in the state its tokenizer would
   produce); the tokens after them are the draft. When a joint token straddles the
   context/draft boundary (the target stopped mid-word: committed " hel", drafted "lo world"
   joins to " hello"), that token is dropped and the draft text is tokenised on its own from
   the boundary, which is where the target's next token starts. When the context's own
   re-tokenisation does not match, nothing is drafted. The last target token is dropped when
   the draft text stops inside a word (the drafter may have gone on with it); when the drafter
   ended its text, the target's end-of-turn token follows.

Proposals are deterministic (q None: the verifier treats them as one-hot), so sampling stays
lossless whatever the drafter is.

Only the recent tail of text is tokenised per call: the target side needs only the last few
committed tokens, and the drafter side keeps the ids of a frozen prefix of the rendered text
(split after a newline, checked to tokenise identically split and joined).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from models.backend import Backend, load_backend
from models.sampling import SamplingParams
from models.speculative import Draft, common_prefix
from models.tokenizer import (
    TYPE_CONTROL,
    TYPE_NORMAL,
    TYPE_USER_DEFINED,
    Tokenizer,
    token_byte_table,
)

TURN_START_TOKENS = ("<|im_start|>", "<start_of_turn>")
TURN_END_TOKENS = ("<|im_end|>", "<end_of_turn>")
ROLE_LABELS = {"user": "User", "assistant": "Assistant", "model": "Assistant", "system": ""}
ASSISTANT = "Assistant"
NEW_TURN_MARKERS = ("\nUser:", "\nAssistant:")  # the drafter writing the next turn: its text ends
GARBAGE_MARKER = "\n\n\n\n"  # a run of blank lines: nothing after it is worth verifying

TAIL_TOKENS = 8  # committed target tokens re-tokenised with each draft
CHECK_TOKENS = 3  # of which the last this many must come out identical


# -- rendering the target's ids as plain text ------------------------------------------------


@dataclass(frozen=True)
class RenderState:
    """Where the renderer is after a token. mode: "text" (emitting), "role" (reading the role
    line after a turn start), "hidden" (inside a left-out turn). turn: None outside any chat
    markup, "" between turns, else the label of the current turn. fresh: a turn label was just
    written and no content yet (the first content gets a space after "Label:")."""

    mode: str = "text"
    turn: str | None = None
    role: bytes = b""
    fresh: bool = False

    @property
    def drafting(self) -> bool:
        """Whether a continuation here is the target's own text (plain text or its turn)."""
        return self.mode == "text" and self.turn in (None, ASSISTANT)


class ChatRenderer:
    """Renders target token ids one at a time; per-token output and state, so that the rendering
    of a grown sequence reuses the rendering of its committed prefix."""

    def __init__(self, target: Tokenizer) -> None:
        spec = target.spec
        self._table = token_byte_table(spec, keep_control=False)
        self._control = {i for i, kind in enumerate(spec.token_types) if kind == TYPE_CONTROL}
        self._starts = {i for i, t in enumerate(spec.tokens) if t in TURN_START_TOKENS}
        self._ends = {i for i, t in enumerate(spec.tokens) if t in TURN_END_TOKENS}
        self.ids: list[int] = []
        self._parts: list[bytes] = []
        self._states: list[RenderState] = []

    @property
    def state(self) -> RenderState:
        return self._states[-1] if self._states else RenderState()

    def render(self, ids: Sequence[int]) -> bytes:
        """The text of ids as UTF-8 bytes (may end inside a character)."""
        keep = common_prefix(self.ids, ids)
        del self.ids[keep:], self._parts[keep:], self._states[keep:]
        state = self.state
        for token in ids[keep:]:
            part, state = self._step(state, token)
            self.ids.append(token)
            self._parts.append(part)
            self._states.append(state)
        return b"".join(self._parts)

    def _step(self, state: RenderState, token: int) -> tuple[bytes, RenderState]:
        if token in self._starts:
            return b"", RenderState(mode="role", turn="")
        if token in self._ends:
            # A left-out turn stays left out up to the next turn, newline after it included.
            return b"", RenderState(mode="hidden" if state.mode == "hidden" else "text", turn="")
        if token in self._control or not 0 <= token < len(self._table):
            return b"", state
        raw = self._table[token]
        if state.mode == "hidden":
            return b"", state
        if state.mode == "role":
            role = state.role + raw
            if b"\n" not in role:
                return b"", RenderState(mode="role", turn="", role=role)
            name, _, rest = role.partition(b"\n")
            key = name.decode("utf-8", errors="replace").strip()
            label = ROLE_LABELS.get(key.lower(), key.capitalize())
            if not label:
                return b"", RenderState(mode="hidden", turn="")
            head = label.encode() + b":"
            body, state = self._content(RenderState(turn=label, fresh=True), rest)
            return head + body, state
        return self._content(state, raw)

    @staticmethod
    def _content(state: RenderState, raw: bytes) -> tuple[bytes, RenderState]:
        if not state.fresh or not raw:
            return raw, state
        after = RenderState(turn=state.turn)
        return (raw if raw.startswith(b"\n") else b" " + raw.lstrip(b" ")), after


def _sorted_vocab(tokenizer: Tokenizer, table: Sequence[bytes]) -> tuple[torch.Tensor, list[str]]:
    """The drafter's ordinary tokens sorted by their text (ids, texts), so that the tokens
    starting with a given text are one contiguous range."""
    kinds = tokenizer.spec.token_types
    pairs = []
    for token, raw in enumerate(table):
        if kinds[token] in (TYPE_NORMAL, TYPE_USER_DEFINED) and raw:
            try:
                pairs.append((raw.decode("utf-8"), token))
            except UnicodeDecodeError:
                continue
    pairs.sort()
    return torch.tensor([t for _, t in pairs], dtype=torch.int64), [text for text, _ in pairs]


def may_continue(text: str) -> bool:
    """Whether text may stop inside a word: its last target token could then be a fragment
    of what the drafter would have gone on to write, and is not proposed. After punctuation or
    whitespace the last token is complete enough to be worth a place in the verify pass."""
    return bool(text) and (text[-1].isalnum() or text[-1] == "_")


def complete_utf8(data: bytes) -> str:
    """Text of data without an incomplete character at its end (held back, not replaced)."""
    for cut in range(min(4, len(data)) + 1):
        try:
            return data[: len(data) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return data.decode("utf-8", errors="replace")


# -- the drafter's tokenisation of a growing text --------------------------------------------


class PrefixEncoder:
    """Tokenises a text that grows at its end, re-tokenising only what follows a frozen prefix.

    The prefix is frozen right after a newline, once splitting the text there gives the same ids
    as not splitting it (true for both vocabulary kinds sled reads, checked rather than assumed).
    """

    def __init__(self, tokenizer: Tokenizer, min_chunk: int = 512, margin: int = 128) -> None:
        self._tok = tokenizer
        self._min_chunk, self._margin = min_chunk, margin
        self._start = tokenizer.encode("")  # the BOS, when the model wants one
        self.frozen_text = ""
        self._frozen_ids = list(self._start)
        self._next_try = 0
        self.encoded_chars = 0  # characters tokenised so far (for tests and stats)

    def encode(self, text: str) -> list[int]:
        if not text.startswith(self.frozen_text):
            self.frozen_text, self._frozen_ids, self._next_try = "", list(self._start), 0
        tail = text[len(self.frozen_text) :]
        ids = self._frozen_ids + self._tok.encode(tail, add_bos=False)
        self.encoded_chars += len(tail)
        if len(text) >= self._next_try and len(tail) >= self._min_chunk + self._margin:
            self._freeze(text, ids)
        return ids

    def _freeze(self, text: str, ids: list[int]) -> None:
        base = len(self.frozen_text)
        at = text.rfind("\n", base, len(text) - self._margin)
        # Split after the newline run, before a character that starts no whitespace run.
        while at >= 0 and text[at + 1] in "\n \t":
            at = text.rfind("\n", base, at)
        split = at + 1
        if at < 0 or split - base < self._min_chunk:
            self._next_try = len(text) + self._min_chunk
            return
        head = self._frozen_ids + self._tok.encode(text[base:split], add_bos=False)
        rest = self._tok.encode(text[split:], add_bos=False)
        self.encoded_chars += len(text) - base
        if head + rest == ids:
            self.frozen_text, self._frozen_ids = text[:split], head
        else:
            self._next_try = len(text) + self._min_chunk


# -- the drafter -----------------------------------------------------------------------------


@dataclass
class TextDraftStats:
    """Counters of one session (mutable; read by tests and benches)."""

    proposals: int = 0
    fed: int = 0  # drafter tokens run through the model (prefill and draft steps)
    prefilled: int = 0  # of which context tokens (not kept from earlier calls)
    steps: int = 0  # greedy drafter tokens generated
    forwards: int = 0  # drafter model passes
    forward_s: float = 0.0  # seconds in them
    aligned: int = 0  # joint tokenisation had a token boundary at the context's end
    straddled: int = 0  # a joint token crossed it (dropped; the draft re-tokenised alone)
    mismatched: int = 0  # the context did not re-tokenise to the committed ids: no draft
    skipped: int = 0  # nothing to draft (not in the target's turn, no room, k < 1)
    healed: int = 0  # the context's last drafter token was left to the draft's first


@dataclass(frozen=True)
class TargetDraft:
    """Target ids for the positions after the committed ones, and how the boundary went."""

    tokens: tuple[int, ...]
    boundary: str  # "aligned" | "straddled" | "mismatched"


class TextSession:
    """One session's drafting state: a drafter KV slot, the drafter ids in it, the renderer."""

    def __init__(self, drafter: TextDrafter, params: SamplingParams) -> None:
        self.kind = drafter.kind
        self._drafter = drafter
        self._backend = drafter.backend
        self._params = params
        self._slot = self._backend.cache.allocate()
        self._fed: list[int] = []  # drafter ids whose K/V sit in the slot, in order
        self._renderer = ChatRenderer(drafter.target)
        self._encoder = PrefixEncoder(drafter.tokenizer)
        self.stats = TextDraftStats()

    @property
    def slot(self) -> int:
        return self._slot

    def _feed(self, ids: Sequence[int]) -> torch.Tensor:
        """Append drafter ids to the slot; the logits of the last one."""
        logits = torch.empty(0)
        chunk = self._drafter.prefill_chunk
        for i in range(0, len(ids), chunk):
            part = torch.tensor(list(ids[i : i + chunk]), dtype=torch.int64)
            started = time.perf_counter()
            logits = self._backend.forward([self._slot], [part], last_only=True)[0][-1]
            self.stats.forward_s += time.perf_counter() - started
            self.stats.forwards += 1
        self._fed.extend(ids)
        self.stats.fed += len(ids)
        return logits

    def propose(self, committed: Sequence[int], k: int) -> Draft:
        start = time.perf_counter()
        position = len(committed)
        self.stats.proposals += 1
        tokens = self._propose(committed, k) if k >= 1 and committed else ()
        return Draft(
            position, tokens, kind=self.kind, draft_s=time.perf_counter() - start
        )  # fmt: skip

    def _propose(self, committed: Sequence[int], k: int) -> tuple[int, ...]:
        drafter = self._drafter
        rendered = self._renderer.render(committed)
        state = self._renderer.state
        if not state.drafting:
            self.stats.skipped += 1
            return ()
        ids = self._encoder.encode(complete_utf8(rendered))
        max_steps = drafter.max_steps(k)
        cache = self._backend.cache
        if len(ids) + max_steps > cache.max_len:
            self.stats.skipped += 1
            return ()
        healed = drafter.healed_text(ids[-1]) if len(ids) > 1 else ""
        if healed:
            ids = ids[:-1]
            self.stats.healed += 1
        keep = min(common_prefix(self._fed, ids), len(ids) - 1)
        cache.truncate(self._slot, keep)
        del self._fed[keep:]
        logits = self._feed(ids[keep:])
        self.stats.prefilled += len(ids) - keep
        text, ended = self._generate(logits, k, max_steps, state.fresh, healed)
        if not text and not ended:
            return ()
        end = drafter.turn_end if state.turn == ASSISTANT else drafter.target.eos_id
        result = drafter.to_target(committed, text, end if ended else None)
        setattr(self.stats, result.boundary, getattr(self.stats, result.boundary) + 1)
        return result.tokens[:k]

    def _generate(
        self, logits: torch.Tensor, k: int, max_steps: int, fresh: bool, healed: str
    ) -> tuple[str, bool]:
        """Greedy drafter text after the fed ids (less the healed text its first token must
        start with), and whether the drafter ended it."""
        drafter = self._drafter
        pieces: list[int] = []
        text = ""
        for step in range(max_steps):
            if step == 0 and healed:
                token = drafter.best_with_prefix(logits, healed)
            else:
                token = int(logits.argmax())
            self.stats.steps += 1
            if token in drafter.tokenizer.stop_ids:
                return text, True
            pieces.append(token)
            text = complete_utf8(b"".join(drafter.drafter_table[t] for t in pieces))
            text = text[len(healed) :]
            if fresh:
                # "Assistant:" was followed by the space the target's turn does not have.
                text = text.removeprefix(" ")
            cut = min((text.find(m) for m in NEW_TURN_MARKERS if m in text), default=-1)
            if cut >= 0:
                return text[:cut], True
            garbage = text.find(GARBAGE_MARKER)
            if garbage >= 0:
                return text[:garbage], False
            if step + 1 >= max_steps or drafter.covers(text, k):
                break
            logits = self._feed([token])
        return text, False

    def close(self) -> None:
        if self._slot in self._backend.cache.slots:
            self._backend.cache.free(self._slot)


class TextDrafter:
    """Drafts for a target through text with a model of another vocabulary, on any Backend."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: Tokenizer,
        target: Tokenizer,
        kind: str = "text",
        prefill_chunk: int = 256,
        heal: Literal["space", "always", "off"] = "space",
    ) -> None:
        if heal not in ("space", "always", "off"):
            raise ValueError(f"heal must be 'space', 'always' or 'off', got {heal!r}")
        if backend.layers != (0, backend.config.n_layers):
            raise ValueError("a drafter backend must hold all layers of its model")
        self.backend = backend
        self.tokenizer = tokenizer
        self.target = target
        self.kind = kind
        self.prefill_chunk = prefill_chunk
        self.drafter_table = token_byte_table(tokenizer.spec, keep_control=False)
        self._target_table = token_byte_table(target.spec, keep_control=False)
        self._target_control = {
            i for i, kind in enumerate(target.spec.token_types) if kind == TYPE_CONTROL
        }
        ends = [i for i, t in enumerate(target.spec.tokens) if t in TURN_END_TOKENS]
        self.turn_end = ends[0] if ends else target.eos_id
        self.heal = heal
        self._vocab_order, self._vocab_texts = _sorted_vocab(tokenizer, self.drafter_table)

    def healed_text(self, last: int) -> str:
        """The text of the context's last drafter token if the draft should regenerate it
        (token healing): a run of whitespace, which the drafter splits otherwise than the target
        (Qwen's "\\n   " + " return" against Gemma's "\\n" + "    " + "return"), so that the
        drafter, seeing three spaces, writes a newline rather than the code after them."""
        if self.heal == "off" or last in self.tokenizer.stop_ids:
            return ""
        text = self.drafter_table[last].decode("utf-8", errors="replace")
        if self.heal == "space" and text.strip(" \t"):
            return ""
        return text if text and "\ufffd" not in text else ""

    def best_with_prefix(self, logits: torch.Tensor, prefix: str) -> int:
        """The drafter's most likely token among those whose text starts with prefix."""
        lo = bisect.bisect_left(self._vocab_texts, prefix)
        hi = bisect.bisect_left(self._vocab_texts, prefix + "\U0010ffff", lo)
        if lo == hi:
            return int(logits.argmax())
        ids = self._vocab_order[lo:hi]
        return int(ids[int(logits[ids].argmax())])

    def open(self, params: SamplingParams) -> TextSession:
        return TextSession(self, params)

    @staticmethod
    def max_steps(k: int) -> int:
        """Drafter tokens allowed for k target tokens (one more may be needed, as an open last
        target token is dropped; a drafter token may also cover less text than a target one)."""
        return 2 * k + 2

    def covers(self, text: str, k: int) -> bool:
        """Whether text holds enough target tokens for k (after dropping an open last one)."""
        count = len(self.target.encode(text, add_bos=False))
        return count - (1 if may_continue(text) else 0) >= k

    def to_target(self, committed: Sequence[int], text: str, end: int | None = None) -> TargetDraft:
        """Target ids for draft text following the committed ids (see the module docstring);
        `end`: the drafter ended its text, and this target token ends it too."""
        start = len(committed)
        floor = max(0, len(committed) - TAIL_TOKENS)
        while start > floor and committed[start - 1] not in self._target_control:
            start -= 1
        tail = list(committed[start:])
        context = b"".join(self._target_table[t] for t in tail)
        try:
            context_text = context.decode("utf-8")
        except UnicodeDecodeError:
            return TargetDraft((), "mismatched")  # the target stopped inside a character
        joint = self.target.encode(context_text + text, add_bos=False)
        cut = len(context)
        before = [pair for pair in self._with_ends(joint) if pair[0] <= cut]
        tail_pairs = self._with_ends(tail)
        tail_ends = {end for end, _ in tail_pairs}
        # The last offset where both tokenisations have a boundary; up to there the committed
        # tokens must be what the target's tokenizer makes of the text (the last few checked).
        agreed = len(before)
        while agreed and before[agreed - 1][0] not in tail_ends:
            agreed -= 1
        reached = before[agreed - 1][0] if agreed else 0
        wanted = [pair for pair in tail_pairs if pair[0] <= reached][-CHECK_TOKENS:]
        if before[agreed - len(wanted) : agreed] != wanted:
            return TargetDraft((), "mismatched")
        if reached == cut:
            boundary, tokens = "aligned", joint[len(before) :]
        else:
            # A joint token straddles the boundary: the target has already committed to a cut
            # inside it, so its next token starts exactly where the draft text does.
            boundary, tokens = "straddled", self.target.encode(text, add_bos=False)
        if end is not None:
            tokens = [*tokens, end]
        elif may_continue(text):
            tokens = tokens[:-1]
        return TargetDraft(tuple(tokens), boundary)

    def _with_ends(self, ids: Sequence[int]) -> list[tuple[int, int]]:
        """(byte offset where each token's text ends, token id)."""
        out, total = [], 0
        for token in ids:
            total += len(self._target_table[token])
            out.append((total, token))
        return out


def load_text_drafter(
    target_path: str | Path,
    drafter_model: str | Path,
    backend: str = "torch",
    weights: str = "bf16",
    max_slots: int = 8,
    max_len: int = 2048,
    threads: int = 0,
    cache_root: Path | None = None,
) -> TextDrafter:
    """A TextDrafter for the target GGUF at target_path, drafting with drafter_model (a .gguf
    path or a registry name) on the named backend and weight format."""
    from models.registry import resolve_model

    path = resolve_model(str(drafter_model))
    model = load_backend(
        path, backend=backend, weights=weights, max_slots=max_slots, max_len=max_len,
        threads=threads, cache_root=cache_root,
    )  # fmt: skip
    return TextDrafter(model, Tokenizer.from_gguf(path), Tokenizer.from_gguf(target_path))
