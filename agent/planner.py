"""The planner: pure, deterministic functions from what a node knows of the cluster to a plan.

`plan(view)` decides which alive nodes hold (serve) each offered model. Inputs are only the
view's values, taken in node-id order, so every node that has the same view computes the same
plan: no dict order, clock or randomness is involved.

Placement, per model (the models that need the most memory are placed first, then by name):
the candidates are alive, non-draining nodes that offer the model as ready and whose remaining
memory budget holds its estimated footprint (a node that cannot hold a model never loads it);
they are ranked by role preference (`verifier` first), then measured decode speed, then node
id. The plan takes the first `replicas` of them (a second holder lets a session fail over
without waiting for a load), plus one more for every chosen node that reports itself busy.

Epochs. A plan's content has a digest; the epoch is a number that all nodes agree on once they
compute the same digest. Each node keeps (epoch, digest) and gossips it to its peers:
when its own digest changes it moves to one more than the largest epoch it has seen, and it
adopts any larger epoch a peer reports for the same digest (`next_epoch`). A Lamport-style
clock, so epochs only grow on every node and converge to the same value within one gossip
round once views agree. (A plain per-node counter would differ between nodes that saw different
histories; a bare content hash would come back to an old value when membership returns to an
old state.)

Load (`next_load_level`): each node turns its own sustained utilisation into a level with
hysteresis and advertises it, so every node plans from the same level, and a short burst, or
utilisation hovering near one threshold, does not re-plan the cluster.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

from agent.probe import READY, DraftOffer, ModelOffer

IDLE, BUSY = 0, 1
BUSY_ABOVE = 0.9  # utilisation (sessions wanting a slot / slots) that makes a node busy...
IDLE_BELOW = 0.5  # ...and that makes it idle again
SUSTAIN_S = 5.0  # seconds utilisation must stay past a threshold before the level changes


@dataclass(frozen=True)
class NodeView:
    """One alive node as the planner sees it."""

    node_id: str
    memory_budget: int
    offers: tuple[ModelOffer, ...] = ()
    role: str = "auto"
    load_level: int = IDLE
    draining: bool = False
    replicas: int = 2
    drafts: tuple[DraftOffer, ...] = ()


@dataclass(frozen=True)
class ClusterView:
    nodes: tuple[NodeView, ...]

    @staticmethod
    def of(nodes: Iterable[NodeView]) -> ClusterView:
        return ClusterView(tuple(sorted(nodes, key=lambda n: n.node_id)))


@dataclass(frozen=True)
class Assignment:
    """The nodes that hold `model`, best first (the first is where sessions go by default)."""

    model: str
    nodes: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    members: tuple[str, ...]  # alive node ids, sorted
    assignments: tuple[Assignment, ...]  # sorted by model name
    unplaced: tuple[str, ...] = ()  # offered models that no alive node can hold now
    # Nodes that draft for each placed model with a model drafter (prompt lookup runs on the
    # verifier itself and is not planned).
    drafters: tuple[Assignment, ...] = field(default=())

    def servers(self, model: str) -> tuple[str, ...]:
        return next((a.nodes for a in self.assignments if a.model == model), ())

    def models_of(self, node_id: str) -> tuple[str, ...]:
        return tuple(a.model for a in self.assignments if node_id in a.nodes)

    def drafters_for(self, model: str) -> tuple[str, ...]:
        return next((a.nodes for a in self.drafters if a.model == model), ())

    def roles(self, node_id: str) -> tuple[str, ...]:
        """`verifier` where the node holds a model, `drafter` where it drafts for one, else
        `client` (it homes sessions only)."""
        if node_id not in self.members:
            return ()
        roles = []
        if self.models_of(node_id):
            roles.append("verifier")
        if any(node_id in a.nodes for a in self.drafters):
            roles.append("drafter")
        return tuple(roles) or ("client",)

    def digest(self) -> str:
        """A hash of the plan's content (canonical JSON): equal plans, equal digests."""
        text = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def to_json(self) -> dict[str, object]:
        return {
            "members": list(self.members),
            "models": {a.model: list(a.nodes) for a in self.assignments},
            "unplaced": list(self.unplaced),
            "drafters": {a.model: list(a.nodes) for a in self.drafters},
        }


def _rank_key(node: NodeView, offer: ModelOffer) -> tuple[int, float, str]:
    return (0 if node.role == "verifier" else 1, -offer.decode_tps, node.node_id)


def _holdable(node: NodeView) -> bool:
    return not node.draining and node.role not in ("client", "drafter")


