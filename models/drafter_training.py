"""`sled models train-drafter`: distil a small drafter from the target, on the target's own text.

Steps (one time budget for all, `--minutes`):
1. the target answers the training prompts (continuous batching: many sessions per forward
   pass, which is where this CPU's throughput is); every generated position keeps the target's
   top-K next-token distribution as the teacher, so no second teacher pass is needed;
2. the frozen first L target layers run once over every sequence (their outputs never change);
3. the reduced vocabulary: the V' target ids with the most teacher mass in that text;
4. the adapter block (initialised from target layer L), final norm and reduced head (initialised
   from the target's rows) are trained by distillation: cross-entropy against the teacher's top-K
   distribution, renormalised over the reduced vocabulary;
5. the file is saved, loaded back as a node would load it, and measured: next-token agreement
   with the target's greedy continuations of held-out prompts, and the seconds of one drafter
   step vs one target step (same backend, weight format and threads, interleaved).
"""

from __future__ import annotations

import json
import math
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from models.backend import Backend, load_backend
from models.batch_inputs import batch_inputs
from models.config import ModelConfig
from models.decoder import Block, gqa_mask, rms_norm
from models.drafter_cli import (
    DEFAULT_LAYERS,
    DEFAULT_MAX_NEW,
    DEFAULT_MINUTES,
    DEFAULT_SLOTS,
    DEFAULT_VOCAB,
    HELDOUT_PROMPTS,
    add_train_drafter_parser,
    cmd_train_drafter,
    main,
)
from models.gguf_loader import GGUFFile
from models.sampling import SamplingParams, position_generator, probabilities, sample
from models.trained_drafter import (
    DrafterWeights,
    TrainedDrafter,
    save_drafter,
    target_sha256,
)
from models.weight_formats import pack_block

TEACHER_TOP = 8  # teacher probabilities kept per position (the rest of the mass is dropped)
SAMPLE_TOP = 64  # the target's training text is sampled from its top 64 tokens


@dataclass(frozen=True)
class TrainOptions:
    layers: int = DEFAULT_LAYERS
    vocab: int = DEFAULT_VOCAB
    minutes: float = DEFAULT_MINUTES
    gen_share: float = 0.45  # of the budget, for generating training text
    max_new: int = DEFAULT_MAX_NEW
    slots: int = DEFAULT_SLOTS
    temperature: float = 0.7
    top_p: float = 0.95
    lr: float = 2e-4
    batch_tokens: int = 2048
    init_layer: int = -1  # target layer the adapter starts from (-1: layer `layers`)
    weights: str = "bf16"
    heldout_new: int = 96
    seed: int = 0
    max_prompts: int = 0  # 0: all
    bf16_autocast: bool = True  # measured ~2x faster training steps on this CPU
    train_head: bool = True  # False: keep the target's head rows and final norm frozen


@dataclass(frozen=True)
class Sample:
    """A target-generated sequence with its teacher: rows i predict tokens[n_prompt + i]."""

    tokens: tuple[int, ...]
    n_prompt: int
    top_ids: torch.Tensor  # [n_gen, K] int64 target ids
    top_probs: torch.Tensor  # [n_gen, K] float32
    # The target's final-normed hidden state at every position but the last ([T-1, dim]), kept
    # when generating for a feature drafter (models/feature_training.py).
    features: torch.Tensor | None = None

    @property
    def n_gen(self) -> int:
        return len(self.tokens) - self.n_prompt


@dataclass(frozen=True)
class TrainReport:
    path: str
    target: str
    layers: int
    vocab: int
    train_sequences: int
    train_tokens: int
    gen_seconds: float
    train_seconds: float
    total_seconds: float
    steps: int
    epochs: float
    agreement_before: float
    agreement: float
    heldout_positions: int
    drafter_step_s: float
    target_step_s: float
    cost_ratio: float
    threads: int
    text_reused: bool
    kind: str = "trained"  # or "feature" (models/feature_training.py; layers 0)
    losses: list[float] = field(default_factory=list)


Progress = Callable[[str], None]


@dataclass(frozen=True)
class Run:
    """What training either kind of drafter starts from: the target loaded for generating,
    its tokenizer's stop ids and the training prompts left after the held-out ones."""

    start: float
    name: str
    gf: GGUFFile
    tokenizer: Any  # models.tokenizer.Tokenizer
    stop_ids: list[int]
    texts: list[str]
    max_len: int
    target: Backend
    sha: str


