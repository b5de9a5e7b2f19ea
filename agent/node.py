"""The node: wires the probe, peer mesh, discovery, peer table, planner, engines, home sessions
and HTTP API of one `sled run` daemon. Decisions live in the parts (planner, session, probe);
this class only keeps them fed and reacts to what they decide.

Life cycle: probe (memory, models on disk) -> HTTP API -> peer listener -> mDNS; speeds are
measured in the background (offers advertise "probing" until then). Every change (a peer up or
down, a peer's new state, our own measured speeds, load level or draining) re-plans; when this
node's plan names a model it loads it (on a worker thread), and drops it again when the plan
moves it elsewhere and its sessions are done. SIGTERM drains: new requests get 503, the plan
moves work away, in-flight sessions finish (bounded by shutdown_grace), then everything closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncGenerator, Collection, Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.config import NodeConfig, describe
from agent.drafting import DrafterService, LocalDraftRouter, RemoteDraftChannel, uses_features
from agent.engine import Engine
from agent.metrics import NodeMetrics
from agent.peers import PeerTable, node_view
from agent.planner import IDLE, ClusterView, Plan, crosses, next_epoch, next_load_level, plan, route
from agent.probe import (
    BROKEN,
    MISSING,
    PROBING,
    Capabilities,
    DraftOffer,
    locate,
    measure_speed,
    probe_node,
    unmeasured,
)
from agent.reply_text import reply_events
from agent.service import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    ModelCard,
    UnavailableError,
    UnknownModelError,
)
from agent.session import HomeSource, HomeStream, serve_generate
from agent.wire import (
    NOT_DRAFTING,
    DraftClose,
    DraftRequest,
    GenerateOpen,
    NodeState,
    connection_config,
)
from models.feature_drafter import FeatureDrafter
from models.sampling import SamplingParams
from models.tokenizer import Tokenizer
from transport.auth import ClusterKey, check_listen_allowed
from transport.connection import Connection, Context, Identity, Refused
from transport.discovery import Advertisement, Discovery
from transport.errors import TransportError
from transport.load import available_memory
from transport.mesh import Mesh, MeshConfig, MeshEvent, PeerDown, PeerUp
from transport.messages import Load
from transport.schema import Message

log = logging.getLogger(__name__)

STATE_REFRESH_S = 2.0  # re-send our state this often even when nothing changed
HOLDER_WAIT_S = 120.0  # how long a session waits for a holder (model loading, re-planning)


class Node:
    """One daemon: a NodeService for the HTTP API and a Cluster for home sessions."""

    def __init__(self, config: NodeConfig, metrics: NodeMetrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.key = ClusterKey.from_secret(config.cluster_key)
        self.peers = PeerTable()
        self.caps = Capabilities(0, 0, 0, 0, config.role, config.backend, config.weights)
        self._paths: dict[str, Path] = {}
        self._engines: dict[str, Engine] = {}
        self._tokenizers: dict[str, Tokenizer] = {}
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._plan = Plan(members=(config.name,), assignments=())
        self._epoch: tuple[int, str] = (0, "")
        self._load_level = IDLE
        self._past_threshold_since: float | None = None
        self._draining = False
        self._sessions: set[HomeStream] = set()
        self._served = 0  # sessions of other homes running on our engines now
        self.failovers = 0
        self._changed = asyncio.Event()
        self._sent_state: NodeState | None = None
        self._last_refresh = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._tick_task: asyncio.Task[None] | None = None
        self.mesh: Mesh | None = None
        self.discovery: Discovery | None = None
        self._runner: web.AppRunner | None = None
        self.api_port = 0
        self.started = time.monotonic()
        self.holder_wait_s = HOLDER_WAIT_S
        self.drafting: DrafterService | None = None  # serves drafts for peers' verifiers
        self._local_drafts: dict[str, LocalDraftRouter] = {}  # drafting for our own engines
        self._draft_channels: dict[str, int] = {}  # remote channels open per drafter node

    # -- start and stop ------------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        check_listen_allowed(cfg.peer_host, self.key)  # before any slow work: fail fast
        self.caps, self._paths = await asyncio.to_thread(
            probe_node,
            cfg.models,
            role=cfg.role,
            backend=cfg.backend,
            weights=cfg.weights,
            sessions=cfg.max_sessions,
            max_len=cfg.max_len,
            memory_budget=cfg.memory_budget,
        )
        for offer in self.caps.models:
            if offer.status in (MISSING, BROKEN):
                log.warning(
                    "model %s is %s here; fetch it with `sled models fetch %s`",
                    offer.name,
                    offer.status,
                    offer.name,
                )
        await self._start_api()
        mesh_config = MeshConfig(
            host=cfg.peer_host,
            port=cfg.peer_port,
            static_peers=cfg.static_peers,
            connection=connection_config(cfg.heartbeat, cfg.dead_after),
        )
        identity = Identity(
            cfg.name, self.key, api_port=self.api_port, capabilities=self.caps.summary()
        )
        self.mesh = Mesh(
            identity,
            handler=self._handle,
            config=mesh_config,
            load_source=self._load_figures,
            on_event=self._on_mesh_event,
        )
        await self.mesh.start()
        if cfg.mdns:
            ad = Advertisement(
                cfg.name,
                self.key.cluster_id,
                self.mesh.port,
                api_port=self.api_port,
                capabilities=self.caps.summary(),
            )
            self.discovery = Discovery(
                ad, self.mesh.on_discovery, interfaces=cfg.zeroconf_interfaces
            )
            await self.discovery.start()
        self._replan()
        self._tick_task = asyncio.get_running_loop().create_task(self._tick_loop())
        self._spawn(self._measure())
        self._spawn(self._load_drafters())

    async def _start_api(self) -> None:
        from agent.api import create_app

        app = create_app(
            self,
            max_body_bytes=self.config.api_max_body,
            max_concurrent=self.config.api_max_sessions,
            metrics=self.metrics,
        )
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.api_host, self.config.api_port)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(
                f"cannot serve the HTTP API on {self.config.api_host}:{self.config.api_port}: "
                f"{exc.strerror or exc}"
            ) from exc
        server = site._server  # aiohttp keeps the bound socket here; port 0 needs the real one
        sockets = getattr(server, "sockets", None) or ()
        self.api_port = int(sockets[0].getsockname()[1]) if sockets else self.config.api_port

    @property
    def api_url(self) -> str:
        host = self.config.api_host
        host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        return f"http://{host}:{self.api_port}"

    async def stop(self) -> None:
        """Drain (bounded by shutdown_grace), then close the API, engines, mDNS and peers."""
        self._draining = True
        self._replan()
        self._broadcast(force=True)
        deadline = time.monotonic() + self.config.shutdown_grace
        while (self._sessions or self._served) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._sessions or self._served:
            log.warning(
                "shutdown: %d home and %d served sessions still running after %.0f s",
                len(self._sessions),
                self._served,
                self.config.shutdown_grace,
            )
        if self._tick_task is not None:
            self._tick_task.cancel()
        for task in list(self._tasks) + list(self._loading.values()):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._loading.values(), return_exceptions=True)
        for engine in list(self._engines.values()):
            await engine.close(grace=0.0)
        if self.drafting is not None:
            await self.drafting.close()
        for router in self._local_drafts.values():
            router.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.discovery is not None:
            await self.discovery.close()
        if self.mesh is not None:
            await self.mesh.close()

    # -- NodeService -----------------------------------------------------------------------------

    @property
    def node_name(self) -> str:
        return self.config.name

    @property
    def node_id(self) -> str:
        return self.config.name

    def list_models(self) -> list[ModelCard]:
        cards: dict[str, ModelCard] = {}
        loaded = self._loaded_map()
        for view in self._views():
            for offer in view.offers:
                if offer.status in (MISSING, BROKEN) or offer.name in cards:
                    continue
                holders = tuple(sorted(n for n, ms in loaded.items() if offer.name in ms))
                cards[offer.name] = ModelCard(
                    offer.name, offer.architecture, offer.file_bytes, offer.chat, holders
                )
        return [cards[name] for name in sorted(cards)]

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        if self._draining:
            raise UnavailableError(f"node {self.node_name} is shutting down; ask another node")
        model = request.model
        known = {o.name for v in self._views() for o in v.offers if o.status not in (MISSING,)}
        if model not in known:
            names = ", ".join(sorted(known)) or "none yet"
            raise UnknownModelError(f"model {model!r} is not offered in this cluster ({names})")
        tokenizer = await self._tokenizer(model)
        opened: list[HomeStream] = []

        def on_open(stream: HomeStream) -> None:
            opened.append(stream)
            self._sessions.add(stream)
            self.metrics.active_sessions.inc()

        source = HomeSource(self, model, self.holder_wait_s, on_open, self._session_closed)
        async for event in reply_events(
            request, tokenizer, source, node_name=self.node_name, metrics=self.metrics
        ):
            if isinstance(event, Finished) and opened:
                extra = {**event.usage.extra, **opened[0].usage_extra()}
                event = Finished(event.finish_reason, replace(event.usage, extra=extra))
            yield event

    def _session_closed(self, stream: HomeStream) -> None:
        if stream in self._sessions:
            self._sessions.discard(stream)
            self.failovers += stream.failovers
            self.metrics.active_sessions.dec()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        epoch, digest = self._epoch
        return {
            "node": self.node_name,
            "epoch": epoch,
            "digest": digest,
            "draining": self._draining,
            "api": self.api_url,
            "peer_port": self.mesh.port if self.mesh else 0,
            "cluster": self.key.cluster_id,
            "plan": self._plan.to_json(),
            "roles": list(self._plan.roles(self.node_id)),
            "loaded": sorted(self._engines),
            "loading": sorted(self._loading),
            "load": {
                "level": self._load_level,
                "engine_active": sum(e.active for e in self._engines.values()),
                "engine_queued": sum(e.queued for e in self._engines.values()),
                "served_sessions": self._served,
            },
            "capabilities": {
                "cores": self.caps.cores,
                "memory_total": self.caps.memory_total,
                "memory_available": self.caps.memory_available,
                "memory_budget": self.caps.memory_budget,
                "role": self.caps.role,
                "backend": self.caps.backend,
                "weights": self.caps.weights,
                "models": [
                    {
                        "name": m.name,
                        "status": m.status,
                        "need_bytes": m.need_bytes,
                        "decode_tps": m.decode_tps,
                        "verify_tps": m.verify_tps,
                    }
                    for m in self.caps.models
                ],
            },
            "peers": self.peers.to_json(),
            "sessions": [
                {
                    "id": s.session_id,
                    "model": s.model,
                    "prompt_tokens": s.prompt_tokens,
                    "completion_tokens": s.generated,
                    "served_by": list(s.served_by),
                    "failovers": s.failovers,
                    "speculative": s.speculation().to_json(),
                    "age_s": round(now - s.started, 3),
                }
                for s in sorted(self._sessions, key=lambda s: s.started)
            ],
            "failovers": self.failovers + sum(s.failovers for s in self._sessions),
            "verifying": [
                {"model": model, **item}
                for model, engine in sorted(self._engines.items())
                for item in engine.sessions_json()
            ],
            "drafting": None
            if self.drafting is None
            else {
                "models": self.drafting.kinds,
                "sessions": self.drafting.active,
                "requests": self.drafting.requests,
                "drafted_ahead_hits": self.drafting.ahead_hits,
            },
            "uptime_s": round(now - self.started, 1),
            "config": describe(self.config),
        }

    def metrics_text(self) -> str:
        return self.metrics.text()

    # -- Cluster (for home sessions) ---------------------------------------------------------------

    def route(self, model: str, exclude: Collection[str]) -> str | None:
        loads = self.peers.loads()
        loads[self.node_id] = sum(e.active + e.queued for e in self._engines.values())
        return route(
            self._plan, model, self._loaded_map(), loads, exclude=exclude, prefer=self.node_id
        )

    def engine(self, model: str) -> Engine | None:
        return self._engines.get(model)

    def connection(self, node_id: str) -> Connection | None:
        return self.mesh.connection(node_id) if self.mesh else None

    async def changed(self, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def _pulse(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- views, plan, epoch ----------------------------------------------------------------------

    def own_state(self) -> NodeState:
        epoch, digest = self._epoch
        return NodeState(
            capabilities=self.caps,
            load_level=self._load_level,
            draining=self._draining,
            loaded=tuple(sorted(self._engines)),
            epoch=epoch,
            digest=digest,
            replicas=self.config.replicas,
            active_sessions=sum(e.active for e in self._engines.values()),
            queue_depth=sum(e.queued for e in self._engines.values()),
        )

    def _views(self) -> list[Any]:
        return [node_view(self.node_id, self.own_state()), *self.peers.views()]

    def _loaded_map(self) -> dict[str, tuple[str, ...]]:
        loaded = self.peers.loaded()
        loaded[self.node_id] = tuple(sorted(self._engines))
        return loaded

    def _replan(self) -> None:
        new_plan = plan(ClusterView.of(self._views()))
        epoch = next_epoch(self._epoch, new_plan.digest(), self.peers.claims())
        if new_plan != self._plan or epoch != self._epoch:
            if new_plan != self._plan:
                log.info("plan epoch %d: %s", epoch[0], json.dumps(new_plan.to_json()))
            self._plan, self._epoch = new_plan, epoch
            self._pulse()
        self._reconcile_models()
        self._broadcast()

    def _broadcast(self, force: bool = False) -> None:
        """Send our state to every peer when what they plan or route with has changed."""
        state = self.own_state()
        key = replace(state, active_sessions=0, queue_depth=0)
        if not force and self._sent_state == key:
            return
        self._sent_state = key
        self._last_refresh = time.monotonic()
        if self.mesh is None:
            return
        for conn in list(self.mesh.peers.values()):
            self._spawn(_notify(conn, state))

    # -- models ------------------------------------------------------------------------------

    def _reconcile_models(self) -> None:
        wanted = set(self._plan.models_of(self.node_id)) if not self._draining else set()
        for model in sorted(wanted - set(self._engines) - set(self._loading)):
            task = asyncio.get_running_loop().create_task(self._load_model(model))
            self._loading[model] = task
        for model in sorted(set(self._engines) - wanted):
            engine = self._engines[model]
            if engine.active == 0 and engine.queued == 0 and not self._draining:
                del self._engines[model]
                self._spawn(engine.close())
                log.info("released %s (the plan moved it elsewhere)", model)
                self._pulse()

    async def _load_model(self, model: str) -> None:
        cfg = self.config
        path = self._paths[model]
        start = time.perf_counter()
        log.info("loading %s (%s %s)", model, cfg.backend, cfg.weights)
        try:
            backend, tokenizer = await asyncio.to_thread(self._load_blocking, path)
        except Exception as exc:
            log.error("loading %s failed: %s", model, exc)
            self._mark_offer(model, BROKEN)
            return
        finally:
            self._loading.pop(model, None)
        self._tokenizers.setdefault(model, tokenizer)
        self._engines[model] = Engine(
            backend,
            stop_ids=tokenizer.stop_ids,
            model=model,
            metrics=self.metrics,
            max_queue=cfg.max_queue,
            drafts=NodeDraftRouter(self, model, backend.config.vocab_size)
            if cfg.speculative
            else None,
            draft_k=cfg.draft_k or None,
        )
        log.info("loaded %s in %.1f s", model, time.perf_counter() - start)
        self._pulse()
        self._replan()

    def _load_blocking(self, path: Path) -> tuple[Any, Tokenizer]:
        from models.backend import load_backend

        cfg = self.config
        backend = load_backend(
            path,
            backend=cfg.backend,
            weights=cfg.weights,
            max_slots=cfg.max_sessions,
            max_len=cfg.max_len,
            threads=cfg.threads,
            purpose="verify",
        )
        return backend, Tokenizer.from_gguf(path)

    async def _tokenizer(self, model: str) -> Tokenizer:
        tokenizer = self._tokenizers.get(model)
        if tokenizer is not None:
            return tokenizer
        path = self._paths.get(model) or await asyncio.to_thread(locate, model)
        if path is None:
            raise UnavailableError(
                f"node {self.node_name} has no copy of {model} to read its tokenizer from; "
                f"run `sled models fetch {model}` here, or send the request to a node that has it"
            )
        tokenizer = await asyncio.to_thread(Tokenizer.from_gguf, path)
        self._tokenizers[model] = tokenizer
        return tokenizer

    async def _measure(self) -> None:
        """Measure each offered model's speed (cached on disk), one at a time, then re-plan."""
        cfg = self.config
        for offer in self.caps.models:
            if offer.status != PROBING:
                continue
            if cfg.probe:
                measured = await asyncio.to_thread(
                    measure_speed, offer, self._paths[offer.name], cfg.backend, cfg.weights,
                    cfg.threads,
                )  # fmt: skip
            else:
                measured = unmeasured(offer)
            models = tuple(measured if m.name == offer.name else m for m in self.caps.models)
            self.caps = replace(self.caps, models=models)
            log.info(
                "model %s: %s, decode %.1f tok/s, verify %.1f tok/s",
                offer.name,
                measured.status,
                measured.decode_tps,
                measured.verify_tps,
            )
            self._replan()

    async def _load_drafters(self) -> None:
        """Load this node's drafter for every offered model on disk, then advertise it."""
        cfg = self.config
        if cfg.drafter == "none":
            return
        from models.drafter_loading import load_drafter

        drafters = {}
        for model, path in sorted(self._paths.items()):
            start = time.perf_counter()
            try:
                drafter = await asyncio.to_thread(
                    load_drafter, cfg.drafter, path, model, backend=cfg.drafter_backend,
                    weights=cfg.drafter_weights, max_slots=64, max_len=cfg.max_len,
                    threads=cfg.threads,
                )  # fmt: skip
            except Exception as exc:  # a missing drafter model is a warning, not a dead node
                log.warning("no %s drafter for %s: %s", cfg.drafter, model, exc)
                continue
            if drafter is not None:
                drafters[model] = drafter
                log.info(
                    "drafting for %s with %s (loaded in %.1f s)",
                    model,
                    cfg.drafter,
                    time.perf_counter() - start,
                )
        if not drafters:
            return
        self.drafting = DrafterService(drafters, max_sessions=64)
        offers = tuple(DraftOffer(m, d.kind) for m, d in sorted(drafters.items()))
        self.caps = replace(self.caps, drafts=offers)
        self._replan()

    def local_drafts(self, model: str) -> LocalDraftRouter | None:
        """Drafting for our own engine's sessions with this node's drafter (prompt lookup, or
        a model drafter sharing the verifier's cores: the centralized set-up)."""
        router = self._local_drafts.get(model)
        if router is None and self.drafting is not None:
            drafter = self.drafting.drafters.get(model)
            if drafter is not None:
                router = LocalDraftRouter(drafter, node=self.node_id)
                self._local_drafts[model] = router
        return router

    def _mark_offer(self, model: str, status: str) -> None:
        models = tuple(
            replace(m, status=status) if m.name == model else m for m in self.caps.models
        )
        self.caps = replace(self.caps, models=models)
        self._replan()

    # -- peers -----------------------------------------------------------------------------------

    def _on_mesh_event(self, event: MeshEvent) -> None:
        now = time.monotonic()
        if isinstance(event, PeerUp):
            self.peers.up(event.peer, now)
            conn = self.connection(event.peer.node_id)
            if conn is not None:
                self._spawn(_notify(conn, self.own_state()))
        elif isinstance(event, PeerDown):
            log.info("peer %s down: %s", event.node_id, event.reason)
            self.peers.down(event.node_id, event.reason, now)
            if self.drafting is not None:
                self._spawn(self.drafting.peer_down(event.node_id))
        self._replan()

    async def _handle(self, msg: Message, ctx: Context) -> Message | None:
        if isinstance(msg, NodeState):
            peer = ctx.peer
            record = self.peers.get(peer.node_id)
            if (record is None or not record.alive) and ctx.connection.is_open:
                self.peers.up(peer, time.monotonic())  # state can arrive before the mesh's PeerUp
            if self.peers.set_state(peer.node_id, msg):
                self._replan()
            return None
        if isinstance(msg, (DraftRequest, DraftClose)):
            if self.drafting is None:
                raise Refused(NOT_DRAFTING, "this node does not draft")
            return await self.drafting.handle(msg, ctx)
        if isinstance(msg, GenerateOpen):
            self._served += 1
            try:
                return await serve_generate(msg, ctx, self._engines.get(msg.model), self._draining)
            finally:
                self._served -= 1
        raise Refused("unsupported", f"this node does not serve {type(msg).__name__} messages")

    def _load_figures(self) -> Load:
        try:
            load_avg = os.getloadavg()[0] / (os.cpu_count() or 1)
        except OSError:
            load_avg = 0.0
        return Load(
            queue_depth=sum(e.queued for e in self._engines.values()),
            active_sessions=sum(e.active for e in self._engines.values()),
            free_memory=available_memory(),
            load_avg=load_avg,
        )

    # -- periodic work ---------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        interval = self.config.heartbeat
        while True:
            await asyncio.sleep(interval)
            try:
                self._tick()
            except Exception:  # one bad tick must not stop the node's upkeep
                log.exception("periodic upkeep failed")

    def _tick(self) -> None:
        now = time.monotonic()
        if self.mesh is not None:
            for node_id, conn in self.mesh.peers.items():
                self.peers.set_load(node_id, conn.peer_load)
        self._update_load_level(now)
        self._replan()
        if now - self._last_refresh >= STATE_REFRESH_S:
            self._broadcast(force=True)

    def _update_load_level(self, now: float) -> None:
        slots = sum(e.backend.cache.max_slots for e in self._engines.values())
        wanting = sum(e.active + e.queued for e in self._engines.values())
        utilisation = wanting / slots if slots else 0.0
        if crosses(self._load_level, utilisation):
            if self._past_threshold_since is None:
                self._past_threshold_since = now
        else:
            self._past_threshold_since = None
        held = 0.0 if self._past_threshold_since is None else now - self._past_threshold_since
        level = next_load_level(self._load_level, utilisation, held)
        if level != self._load_level:
            log.info("load level %d -> %d (utilisation %.2f)", self._load_level, level, utilisation)
            self._load_level = level
            self._past_threshold_since = None

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class NodeDraftRouter:
    """Chooses each verified session's drafter: a planned drafter node (the one this node has
    the fewest sessions on), else this node's own drafter, else none."""

    def __init__(self, node: Node, model: str, vocab_size: int) -> None:
        self._node = node
        self._model = model
        self._vocab = vocab_size

    def _drafter_kind(self, node_id: str) -> str:
        """The kind of drafter a peer advertises for this model ("" when unknown)."""
        record = self._node.peers.get(node_id)
        if record is None or record.state is None:
            return ""
        offers = record.state.capabilities.drafts
        return next((d.kind for d in offers if d.target == self._model), "")

    @property
    def uses_features(self) -> bool:
        """A planned drafter node or this node's own drafter drafts from target features: the
        engine keeps its sessions' features from their first pass."""
        node = self._node
        own = node.drafting.drafters.get(self._model) if node.drafting is not None else None
        if uses_features(own):
            return True
        return any(
            self._drafter_kind(n) == FeatureDrafter.kind
            for n in node._plan.drafters_for(self._model)
            if n != node.node_id
        )

    async def channel(
        self, session_id: str, params: SamplingParams, exclude: Collection[str]
    ) -> Any:
        node = self._node
        counts = node._draft_channels
        candidates = [
            n
            for n in node._plan.drafters_for(self._model)
            if n != node.node_id and n not in exclude
        ]
        for drafter_node in sorted(candidates, key=lambda n: (counts.get(n, 0), n)):
            conn = node.connection(drafter_node)
            if conn is None or not conn.is_open:
                continue
            counts[drafter_node] = counts.get(drafter_node, 0) + 1
            features = self._drafter_kind(drafter_node) == FeatureDrafter.kind
            return _CountedChannel(
                RemoteDraftChannel(
                    conn,
                    drafter_node,
                    session_id,
                    self._model,
                    params,
                    self._vocab,
                    uses_features=features,
                ),  # fmt: skip
                counts,
            )
        local = node.local_drafts(self._model)
        if local is None:
            return None
        return await local.channel(session_id, params, exclude)


