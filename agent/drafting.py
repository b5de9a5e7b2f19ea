"""Drafting across peers: the verifier's channels to drafters, and a drafter node's service.

The verifier drives every session (agent/engine.py); for each one it holds a `DraftChannel`:
- `LocalDraftChannel`: a drafter in this process (prompt lookup costs nothing; a model drafter
  here shares the verifier's cores: the centralized set-up);
- `RemoteDraftChannel`: a drafter on another node, asked with one `DraftRequest` per draft. The
  request carries only the tokens the drafter does not have yet (`keep` + delta), and the reply
  the draft tokens with their sparse proposal distribution. A feature drafter (drafting from the
  target's final-normed hidden states, models/feature_drafter.py) also gets the features of
  the positions it lacks: the verifier computed them in its passes anyway.
A channel that fails (the drafter died, refused, or sent a draft that does not check out)
raises `DraftFailed`; the verifier then drafts elsewhere or verifies without a draft. Drafts
never decide text, verification does, so no token changes when a drafter disappears.

`DrafterService` is the drafter node's side: one `DraftSession` per (verifier, session), on a
single worker thread (a device drafts one thing at a time). After each reply it drafts ahead:
it assumes its draft is accepted, guesses the token after it, and drafts the next k tokens, so
when the verifier's next request matches the guess the reply is immediate (drafting overlaps
verification, as in SpecEdge's proactive drafting). Feature sessions do not draft ahead: the
guessed continuation has no target features until the verifier has read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, cast

import numpy as np
import torch

from agent.wire import (
    BAD_SESSION,
    MISSING_FEATURES,
    NOT_DRAFTING,
    UNKNOWN_DRAFT_SESSION,
    DraftClose,
    DraftReply,
    DraftRequest,
)
from models.drafters import Drafter, DraftSession
from models.feature_drafter import MissingFeaturesError, check_features
from models.sampling import InvalidSamplingParamsError, SamplingParams
from models.speculative import BadDraftError, Draft, check_draft, common_prefix
from transport.connection import Connection, Context, Refused
from transport.errors import RemoteError, TransportError

log = logging.getLogger(__name__)

DRAFT_TIMEOUT_S = 10.0  # a drafter slower than this is treated as gone for the session
IDLE_SESSION_S = 300.0  # drafter-side sessions not asked for this long are dropped
AHEAD_TRIAL = 4  # guesses before the hit rate decides whether to keep drafting ahead
AHEAD_MIN_HIT_RATE = 0.4
AHEAD_RETRY_EVERY = 16


class DraftFailed(Exception):
    """A drafter stopped drafting for a session (gone, refused, or sent a bad draft)."""


class DraftChannel(Protocol):
    """One session's drafter. When `uses_features`, `propose` needs `features`: the target's
    features for positions 0..len(committed)-2 (the channel sends only what its drafter
    lacks); other channels are called without them."""

    kind: str
    node: str  # the node drafting ("" for this one)
    remote: bool
    uses_features: bool

    async def propose(
        self, committed: Sequence[int], k: int, features: torch.Tensor | None = None
    ) -> Draft: ...

    async def close(self) -> None: ...


class FeatureDraftSession(Protocol):
    """A draft session that drafts from target features (models.feature_drafter.FeatureSession):
    `held` positions' features it has; `features` cover features_from..len(committed)-2."""

    kind: str
    uses_features: bool

    @property
    def held(self) -> int: ...

    def propose(
        self,
        committed: Sequence[int],
        k: int,
        features: torch.Tensor | None = None,
        features_from: int = 0,
    ) -> Draft: ...

    def close(self) -> None: ...


def uses_features(thing: object) -> bool:
    """Whether a drafter, session or channel drafts from target features."""
    return bool(getattr(thing, "uses_features", False))


def propose_with_features(
    session: DraftSession, committed: Sequence[int], k: int, features: torch.Tensor | None
) -> Draft:
    """A draft from a session, giving a feature session the rows it lacks (all of them when
    what it holds does not fit `committed`)."""
    if not uses_features(session):
        return session.propose(committed, k)
    fs = cast(FeatureDraftSession, session)
    if features is None:
        raise MissingFeaturesError(f"a {fs.kind} drafter needs the target's features")
    start = min(fs.held, int(features.shape[0]))
    try:
        return fs.propose(committed, k, features[start:], start)
    except MissingFeaturesError:
        if start == 0:
            raise
        return fs.propose(committed, k, features, 0)


