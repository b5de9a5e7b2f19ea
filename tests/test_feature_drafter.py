"""The feature drafter on the tiny qwen2 fixture: the target's features come out of its passes
unchanged in logits, training on them raises agreement, the file round-trips, sessions reuse
what they hold and refuse drafts without the features they lack."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from models.backend import load_backend
from models.drafter_prompts import training_prompts
from models.drafter_training import TrainOptions, TrainReport
from models.feature_drafter import (
    FeatureDrafter,
    MissingFeaturesError,
    initial_feature_weights,
    load_feature_drafter_weights,
    save_feature_drafter,
)
from models.feature_training import train_feature_drafter
from models.sampling import SamplingParams
from models.speculative import check_draft
from models.trained_drafter import DrafterFileError, DrafterTargetMismatchError

VOCAB = 64


@dataclass(frozen=True)
class Trained:
    target: Path
    cache: Path
    report: TrainReport

    @property
    def path(self) -> Path:
        return Path(self.report.path)

    def load(self, slots: int = 4) -> FeatureDrafter:
        return FeatureDrafter.load(
            self.path, self.target, "fp32", max_slots=slots, max_len=256, cache_root=self.cache
        )


@pytest.fixture(scope="module")
def trained(tiny_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Trained:
    tmp = tmp_path_factory.mktemp("feature")
    target = tiny_paths["qwen2"]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        options = TrainOptions(
            vocab=VOCAB, minutes=0.35, max_new=24, slots=8, weights="fp32", lr=3e-3,
            batch_tokens=512, heldout_new=24,
        )  # fmt: skip
        prompts = training_prompts()
        report = train_feature_drafter(
            target, tmp / "qwen2.feature.gguf", options, prompts[:16], prompts[16:20], "qwen2",
            show=False, cache_root=tmp / "weights", samples_per_prompt=2,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    return Trained(target, tmp / "weights", report)


def _features(trained: Trained, tokens: list[int]) -> torch.Tensor:
    """The target's features for every token (as a verifier computes them)."""
    target = load_backend(trained.target, weights="fp32", max_slots=1, cache_root=trained.cache)
    slot = target.cache.allocate()
    forward_features = target.forward_features
    return forward_features([slot], [torch.tensor(tokens)])[1][0]


def test_features_pass_gives_the_same_logits(tiny_path: Path, tmp_path: Path) -> None:
    backend = load_backend(tiny_path, weights="fp32", max_slots=4, cache_root=tmp_path)
    a, b = backend.cache.allocate(), backend.cache.allocate()
    x, y = torch.arange(3, 20), torch.arange(5, 9)
    plain = backend.forward([a, b], [x, y], keep=[2, 1])
    c, d = backend.cache.allocate(), backend.cache.allocate()
    logits, features = backend.forward_features([c, d], [x, y], keep=[2, 1])
    assert all(torch.equal(p, q) for p, q in zip(plain, logits, strict=True))
    assert [f.shape[0] for f in features] == [17, 4]
    assert features[0].shape[1] == backend.config.dim


def test_training_raises_agreement_on_held_out_answers(trained: Trained) -> None:
    r = trained.report
    assert r.train_tokens >= 200 and r.heldout_positions > 20
    assert r.agreement > r.agreement_before + 0.1, (r.agreement_before, r.agreement)
    assert r.cost_ratio > 0 and r.drafter_step_s > 0


def test_file_round_trip_keeps_the_trained_tensors(trained: Trained, tmp_path: Path) -> None:
    w = load_feature_drafter_weights(trained.path)
    assert w.vocab_ids.shape == (VOCAB,) and w.head.shape[0] == VOCAB
    assert w.info["train_tokens"] == trained.report.train_tokens
    again = load_feature_drafter_weights(save_feature_drafter(w, tmp_path / "again.gguf"))
    assert torch.equal(w.fc, again.fc) and torch.equal(w.head, again.head)
    assert all(torch.equal(w.block[k], again.block[k]) for k in w.block)


