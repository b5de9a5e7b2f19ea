"""Decoder + torch backend on the tiny models: splits, batches, rollback, masks, errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.backend import Backend, BadBatchError, UnsupportedBackendError, load_backend
from models.batch_inputs import attention_mask
from models.kv_cache import CacheFullError, NoFreeSlotError
from models.torch_backend import TorchBackend
from models.weight_formats import UnsupportedWeightFormatError

# Tolerances on logits (std ~5, so |logit| up to ~20) between two computations of the same thing.
# bf16 logits are rounded to 8 significant bits (a step of 0.0625 at 8, 0.125 at 16), and a batch
# takes other GEMM kernels than a single row, so a few steps of difference are expected; the mean
# difference must stay far smaller.
TOL = {"fp32": 1e-4, "bf16": 0.5, "int8": 0.5, "int4": 0.5}
# int4 quantizes activations to int8 per group of 32 (the VNNI kernel), so the bf16 attention's
# batch-dependent rounding moves its logits about twice as far as bf16's (measured: 0.05-0.11).
MEAN_TOL = {"fp32": 1e-5, "bf16": 0.1, "int8": 0.1, "int4": 0.2}

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def _backend(path: Path, fmt: str = "fp32", **kw: object) -> Backend:
    return load_backend(path, weights=fmt, use_cache=False, **kw)  # type: ignore[arg-type]


def _alone(be: Backend, ids: torch.Tensor) -> torch.Tensor:
    slot = be.cache.allocate()
    try:
        return be.forward([slot], [ids])[0]
    finally:
        be.cache.free(slot)


def test_split_layers_equal_whole(tiny_path: Path) -> None:
    whole = _backend(tiny_path)
    n = whole.config.n_layers
    ids = _ids(20, whole.config.vocab_size, 1)
    expected = _alone(whole, ids)
    for a in (1, n // 2, n - 1):
        first = _backend(tiny_path, layers=(0, a))
        second = _backend(tiny_path, layers=(a, n))
        s1, s2 = first.cache.allocate(), second.cache.allocate()
        # Prefill, then two decode steps, piping hidden states between the segments.
        outs = []
        for chunk in (ids[:12], ids[12:13], ids[13:]):
            hidden = first.forward([s1], [chunk])[0]
            assert hidden.shape == (len(chunk), whole.config.dim)
            outs.append(second.forward([s2], [hidden])[0])
        torch.testing.assert_close(torch.cat(outs), expected, atol=TOL["fp32"], rtol=0)


def test_three_segments_in_bf16(tiny_paths: dict[str, Path]) -> None:
    path = tiny_paths["gemma3"]  # tied head: the last segment needs the embedding matrix
    whole = _backend(path, "bf16")
    ids = _ids(16, whole.config.vocab_size, 2)
    expected = _alone(whole, ids)
    segments = [_backend(path, "bf16", layers=r) for r in [(0, 2), (2, 5), (5, 6)]]
    x = ids
    for seg in segments:
        x = _alone(seg, x)
    torch.testing.assert_close(x, expected, atol=TOL["bf16"], rtol=0)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4"])
def test_batch_of_ragged_sessions_equals_each_alone(tiny_path: Path, fmt: str) -> None:
    be = _backend(tiny_path, fmt)
    vocab = be.config.vocab_size
    prompts = [_ids(n, vocab, 10 + n) for n in (3, 17, 9)]
    steps = [_ids(n, vocab, 20 + n) for n in (1, 4, 2)]
    alone = []
    for p, s in zip(prompts, steps, strict=True):
        slot = be.cache.allocate()
        be.forward([slot], [p])
        alone.append(be.forward([slot], [s])[0])
        be.cache.free(slot)
    slots = [be.cache.allocate() for _ in prompts]
    prefill = be.forward(slots, prompts)  # ragged prefill in one pass
    for p, out in zip(prompts, prefill, strict=True):
        assert out.shape == (len(p), vocab)
    batched = be.forward(slots, steps)  # ragged verify step
    for a, b in zip(alone, batched, strict=True):
        torch.testing.assert_close(b, a, atol=TOL[fmt], rtol=0)
        assert (b - a).abs().mean() < MEAN_TOL[fmt]
        # Peaked logits: the greedy choice agrees wherever the margin is not tiny.
        top2 = a.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 4 * TOL[fmt]
        assert torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_low_precision_formats_track_fp32(tiny_path: Path, fmt: str) -> None:
    ids = _ids(24, 600, 11)
    ref = _alone(_backend(tiny_path, "fp32"), ids)
    got = _alone(_backend(tiny_path, fmt), ids)
    assert (got - ref).abs().mean() < 0.2
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.5  # where fp32 is not near a tie
    assert clear.sum() >= 12
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])


def test_truncate_then_reappend_equals_fresh_run(tiny_path: Path) -> None:
    be = _backend(tiny_path)
    vocab = be.config.vocab_size
    prompt, rejected, accepted = _ids(11, vocab, 3), _ids(4, vocab, 4), _ids(3, vocab, 5)
    slot = be.cache.allocate()
    be.forward([slot], [prompt])
    be.forward([slot], [rejected])  # draft tokens that verification rejects
    be.cache.truncate(slot, len(prompt))
    rolled_back = be.forward([slot], [accepted])[0]
    fresh = _alone(be, torch.cat([prompt, accepted]))[len(prompt) :]
    torch.testing.assert_close(rolled_back, fresh, atol=TOL["fp32"], rtol=0)


def test_token_by_token_equals_prefill(tiny_path: Path) -> None:
    """Incremental decoding past gemma3's sliding window (8) matches one full pass."""
    be = _backend(tiny_path)
    ids = _ids(24, be.config.vocab_size, 6)
    full = _alone(be, ids)
    slot = be.cache.allocate()
    steps = [be.forward([slot], [ids[i : i + 1]])[0] for i in range(len(ids))]
    torch.testing.assert_close(torch.cat(steps), full, atol=TOL["fp32"], rtol=0)


