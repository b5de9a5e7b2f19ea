"""Speculative decoding is lossless: greedy text equals target-only greedy for every drafter kind
and draft length, and sampled tokens follow the target's distribution (chi-square, with a broken
acceptance rule that the same test must catch)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from models.backend import Backend, load_backend
from models.drafters import ModelDrafter, NgramDrafter, lookup_continuation
from models.feature_drafter import FeatureDrafter
from models.generate import generate
from models.sampling import SamplingParams
from models.speculative import (
    BadDraftError,
    Draft,
    DraftPolicy,
    PassCostCurve,
    Verdict,
    check_draft,
    choose_draft_length,
    expected_tokens,
    verify_draft,
)
from models.speculative_generate import generate_speculative

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


def _backend(path: Path, slots: int = 4) -> Backend:
    return load_backend(path, weights="fp32", use_cache=False, max_slots=slots, max_len=256)


@pytest.fixture(scope="module")
def target(tiny_paths: dict[str, Path]) -> Backend:
    return _backend(tiny_paths["qwen2"])


@pytest.fixture(scope="module")
def drafters(
    tiny_paths: dict[str, Path],
    tiny_feature_drafter: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, object]:
    # tiny-llama shares tiny-qwen2's token ids (same byte-level vocabulary), so it can draft for
    # it; the target drafting for itself accepts everything, which exercises long accepted runs.
    # The feature drafter drafts from the target's features (sampled proposals with sparse q).
    return {
        "ngram": NgramDrafter(),
        "model": ModelDrafter(_backend(tiny_paths["llama"])),
        "model_sampled": ModelDrafter(_backend(tiny_paths["llama"]), proposal="sampled"),
        "self": ModelDrafter(_backend(tiny_paths["qwen2"]), kind="self"),
        "feature": FeatureDrafter.load(
            tiny_feature_drafter,
            tiny_paths["qwen2"],
            "fp32",
            max_slots=4,
            max_len=256,
            cache_root=tmp_path_factory.mktemp("feature_weights"),
        ),  # fmt: skip
    }


# -- pure parts ------------------------------------------------------------------------------


def test_lookup_continuation_finds_latest_match() -> None:
    seq = [1, 2, 3, 4, 9, 1, 2, 3, 5, 6, 1, 2, 3]
    assert lookup_continuation(seq, 2) == [5, 6]  # the latest earlier "1 2 3" is followed by 5 6
    assert lookup_continuation([1, 2, 3, 4], 3) == []
    assert lookup_continuation(seq, 0) == []


def test_greedy_verdict_counts_matching_prefix() -> None:
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 4, 7, 1]):
        logits[row, best] = 5.0
    assert verify_draft(logits, Draft(0, (3, 4, 2)), SamplingParams()) == Verdict(2, 7)
    assert verify_draft(logits, Draft(0, (3, 4, 7)), SamplingParams()) == Verdict(3, 1)
    assert verify_draft(logits[:1], Draft(0, ()), SamplingParams()) == Verdict(0, 3)
    with pytest.raises(BadDraftError, match="rows of logits"):
        verify_draft(logits, Draft(0, (3,)), SamplingParams())


def test_bad_drafts_are_refused() -> None:
    check_draft(Draft(0, (1, 2)), 10)
    with pytest.raises(BadDraftError, match="token ids"):
        check_draft(Draft(0, (1, 12)), 10)
    with pytest.raises(BadDraftError, match="both"):
        check_draft(Draft(0, (1,), q_ids=torch.tensor([[1]])), 10)
    ids, probs = torch.tensor([[1, 2]]), torch.tensor([[0.5, 0.4]])
    with pytest.raises(BadDraftError, match="sum to 1"):
        check_draft(Draft(0, (1,), ids, probs), 10)
    with pytest.raises(BadDraftError, match="no probability"):
        check_draft(Draft(0, (3,), ids, torch.tensor([[0.5, 0.5]])), 10)
    with pytest.raises(BadDraftError, match="rows"):
        check_draft(Draft(0, (1, 2), ids, torch.tensor([[0.5, 0.5]])), 10)


def test_draft_after_drops_the_consumed_part() -> None:
    draft = Draft(10, (1, 2, 3), torch.tensor([[1], [2], [3]]), torch.ones(3, 1))
    rest = draft.after(12)
    assert rest.position == 12 and rest.tokens == (3,)
    assert rest.q_ids is not None and rest.q_ids.tolist() == [[3]]
    assert draft.after(9) is draft and draft.after(20).tokens == ()


def test_draft_length_follows_acceptance_and_costs() -> None:
    flat = PassCostCurve()
    for t in range(1, 10):
        flat.observe(t, 0.10 + 0.002 * t)  # memory-bound verifier: extra tokens nearly free
    steep = PassCostCurve()
    for t in range(1, 10):
        steep.observe(t, 0.05 * t)  # compute-bound: each token costs a full step
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0
    assert choose_draft_length(0.9, 0.0, flat) == 8
    assert choose_draft_length(0.05, 0.0, flat) <= 1
    assert choose_draft_length(0.9, 0.0, steep) <= 1  # nothing to gain when tokens cost linearly
    assert choose_draft_length(0.9, 0.5, flat) == 0  # a drafter slower than the verifier
    # A drafter with a fixed cost per request (a round trip) and cheap tokens: long drafts.
    assert choose_draft_length(0.8, lambda k: 0.05 + 0.001 * k, flat) >= 6
    # More tokens from other sessions in the pass push this session's k down on a steep curve.
    bent = PassCostCurve()
    for t, s in [(1, 0.1), (8, 0.11), (16, 0.3), (32, 0.9)]:
        bent.observe(t, s)
    assert choose_draft_length(0.7, 0.0, bent, other_tokens=0) > choose_draft_length(
        0.7, 0.0, bent, other_tokens=15
    )


def test_policy_probes_after_idle_steps() -> None:
    curve = PassCostCurve()
    for t in range(1, 10):
        curve.observe(t, 0.05 * t)
    policy = DraftPolicy(curve, probe_every=3)
    policy.observe_draft(3, 60.0)  # the first draft reads the prompt too: not counted
    for k in range(1, 9):
        policy.observe_draft(k, 1.0 * k)  # a drafter far slower than the verifier
    ks = [policy.next_k(room=8) for _ in range(6)]
    assert ks == [0, 0, 1, 0, 0, 1]
    assert DraftPolicy(curve, fixed_k=5).next_k(room=3) == 3


# -- greedy equality -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ngram", "model", "self", "feature"])
@pytest.mark.parametrize("k", [1, 3, 8, None])
def test_greedy_text_equals_target_only(
    target: Backend, drafters: dict[str, object], kind: str, k: int | None
) -> None:
    expected = generate(target, PROMPT, SamplingParams(), 48).tokens
    drafter = drafters[kind]
    result = generate_speculative(target, drafter, PROMPT, SamplingParams(), 48, draft_k=k)  # type: ignore[arg-type]
    assert result.tokens == expected
    spec = result.speculative
    assert spec.verify_steps >= 1 and spec.accepted <= spec.drafted
    if kind == "self" and k is not None:
        assert spec.acceptance == 1.0 and spec.verify_steps < 48  # several tokens per pass
    assert target.cache.slots == ()  # the slot was freed


def test_stop_ids_inside_an_accepted_run(target: Backend, drafters: dict[str, object]) -> None:
    expected = generate(target, PROMPT, SamplingParams(), 40).tokens
    stop = expected[10]
    first = expected.index(stop)
    result = generate_speculative(
        target,
        drafters["self"],  # type: ignore[arg-type]
        PROMPT,
        SamplingParams(),
        40,
        stop_ids={stop},
        draft_k=8,
    )
    assert result.tokens == expected[:first]
    assert result.stats.stop_reason == "stop"


def test_feature_drafts_are_made_from_the_targets_features(
    target: Backend, drafters: dict[str, object]
) -> None:
    """Every draft of the feature drafter is the one a fresh session makes from the target's
    features of the whole committed text (so the rows it was given were the right ones)."""
    drafter = drafters["feature"]
    assert isinstance(drafter, FeatureDrafter)
    forward_features = target.forward_features  # type: ignore[attr-defined]
    seen: list[tuple[list[int], int, tuple[int, ...]]] = []

    class Recording:
        kind = "feature"

        def open(self, params: SamplingParams) -> object:
            inner = drafter.open(params)

            class Session:
                kind = "feature"
                uses_features = True

                def propose(self, committed: list[int], k: int, *args: object) -> Draft:
                    draft = inner.propose(committed, k, *args)  # type: ignore[arg-type]
                    seen.append((list(committed), k, draft.tokens))
                    return draft

                def close(self) -> None:
                    inner.close()

            return Session()

    result = generate_speculative(target, Recording(), PROMPT, SamplingParams(), 30, draft_k=3)  # type: ignore[arg-type]
    assert result.tokens == generate(target, PROMPT, SamplingParams(), 30).tokens
    assert len(seen) > 5
    slot = target.cache.allocate()
    try:
        _, (reference,) = forward_features([slot], [torch.tensor(PROMPT + list(result.tokens))])
    finally:
        target.cache.free(slot)
    for committed, k, tokens in seen:
        fresh = drafter.open(SamplingParams())
        assert fresh.propose(committed, k, reference[: len(committed) - 1]).tokens == tokens
        fresh.close()


def test_a_feature_drafter_needs_a_backend_with_features(
    target: Backend, drafters: dict[str, object]
) -> None:
    class NoFeatures:
        name = "plain"

        def __init__(self, inner: Backend) -> None:
            self.config, self.layers, self.cache = inner.config, inner.layers, inner.cache
            self.forward = inner.forward

    with pytest.raises(ValueError, match="does not give them"):
        generate_speculative(NoFeatures(target), drafters["feature"], PROMPT, SamplingParams(), 4)  # type: ignore[arg-type]
    assert target.cache.slots == ()


def test_no_draft_sampling_draws_what_target_only_draws(target: Backend) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=11)
    expected = generate(target, PROMPT, params, 24).tokens
    result = generate_speculative(target, NgramDrafter(), PROMPT, params, 24, draft_k=0)
    assert result.tokens == expected


# -- distribution equality -------------------------------------------------------------------


def _chi_square_p(a: Counter[tuple[int, ...]], b: Counter[tuple[int, ...]]) -> float:
    """Two-sample chi-square test of homogeneity over the categories seen (p-value)."""
    keys = sorted(set(a) | set(b))
    na, nb = sum(a.values()), sum(b.values())
    stat = 0.0
    for key in keys:
        total = a[key] + b[key]
        for count, n in ((a[key], na), (b[key], nb)):
            expected = total * n / (na + nb)
            stat += (count - expected) ** 2 / expected
    df = len(keys) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def _samples(run: Callable[[int], tuple[int, ...]], n: int) -> Counter[tuple[int, ...]]:
    return Counter(run(seed) for seed in range(n))


N_SAMPLES = 1200
N_TOKENS = 2


@pytest.fixture(scope="module")
def target_only_samples(target: Backend) -> Counter[tuple[int, ...]]:
    def run(seed: int) -> tuple[int, ...]:
        params = SamplingParams(temperature=1.0, top_k=3, seed=seed)
        return generate(target, PROMPT, params, N_TOKENS).tokens

    # Seeds offset from the speculative runs' so the two samples are independent.
    return _samples(lambda s: run(s + 10**6), N_SAMPLES)


def _speculative_samples(
    target: Backend, drafter: object, verify: Callable[..., Verdict] = verify_draft
) -> Counter[tuple[int, ...]]:
    def run(seed: int) -> tuple[int, ...]:
        params = SamplingParams(temperature=1.0, top_k=3, seed=seed)
        return generate_speculative(
            target,
            drafter,  # type: ignore[arg-type]
            PROMPT,
            params,
            N_TOKENS,
            draft_k=2,
            verify=verify,
        ).tokens

    return _samples(run, N_SAMPLES)


@pytest.mark.parametrize("kind", ["model", "ngram", "self"])
def test_deterministic_drafts_sample_exactly_what_target_only_samples(
    target: Backend, drafters: dict[str, object], kind: str
) -> None:
    """A deterministic proposal is verified with the position's own uniform (the coupled form
    of min(1, p/q) with one-hot q): the text is target-only sampling's, token for token."""
    for seed in range(3):
        params = SamplingParams(temperature=1.0, top_p=0.9, seed=seed)
        expected = generate(target, PROMPT, params, 32).tokens
        for k in (2, 5):
            got = generate_speculative(target, drafters[kind], PROMPT, params, 32, draft_k=k)  # type: ignore[arg-type]
            assert got.tokens == expected
            if kind == "self":
                assert got.speculative.accepted > 0


