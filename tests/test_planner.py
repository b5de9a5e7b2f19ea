"""The planner as a pure function over many synthetic clusters."""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.planner import (
    BUSY,
    IDLE,
    ClusterView,
    NodeView,
    crosses,
    next_epoch,
    next_load_level,
    plan,
    route,
)
from agent.probe import PROBING, READY, TOO_BIG, ModelOffer

GB = 2**30
MODELS = ("big", "mid", "small")
NEED = {"big": 4 * GB, "mid": 2 * GB, "small": GB // 2}

offers = st.lists(
    st.builds(
        lambda name, status, speed: ModelOffer(
            name, status, need_bytes=NEED[name], decode_tps=speed
        ),
        st.sampled_from(MODELS),
        st.sampled_from([READY, READY, READY, PROBING, TOO_BIG]),
        st.sampled_from([0.0, 5.0, 8.0, 12.5]),
    ),
    max_size=3,
    unique_by=lambda o: o.name,
).map(tuple)

node_views = st.builds(
    NodeView,
    node_id=st.text("abcdef0123", min_size=1, max_size=4),
    memory_budget=st.sampled_from([0, GB, 3 * GB, 5 * GB, 9 * GB]),
    offers=offers,
    role=st.sampled_from(["auto", "auto", "verifier", "client"]),
    load_level=st.sampled_from([IDLE, IDLE, BUSY]),
    draining=st.sampled_from([False, False, False, True]),
    replicas=st.sampled_from([1, 2, 2, 3]),
)
clusters = st.lists(node_views, max_size=7, unique_by=lambda n: n.node_id)


@settings(max_examples=150, deadline=None)
@given(clusters, st.randoms(use_true_random=False))
def test_deterministic_and_permutation_invariant(nodes: list[NodeView], rnd: random.Random) -> None:
    first = plan(ClusterView.of(nodes))
    shuffled = list(nodes)
    rnd.shuffle(shuffled)
    second = plan(ClusterView(tuple(shuffled)))  # even unsorted input gives the same plan
    assert first == second
    assert first.digest() == second.digest()
    assert first.members == tuple(sorted(n.node_id for n in nodes))


@settings(max_examples=150, deadline=None)
@given(clusters)
def test_only_nodes_that_fit_hold_models(nodes: list[NodeView]) -> None:
    result = plan(ClusterView.of(nodes))
    by_id = {n.node_id: n for n in nodes}
    used = dict.fromkeys(by_id, 0)
    for assignment in result.assignments:
        assert assignment.nodes, "an assignment names at least one node"
        assert len(set(assignment.nodes)) == len(assignment.nodes)
        for node_id in assignment.nodes:
            node = by_id[node_id]
            offer = next(o for o in node.offers if o.name == assignment.model)
            assert offer.status == READY
            assert not node.draining and node.role != "client"
            used[node_id] += offer.need_bytes
        replicas = max(n.replicas for n in nodes)
        busy = sum(by_id[n].load_level == BUSY for n in assignment.nodes)
        assert len(assignment.nodes) <= replicas + busy
    for node_id, total in used.items():
        assert total <= by_id[node_id].memory_budget
    assert result.drafters == ()  # drafting is a later issue: no fake assignments


@settings(max_examples=100, deadline=None)
@given(clusters)
def test_a_model_is_placed_when_some_node_can_hold_it(nodes: list[NodeView]) -> None:
    result = plan(ClusterView.of(nodes))
    for model in MODELS:
        could = [
            n
            for n in nodes
            if not n.draining
            and n.role != "client"
            and any(o.name == model and o.status == READY for o in n.offers)
            and n.memory_budget >= NEED[model]
            and not any(  # nothing bigger competes for that node's memory
                o.status == READY and NEED[o.name] > NEED[model] for o in n.offers
            )
        ]
        if could:
            assert result.servers(model), (model, result)
        offered = any(o.name == model for n in nodes for o in n.offers)
        assert (model in result.unplaced) == (offered and not result.servers(model))


@settings(max_examples=100, deadline=None)
@given(clusters)
def test_failure_of_a_holder_replans_without_it(nodes: list[NodeView]) -> None:
    before = plan(ClusterView.of(nodes))
    for assignment in before.assignments:
        dead = assignment.nodes[0]
        after = plan(ClusterView.of(n for n in nodes if n.node_id != dead))
        assert dead not in after.members
        assert all(dead not in a.nodes for a in after.assignments)
        survivors = [n for n in assignment.nodes if n != dead]
        if survivors:  # another holder existed: the model stays placed
            assert after.servers(assignment.model)
        assert after.digest() != before.digest()


def test_ranking_prefers_verifier_role_then_speed_then_id() -> None:
    def node(node_id: str, tps: float, role: str = "auto") -> NodeView:
        offer = ModelOffer("m", READY, need_bytes=GB, decode_tps=tps)
        return NodeView(node_id, 2 * GB, (offer,), role=role, replicas=1)

    assert plan(ClusterView.of([node("a", 5), node("b", 9)])).servers("m") == ("b",)
    assert plan(ClusterView.of([node("b", 5), node("a", 5)])).servers("m") == ("a",)
    slow_verifier = [node("a", 9), node("z", 1, role="verifier")]
    assert plan(ClusterView.of(slow_verifier)).servers("m") == ("z",)


def test_replicas_and_busy_nodes_add_holders() -> None:
    offer = ModelOffer("m", READY, need_bytes=GB, decode_tps=5)
    nodes = [NodeView(f"n{i}", 2 * GB, (offer,), replicas=2) for i in range(4)]
    assert plan(ClusterView.of(nodes)).servers("m") == ("n0", "n1")
    nodes[0] = replace(nodes[0], load_level=BUSY)
    assert plan(ClusterView.of(nodes)).servers("m") == ("n0", "n1", "n2")
    nodes[3] = replace(nodes[3], memory_budget=GB // 2)  # cannot hold it
    nodes[2] = replace(nodes[2], draining=True)
    assert plan(ClusterView.of(nodes)).servers("m") == ("n0", "n1")


def test_a_join_changes_the_digest() -> None:
    offer = ModelOffer("m", READY, need_bytes=GB)
    nodes = [NodeView("a", GB, (offer,)), NodeView("b", 0, (offer,))]
    joined = [*nodes, NodeView("c", 0)]
    assert plan(ClusterView.of(nodes)).digest() != plan(ClusterView.of(joined)).digest()
    assert plan(ClusterView.of(joined)).roles("c") == ("client",)
    assert plan(ClusterView.of(joined)).roles("a") == ("verifier",)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.lists(st.sampled_from("xyz"), min_size=1, max_size=6), min_size=2, max_size=5),
    st.randoms(use_true_random=False),
)
def test_epochs_converge_and_only_grow(histories: list[list[str]], rnd: random.Random) -> None:
    """Nodes see different digest histories with gossip in random order; once they all compute
    the same digest, a round of gossip gives them all the same epoch; no epoch ever decreases."""
    state = [(0, "") for _ in histories]
    steps = [(i, d) for i, h in enumerate(histories) for d in h]
    rnd.shuffle(steps)
    for i, digest in steps:
        claims = [state[j] for j in range(len(state)) if j != i and rnd.random() < 0.7]
        new = next_epoch(state[i], digest, claims)
        assert new[0] >= state[i][0]
        state[i] = new
    final = "final"
    for _ in range(2):  # everyone computes the same plan, then gossips twice
        for i in range(len(state)):
            others = [state[j] for j in range(len(state)) if j != i]
            new = next_epoch(state[i], final, others)
            assert new[0] >= state[i][0]
            state[i] = new
    assert len(set(state)) == 1


