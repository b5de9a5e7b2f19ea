"""The peer table: what this node knows of every other node it has met.

Fed by mesh events (up/down), by each peer's `NodeState` gossip (capabilities, load level,
loaded models, epoch claim) and by the transport's heartbeat load figures. It turns that into
the planner's `NodeView`s and the routing inputs. Down peers stay listed (alive = False) so
`/status` shows them; only alive peers with a known state take part in planning.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from agent.planner import NodeView
from agent.wire import NodeState
from transport.connection import PeerInfo
from transport.messages import Load


@dataclass(frozen=True)
class PeerRecord:
    node_id: str
    host: str
    peer_port: int
    api_port: int
    alive: bool
    changed_at: float  # monotonic time of the last up/down
    state: NodeState | None = None
    load: Load | None = None
    down_reason: str = ""

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.api_port}" if self.api_port else ""

    def view(self) -> NodeView | None:
        if not self.alive or self.state is None:
            return None
        return node_view(self.node_id, self.state)


def node_view(node_id: str, state: NodeState) -> NodeView:
    caps = state.capabilities
    return NodeView(
        node_id=node_id,
        memory_budget=caps.memory_budget,
        offers=caps.models,
        role=caps.role,
        load_level=state.load_level,
        draining=state.draining,
        replicas=state.replicas,
        drafts=caps.drafts,
    )


class PeerTable:
    def __init__(self) -> None:
        self._peers: dict[str, PeerRecord] = {}

    def up(self, peer: PeerInfo, now: float) -> None:
        old = self._peers.get(peer.node_id)
        self._peers[peer.node_id] = PeerRecord(
            node_id=peer.node_id,
            host=peer.host,
            peer_port=peer.listen_port,
            api_port=peer.api_port,
            alive=True,
            changed_at=now,
            # A state from before a restart is stale: wait for the peer's fresh one.
            state=None if old is None or not old.alive else old.state,
        )

    def down(self, node_id: str, reason: str, now: float) -> None:
        old = self._peers.get(node_id)
        if old is not None and old.alive:
            self._peers[node_id] = replace(
                old, alive=False, changed_at=now, down_reason=reason, load=None
            )

    def set_state(self, node_id: str, state: NodeState) -> bool:
        """Record a peer's gossip; True if it changed anything the planner or router reads."""
        old = self._peers.get(node_id)
        if old is None or not old.alive:
            return False  # from a connection the mesh has not reported (yet) or already lost
        self._peers[node_id] = replace(old, state=state)
        return old.state != state

    def set_load(self, node_id: str, load: Load | None) -> None:
        old = self._peers.get(node_id)
        if old is not None and old.alive and load is not None:
            self._peers[node_id] = replace(old, load=load)

    def get(self, node_id: str) -> PeerRecord | None:
        return self._peers.get(node_id)

    @property
    def records(self) -> list[PeerRecord]:
        return [self._peers[k] for k in sorted(self._peers)]

    def alive_ids(self) -> list[str]:
        return [r.node_id for r in self.records if r.alive]

    def views(self) -> list[NodeView]:
        return [v for v in (r.view() for r in self.records) if v is not None]

    def claims(self) -> list[tuple[int, str]]:
        return [
            (r.state.epoch, r.state.digest) for r in self.records if r.alive and r.state is not None
        ]

    def loaded(self) -> dict[str, tuple[str, ...]]:
        return {r.node_id: r.state.loaded for r in self.records if r.alive and r.state is not None}

    def loads(self) -> dict[str, int]:
        """Sessions each alive peer is running or queueing (heartbeat figures, else gossip)."""
        out: dict[str, int] = {}
        for r in self.records:
            if not r.alive:
                continue
            if r.load is not None:
                out[r.node_id] = r.load.active_sessions + r.load.queue_depth
            elif r.state is not None:
                out[r.node_id] = r.state.active_sessions + r.state.queue_depth
        return out

    def to_json(self) -> list[dict[str, Any]]:
        out = []
        for r in self.records:
            entry: dict[str, Any] = {
                "name": r.node_id,
                "alive": r.alive,
                "host": r.host,
                "peer_port": r.peer_port,
                "api": r.api_url,
            }
            if not r.alive:
                entry["down_reason"] = r.down_reason
            if r.state is not None:
                caps = r.state.capabilities
                entry.update(
                    epoch=r.state.epoch,
                    digest=r.state.digest,
                    draining=r.state.draining,
                    load_level=r.state.load_level,
                    loaded=list(r.state.loaded),
                    memory_budget=caps.memory_budget,
                    role=caps.role,
                    models=[
                        {
                            "name": m.name,
                            "status": m.status,
                            "need_bytes": m.need_bytes,
                            "decode_tps": m.decode_tps,
                            "verify_tps": m.verify_tps,
                        }
                        for m in caps.models
                    ],
                )
            if r.load is not None:
                entry["load"] = {
                    "active_sessions": r.load.active_sessions,
                    "queue_depth": r.load.queue_depth,
                    "load_avg": round(r.load.load_avg, 3),
                }
            out.append(entry)
        return out