def start_run(
    target_path: Path,
    options: TrainOptions,
    train_texts: Sequence[str],
    heldout_texts: Sequence[str],
    target_name: str | None,
    progress: Callable[[str], None],
    cache_root: Path | None,
) -> Run:
    from models.tokenizer import Tokenizer

    start = time.monotonic()
    target_path = Path(target_path)
    name = target_name or target_path.name.removesuffix(".gguf")
    gf = GGUFFile(target_path)
    tokenizer = Tokenizer.from_gguf(target_path)
    banned = set(heldout_texts)
    texts = [t for t in train_texts if t not in banned]
    if options.max_prompts:
        texts = texts[: options.max_prompts]
    if not texts:
        raise ValueError("no training prompts left after removing the held-out ones")
    progress(f"loading target {name} ({options.weights}, {options.slots} slots)")
    max_len = min(gf.config.context_length, 1024)
    target = load_backend(
        target_path, weights=options.weights, max_slots=options.slots, max_len=max_len,
        cache_root=cache_root,
    )  # fmt: skip
    stop_ids = list(getattr(tokenizer, "stop_ids", ()))
    sha = target_sha256(target_path)
    return Run(start, name, gf, tokenizer, stop_ids, texts, max_len, target, sha)


def _quiet(_: str) -> None:
    pass


# -- 1. text from the target -------------------------------------------------------------------


