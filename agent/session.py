"""Sessions: the home side (a client's session lives on the node it talks to) and the serving
side (a node that holds the model continues a session for its home).

The home holds the committed tokens (prompt + every token received so far). `HomeStream` asks
the node the plan routes to (its own engine when the home holds the model, else a peer over a
`GenerateOpen` stream) and yields tokens as they come. When the serving node fails (connection
lost, peer dead, a refusal, a stream that breaks off) the home excludes it for this session and
re-routes, waiting (bounded) for the plan to name another holder that has the model loaded,
then sends the committed tokens there: the new node prefills them and continues. No token is
lost or repeated (every item carries its absolute position, checked here), and because the
token at position p is sampled with position_generator(seed, p) the text is the same as if
nothing had failed. The text side (detokenizing, stop strings, usage) is `reply_events`, shared
with the single-node LocalService.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from agent.engine import Engine, EngineFinish, EngineStream
from agent.service import BadRequestError, OverloadedError, UnavailableError
from agent.wire import (
    BAD_SESSION,
    DRAINING,
    NOT_HOLDING,
    OVERLOADED,
    Generated,
    GenerateOpen,
    SpeculationStats,
)
from models.sampling import InvalidSamplingParamsError, SamplingParams
from transport.connection import Connection, Context, Refused, Stream
from transport.errors import RemoteError, TransportError
from transport.schema import Message

log = logging.getLogger(__name__)

RETRY_OVERLOADED_S = 0.5  # pause before asking busy holders again, mid-reply


class Cluster(Protocol):
    """What a home session needs from its node."""

    @property
    def node_id(self) -> str: ...

    def route(self, model: str, exclude: Collection[str]) -> str | None:
        """A planned holder of `model` with it loaded, not in `exclude`; None if none now."""
        ...

    def engine(self, model: str) -> Engine | None: ...

    def connection(self, node_id: str) -> Connection | None: ...

    async def changed(self, timeout: float) -> None:
        """Return when the plan or a peer's state changes, or after `timeout` seconds."""
        ...


class LegFailed(Exception):
    """The node serving a session stopped serving it; `busy` when it only refused for load."""

    def __init__(self, text: str, busy: bool = False) -> None:
        super().__init__(text)
        self.busy = busy


class _Leg(Protocol):
    node: str

    async def next(self) -> int | None:
        """The next token, None at the end (then `finish` is set); LegFailed on failure."""
        ...

    @property
    def finish(self) -> EngineFinish | None: ...

    def stats(self) -> SpeculationStats: ...

    async def close(self) -> None: ...


class _LocalLeg:
    def __init__(self, node: str, stream: EngineStream) -> None:
        self.node = node
        self._stream = stream

    @property
    def finish(self) -> EngineFinish | None:
        return self._stream.finish_reason

    async def next(self) -> int | None:
        try:
            return await self._stream.__anext__()
        except StopAsyncIteration:
            return None
        except UnavailableError as exc:  # this node's engine is shutting down
            raise LegFailed(str(exc)) from exc

    def stats(self) -> SpeculationStats:
        return self._stream.stats()

    async def close(self) -> None:
        await self._stream.aclose()


class _RemoteLeg:
    def __init__(self, node: str, stream: Stream, position: int) -> None:
        self.node = node
        self._stream = stream
        self._position = position  # absolute position of the next token expected
        self._pending: list[int] = []
        self._finish: EngineFinish | None = None
        self._ended = False
        self.received = 0
        self._stats = SpeculationStats()

    def stats(self) -> SpeculationStats:
        return self._stats

    @property
    def finish(self) -> EngineFinish | None:
        return self._finish

    async def next(self) -> int | None:
        while not self._pending:
            if self._ended:
                return None
            try:
                item: Message = await self._stream.__anext__()
            except StopAsyncIteration:
                raise LegFailed(f"{self.node} ended the stream without a finish") from None
            except RemoteError as exc:
                busy = exc.code == OVERLOADED and self.received == 0
                raise LegFailed(f"{self.node} refused: {exc.code}: {exc.text}", busy) from exc
            except TransportError as exc:
                raise LegFailed(f"lost {self.node}: {exc}") from exc
            if not isinstance(item, Generated) or item.position != self._position:
                got = item.position if isinstance(item, Generated) else type(item).__name__
                raise LegFailed(f"{self.node} sent position {got}, expected {self._position}")
            self._pending.extend(item.tokens)
            self._position += len(item.tokens)
            if item.stats is not None:
                self._stats = item.stats
            if item.finish:
                self._finish = "stop" if item.finish == "stop" else "length"
                self._ended = True
        self.received += 1
        return self._pending.pop(0)

    async def close(self) -> None:
        await self._stream.__aexit__(None, None, None)  # cancels the session at the peer


