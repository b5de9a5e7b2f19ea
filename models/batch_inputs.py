"""The per-pass inputs of DecoderCore that depend on each session's length, built outside it.

A batch holds B sessions; session i has P_i cached tokens and T_i new tokens. The pass is padded
to P = max P_i past entries and T = max T_i new tokens. Session i's new token j sits at absolute
position P_i + j; its query may see past entry p when p < P_i, and new token t when t <= j
(within the sliding window for local layers). Padding rows see themselves (the diagonal), so no
row of the softmax is empty; their outputs are thrown away.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.config import ModelConfig


class BadBatchError(ValueError):
    """A forward call whose slots/inputs do not fit the backend (shapes, dtypes, ids)."""


@dataclass(frozen=True)
class BatchInputs:
    """Rope tables and masks for one padded pass (see DecoderCore.forward)."""

    positions: torch.Tensor  # [B, T] int64 absolute positions
    cos: torch.Tensor
    sin: torch.Tensor
    cos_local: torch.Tensor
    sin_local: torch.Tensor
    mask: torch.Tensor
    mask_local: torch.Tensor
    past_len: int  # P
    new_len: int  # T


def token_positions(past_lens: Sequence[int], new_lens: Sequence[int]) -> torch.Tensor:
    """[B, T] absolute positions; padded entries continue the count (their values are unused)."""
    t = max(new_lens)
    past = torch.tensor(list(past_lens), dtype=torch.int64)[:, None]
    return past + torch.arange(t, dtype=torch.int64)[None, :]


def rope_tables(
    positions: torch.Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
    scaling_factor: float = 1.0,
    freq_factors: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, head_dim] for half-split rope, computed in float32 then cast."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if freq_factors is not None:
        inv_freq = inv_freq / freq_factors.float()
    angles = (positions.float() / scaling_factor)[..., None] * inv_freq
    emb = torch.cat([angles, angles], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def attention_mask(
    past_lens: Sequence[int], new_lens: Sequence[int], window: int, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask [B, 1, T, P + T]: 0 where query (i, j) may attend, -inf elsewhere.

    `window` > 0 limits attention to keys with query_pos - key_pos < window (sliding layers).
    """
    p, t = max(past_lens), max(new_lens)
    past = torch.tensor(list(past_lens), dtype=torch.int64)[:, None, None]  # [B, 1, 1]
    new = torch.tensor(list(new_lens), dtype=torch.int64)[:, None, None]
    j = torch.arange(t)[None, :, None]  # query index among new tokens
    s = torch.arange(p + t)[None, None, :]  # key index: past entries, then new tokens
    is_past = s < p
    t_key = s - p
    key_pos = torch.where(is_past, s, past + t_key)
    query_pos = past + j
    allowed = torch.where(is_past, s < past, (t_key <= j) & (t_key < new))
    if window > 0:
        allowed = allowed & (query_pos - key_pos < window)
    allowed = allowed | (t_key == j)  # padding rows keep their diagonal
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, float("-inf"))
    return mask[:, None]


def batch_inputs(
    config: ModelConfig,
    past_lens: Sequence[int],
    new_lens: Sequence[int],
    dtype: torch.dtype,
    freq_factors: torch.Tensor | None = None,
) -> BatchInputs:
    """Everything DecoderCore needs besides x and the past K/V."""
    if len(past_lens) != len(new_lens) or not new_lens:
        raise ValueError("need one past length and one new length per session")
    if min(new_lens) < 1 or min(past_lens) < 0:
        raise ValueError(f"bad lengths: past {list(past_lens)}, new {list(new_lens)}")
    positions = token_positions(past_lens, new_lens)
    hd = config.head_dim
    cos, sin = rope_tables(
        positions, hd, config.rope_theta, dtype, config.rope_scaling_factor, freq_factors
    )
    mask = attention_mask(past_lens, new_lens, 0, dtype)
    if any(config.sliding_layers):
        cos_l, sin_l = rope_tables(positions, hd, config.rope_theta_local, dtype)
        mask_l = attention_mask(past_lens, new_lens, config.sliding_window, dtype)
    else:
        cos_l, sin_l, mask_l = cos, sin, mask
    return BatchInputs(
        positions=positions,
        cos=cos,
        sin=sin,
        cos_local=cos_l,
        sin_local=sin_l,
        mask=mask,
        mask_local=mask_l,
        past_len=max(past_lens),
        new_len=max(new_lens),
    )


def new_token_counts(slots: Sequence[int], inputs: Sequence[torch.Tensor]) -> list[int]:
    """T_i of each session, after checking there is one non-empty input per slot."""
    if len(slots) != len(inputs) or not slots:
        raise BadBatchError(f"{len(slots)} slots for {len(inputs)} inputs")
    counts = [int(x.shape[0]) for x in inputs]
    if min(counts) < 1:
        raise BadBatchError("every session in a batch needs at least one new token")
    return counts


def pad_inputs(
    config: ModelConfig, first: bool, inputs: Sequence[torch.Tensor], t: int, dtype: torch.dtype
) -> torch.Tensor:
    """Ragged inputs padded into one batch: token ids [B, T] (first segment) or hidden
    states [B, T, dim] in `dtype`, each checked for its kind, shape and range."""
    b = len(inputs)
    if first:
        ids = torch.zeros((b, t), dtype=torch.int64)
        for i, x in enumerate(inputs):
            if x.dim() != 1 or x.dtype.is_floating_point:
                raise BadBatchError(
                    f"input {i}: expected token ids [T], got {x.dtype} {tuple(x.shape)}"
                )
            if x.numel() and (int(x.min()) < 0 or int(x.max()) >= config.vocab_size):
                raise BadBatchError(f"input {i}: token ids must be in [0, {config.vocab_size})")
            ids[i, : x.shape[0]] = x
        return ids
    hidden = torch.zeros((b, t, config.dim), dtype=dtype)
    for i, x in enumerate(inputs):
        if x.dim() != 2 or x.shape[1] != config.dim or not x.dtype.is_floating_point:
            raise BadBatchError(
                f"input {i}: expected hidden states [T, {config.dim}], "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        hidden[i, : x.shape[0]] = x
    return hidden


@dataclass(frozen=True)
class PreparedPass:
    """A backend's padded pass, ready to run: per-session counts, padded x, rope and masks."""

    counts: list[int]
    x: torch.Tensor
    inputs: BatchInputs


def prepare_pass(
    config: ModelConfig,
    first: bool,
    past_lens: Sequence[int],
    inputs: Sequence[torch.Tensor],
    dtype: torch.dtype,
    freq_factors: torch.Tensor | None = None,
) -> PreparedPass:
    """What every backend does before running its graph on one ragged batch."""
    counts = new_token_counts(past_lens, inputs)
    x = pad_inputs(config, first, inputs, max(counts), dtype)
    return PreparedPass(counts, x, batch_inputs(config, past_lens, counts, dtype, freq_factors))


def rows_kept(
    counts: Sequence[int], keep: Sequence[int] | None, last_only: bool
) -> list[tuple[int, int]]:
    """(new tokens, rows to return) per session for a pass that returns only the last rows."""
    if keep is None:
        keep = [1] * len(counts) if last_only else list(counts)
    if len(keep) != len(counts):
        raise BadBatchError(f"keep has {len(keep)} entries for {len(counts)} sessions")
    if any(not 1 <= m <= n for m, n in zip(keep, counts, strict=True)):
        raise BadBatchError(f"keep {list(keep)} must be in [1, new tokens {list(counts)}]")
    return list(zip(counts, keep, strict=True))