def generate_samples(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    max_new: int,
    stop_ids: Sequence[int],
    params: SamplingParams,
    deadline: float = math.inf,
    desc: str = "generate",
    show: bool = True,
    features: bool = False,
) -> list[Sample]:
    """The target's continuations of `prompts`, batched over the backend's free slots.

    New prompts are prefilled together (one padded pass) when a quarter of the slots is free, so
    a long prefill never pads every decode step. Stops at `deadline` (partial answers are kept).
    """
    cache = backend.cache
    pending = deque(enumerate(prompts))
    live: dict[int, tuple[int, list[int], list[torch.Tensor], list[torch.Tensor], int]] = {}
    feats: dict[int, list[torch.Tensor]] = {}  # slot -> feature rows of the tokens fed so far
    done: list[Sample] = []
    stops = set(stop_ids)
    admit_at = max(1, cache.max_slots // 4)
    bar = tqdm(total=len(prompts) * max_new, desc=desc, unit="tok", disable=not show, leave=False)

    def finish(slot: int) -> None:
        index, tokens, ids, probs, n_prompt = live.pop(slot)
        cache.free(slot)
        rows = feats.pop(slot, [])
        if ids:
            f = torch.cat(rows) if features else None
            done.append(Sample(tuple(tokens), n_prompt, torch.stack(ids), torch.stack(probs), f))

    while (pending or live) and time.monotonic() < deadline:
        free = cache.max_slots - len(cache.slots)
        if pending and free and (not live or free >= admit_at):
            batch = [pending.popleft() for _ in range(min(free, len(pending)))]
            slots = [cache.allocate() for _ in batch]
            for slot, (index, prompt) in zip(slots, batch, strict=True):
                live[slot] = (index, list(prompt), [], [], len(prompt))
            inputs = [torch.tensor(list(prompt), dtype=torch.int64) for _, prompt in batch]
        else:
            slots = list(live)
            inputs = [torch.tensor(live[s][1][-1:], dtype=torch.int64) for s in slots]
        if features:
            forward_features = getattr(backend, "forward_features", None)
            if forward_features is None:
                raise ValueError(f"the {backend.name} backend gives no features")
            outs, rows = forward_features(slots, inputs)
            for slot, row in zip(slots, rows, strict=True):
                feats.setdefault(slot, []).append(row)
        else:
            outs = backend.forward(slots, inputs, last_only=True)
        for slot, out in zip(slots, outs, strict=True):
            index, tokens, ids, probs, n_prompt = live[slot]
            logits = out[-1]
            top = torch.softmax(logits.float(), dim=-1).topk(TEACHER_TOP)
            ids.append(top.indices)
            probs.append(top.values)
            position = len(tokens)
            if params.greedy:
                token = int(logits.argmax())
            else:
                # Top-k first, then temperature/top-p within it: the same distribution as
                # params with top_k=SAMPLE_TOP, without sorting the whole vocabulary per row
                # (measured 24 ms a row, as long as a batched target step).
                values, indices = logits.topk(min(SAMPLE_TOP, logits.shape[-1]))
                gen = position_generator(params.seed + 7919 * index, position)
                token = int(indices[sample(probabilities(values, params), gen)])
            tokens.append(token)
            bar.update(1)
            if token in stops or len(tokens) - n_prompt >= max_new or cache.room(slot) < 1:
                finish(slot)
    for slot in list(live):
        finish(slot)
    bar.close()
    return done


def chat_ids(tokenizer: object, prompt: str) -> list[int]:
    from models.tokenizer import Tokenizer

    assert isinstance(tokenizer, Tokenizer)
    if tokenizer.has_chat_template:
        return tokenizer.encode_chat([{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt)


def heldout_prompts(path: Path = HELDOUT_PROMPTS) -> list[str]:
    """The benchmark's prompts: the agreement figure is measured on them, never trained on."""
    data = json.loads(Path(path).read_text())
    return [str(p["prompt"]) for p in data["prompts"]]


__all__ = ["add_train_drafter_parser", "cmd_train_drafter", "train_drafter"]


def save_text(
    path: Path, sha: str, samples: Sequence[Sample], held: Sequence[Sample], seconds: float
) -> None:
    """Keep the target's text so other drafter configurations can train on it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [[asdict(s) for s in samples], [asdict(s) for s in held]]
    torch.save({"target_sha256": sha, "seconds": seconds, "samples": rows}, path)


def load_text(path: Path, sha: str) -> tuple[list[Sample], list[Sample], float] | None:
    """Samples saved by save_text for this target; None when absent or for another target."""
    if not Path(path).is_file():
        return None
    data = torch.load(path, weights_only=True)
    if data.get("target_sha256") != sha:
        return None
    train, held = ([Sample(**row) for row in rows] for rows in data["samples"])
    return train, held, float(data["seconds"])


# -- 2-3. frozen features and the reduced vocabulary ------------------------------------------


def frozen_hidden(
    frozen: Backend, samples: Sequence[Sample], show: bool = True
) -> list[torch.Tensor]:
    """Outputs of the frozen first L layers over each whole sequence ([T, dim], bf16)."""
    out: list[torch.Tensor] = []
    for s in tqdm(samples, desc="frozen layers", disable=not show, leave=False):
        slot = frozen.cache.allocate()
        try:
            out.append(frozen.forward([slot], [torch.tensor(s.tokens, dtype=torch.int64)])[0])
        finally:
            frozen.cache.free(slot)
    return out


def reduced_vocabulary(samples: Sequence[Sample], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` target ids with the most teacher mass (ties by id), sorted by id."""
    mass = torch.zeros(vocab_size, dtype=torch.float64)
    for s in samples:
        mass.index_add_(0, s.top_ids.reshape(-1), s.top_probs.reshape(-1).double())
        # Text the target wrote counts too (sampled tokens outside its top-K included).
        mass.index_add_(
            0, torch.tensor(s.tokens), torch.full((len(s.tokens),), 1e-3, dtype=torch.float64)
        )
    size = min(size, vocab_size)
    keep = torch.argsort(-mass, stable=True)[:size]
    return keep.sort().values


# -- 4. the trainable part --------------------------------------------------------------------


class DrafterNet(nn.Module):
    """Adapter block + final norm + reduced head, in float32 with gradients.

    The adapter IS the decoder's own Block (its buffers turned into parameters), so the function
    trained here is exactly the one TrainedDrafter runs.
    """

    def __init__(
        self,
        config: ModelConfig,
        adapter: dict[str, torch.Tensor],
        final_norm: torch.Tensor,
        head: torch.Tensor,
        sliding: bool,
    ) -> None:
        super().__init__()
        self.config = config
        self.block = Block(config, adapter, sliding)
        for module in self.block.modules():
            for name, buf in list(module.named_buffers(recurse=False)):
                if buf is not None and buf.is_floating_point():
                    setattr(module, name, nn.Parameter(buf.detach().float().clone()))
        self.final_norm = nn.Parameter(final_norm.detach().float().clone())
        self.head = nn.Parameter(head.detach().float().clone())

    def hidden(self, x: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """Adapter outputs [B, T, dim] for padded frozen features x [B, T, dim] (no past)."""
        b = x.shape[0]
        bi = batch_inputs(self.config, [0] * b, list(lengths), torch.float32)
        cos, sin, mask = (
            (bi.cos_local, bi.sin_local, bi.mask_local)
            if self.block.sliding
            else (bi.cos, bi.sin, bi.mask)
        )
        c = self.config
        empty = torch.zeros(b, c.n_kv_heads, 0, c.head_dim)
        out, _, _ = self.block(x, cos, sin, gqa_mask(mask, c), empty, empty)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(
            rms_norm(hidden, self.final_norm, self.config.norm_eps), self.head
        )

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().clone() for name, p in self.block.named_parameters()}


def initial_weights(
    gf: GGUFFile, layers: int, init_layer: int, vocab_ids: torch.Tensor
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Adapter (packed fp32, from target layer `init_layer`), final norm, reduced head rows."""
    adapter = pack_block(gf.block(init_layer, torch.float32), "fp32")
    head = gf.head(torch.float32)[vocab_ids].clone()
    return adapter, gf.final_norm(torch.float32), head


@dataclass(frozen=True)
class _Example:
    hidden: torch.Tensor  # [T, dim]
    start: int  # first position with a teacher row (n_prompt - 1)
    targets: torch.Tensor  # [n_gen, K] reduced indices (0 where out of vocabulary)
    weights: torch.Tensor  # [n_gen, K] teacher probabilities renormalised over the vocabulary


def make_examples(
    samples: Sequence[Sample],
    hidden: Sequence[torch.Tensor],
    vocab_ids: torch.Tensor,
    vocab_size: int,
) -> list[_Example]:
    index = torch.full((vocab_size,), -1, dtype=torch.int64)
    index[vocab_ids] = torch.arange(len(vocab_ids))
    out = []
    for s, h in zip(samples, hidden, strict=True):
        reduced = index[s.top_ids]
        probs = s.top_probs.float() * (reduced >= 0)
        probs = probs / probs.sum(dim=-1, keepdim=True).clamp(min=1e-9)
        # The teacher rows predict positions n_prompt.. from positions n_prompt-1..; the hidden
        # state of the last position (which predicts beyond the sequence) is not used.
        out.append(_Example(h[: len(s.tokens) - 1], s.n_prompt - 1, reduced.clamp(min=0), probs))
    return out


def batches(examples: Sequence[Any], batch_tokens: int, rng: random.Random) -> list[list[Any]]:
    """Length-sorted groups of about batch_tokens padded tokens, in random order."""
    order = sorted(examples, key=lambda e: e.hidden.shape[0])
    groups: list[list[Any]] = []
    current: list[Any] = []
    for e in order:
        if current and (len(current) + 1) * e.hidden.shape[0] > batch_tokens:
            groups.append(current)
            current = []
        current.append(e)
    if current:
        groups.append(current)
    rng.shuffle(groups)
    return groups


def batch_loss(net: DrafterNet, group: Sequence[_Example]) -> tuple[torch.Tensor, int, int]:
    """Distillation loss (mean over teacher rows), rows whose argmax matches, rows."""
    lengths = [e.hidden.shape[0] for e in group]
    t = max(lengths)
    x = torch.zeros(len(group), t, net.config.dim)
    for i, e in enumerate(group):
        x[i, : lengths[i]] = e.hidden.float()
    hidden = net.hidden(x, lengths)
    rows = torch.cat([hidden[i, e.start : lengths[i]] for i, e in enumerate(group)])
    targets = torch.cat([e.targets for e in group])
    weights = torch.cat([e.weights for e in group])
    logp = torch.log_softmax(net.logits(rows), dim=-1)
    loss = -(logp.gather(1, targets) * weights).sum(dim=-1).mean()
    hits = int((logp.argmax(dim=-1) == targets[:, 0]).sum())
    return loss, hits, int(rows.shape[0])


LossFn = Callable[[Any, Sequence[Any]], tuple[torch.Tensor, int, int]]


def evaluate(
    net: nn.Module, examples: Sequence[Any], options: TrainOptions, loss_fn: LossFn = batch_loss
) -> float:
    """Fraction of teacher rows whose argmax the net predicts (no gradients)."""
    hits = rows = 0
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=options.bf16_autocast):
        for group in batches(examples, options.batch_tokens, random.Random(0)):
            _, h, n = loss_fn(net, group)
            hits, rows = hits + h, rows + n
    return hits / max(1, rows)


def train_net(
    net: nn.Module,
    examples: Sequence[Any],
    deadline: float,
    options: TrainOptions,
    show: bool = True,
    max_epochs: int = 1000,
    loss_fn: LossFn = batch_loss,
) -> tuple[int, float, list[float]]:
    """Train until the deadline (or max_epochs); (steps, epochs, mean loss per epoch).

    Every 20th sequence is held back for validation; the weights of the epoch with the best
    validation agreement are the ones kept (more epochs on little data overfit)."""
    rng = random.Random(options.seed)
    val = list(examples[::20]) if len(examples) >= 20 else []
    train = [e for i, e in enumerate(examples) if not val or i % 20]
    if not options.train_head and isinstance(net, DrafterNet):
        # The target's own head rows and final norm stay: the adapter must then produce hidden
        # states the target's head reads correctly (fewer free parameters on little data).
        net.head.requires_grad_(False)
        net.final_norm.requires_grad_(False)
    trainable = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=0.0)
    steps, epoch_losses = 0, []
    epochs = 0.0
    best = (
        evaluate(net, val, options, loss_fn),
        {k: v.clone() for k, v in net.state_dict().items()},
    )
    net.train()
    for epoch in range(max_epochs):
        groups = batches(train, options.batch_tokens, rng)
        total, hits, rows, done = 0.0, 0, 0, 0
        bar = tqdm(groups, desc=f"train epoch {epoch + 1}", disable=not show, leave=False)
        for group in bar:
            if time.monotonic() >= deadline:
                break
            with torch.autocast("cpu", torch.bfloat16, enabled=options.bf16_autocast):
                loss, h, n = loss_fn(net, group)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            steps, done = steps + 1, done + 1
            total += float(loss.detach())
            hits, rows = hits + h, rows + n
            bar.set_postfix(loss=f"{total / done:.3f}", agree=f"{hits / max(1, rows):.1%}")
        bar.close()
        epochs += done / max(1, len(groups))
        if done:
            epoch_losses.append(total / done)
        if val and done:
            score = evaluate(net, val, options, loss_fn)
            if show:
                tqdm.write(
                    f"epoch {epoch + 1}: loss {total / done:.3f}, validation agreement {score:.1%}",
                    file=sys.stderr,
                )
            if score >= best[0]:
                best = (score, {k: v.clone() for k, v in net.state_dict().items()})
        if time.monotonic() >= deadline:
            break
    if val:
        net.load_state_dict(best[1])
    return steps, epochs, epoch_losses


# -- 5. measurement ---------------------------------------------------------------------------


def agreement(drafter: TrainedDrafter, samples: Sequence[Sample]) -> tuple[float, int]:
    """Fraction of generated positions where the drafter's argmax is the token the target chose
    (the target's argmax when the samples were generated greedily); and the position count."""
    hits = total = 0
    for s in samples:
        predicted = drafter.next_token_ids(s.tokens[:-1])[s.n_prompt - 1 :]
        actual = s.tokens[s.n_prompt :]
        hits += sum(int(p == a) for p, a in zip(predicted, actual, strict=True))
        total += len(actual)
    return hits / max(1, total), total


def step_costs(
    target: Backend, drafter: TrainedDrafter, context: Sequence[int], rounds: int = 8
) -> tuple[float, float]:
    """Median seconds of one one-token step after `context`: (drafter, target), interleaved."""
    t_slot = target.cache.allocate()
    d_slot = drafter.backend.cache.allocate()
    ids = torch.tensor(list(context), dtype=torch.int64)
    target.forward([t_slot], [ids], last_only=True)
    drafter.backend.forward([d_slot], [ids], last_only=True)
    one = ids[-1:]
    d_times, t_times = [], []
    try:
        for _ in range(rounds + 1):  # the first round warms up and is dropped
            start = time.perf_counter()
            drafter.logits(drafter.backend.forward([d_slot], [one], last_only=True)[0][-1])
            d_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            target.forward([t_slot], [one], last_only=True)
            t_times.append(time.perf_counter() - start)
            target.cache.truncate(t_slot, len(context))
            drafter.backend.cache.truncate(d_slot, len(context))
    finally:
        target.cache.free(t_slot)
        drafter.backend.cache.free(d_slot)
    return statistics.median(d_times[1:]), statistics.median(t_times[1:])


# -- the whole run ----------------------------------------------------------------------------


def train_drafter(
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
) -> TrainReport:
    """Generate, train, save and measure a drafter for the target (see the module docstring).

    With `data_path`, the target's text (training and held-out samples) is saved there, or
    reused from there when it was generated for the same target file."""
    budget = options.minutes * 60.0
    config = GGUFFile(target_path).config
    layers = options.layers
    if not 1 <= layers <= config.n_layers - 2:
        raise ValueError(f"--layers must be in [1, {config.n_layers - 2}] for this target")
    init_layer = layers if options.init_layer < 0 else options.init_layer
    if not 0 <= init_layer < config.n_layers:
        raise ValueError(f"init layer must be in [0, {config.n_layers})")
    run = start_run(
        target_path, options, train_texts, heldout_texts, target_name, progress, cache_root
    )
    start, name, gf, tokenizer = run.start, run.name, run.gf, run.tokenizer
    stop_ids, texts, max_len, target, sha = (
        run.stop_ids, run.texts, run.max_len, run.target, run.sha
    )  # fmt: skip
    reused = load_text(data_path, sha) if data_path is not None else None
    if reused is not None:
        samples, held, gen_seconds = reused
        progress(f"reusing the target's text from {data_path} (generated in {gen_seconds:.0f} s)")
    else:
        # Similar lengths side by side: new prompts are prefilled together, padded to the longest.
        train_ids = sorted(
            (chat_ids(tokenizer, t)[: max_len - options.max_new] for t in texts), key=len
        )
        params = SamplingParams(
            temperature=options.temperature, top_p=options.top_p, seed=options.seed
        )
        gen_start = time.monotonic()
        samples = generate_samples(
            target, train_ids, options.max_new, stop_ids, params,
            deadline=start + options.gen_share * budget, desc="target writes training text",
            show=show,
        )  # fmt: skip
        gen_seconds = time.monotonic() - gen_start
        if not samples:
            raise RuntimeError("the time budget ended before the target generated any text")
        held_ids = [chat_ids(tokenizer, t)[: max_len - options.heldout_new] for t in heldout_texts]
        held = generate_samples(
            target, held_ids, options.heldout_new, stop_ids, SamplingParams(),
            desc="target answers held-out prompts", show=show,
        )  # fmt: skip
        if data_path is not None:
            save_text(data_path, sha, samples, held, gen_seconds)
    n_tokens = sum(s.n_gen for s in samples)
    progress(
        f"training text: {len(samples)} sequences, {n_tokens} generated tokens, {gen_seconds:.0f} s"
    )

    frozen = load_backend(
        target_path, layers=(0, layers), weights=options.weights, max_slots=1, max_len=max_len,
        cache_root=cache_root,
    )  # fmt: skip
    hidden = frozen_hidden(frozen, samples, show)
    del frozen
    vocab_ids = reduced_vocabulary(samples, options.vocab, config.vocab_size)
    adapter, final_norm, head = initial_weights(gf, layers, init_layer, vocab_ids)
    net = DrafterNet(config, adapter, final_norm, head, config.sliding_layers[layers])

    def weights_of(info: dict[str, float]) -> DrafterWeights:
        return DrafterWeights(
            target_sha256=sha, target_name=name, layers=layers, vocab_ids=vocab_ids,
            adapter=net.adapter_tensors(), final_norm=net.final_norm.detach().clone(),
            head=net.head.detach().clone(), info=info,
        )  # fmt: skip

    before = TrainedDrafter.from_weights(
        weights_of({}), target_path, options.weights, max_slots=2, max_len=max_len,
        cache_root=cache_root,
    )  # fmt: skip
    agree_before, _ = agreement(before, held)
    del before
    progress(f"held-out agreement before training: {agree_before:.1%}")

    examples = make_examples(samples, hidden, vocab_ids, config.vocab_size)
    reserve = 0.08 * budget  # saving and measuring after training
    train_start = time.monotonic()
    steps, epochs, losses = train_net(
        net, examples, max(train_start + 1.0, start + budget - reserve), options, show
    )
    train_seconds = time.monotonic() - train_start
    progress(f"trained {steps} steps ({epochs:.2f} epochs) in {train_seconds:.0f} s")

    info = {
        "train_seconds": train_seconds,
        "gen_seconds": gen_seconds,
        "train_tokens": float(n_tokens),
        "epochs": epochs,
    }
    save_drafter(weights_of(info), out_path)
    drafter = TrainedDrafter.load(
        out_path, target_path, options.weights, max_slots=2, max_len=max_len, cache_root=cache_root
    )
    agree, positions = agreement(drafter, held)
    context = held[0].tokens if held else samples[0].tokens
    d_step, t_step = step_costs(target, drafter, context[:128])
    return TrainReport(
        path=str(out_path),
        target=name,
        layers=layers,
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
        losses=[round(x, 4) for x in losses],
    )


if __name__ == "__main__":
    sys.exit(main())