def test_epoch_rules() -> None:
    assert next_epoch((3, "a"), "a", [(7, "b")]) == (3, "a")  # same content: unchanged
    assert next_epoch((3, "a"), "b", [(7, "c")]) == (8, "b")  # new content: past all seen
    assert next_epoch((8, "b"), "b", [(9, "b")]) == (9, "b")  # adopt a larger equal claim


def test_load_level_hysteresis() -> None:
    assert next_load_level(IDLE, 1.5, past_threshold_s=1.0) == IDLE  # a burst: no change
    assert next_load_level(IDLE, 1.5, past_threshold_s=6.0) == BUSY
    assert next_load_level(BUSY, 0.7, past_threshold_s=60.0) == BUSY  # inside the band
    assert next_load_level(BUSY, 0.2, past_threshold_s=6.0) == IDLE
    assert crosses(IDLE, 0.95) and not crosses(IDLE, 0.7)
    assert crosses(BUSY, 0.3) and not crosses(BUSY, 0.7)


def test_route_prefers_home_then_least_loaded_loaded_holder() -> None:
    offer = ModelOffer("m", READY, need_bytes=GB)
    nodes = [NodeView(n, 2 * GB, (offer,), replicas=3) for n in ("a", "b", "c")]
    result = plan(ClusterView.of(nodes))
    loaded = {"a": ("m",), "b": ("m",), "c": ()}
    assert route(result, "m", loaded, {"a": 3, "b": 1}) == "b"
    assert route(result, "m", loaded, {"a": 1, "b": 1}) == "a"  # tie: plan order
    assert route(result, "m", loaded, {"a": 3, "b": 1}, prefer="a") == "a"
    assert route(result, "m", loaded, {}, exclude=["a", "b"]) is None  # c is still loading
    assert route(result, "other", loaded, {}) is None