class _CountedChannel:
    """A remote channel that keeps its node's count of open channels."""

    remote = True

    def __init__(self, inner: RemoteDraftChannel, counts: dict[str, int]) -> None:
        self._inner = inner
        self._counts = counts
        self.node = inner.node
        self.uses_features = inner.uses_features
        self._open = True

    @property
    def kind(self) -> str:
        return self._inner.kind

    async def propose(self, committed: Any, k: int, features: Any = None) -> Any:
        return await self._inner.propose(committed, k, features)

    async def close(self) -> None:
        if self._open:
            self._open = False
            self._counts[self.node] = max(0, self._counts.get(self.node, 1) - 1)
        await self._inner.close()


async def _notify(conn: Connection, msg: Message) -> None:
    try:
        await conn.notify(msg)
    except TransportError as exc:  # the peer went away meanwhile; PeerDown follows
        log.debug("state to %s not sent: %s", conn.address, exc)


# -- `sled run` --------------------------------------------------------------------------------


def sd_notify(state: str) -> bool:
    """Tell systemd (Type=notify) about our state via $NOTIFY_SOCKET; False when not under it."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract socket namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)
        return False
    return True


async def run_node(config: NodeConfig, ready_file: Path | None = None) -> int:
    """Start a node, announce readiness, serve until SIGTERM/SIGINT, then drain and exit 0."""
    node = Node(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await node.start()
    except BaseException:
        await node.stop()
        raise
    ready = {
        "event": "ready",
        "node": node.node_name,
        "api": node.api_url,
        "peer_port": node.mesh.port if node.mesh else 0,
        "pid": os.getpid(),
    }
    print(json.dumps(ready), flush=True)
    if ready_file is not None:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(json.dumps(ready))
        os.replace(tmp, ready_file)
    sd_notify("READY=1\nSTATUS=serving")
    await stop.wait()
    log.info("stopping: draining sessions (up to %.0f s)", config.shutdown_grace)
    sd_notify("STOPPING=1")
    await node.stop()
    print(json.dumps({"event": "stopped", "node": node.node_name}), flush=True)
    return 0


def serve(config: NodeConfig, ready_file: Path | None = None) -> int:
    """`sled run` after its configuration is valid: log setup, then the node until SIGTERM."""
    from transport.errors import ConfigError as TransportConfigError
    from transport.runtime import run

    logging.basicConfig(
        level=getattr(logging, config.log_level.upper()),
        stream=sys.stderr,
        format=f"%(asctime)s {config.name} %(name)s %(levelname)s %(message)s",
    )
    try:
        return run(run_node(config, ready_file))
    except TransportConfigError as exc:
        print(f"sled run: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sled run: {exc}", file=sys.stderr)
        return 1