class LocalDraftChannel:
    """A drafter in this process; model drafters run on `executor` so the loop stays free."""

    remote = False

    def __init__(
        self, session: DraftSession, executor: ThreadPoolExecutor | None = None, node: str = ""
    ) -> None:
        self.kind = session.kind
        self.node = node
        self.uses_features = uses_features(session)
        self._session = session
        self._executor = executor

    async def propose(
        self, committed: Sequence[int], k: int, features: torch.Tensor | None = None
    ) -> Draft:
        try:
            if self._executor is None:
                return propose_with_features(self._session, committed, k, features)
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._executor, propose_with_features, self._session, committed, k, features
            )
        except Exception as exc:  # a drafter bug must not take the session down
            log.exception("local %s drafter failed", self.kind)
            raise DraftFailed(f"local {self.kind} drafter failed: {exc}") from exc

    async def close(self) -> None:
        if self._executor is None:
            self._session.close()
        else:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._session.close)


class RemoteDraftChannel:
    """A drafter on another node (see the module text)."""

    remote = True

    def __init__(
        self,
        conn: Connection,
        node: str,
        session_id: str,
        model: str,
        params: SamplingParams,
        vocab_size: int,
        timeout: float = DRAFT_TIMEOUT_S,
        uses_features: bool = False,
    ) -> None:
        self.kind = "remote"  # replaced by the drafter's own kind after its first reply
        self.node = node
        self.uses_features = uses_features  # the drafter node advertises a feature drafter
        self._conn = conn
        self._session_id = session_id
        self._model = model
        self._params = params
        self._vocab = vocab_size
        self._timeout = timeout
        self._held: list[int] = []  # what the drafter holds for this session
        self._features_held = 0  # positions whose features it holds (a prefix of _held's)

    async def propose(
        self, committed: Sequence[int], k: int, features: torch.Tensor | None = None
    ) -> Draft:
        if self.uses_features and (features is None or features.shape[0] != len(committed) - 1):
            raise DraftFailed(
                f"{self.node} drafts from target features; got "
                f"{None if features is None else tuple(features.shape)} for {len(committed)} tokens"
            )
        keep = common_prefix(self._held, committed)
        try:
            try:
                reply = await self._ask(committed, keep, k, features)
            except RemoteError as exc:
                if exc.code not in (UNKNOWN_DRAFT_SESSION, MISSING_FEATURES) or keep == 0:
                    raise
                # It restarted or dropped the session: everything again, features from 0.
                reply = await self._ask(committed, 0, k, features)
        except RemoteError as exc:
            raise DraftFailed(f"{self.node} refused to draft: {exc.code}: {exc.text}") from exc
        self._held = list(committed)
        self._features_held = len(committed) - 1 if self.uses_features else 0
        try:
            draft = _draft_of(reply)
            check_draft(draft, self._vocab)
        except (BadDraftError, ValueError, TypeError) as exc:
            raise DraftFailed(f"{self.node} sent a bad draft: {exc}") from exc
        if draft.position != len(committed) or draft.k > k:
            raise DraftFailed(
                f"{self.node} drafted {draft.k} tokens at position {draft.position}, "
                f"asked for {k} at {len(committed)}"
            )
        self.kind = draft.kind or self.kind
        return draft

    async def _ask(
        self, committed: Sequence[int], keep: int, k: int, features: torch.Tensor | None
    ) -> DraftReply:
        p = self._params
        rows = None
        if self.uses_features and features is not None:
            # The positions the drafter lacks: what it holds stands only under the kept tokens.
            rows = features[min(self._features_held, keep) :].contiguous()
        request = DraftRequest(
            session_id=self._session_id,
            model=self._model,
            keep=keep,
            tokens=np.asarray(committed[keep:], dtype=np.int64),
            k=k,
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=p.seed,
            features=rows,
        )
        try:
            return await self._conn.request(request, DraftReply, timeout=self._timeout)
        except RemoteError:
            raise
        except (TransportError, TimeoutError) as exc:
            raise DraftFailed(f"lost drafter {self.node}: {exc}") from exc

    async def close(self) -> None:
        if self._conn.is_open:
            with contextlib.suppress(TransportError):
                await self._conn.notify(DraftClose(self._session_id))


def _draft_of(reply: DraftReply) -> Draft:
    tokens = tuple(int(t) for t in np.asarray(reply.tokens).reshape(-1))
    q_ids = torch.as_tensor(np.asarray(reply.q_ids), dtype=torch.int64)
    q_probs = torch.as_tensor(np.asarray(reply.q_probs), dtype=torch.float32)
    if q_ids.dim() != 2 or q_ids.shape[1] == 0:
        return Draft(reply.position, tokens, kind=reply.kind, draft_s=reply.draft_s)
    return Draft(reply.position, tokens, q_ids, q_probs, reply.kind, reply.draft_s)