def test_session_reuses_what_it_holds_and_matches_a_fresh_one(trained: Trained) -> None:
    drafter = trained.load()
    tokens = list(range(3, 40))
    feats = _features(trained, tokens)
    session = drafter.open(SamplingParams())
    session.propose(tokens[:15], 4, feats[:14], 0)
    assert session.held == 14
    # Part of the draft accepted: only the new positions' features are sent.
    later = session.propose(tokens[:22], 4, feats[14:21], 14)
    fresh = drafter.open(SamplingParams()).propose(tokens[:22], 4, feats[:21], 0)
    assert later.tokens == fresh.tokens and later.position == 22 and later.k == 4
    # A rollback to an earlier prefix needs no new features up to it.
    back = session.propose(tokens[:10], 3, feats[9:9], 9)
    assert back.tokens == drafter.open(SamplingParams()).propose(tokens[:10], 3, feats[:9]).tokens
    check_draft(later, drafter.config.vocab_size)
    assert set(later.tokens) <= set(drafter.vocab_ids.tolist())
    session.close()


def test_first_greedy_draft_is_the_teacher_forced_argmax(trained: Trained) -> None:
    drafter = trained.load()
    tokens = list(range(7, 30))
    feats = _features(trained, tokens)
    draft = drafter.open(SamplingParams()).propose(tokens, 1, feats[:-1])
    slot = drafter.backend.cache.allocate()
    out = drafter.backend.forward([slot], [drafter.inputs(tokens[1:], feats[:-1])])[0]
    assert draft.tokens[0] == int(drafter.vocab_ids[drafter.logits(out[-1]).argmax()])


def test_sampled_drafts_carry_sparse_q(trained: Trained) -> None:
    drafter = trained.load()
    tokens = list(range(3, 20))
    feats = _features(trained, tokens)
    draft = drafter.open(SamplingParams(temperature=1.0, seed=5)).propose(tokens, 3, feats[:-1])
    assert draft.q_ids is not None and draft.q_probs is not None
    assert torch.allclose(draft.q_probs.sum(dim=-1), torch.ones(3), atol=1e-4)
    check_draft(draft, drafter.config.vocab_size)


def test_drafts_without_the_features_it_lacks_are_refused(trained: Trained) -> None:
    drafter = trained.load()
    tokens = list(range(3, 20))
    feats = _features(trained, tokens)
    session = drafter.open(SamplingParams())
    with pytest.raises(MissingFeaturesError, match="send them from 0"):
        session.propose(tokens, 3)  # a new session holds nothing
    with pytest.raises(MissingFeaturesError, match="send them from 0"):
        session.propose(tokens, 3, feats[5:-1], 5)
    with pytest.raises(MissingFeaturesError, match="must be"):
        session.propose(tokens, 3, feats[:-1, :4], 0)
    assert session.propose(tokens, 3, feats[:-1], 0).k == 3  # and it goes on


def test_wrong_target_and_broken_files_are_refused(
    trained: Trained, tiny_paths: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(DrafterTargetMismatchError, match="train-drafter --kind feature"):
        FeatureDrafter.load(trained.path, tiny_paths["llama"], "fp32", cache_root=trained.cache)
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(trained.path.read_bytes()[:5000])
    with pytest.raises(DrafterFileError):
        load_feature_drafter_weights(broken)
    with pytest.raises(DrafterFileError, match="not found"):
        load_feature_drafter_weights(tmp_path / "missing.gguf")


def test_untrained_weights_load_for_any_tiny_target(tiny_path: Path, tmp_path: Path) -> None:
    config_vocab = load_backend(tiny_path, weights="fp32", cache_root=tmp_path).config.vocab_size
    w = initial_feature_weights(tiny_path, torch.arange(config_vocab))
    drafter = FeatureDrafter.from_weights(w, tiny_path, "fp32", max_slots=2, cache_root=tmp_path)
    start = time.perf_counter()
    tokens = list(range(3, 12))
    feats = torch.randn(len(tokens) - 1, drafter.config.dim)
    draft = drafter.open(SamplingParams()).propose(tokens, 5, feats)
    assert draft.k == 5 and time.perf_counter() - start < 30


def test_repeated_text_is_drafted_by_prompt_lookup(trained: Trained) -> None:
    drafter = trained.load()
    tokens = [5, 6, 7, 8, 9, 10, 11, 12, 5, 6, 7]
    feats = _features(trained, tokens)
    draft = drafter.open(SamplingParams()).propose(tokens, 4, feats[:-1])
    assert draft.tokens == (8, 9, 10, 11)  # what followed 5 6 7 before
    drafter.lookup = False
    block = drafter.open(SamplingParams()).propose(tokens, 4, feats[:-1])
    slot = drafter.backend.cache.allocate()
    out = drafter.backend.forward([slot], [drafter.inputs(tokens[1:], feats[:-1])])[0]
    assert block.tokens[0] == int(drafter.vocab_ids[drafter.logits(out[-1]).argmax()])