@pytest.mark.parametrize("kind", ["model_sampled", "model", "ngram", "feature"])
def test_sampled_tokens_follow_the_target_distribution(
    target: Backend,
    drafters: dict[str, object],
    target_only_samples: Counter[tuple[int, ...]],
    kind: str,
) -> None:
    spec = _speculative_samples(target, drafters[kind])
    assert len(target_only_samples) > 5  # enough categories for the test to mean something
    assert _chi_square_p(spec, target_only_samples) > 1e-3


def test_a_broken_acceptance_rule_is_caught(
    target: Backend, drafters: dict[str, object], target_only_samples: Counter[tuple[int, ...]]
) -> None:
    """Accepting every draft token (no min(1, p/q), no residual) samples the drafter's
    distribution instead of the target's: the chi-square test must reject it."""

    def accept_everything(logits: torch.Tensor, draft: Draft, params: SamplingParams) -> Verdict:
        return verify_draft(logits, draft, params, accept=lambda p, q: 1.0)

    spec = _speculative_samples(target, drafters["model_sampled"], accept_everything)
    assert _chi_square_p(spec, target_only_samples) < 1e-6


def test_feature_spec_loads_its_default_file_and_says_how_to_make_one(
    tiny_paths: dict[str, Path],
    tiny_feature_drafter: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from models.drafter_loading import load_drafter, parse_drafter_spec
    from models.feature_drafter import default_feature_drafter_path

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert str(parse_drafter_spec("feature:/x/y.gguf")) == "feature:/x/y.gguf"
    target = tiny_paths["qwen2"]
    with pytest.raises(FileNotFoundError, match="train-drafter --target tiny-qwen2 --kind feature"):
        load_drafter("feature", target, "tiny-qwen2", weights="fp32", cache_root=tmp_path)
    default = default_feature_drafter_path("tiny-qwen2")
    assert default.parent.parent == tmp_path / "sled"
    default.parent.mkdir(parents=True)
    default.write_bytes(tiny_feature_drafter.read_bytes())
    for spec in ("feature", f"feature:{tiny_feature_drafter}"):
        drafter = load_drafter(spec, target, "tiny-qwen2", weights="fp32", cache_root=tmp_path)
        assert isinstance(drafter, FeatureDrafter) and drafter.uses_features