def plan(view: ClusterView) -> Plan:
    """The plan for this view (pure and deterministic; see the module text)."""
    nodes = sorted(view.nodes, key=lambda n: n.node_id)
    members = tuple(n.node_id for n in nodes)
    replicas = max((n.replicas for n in nodes), default=1)
    ready: dict[str, list[tuple[NodeView, ModelOffer]]] = {}
    offered: set[str] = set()
    for node in nodes:
        for offer in node.offers:
            offered.add(offer.name)
            if offer.status == READY and _holdable(node):
                ready.setdefault(offer.name, []).append((node, offer))
    remaining = {n.node_id: n.memory_budget for n in nodes}

    def biggest_need(model: str) -> int:
        return max(o.need_bytes for _, o in ready[model])

    assignments: list[Assignment] = []
    for model in sorted(ready, key=lambda m: (-biggest_need(m), m)):
        fits = [(n, o) for n, o in ready[model] if o.need_bytes <= remaining[n.node_id]]
        ranked = sorted(fits, key=lambda pair: _rank_key(*pair))
        count = min(len(ranked), replicas)
        busy = sum(1 for n, _ in ranked[:count] if n.load_level >= BUSY)
        chosen = ranked[: min(len(ranked), count + busy)]
        for node, offer in chosen:
            remaining[node.node_id] -= offer.need_bytes
        if chosen:
            assignments.append(Assignment(model, tuple(n.node_id for n, _ in chosen)))
    placed = {a.model for a in assignments}
    return Plan(
        members=members,
        assignments=tuple(sorted(assignments, key=lambda a: a.model)),
        unplaced=tuple(sorted(offered - placed)),
        drafters=plan_drafters(nodes, placed),
    )


def plan_drafters(nodes: Iterable[NodeView], placed: Iterable[str]) -> tuple[Assignment, ...]:
    """For each placed model, the alive, non-draining nodes offering a model drafter for it,
    dedicated drafters (role `drafter`) first, then by node id."""
    out = []
    for model in sorted(set(placed)):
        offering = [
            n
            for n in nodes
            if not n.draining and any(d.target == model and d.kind != "ngram" for d in n.drafts)
        ]
        ranked = sorted(offering, key=lambda n: (0 if n.role == "drafter" else 1, n.node_id))
        if ranked:
            out.append(Assignment(model, tuple(n.node_id for n in ranked)))
    return tuple(out)


def next_epoch(
    current: tuple[int, str], digest: str, claims: Iterable[tuple[int, str]]
) -> tuple[int, str]:
    """The (epoch, digest) a node holds after computing `digest`, given its peers' claims.

    A new digest moves past every epoch seen; then the largest epoch claimed for the same
    digest is adopted, so nodes that agree on the plan agree on the epoch.
    """
    epoch, mine = current
    claims = list(claims)
    if digest != mine:
        epoch = max([epoch, *(e for e, _ in claims)]) + 1
    same = [e for e, d in claims if d == digest]
    return max([epoch, *same]), digest


def next_load_level(
    level: int, utilisation: float, past_threshold_s: float, sustain_s: float = SUSTAIN_S
) -> int:
    """A node's load level after utilisation has stayed on the far side of the threshold that
    would change it for `past_threshold_s` seconds (hysteresis: busy above BUSY_ABOVE, idle
    again only below IDLE_BELOW)."""
    if past_threshold_s < sustain_s:
        return level
    if level == IDLE and utilisation > BUSY_ABOVE:
        return BUSY
    if level == BUSY and utilisation < IDLE_BELOW:
        return IDLE
    return level


def crosses(level: int, utilisation: float) -> bool:
    """Whether utilisation is on the side of the threshold that would change `level`."""
    return utilisation > BUSY_ABOVE if level == IDLE else utilisation < IDLE_BELOW


def route(
    plan_: Plan,
    model: str,
    loaded: Mapping[str, tuple[str, ...]],
    load: Mapping[str, int],
    exclude: Iterable[str] = (),
    prefer: str | None = None,
) -> str | None:
    """The node a new (or failed-over) session of `model` goes to: a planned holder that has
    the model loaded and is not excluded; `prefer` (the home itself) when it is one, else the
    least loaded, ties in plan order. None when no such node exists right now."""
    skip = set(exclude)
    ready = [n for n in plan_.servers(model) if n not in skip and model in loaded.get(n, ())]
    if not ready:
        return None
    if prefer in ready:
        return prefer
    return min(ready, key=lambda n: (load.get(n, 0), ready.index(n)))