_session_ids = itertools.count(1)


@dataclass(eq=False)
class HomeStream:
    """One session homed here (a TokenStream): routes, streams, fails over."""

    cluster: Cluster
    model: str
    params: SamplingParams
    max_new: int
    committed: list[int]
    wait_s: float  # how long to wait for a holder (loading, re-planning) before giving up
    on_close: Callable[[HomeStream], None] = lambda _: None
    session_id: str = ""
    prompt_tokens: int = 0
    generated: int = 0
    failovers: int = 0
    served_by: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    finish_reason: EngineFinish | None = None
    _leg: _Leg | None = None
    _excluded: set[str] = field(default_factory=set)
    _done: bool = False
    _past_stats: SpeculationStats = field(default_factory=SpeculationStats)

    def __post_init__(self) -> None:
        self.prompt_tokens = len(self.committed)
        if not self.session_id:
            self.session_id = f"{self.cluster.node_id}-{next(_session_ids)}"

    def __aiter__(self) -> HomeStream:
        return self

    async def __anext__(self) -> int:
        while not self._done:
            if self._leg is None:
                self._leg = await self._open_leg()
            leg = self._leg
            try:
                token = await leg.next()
            except LegFailed as exc:
                self._leg = None
                self._retire_leg(leg)
                await leg.close()
                await self._refused(leg.node, exc)
                continue
            if token is None:
                self.finish_reason = leg.finish
                await self._end()
                break
            if not self.served_by or self.served_by[-1] != leg.node:
                self.served_by.append(leg.node)
            self.committed.append(token)
            self.generated += 1
            if self.generated >= self.max_new:
                self.finish_reason = "length"
                await self._end()
            return token
        raise StopAsyncIteration

    async def aclose(self) -> None:
        await self._end()

    def speculation(self) -> SpeculationStats:
        """Drafting figures over every node that served this session so far."""
        if self._leg is None:
            return self._past_stats
        return add_stats(self._past_stats, self._leg.stats())

    def usage_extra(self) -> dict[str, Any]:
        return {
            "served_by": list(self.served_by),
            "failovers": self.failovers,
            "speculative": self.speculation().to_json(),
        }

    def _retire_leg(self, leg: _Leg) -> None:
        self._past_stats = add_stats(self._past_stats, leg.stats())

    async def _end(self) -> None:
        if self._done:
            return
        self._done = True
        leg, self._leg = self._leg, None
        if leg is not None:
            self._retire_leg(leg)
            await leg.close()
        self.on_close(self)

    async def _refused(self, node: str, exc: LegFailed) -> None:
        """A holder failed or refused this session: exclude it, or (busy) try it again later."""
        self._excluded.add(node)
        if not exc.busy:
            if self.generated or self.served_by:
                self.failovers += 1
            log.warning(
                "session %s: %s; re-routing with %d committed tokens",
                self.session_id,
                exc,
                len(self.committed),
            )
            return
        if self.cluster.route(self.model, self._excluded) is not None:
            return  # another holder may have room
        if self.generated == 0:
            await self._end()
            raise OverloadedError(f"every node holding {self.model} is busy; try again shortly")
        await asyncio.sleep(RETRY_OVERLOADED_S)  # mid-reply: wait for room rather than fail
        self._excluded.discard(node)

    async def _open_leg(self) -> _Leg:
        deadline = time.monotonic() + self.wait_s
        while True:
            node = self.cluster.route(self.model, self._excluded)
            if node is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    await self._end()
                    tried = ", ".join(sorted(self._excluded)) or "none"
                    raise UnavailableError(
                        f"no live node holds {self.model} now (waited {self.wait_s:.0f} s; "
                        f"failed or refused: {tried})"
                    )
                await self.cluster.changed(min(left, 1.0))
                continue
            try:
                return await self._start(node)
            except LegFailed as exc:
                await self._refused(node, exc)

    async def _start(self, node: str) -> _Leg:
        remaining = self.max_new - self.generated
        if node == self.cluster.node_id:
            engine = self.cluster.engine(self.model)
            if engine is None:
                raise LegFailed(f"{node} does not hold {self.model} any more")
            try:
                local = engine.open(self.committed, self.params, remaining, self.session_id)
                return _LocalLeg(node, local)
            except OverloadedError as exc:
                raise LegFailed(str(exc), busy=True) from exc
            except UnavailableError as exc:
                raise LegFailed(str(exc)) from exc
        conn = self.cluster.connection(node)
        if conn is None or not conn.is_open:
            raise LegFailed(f"no connection to {node}")
        request = GenerateOpen(
            session_id=self.session_id,
            model=self.model,
            committed=np.asarray(self.committed, dtype=np.int64),
            max_new=remaining,
            temperature=self.params.temperature,
            top_p=self.params.top_p,
            top_k=self.params.top_k,
            seed=self.params.seed,
        )
        stream = conn.stream(request)
        try:
            await stream.__aenter__()
        except TransportError as exc:
            raise LegFailed(f"cannot open a stream to {node}: {exc}") from exc
        return _RemoteLeg(node, stream, len(self.committed))


