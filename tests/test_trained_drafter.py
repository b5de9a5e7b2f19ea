"""The trained drafter on the tiny qwen2 fixture: training helps, the file round-trips, drafting
follows the Drafter protocol, and bad files or the wrong target are refused clearly."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from models.backend import load_backend
from models.drafter_prompts import training_prompts
from models.drafter_training import (
    DrafterNet,
    Sample,
    TrainOptions,
    add_train_drafter_parser,
    agreement,
    chat_ids,
    cmd_train_drafter,
    frozen_hidden,
    generate_samples,
    initial_weights,
    make_examples,
    reduced_vocabulary,
    train_drafter,
    train_net,
)
from models.gguf_loader import GGUFFile
from models.sampling import SamplingParams
from models.speculative import check_draft
from models.tokenizer import Tokenizer
from models.trained_drafter import (
    DrafterFileError,
    DrafterTargetMismatchError,
    DrafterWeights,
    TrainedDrafter,
    default_drafter_path,
    load_drafter_weights,
    save_drafter,
    target_sha256,
)

LAYERS = 1
VOCAB = 48


@dataclass(frozen=True)
class Trained:
    target: Path
    path: Path
    cache: Path
    samples: list[Sample]
    before: float
    after: float


def _weights(net: DrafterNet, target: Path, vocab_ids: torch.Tensor) -> DrafterWeights:
    return DrafterWeights(
        target_sha256=target_sha256(target), target_name="qwen2", layers=LAYERS,
        vocab_ids=vocab_ids, adapter=net.adapter_tensors(),
        final_norm=net.final_norm.detach().clone(), head=net.head.detach().clone(), info={},
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Trained:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(tiny_paths["qwen2"], tmp_path_factory.mktemp("drafter"))
    finally:
        torch.set_num_threads(previous)


def _train(target: Path, tmp: Path) -> Trained:
    cache = tmp / "weights"
    tokenizer = Tokenizer.from_gguf(target)
    prompts = [chat_ids(tokenizer, p) for p in training_prompts()[:16]]
    backend = load_backend(target, max_slots=8, max_len=256, cache_root=cache)
    params = SamplingParams(temperature=0.8, seed=3)
    samples = generate_samples(backend, prompts, 24, (), params, show=False)
    frozen = load_backend(target, layers=(0, LAYERS), max_slots=1, max_len=256, cache_root=cache)
    hidden = frozen_hidden(frozen, samples, show=False)
    gf = GGUFFile(target)
    vocab_ids = reduced_vocabulary(samples, VOCAB, gf.config.vocab_size)
    net = DrafterNet(gf.config, *initial_weights(gf, LAYERS, LAYERS, vocab_ids), sliding=False)

    def measured(path: Path) -> float:
        save_drafter(_weights(net, target, vocab_ids), path)
        drafter = TrainedDrafter.load(path, target, max_slots=4, max_len=256, cache_root=cache)
        return agreement(drafter, samples)[0]

    before = measured(tmp / "untrained.drafter.gguf")
    examples = make_examples(samples, hidden, vocab_ids, gf.config.vocab_size)
    options = TrainOptions(lr=3e-3, batch_tokens=512)
    train_net(net, examples, time.monotonic() + 30.0, options, show=False, max_epochs=30)
    path = tmp / "qwen2.drafter.gguf"
    after = measured(path)
    return Trained(target, path, cache, samples, before, after)


def _load(t: Trained) -> TrainedDrafter:
    return TrainedDrafter.load(t.path, t.target, max_slots=4, max_len=256, cache_root=t.cache)


def test_training_raises_agreement_on_the_training_text(trained: Trained) -> None:
    assert sum(s.n_gen for s in trained.samples) >= 200
    assert trained.after > trained.before + 0.1, (trained.before, trained.after)


def test_file_round_trip_keeps_the_trained_tensors(trained: Trained, tmp_path: Path) -> None:
    w = load_drafter_weights(trained.path)
    assert w.layers == LAYERS and w.target_name == "qwen2"
    assert w.vocab_ids.shape == (VOCAB,) and w.head.shape[0] == VOCAB
    again = save_drafter(w, tmp_path / "again.drafter.gguf")
    w2 = load_drafter_weights(again)
    assert torch.equal(w.head, w2.head) and torch.equal(w.vocab_ids, w2.vocab_ids)
    assert w.adapter.keys() == w2.adapter.keys()


def test_greedy_drafts_are_deterministic_and_valid(trained: Trained) -> None:
    drafter = _load(trained)
    vocab = drafter.config.vocab_size
    committed = list(trained.samples[0].tokens[:20])
    a = drafter.open(SamplingParams()).propose(committed, 5)
    b = drafter.open(SamplingParams()).propose(committed, 5)
    assert a.tokens == b.tokens and a.k == 5 and a.q_ids is None
    assert all(t in set(drafter.vocab_ids.tolist()) for t in a.tokens)
    check_draft(a, vocab)
    # The greedy draft is the teacher-forced argmax chain.
    assert a.tokens[0] == drafter.next_token_ids(committed)[-1]


def test_session_reuses_its_prefix_and_matches_a_fresh_one(trained: Trained) -> None:
    drafter = _load(trained)
    tokens = list(trained.samples[1].tokens)
    session = drafter.open(SamplingParams())
    session.propose(tokens[:15], 4)
    # Some draft tokens accepted, some rejected: the session rolls back and continues.
    later = session.propose(tokens[:18], 4)
    fresh = drafter.open(SamplingParams()).propose(tokens[:18], 4)
    assert later.tokens == fresh.tokens and later.position == 18
    session.close()


def test_sampled_drafts_carry_sparse_q_rows_summing_to_one(trained: Trained) -> None:
    drafter = _load(trained)
    params = SamplingParams(temperature=1.0, seed=11)
    draft = drafter.open(params).propose(list(trained.samples[2].tokens[:12]), 4)
    assert draft.q_ids is not None and draft.q_probs is not None
    assert draft.q_ids.shape == draft.q_probs.shape == (4, draft.q_ids.shape[1])
    assert torch.allclose(draft.q_probs.sum(dim=-1), torch.ones(4), atol=1e-4)
    assert set(draft.q_ids.flatten().tolist()) <= set(drafter.vocab_ids.tolist())
    check_draft(draft, drafter.config.vocab_size)
    again = drafter.open(params).propose(list(trained.samples[2].tokens[:12]), 4)
    assert again.tokens == draft.tokens  # seeded by position


def test_wrong_target_is_refused(trained: Trained, tiny_paths: dict[str, Path]) -> None:
    with pytest.raises(DrafterTargetMismatchError, match="trained for target qwen2"):
        TrainedDrafter.load(trained.path, tiny_paths["llama"], cache_root=trained.cache)


def test_truncated_or_foreign_file_is_refused(trained: Trained, tmp_path: Path) -> None:
    data = trained.path.read_bytes()
    cut = tmp_path / "cut.drafter.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DrafterFileError, match="cut.drafter.gguf"):
        TrainedDrafter.load(cut, trained.target, cache_root=trained.cache)
    junk = tmp_path / "junk.drafter.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(DrafterFileError):
        load_drafter_weights(junk)
    with pytest.raises(DrafterFileError, match="not a sled drafter"):
        load_drafter_weights(trained.target)  # a GGUF, but a model, not a drafter
    with pytest.raises(DrafterFileError, match="not found"):
        load_drafter_weights(tmp_path / "missing.gguf")


def test_whole_run_saves_a_loadable_drafter_and_reports(
    tiny_paths: dict[str, Path], tmp_path: Path, torch_single_thread: None
) -> None:
    out = tmp_path / "run.drafter.gguf"
    options = TrainOptions(
        layers=1, vocab=32, minutes=0.08, max_new=12, slots=4, heldout_new=8, max_prompts=6,
        batch_tokens=256, lr=3e-3,
    )  # fmt: skip
    held = ["Say hello.", "Write a loop."]
    report = train_drafter(
        tiny_paths["qwen2"], out, options, training_prompts() + held, held, show=False,
        cache_root=tmp_path / "weights",
    )  # fmt: skip
    assert out.is_file() and report.train_sequences == 6 and report.vocab == 32
    assert report.heldout_positions > 0 and 0.0 <= report.agreement <= 1.0
    assert report.drafter_step_s > 0 and report.target_step_s > 0
    info = load_drafter_weights(out).info
    assert info["train_tokens"] == report.train_tokens


def test_default_path_and_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = default_drafter_path("qwen2.5-coder-1.5b-instruct", root=tmp_path)
    assert path == tmp_path / "drafters" / "qwen2.5-coder-1.5b-instruct.drafter.gguf"
    parser = argparse.ArgumentParser()
    add_train_drafter_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["train-drafter", "--target", "no-such-model", "--minutes", "1"])
    assert cmd_train_drafter(args) == 2
    assert "no-such-model" in capsys.readouterr().err
    args = parser.parse_args(["train-drafter", "--target", "x", "--minutes", "0"])
    assert cmd_train_drafter(args) == 2
    assert "--minutes" in capsys.readouterr().err


def test_saved_text_is_reused_only_for_the_same_target(
    trained: Trained, tmp_path: Path, tiny_paths: dict[str, Path]
) -> None:
    from models.drafter_training import load_text, save_text

    path = tmp_path / "text.pt"
    sha = target_sha256(trained.target)
    save_text(path, sha, trained.samples, trained.samples[:2], 12.5)
    loaded = load_text(path, sha)
    assert loaded is not None
    samples, held, seconds = loaded
    assert seconds == 12.5 and len(held) == 2
    assert [s.tokens for s in samples] == [s.tokens for s in trained.samples]
    assert torch.equal(samples[0].top_probs, trained.samples[0].top_probs)
    assert load_text(path, target_sha256(tiny_paths["llama"])) is None
    assert load_text(tmp_path / "absent.pt", sha) is None


def test_frozen_head_option_trains_only_the_adapter(trained: Trained) -> None:
    gf = GGUFFile(trained.target)
    samples = trained.samples[:4]
    vocab_ids = reduced_vocabulary(samples, VOCAB, gf.config.vocab_size)
    net = DrafterNet(gf.config, *initial_weights(gf, LAYERS, LAYERS, vocab_ids), sliding=False)
    head, qkv = net.head.detach().clone(), net.block.qkv.weight.detach().clone()
    frozen = load_backend(trained.target, layers=(0, LAYERS), max_slots=1, cache_root=trained.cache)
    examples = make_examples(
        samples, frozen_hidden(frozen, samples, show=False), vocab_ids, gf.config.vocab_size
    )
    options = TrainOptions(lr=3e-3, batch_tokens=256, train_head=False)
    train_net(net, examples, time.monotonic() + 10.0, options, show=False, max_epochs=2)
    assert torch.equal(net.head, head)
    assert not torch.equal(net.block.qkv.weight, qkv)
