"""`sled models train-drafter --kind feature`: train a feature drafter (models/feature_drafter.py)
on the target's own text and features.

Steps (one time budget, `--minutes`):
1. the target answers the training prompts (several seeded samples per prompt, continuous
   batching); every pass keeps the final-normed hidden state of each token it reads (the
   features) and the target's top-K next-token distribution (the teacher);
2. the reduced vocabulary: the V' ids with the most teacher mass;
3. fc, the block (from the target's last layer) are trained: drafter position i reads
   (t_{i+1}, f_i + noise) and must output f_{i+1} (smooth L1, in units of the features' RMS)
   and, through the target's own head rows (frozen), the teacher's distribution at i+1
   (cross-entropy). The noise stands in for the error of predicted features, which later draft
   steps read (EAGLE's recipe);
4. saved, loaded back as a node loads it, and measured: next-token agreement on the target's
   greedy answers to held-out prompts (teacher-forced real features: the first draft token
   after a verification), and one drafter step's seconds against one target step's.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from models.backend import Backend
from models.config import ModelConfig
from models.drafter_training import (
    DrafterNet,
    Progress,
    Sample,
    TrainOptions,
    TrainReport,
    _quiet,
    chat_ids,
    generate_samples,
    load_text,
    reduced_vocabulary,
    save_text,
    start_run,
    train_net,
)
from models.feature_drafter import (
    FeatureDrafter,
    FeatureDrafterWeights,
    initial_feature_weights,
    save_feature_drafter,
)
from models.sampling import SamplingParams

CLS_WEIGHT = 0.3  # cross-entropy against the teacher, next to the feature regression
NOISE = 0.1  # uniform input-feature noise, in units of the features' RMS


@dataclass(frozen=True)
class FeatureExample:
    hidden: torch.Tensor  # [T-1, dim] target features f_0..f_{T-2} (`batches` sorts by it)
    next_ids: torch.Tensor  # [T-1] t_1..t_{T-1}: what position i reads besides f_i
    start: int  # first drafter position with a loss (n_prompt - 2)
    targets: torch.Tensor  # [n, K] reduced indices of the teacher rows for positions start..
    weights: torch.Tensor  # [n, K]


class FeatureNet(nn.Module):
    """fc + block (trainable, float32) + the target's head rows and embedding (frozen)."""

    embedding: torch.Tensor

    def __init__(
        self,
        config: ModelConfig,
        init: FeatureDrafterWeights,
        embedding: torch.Tensor,
        scale: float,
        sliding: bool,
    ) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Parameter(init.fc.float().clone())
        self.core = DrafterNet(config, init.block, torch.ones(config.dim), init.head, sliding)
        self.core.head.requires_grad_(False)
        self.core.final_norm.requires_grad_(False)
        self.register_buffer("embedding", embedding, persistent=False)
        self.scale = scale

    def predict(self, features: torch.Tensor, next_ids: torch.Tensor, lengths: Sequence[int]):
        emb = nn.functional.embedding(next_ids, self.embedding).float()
        if self.config.embed_scale != 1.0:
            emb = emb * self.config.embed_scale
        x = nn.functional.linear(torch.cat([emb, features], dim=-1), self.fc)
        return self.core.hidden(x, lengths)

    def logits(self, predicted: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(predicted, self.core.head)

    def weights(self, base: FeatureDrafterWeights, info: dict[str, float]) -> FeatureDrafterWeights:
        return FeatureDrafterWeights(
            target_sha256=base.target_sha256, target_name=base.target_name,
            vocab_ids=base.vocab_ids, fc=self.fc.detach().clone(),
            block=self.core.adapter_tensors(), head=self.core.head.detach().clone(), info=info,
        )  # fmt: skip


def make_feature_examples(
    samples: Sequence[Sample], vocab_ids: torch.Tensor, vocab_size: int
) -> list[FeatureExample]:
    index = torch.full((vocab_size,), -1, dtype=torch.int64)
    index[vocab_ids] = torch.arange(len(vocab_ids))
    out = []
    for s in samples:
        assert s.features is not None
        t = len(s.tokens)
        if s.n_prompt < 2 or t - s.n_prompt < 2 or s.features.shape[0] != t - 1:
            continue
        # Position i (n_prompt-2 <= i <= T-3) predicts f_{i+1}, whose teacher row is
        # i + 2 - n_prompt (rows j give the distribution at position n_prompt - 1 + j).
        rows = slice(0, t - s.n_prompt)
        reduced = index[s.top_ids[rows]]
        probs = s.top_probs[rows].float() * (reduced >= 0)
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp(min=1e-9)
        out.append(
            FeatureExample(
                hidden=s.features,
                next_ids=torch.tensor(s.tokens[1:], dtype=torch.int64),
                start=s.n_prompt - 2,
                targets=reduced.clamp(min=0),
                weights=probs,
            )
        )
    return out


def feature_loss(net: FeatureNet, group: Sequence[FeatureExample]) -> tuple[torch.Tensor, int, int]:
    """Regression on the next feature + distillation through the frozen head; argmax hits."""
    lengths = [e.hidden.shape[0] for e in group]
    t, dim = max(lengths), net.config.dim
    x = torch.zeros(len(group), t, dim)
    ids = torch.zeros(len(group), t, dtype=torch.int64)
    for i, e in enumerate(group):
        x[i, : lengths[i]] = e.hidden.float()
        ids[i, : lengths[i]] = e.next_ids
    clean = x
    if net.training:
        x = x + (torch.rand_like(x) * 2 - 1) * (NOISE * net.scale)
    out = net.predict(x, ids, lengths)
    pred = torch.cat([out[i, e.start : lengths[i] - 1] for i, e in enumerate(group)])
    real = torch.cat([clean[i, e.start + 1 : lengths[i]] for i, e in enumerate(group)])
    reg = nn.functional.smooth_l1_loss(pred.float() / net.scale, real / net.scale)
    targets = torch.cat([e.targets for e in group])
    weights = torch.cat([e.weights for e in group])
    logp = torch.log_softmax(net.logits(pred).float(), dim=-1)
    cls = -(logp.gather(1, targets) * weights).sum(dim=-1).mean()
    hits = int((logp.argmax(dim=-1) == targets[:, 0]).sum())
    return reg + CLS_WEIGHT * cls, hits, int(pred.shape[0])


def feature_agreement(drafter: FeatureDrafter, samples: Sequence[Sample]) -> tuple[float, int]:
    """Fraction of generated positions (beyond the first) where the drafter, given the real
    features, drafts the token the target chose; and the position count."""
    hits = total = 0
    for s in samples:
        if s.features is None or s.n_prompt < 2 or len(s.tokens) - s.n_prompt < 2:
            continue
        slot = drafter.backend.cache.allocate()
        try:
            x = drafter.inputs(s.tokens[1:], s.features)
            out = drafter.backend.forward([slot], [x])[0]
            # Output at position i drafts t_{i+2}: compare for i = n_prompt-2 .. T-3.
            predicted = drafter.vocab_ids[drafter.logits(out).argmax(dim=-1)].tolist()
            predicted = predicted[s.n_prompt - 2 : len(s.tokens) - 2]
            actual = s.tokens[s.n_prompt :]
            hits += sum(int(p == a) for p, a in zip(predicted, actual, strict=True))
            total += len(actual)
        finally:
            drafter.backend.cache.free(slot)
    return hits / max(1, total), total


def feature_step_costs(
    target: Backend, drafter: FeatureDrafter, context: Sequence[int], rounds: int = 8
) -> tuple[float, float]:
    """Median seconds of one draft step (fc + block + head) and one target step after
    `context`, interleaved."""
    t_slot = target.cache.allocate()
    d_slot = drafter.backend.cache.allocate()
    ids = torch.tensor(list(context), dtype=torch.int64)
    target.forward([t_slot], [ids], last_only=True)
    feats = torch.zeros(len(context) - 1, drafter.config.dim)
    drafter.backend.forward([d_slot], [drafter.inputs(context[1:], feats)], last_only=True)
    d_times, t_times = [], []
    try:
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            start = time.perf_counter()
            x = drafter.inputs(context[-1:], feats[-1:])
            drafter.logits(drafter.backend.forward([d_slot], [x], last_only=True)[0][-1])
            d_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            target.forward([t_slot], [ids[-1:]], last_only=True)
            t_times.append(time.perf_counter() - start)
            target.cache.truncate(t_slot, len(context))
            drafter.backend.cache.truncate(d_slot, len(context) - 1)
    finally:
        target.cache.free(t_slot)
        drafter.backend.cache.free(d_slot)
    return statistics.median(d_times[1:]), statistics.median(t_times[1:])


def train_feature_drafter(
    target_path: Path,
    out_path: Path,
    options: TrainOptions,
    train_texts: Sequence[str],
    heldout_texts: Sequence[str],
    target_name: str | None = None,
    progress: Progress = _quiet,
    show: bool = True,
    cache_root: Path | None = None,
    data_path: Path | None = None,
    samples_per_prompt: int = 3,
    more_text: bool = False,
) -> TrainReport:
    """With `data_path`, the target's text (and features) is saved there or reused from there;
    `more_text` then adds answers to it within this run's generation share (the report's
    gen_seconds counts the saved text's time too)."""
    budget = options.minutes * 60.0
    run = start_run(
        target_path, options, train_texts, heldout_texts, target_name, progress, cache_root
    )
    start, name, config, tokenizer = run.start, run.name, run.gf.config, run.tokenizer
    stop_ids, texts, max_len, target, sha = (
        run.stop_ids, run.texts, run.max_len, run.target, run.sha
    )  # fmt: skip
    reused = load_text(data_path, sha) if data_path is not None else None
    if reused is not None and not all(s.features is not None for s in reused[0] + reused[1]):
        reused = None  # text saved for the other kind: no features in it
    samples: list[Sample] = []
    held: list[Sample] = []
    gen_seconds = 0.0
    if reused is not None:
        samples, held, gen_seconds = reused
        progress(
            f"reusing the target's text from {data_path} ({len(samples)} sequences, "
            f"generated in {gen_seconds:.0f} s)"
        )
    if reused is None or more_text:
        prompt_ids = [chat_ids(tokenizer, t)[: max_len - options.max_new] for t in texts]
        # Each prompt answered several times (each its own seed): more text from few prompts.
        # Answers still missing go first (a deadline cuts the rest); similar lengths side by
        # side, since new prompts are prefilled together.
        answered = Counter(tuple(s.tokens[: s.n_prompt]) for s in samples)
        wanted: list[list[int]] = []
        extra: list[list[int]] = []
        for ids in prompt_ids:
            missing = max(0, samples_per_prompt - answered[tuple(ids)])
            wanted += [ids] * missing
            extra += [ids] * (samples_per_prompt - missing)
        train_ids = sorted(wanted, key=len) + sorted(extra, key=len)
        params = SamplingParams(
            temperature=options.temperature,
            top_p=options.top_p,
            seed=options.seed + 1_000_003 * len(samples),  # other seeds than the saved text's
        )
        gen_start = time.monotonic()
        new = generate_samples(
            target, train_ids, options.max_new, stop_ids, params,
            deadline=start + options.gen_share * budget, desc="target writes training text",
            show=show, features=True,
        )  # fmt: skip
        gen_seconds += time.monotonic() - gen_start
        samples = samples + new
        if not samples:
            raise RuntimeError("the time budget ended before the target generated any text")
        if not held:
            held_ids = [
                chat_ids(tokenizer, t)[: max_len - options.heldout_new] for t in heldout_texts
            ]
            held = generate_samples(
                target, held_ids, options.heldout_new, stop_ids, SamplingParams(),
                desc="target answers held-out prompts", show=show, features=True,
            )  # fmt: skip
        if data_path is not None:
            save_text(data_path, sha, samples, held, gen_seconds)
    n_tokens = sum(s.n_gen for s in samples)
    progress(
        f"training text: {len(samples)} sequences, {n_tokens} generated tokens, {gen_seconds:.0f} s"
    )

    vocab_ids = reduced_vocabulary(samples, options.vocab, config.vocab_size)
    init = initial_feature_weights(target_path, vocab_ids, options.init_layer, name, sha)
    before = FeatureDrafter.from_weights(
        init, target_path, options.weights, max_slots=2, max_len=max_len, cache_root=cache_root
    )
    agree_before, _ = feature_agreement(before, held)
    progress(f"held-out agreement before training: {agree_before:.1%}")
    embedding = before.embedding
    del before
    examples = make_feature_examples(samples, vocab_ids, config.vocab_size)
    sq = sum(float(e.hidden.float().pow(2).sum()) for e in examples[:64])
    count = sum(e.hidden.numel() for e in examples[:64])
    scale = math.sqrt(sq / max(1, count))
    net = FeatureNet(
        config, init, embedding, scale, config.sliding_layers[min(1, config.n_layers - 2)]
    )

    reserve = 0.08 * budget  # saving and measuring after training
    train_start = time.monotonic()
    steps, epochs, losses = train_net(
        net, examples, max(train_start + 1.0, start + budget - reserve), options, show,
        loss_fn=feature_loss,
    )  # fmt: skip
    train_seconds = time.monotonic() - train_start
    progress(f"trained {steps} steps ({epochs:.2f} epochs) in {train_seconds:.0f} s")
    info = {
        "train_seconds": train_seconds,
        "gen_seconds": gen_seconds,
        "train_tokens": float(n_tokens),
        "epochs": epochs,
        "agreement_before": agree_before,
    }
    save_feature_drafter(net.weights(init, info), out_path)
    drafter = FeatureDrafter.load(
        out_path, target_path, options.weights, max_slots=2, max_len=max_len, cache_root=cache_root
    )
    agree, positions = feature_agreement(drafter, held)
    context = held[0].tokens if held else samples[0].tokens
    d_step, t_step = feature_step_costs(target, drafter, context[:128])
    return TrainReport(
        path=str(out_path),
        target=name,
        layers=0,
        vocab=int(vocab_ids.shape[0]),
        train_sequences=len(samples),
        train_tokens=n_tokens,
        gen_seconds=round(gen_seconds, 1),
        train_seconds=round(train_seconds, 1),
        total_seconds=round(time.monotonic() - start, 1),
        steps=steps,
        epochs=round(epochs, 2),
        agreement_before=round(agree_before, 4),
        agreement=round(agree, 4),
        heldout_positions=positions,
        drafter_step_s=round(d_step, 5),
        target_step_s=round(t_step, 5),
        cost_ratio=round(d_step / t_step, 4),
        threads=torch.get_num_threads(),
        text_reused=reused is not None,
        kind="feature",
        losses=[round(x, 4) for x in losses],
    )