def reply_of(draft: Draft) -> DraftReply:
    k = draft.k
    if draft.q_ids is None or draft.q_probs is None:
        q_ids = np.zeros((k, 0), dtype=np.int64)
        q_probs = np.zeros((k, 0), dtype=np.float32)
    else:
        q_ids = draft.q_ids.to(torch.int64).numpy()
        q_probs = draft.q_probs.to(torch.float32).numpy()
    return DraftReply(
        position=draft.position,
        tokens=np.asarray(draft.tokens, dtype=np.int64),
        q_ids=q_ids,
        q_probs=q_probs,
        kind=draft.kind,
        draft_s=float(draft.draft_s),
    )


# -- the drafter node's side ------------------------------------------------------------------


@dataclass(eq=False)
class _Drafting:
    """One session drafted here for a verifier."""

    session: DraftSession
    params: SamplingParams
    committed: list[int]
    last_used: float
    ahead: asyncio.Task[tuple[list[int], Draft] | None] | None = None
    served: int = 0
    ahead_tries: int = 0
    ahead_hits: int = 0

    def worth_drafting_ahead(self) -> bool:
        """A guess that keeps missing costs the next request its wait: stop guessing for a
        session whose guesses rarely come true (cross-tokenizer drafters miss the token after
        a verification most of the time), but retry now and then."""
        if self.ahead_tries < AHEAD_TRIAL:
            return True
        if self.ahead_hits >= AHEAD_MIN_HIT_RATE * self.ahead_tries:
            return True
        return self.served % AHEAD_RETRY_EVERY == 0

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class DrafterService:
    """Serves `DraftRequest`s for the target models it has drafters for."""

    def __init__(
        self,
        drafters: Mapping[str, Drafter],
        max_sessions: int = 64,
        draft_ahead: bool = True,
    ) -> None:
        self.drafters = dict(drafters)
        self.max_sessions = max_sessions
        self.draft_ahead = draft_ahead
        self._sessions: dict[tuple[str, str], _Drafting] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sled-drafter")
        self.requests = 0
        self.ahead_hits = 0

    @property
    def kinds(self) -> dict[str, str]:
        return {model: d.kind for model, d in self.drafters.items()}

    @property
    def active(self) -> int:
        return len(self._sessions)

    async def handle(self, msg: DraftRequest | DraftClose, ctx: Context) -> DraftReply | None:
        key = (ctx.peer.node_id, msg.session_id)
        if isinstance(msg, DraftClose):
            await self._drop(key)
            return None
        return await self._draft(key, msg)

    async def _draft(self, key: tuple[str, str], msg: DraftRequest) -> DraftReply:
        drafter = self.drafters.get(msg.model)
        if drafter is None:
            raise Refused(NOT_DRAFTING, f"this node does not draft for {msg.model}")
        tokens = np.asarray(msg.tokens)
        if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
            raise Refused(BAD_SESSION, "tokens must be a 1-d integer array")
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= 2**31):
            raise Refused(BAD_SESSION, "token ids out of range")
        try:
            params = SamplingParams(msg.temperature, msg.top_k, msg.top_p, msg.seed)
        except InvalidSamplingParamsError as exc:
            raise Refused(BAD_SESSION, str(exc)) from exc
        features = _features_of(drafter, msg)
        self.requests += 1
        state = self._sessions.get(key)
        if state is not None and state.params != params:
            await self._drop(key)
            state = None
        if state is None:
            if msg.keep:
                raise Refused(UNKNOWN_DRAFT_SESSION, f"no drafting session {msg.session_id}")
            await self._make_room()
            session = await self._run(drafter.open, params)
            state = _Drafting(session, params, [], time.monotonic())
            self._sessions[key] = state
        async with state.lock:
            if msg.keep > len(state.committed):
                raise Refused(UNKNOWN_DRAFT_SESSION, "keep is past what this drafter holds")
            committed = state.committed[: msg.keep] + [int(t) for t in tokens]
            if not committed:
                raise Refused(BAD_SESSION, "nothing to draft after: the sequence is empty")
            if features is not None and features.shape[0] > len(committed) - 1:
                raise Refused(
                    BAD_SESSION,
                    f"{features.shape[0]} feature rows for a session of {len(committed)} tokens",
                )
            state.committed = committed
            state.last_used = time.monotonic()
            draft = await self._ahead_draft(state, committed, msg.k)
            if draft is None:
                try:
                    draft = await self._run(
                        self._propose, state.session, committed, msg.k, features
                    )
                except MissingFeaturesError as exc:  # the verifier resends them all from 0
                    await self._drop(key)
                    raise Refused(MISSING_FEATURES, str(exc)) from exc
                except Exception as exc:  # bad ids for this model, a drafter bug: this session only
                    log.warning("drafting for %s failed: %s", msg.session_id, exc)
                    await self._drop(key)
                    raise Refused(BAD_SESSION, f"drafting failed: {exc}") from exc
            state.served += 1
            ahead = self.draft_ahead and not uses_features(state.session)
            if ahead and draft.k and state.worth_drafting_ahead():
                state.ahead_tries += 1
                state.ahead = asyncio.get_running_loop().create_task(
                    self._guess(state, committed + list(draft.tokens), msg.k)
                )
        return reply_of(draft)

    @staticmethod
    def _propose(
        session: DraftSession, committed: list[int], k: int, features: torch.Tensor | None
    ) -> Draft:
        """On the worker thread: a feature session gets the rows sent, which end at the last
        committed position but one (they start where the verifier's copy of `held` ends)."""
        if not uses_features(session):
            return session.propose(committed, k)
        fs = cast(FeatureDraftSession, session)
        rows = 0 if features is None else int(features.shape[0])
        return fs.propose(committed, k, features, len(committed) - 1 - rows)

    async def _ahead_draft(self, state: _Drafting, committed: list[int], k: int) -> Draft | None:
        """The drafted-ahead draft when the verifier's answer matched the guess, else None."""
        task, state.ahead = state.ahead, None
        if task is None:
            return None
        try:
            guess = await task
        except Exception:  # drafting ahead is only an optimisation
            log.debug("drafting ahead failed", exc_info=True)
            return None
        if guess is None:
            return None
        expected, draft = guess
        if expected != committed or draft.k == 0:
            return None
        state.ahead_hits += 1
        self.ahead_hits += 1
        return draft.first(k)

    async def _guess(
        self, state: _Drafting, assumed: list[int], k: int
    ) -> tuple[list[int], Draft] | None:
        """Draft k+1 tokens after `assumed`: the first is the guess of the verifier's next
        token, the rest the draft to offer if the guess comes true."""
        try:
            draft = await self._run(state.session.propose, assumed, k + 1)
        except Exception:
            log.debug("drafting ahead failed", exc_info=True)
            return None
        if draft.k < 2:
            return None
        return assumed + [draft.tokens[0]], draft.after(draft.position + 1)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _make_room(self) -> None:
        now = time.monotonic()
        for key, state in list(self._sessions.items()):
            if now - state.last_used > IDLE_SESSION_S:
                await self._drop(key)
        while len(self._sessions) >= self.max_sessions:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].last_used)
            await self._drop(oldest)

    async def _drop(self, key: tuple[str, str]) -> None:
        state = self._sessions.pop(key, None)
        if state is None:
            return
        if state.ahead is not None:
            state.ahead.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await state.ahead
        with contextlib.suppress(Exception):
            await self._run(state.session.close)

    async def peer_down(self, node_id: str) -> None:
        for key in [k for k in self._sessions if k[0] == node_id]:
            await self._drop(key)

    async def close(self) -> None:
        for key in list(self._sessions):
            await self._drop(key)
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)