def test_last_only_returns_last_row(tiny_path: Path) -> None:
    be = _backend(tiny_path)
    prompts = [_ids(n, be.config.vocab_size, n) for n in (5, 9)]
    full = [_alone(be, p) for p in prompts]
    slots = [be.cache.allocate() for _ in prompts]
    last = be.forward(slots, prompts, last_only=True)
    for f, got in zip(full, last, strict=True):
        assert got.shape == (1, be.config.vocab_size)
        torch.testing.assert_close(got[0], f[-1], atol=TOL["fp32"], rtol=0)


def test_sliding_window_changes_gemma_output(tiny_paths: dict[str, Path]) -> None:
    """Tokens beyond the window still matter (the global layer sees them), but only through it."""
    be = _backend(tiny_paths["gemma3"])
    vocab = be.config.vocab_size
    tail = _ids(8, vocab, 7)
    a = _alone(be, torch.cat([_ids(10, vocab, 8), tail]))[-1]
    b = _alone(be, torch.cat([_ids(10, vocab, 9), tail]))[-1]
    assert (a - b).abs().max() > 1e-3


def test_attention_mask_semantics() -> None:
    m = attention_mask([2, 0], [2, 3], window=0, dtype=torch.float32)
    assert m.shape == (2, 1, 3, 5)
    allowed = (m[:, 0] == 0).int().tolist()
    # Session 0: past 2, new 2 (the third query row is padding: it sees everything valid and its
    # own diagonal entry, so its softmax is never empty; its output is discarded).
    assert allowed[0] == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    # Session 1: no past (padded past columns masked), causal over 3 new tokens.
    assert allowed[1] == [[0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    w = attention_mask([4], [2], window=3, dtype=torch.float32)
    # Query at position 4 sees positions 2..4; at 5 sees 3..5.
    assert (w[0, 0] == 0).int().tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]


def test_bad_inputs_give_clear_errors(tiny_paths: dict[str, Path]) -> None:
    path = tiny_paths["qwen2"]
    be = _backend(path, max_slots=1, max_len=16)
    vocab = be.config.vocab_size
    slot = be.cache.allocate()
    with pytest.raises(NoFreeSlotError):
        be.cache.allocate()
    with pytest.raises(BadBatchError, match="token ids must be in"):
        be.forward([slot], [torch.tensor([vocab])])
    with pytest.raises(BadBatchError, match="expected token ids"):
        be.forward([slot], [torch.zeros(3, be.config.dim)])
    with pytest.raises(BadBatchError, match="at least one new token"):
        be.forward([slot], [torch.tensor([], dtype=torch.int64)])
    with pytest.raises(BadBatchError, match="2 slots for 1 inputs"):
        be.forward([slot, slot], [torch.tensor([1])])
    be.forward([slot], [_ids(10, vocab, 0)])
    with pytest.raises(CacheFullError, match="max_len=16"):
        be.forward([slot], [_ids(7, vocab, 0)])
    assert be.cache.length(slot) == 10  # the refused pass left no trace
    middle = _backend(path, layers=(1, 3))
    s = middle.cache.allocate()
    with pytest.raises(BadBatchError, match=r"expected hidden states \[T, 64\]"):
        middle.forward([s], [torch.zeros(3, 32)])
    with pytest.raises(UnsupportedWeightFormatError, match="unknown weight format 'int3'"):
        _backend(path, "int3")
    with pytest.raises(UnsupportedBackendError, match="unknown backend"):
        load_backend(path, backend="tpu", use_cache=False)


@pytest.mark.slow
def test_core_exports_to_onnx_with_dynamic_shapes(
    tiny_paths: dict[str, Path], tmp_path: Path
) -> None:
    """The pure core traces with dynamic B, T, P (and mask width) and onnxruntime agrees."""
    import numpy as np
    import onnxruntime as ort
    from torch.export import Dim

    from models.batch_inputs import batch_inputs

    be = _backend(tiny_paths["gemma3"])
    assert isinstance(be, TorchBackend)
    core, c = be.core, be.config
    names = ["x", "cos", "sin", "cos_local", "sin_local", "mask", "mask_local", "past_k", "past_v"]

    def make(past: list[int], new: list[int]) -> tuple[torch.Tensor, ...]:
        bi = batch_inputs(c, past, new, torch.float32)
        x = torch.randint(0, c.vocab_size, (len(past), max(new)))
        shape = (c.n_layers, len(past), c.n_kv_heads, max(past), c.head_dim)
        pk, pv = torch.randn(shape), torch.randn(shape)
        return (x, bi.cos, bi.sin, bi.cos_local, bi.sin_local, bi.mask, bi.mask_local, pk, pv)

    b, t = Dim("B", min=1, max=64), Dim("T", min=1, max=1024)
    p, s = Dim("P", min=0, max=4096), Dim("S", min=1, max=5120)
    rope = {0: b, 1: t}
    dynamic = {
        "x": rope, "cos": rope, "sin": rope, "cos_local": rope, "sin_local": rope,
        "mask": {0: b, 2: t, 3: s}, "mask_local": {0: b, 2: t, 3: s},
        "past_k": {1: b, 3: p}, "past_v": {1: b, 3: p},
    }  # fmt: skip
    path = tmp_path / "core.onnx"
    torch.onnx.export(
        core, make([5, 4], [3, 2]), str(path), dynamo=True, dynamic_shapes=dynamic,
        input_names=names, output_names=["out", "new_k", "new_v"],
    )  # fmt: skip
    session = ort.InferenceSession(str(path))
    for past, new in [([9], [1]), ([0, 0, 0], [4, 4, 4]), ([20, 3], [1, 2])]:
        args = make(past, new)
        with torch.inference_mode():
            expected = core(*args)
        got = session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True)})
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e.numpy(), atol=1e-4, rtol=0)