class HomeSource:
    """The TokenSource of a node's home sessions for one request's model."""

    def __init__(
        self,
        cluster: Cluster,
        model: str,
        wait_s: float,
        on_open: Callable[[HomeStream], None],
        on_close: Callable[[HomeStream], None],
    ) -> None:
        self._cluster = cluster
        self._model = model
        self._wait_s = wait_s
        self._on_open = on_open
        self._on_close = on_close

    def open(self, committed: Sequence[int], params: SamplingParams, max_new: int) -> HomeStream:
        if max_new < 1:
            raise BadRequestError(f"max_tokens must be >= 1, got {max_new}")
        stream = HomeStream(
            self._cluster,
            self._model,
            params,
            max_new,
            list(committed),
            self._wait_s,
            on_close=self._on_close,
        )
        self._on_open(stream)
        return stream


# -- the serving side ------------------------------------------------------------------------


async def serve_generate(
    msg: GenerateOpen, ctx: Context, engine: Engine | None, draining: bool
) -> Message:
    """Continue a peer's session on the local engine, pushing one `Generated` per token.

    Refusals (transport `error` replies) tell the home why, so it can pick another holder."""
    if not ctx.is_stream:
        raise Refused(BAD_SESSION, "generate_open must be sent as a stream request")
    if draining:
        raise Refused(DRAINING, "this node is shutting down")
    if engine is None:
        raise Refused(NOT_HOLDING, f"this node does not hold {msg.model} now")
    committed = np.asarray(msg.committed)
    if committed.ndim != 1 or committed.dtype.kind not in "iu":
        raise Refused(BAD_SESSION, "committed must be a 1-d integer array of token ids")
    try:
        params = SamplingParams(
            temperature=msg.temperature, top_k=msg.top_k, top_p=msg.top_p, seed=msg.seed
        )
        stream = engine.open(committed.tolist(), params, msg.max_new, msg.session_id)
    except InvalidSamplingParamsError as exc:
        raise Refused(BAD_SESSION, str(exc)) from exc
    except OverloadedError as exc:
        raise Refused(OVERLOADED, str(exc)) from exc
    except BadRequestError as exc:
        raise Refused(BAD_SESSION, str(exc)) from exc
    except UnavailableError as exc:
        raise Refused(DRAINING, str(exc)) from exc
    position = len(committed)
    try:
        async for token in stream:
            await ctx.push(Generated(position, (token,), stats=stream.stats()))
            position += 1
    finally:
        await stream.aclose()
    return Generated(position, (), stream.finish_reason or "length", stats=stream.stats())


def add_stats(a: SpeculationStats, b: SpeculationStats) -> SpeculationStats:
    """Figures of two stretches of one session (before and after a failover)."""
    steps = a.verify_steps + b.verify_steps
    asked = a.draft_k * a.verify_steps + b.draft_k * b.verify_steps
    return SpeculationStats(
        kind=b.kind or a.kind,
        drafted=a.drafted + b.drafted,
        accepted=a.accepted + b.accepted,
        verify_steps=steps,
        draft_k=asked / steps if steps else 0.0,
    )