def _features_of(drafter: Drafter, msg: DraftRequest) -> torch.Tensor | None:
    """A request's features as a tensor, checked ([n, dim], float, finite): Refused with
    BAD_SESSION otherwise. None when the drafter does not draft from features."""
    if msg.features is None or not uses_features(drafter):
        return None
    dim = int(drafter.config.dim)  # type: ignore[attr-defined]
    raw = msg.features
    try:
        features = raw if isinstance(raw, torch.Tensor) else torch.from_numpy(np.array(raw))
        check_features(features, dim)
    except (MissingFeaturesError, TypeError, ValueError) as exc:
        raise Refused(BAD_SESSION, f"bad features: {exc}") from exc
    return features


class LocalDraftRouter:
    """Every session drafts in this process with one drafter (the centralized set-up, and
    prompt lookup on a verifier). Model drafters run on their own worker thread."""

    def __init__(self, drafter: Drafter, threaded: bool | None = None, node: str = "") -> None:
        self.drafter = drafter
        self.node = node
        self.uses_features = uses_features(drafter)  # the engine keeps its sessions' features
        threaded = drafter.kind != "ngram" if threaded is None else threaded
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="sled-local-drafter")
            if threaded
            else None
        )

    async def channel(
        self, session_id: str, params: SamplingParams, exclude: Collection[str]
    ) -> DraftChannel | None:
        if (self.node or "local") in exclude:
            return None
        return LocalDraftChannel(self.drafter.open(params), self._executor, self.node)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
