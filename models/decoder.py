"""One compact decoder (gpt-fast style) for llama, qwen2 and gemma3, running layers [a, b).

`DecoderCore.forward` is a pure tensor function, free of data-dependent Python control flow, so
`torch.onnx.export` can trace it with dynamic batch B, new tokens T and past length P:

    forward(x, cos, sin, cos_local, sin_local, mask, mask_local, past_k, past_v)
        -> (out, new_k, new_v)

- x: token ids [B, T] (int64) when a == 0, else hidden states [B, T, dim];
- cos/sin: [B, T, head_dim] rope tables for global layers, cos_local/sin_local for sliding-window
  layers (Gemma 3 uses another theta there; the same tensors otherwise), in the activation dtype;
- mask/mask_local: additive [B, 1, T, P + T] (0 or -inf), built outside from each session's own
  length, so padding and sliding windows are data, not code;
- past_k/past_v: [n_layers_in_range, B, n_kv_heads, P, head_dim];
- out: logits [B, T, vocab] when b == n_layers, else hidden [B, T, dim];
- new_k/new_v: only the T new tokens' keys/values [n_layers_in_range, B, n_kv_heads, T, head_dim].

Layout choices: weights are [out, in] for `F.linear`; q/k/v and gate/up are fused GEMMs; rope is
the half-split (NEOX) form for every architecture (the loader un-permutes llama's q/k); all
RMSNorms multiply by the stored weight (Gemma's +1 is already in its GGUF norms).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.weight_formats import PackedSegment, linear_from_packed, split_prefix


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 (as Gemma and llama.cpp do), cast back to x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * weight).to(x.dtype)


def gqa_mask(mask: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """A [B, 1, T, S] mask with its rows tiled for the grouped query layout `Block` attends in."""
    return mask.repeat(1, 1, config.n_heads // config.n_kv_heads, 1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding; x [B, H, T, D], cos/sin [B, 1, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Block(nn.Module):
    # Buffers (the optional ones are None when the config flag is off and then never read).
    attn_norm: torch.Tensor
    ffn_norm: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    post_attn_norm: torch.Tensor
    post_ffn_norm: torch.Tensor

    def __init__(self, config: ModelConfig, packed: dict[str, torch.Tensor], sliding: bool) -> None:
        super().__init__()
        c = config
        self.sliding = sliding
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.eps, self.scale = c.norm_eps, c.attn_scale
        self.window = c.sliding_window
        self.gelu = c.activation == "gelu_tanh"
        self.qkv = linear_from_packed(split_prefix(packed, "qkv"))
        self.wo = linear_from_packed(split_prefix(packed, "wo"))
        self.gate_up = linear_from_packed(split_prefix(packed, "gate_up"))
        self.down = linear_from_packed(split_prefix(packed, "down"))
        self.register_buffer("attn_norm", packed["attn_norm"])
        self.register_buffer("ffn_norm", packed["ffn_norm"])
        self.qk_norm = c.qk_norm
        self.post_norms = c.post_norms
        for name in ("q_norm", "k_norm", "post_attn_norm", "post_ffn_norm"):
            self.register_buffer(name, packed.get(name))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        rows: tuple[Sequence[int], Sequence[int], int] | None = None,
        direct: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bsz, t = x.shape[0], x.shape[1]
        h, kvh, hd = self.n_heads, self.n_kv_heads, self.head_dim
        rep = h // kvh
        qkv = self.qkv(rms_norm(x, self.attn_norm, self.eps))
        q, k, v = qkv.split([h * hd, kvh * hd, kvh * hd], dim=-1)
        q = q.view(bsz, t, h, hd).transpose(1, 2)
        k = k.view(bsz, t, kvh, hd).transpose(1, 2)
        v = v.view(bsz, t, kvh, hd).transpose(1, 2)
        if self.qk_norm:
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if direct is not None:
            assert rows is not None
            attn = self._attention_direct(q, k, v, direct, rows)
            return self._finish(x, attn), k, v
        keys = torch.cat([past_k, k], dim=2)
        values = torch.cat([past_v, v], dim=2)
        # GQA without repeating K/V: the rep query heads that share a kv head become rep * T
        # query rows of one attention problem (`mask` comes with its rows tiled: `gqa_mask`).
        batched: torch.Tensor | None = None
        if rows is None or max(rows[1]) > rows[2]:
            qg = q.reshape(bsz, kvh, rep * t, hd)
            batched = F.scaled_dot_product_attention(
                qg, keys, values, attn_mask=mask, scale=self.scale
            )
        if rows is not None:
            attn = self._attention_by_row(q, keys, values, past_k.shape[2], rows, batched)
        else:
            assert batched is not None
            attn = batched
        return self._finish(x, attn), k, v

    def _finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Output projection, residual and feed-forward of attention output [B, kvh, rep*T, hd]."""
        bsz, t = x.shape[0], x.shape[1]
        h, hd = self.n_heads, self.head_dim
        attn = attn.reshape(bsz, h, t, hd).transpose(1, 2).reshape(bsz, t, h * hd)
        out = self.wo(attn)
        if self.post_norms:
            out = rms_norm(out, self.post_attn_norm, self.eps)
        x = x + out
        gate, up = self.gate_up(rms_norm(x, self.ffn_norm, self.eps)).chunk(2, dim=-1)
        act = F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)
        out = self.down(act * up)
        if self.post_norms:
            out = rms_norm(out, self.post_ffn_norm, self.eps)
        return x + out

    def _attention_direct(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        direct: Sequence[tuple[torch.Tensor, torch.Tensor]],
        rows: tuple[Sequence[int], Sequence[int], int],
    ) -> torch.Tensor:
        """Row attention (see _attention_by_row) straight over each session's cache buffers
        (this layer's [kvh, capacity, hd]), after writing the session's new K/V there: no
        padded copy of every session's past per pass and layer. Every session brings at most
        `limit` tokens. Returns [B, kvh, rep * T, hd] like the batched path."""
        bsz, h, t, hd = q.shape
        kvh = self.n_kv_heads
        rep = h // kvh
        window = self.window if self.sliding else 0
        pasts, counts, _ = rows
        for b, (past, new) in enumerate(zip(pasts, counts, strict=True)):
            kb, vb = direct[b]
            kb[:, past : past + new] = k[b, :, :new]
            vb[:, past : past + new] = v[b, :, :new]
        if bsz == 1 and t == 1:  # a decode step: one call, nothing to assemble
            kb, vb = direct[0]
            end = pasts[0] + 1
            start = max(0, end - window) if window else 0
            return F.scaled_dot_product_attention(
                q.reshape(1, kvh, rep, hd), kb[None, :, start:end], vb[None, :, start:end],
                scale=self.scale,
            )  # fmt: skip
        out = torch.zeros(bsz, kvh, rep, t, hd, dtype=q.dtype)
        for b, (past, new) in enumerate(zip(pasts, counts, strict=True)):
            kb, vb = direct[b]
            for i in range(new):
                end = past + i + 1  # keys of positions 0..past+i
                start = max(0, end - window) if window else 0
                qi = q[b, :, i].reshape(1, kvh, rep, hd)
                out[b, :, :, i] = F.scaled_dot_product_attention(
                    qi, kb[None, :, start:end], vb[None, :, start:end], scale=self.scale
                )[0]
        return out.reshape(bsz, kvh, rep * t, hd)

    def _attention_by_row(
        self,
        q: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        padded_past: int,
        rows: tuple[Sequence[int], Sequence[int], int],
        batched: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attention one query token at a time over exactly the keys it sees, in the shapes a
        one-token pass of one session has: a token's result then does not depend on how many
        tokens or sessions share its pass, so a k-token verify pass decides what k one-token
        steps would (greedy speculative text equals target-only text bit for bit).

        rows = (past lengths, new counts, limit): sessions bringing more than `limit` tokens (a
        prefill chunk) keep their rows of `batched`, the one masked call over the pass.
        q [B, h, T, hd] -> [B, kvh, rep * T, hd] like the batched path (padding rows zero)."""
        bsz, h, t, hd = q.shape
        kvh = self.n_kv_heads
        rep = h // kvh
        window = self.window if self.sliding else 0
        pasts, counts, limit = rows
        if bsz == 1 and t == 1 and pasts[0] == padded_past:  # a decode step: the same call
            end = padded_past + 1
            start = max(0, end - window) if window else 0
            return F.scaled_dot_product_attention(
                q.reshape(1, kvh, rep, hd),
                keys[:, :, start:end],
                values[:, :, start:end],
                scale=self.scale,
            )
        if batched is None:
            out = torch.zeros(bsz, kvh, rep, t, hd, dtype=q.dtype)
        else:
            out = batched.reshape(bsz, kvh, rep, t, hd).clone()
        for b, (past, new) in enumerate(zip(pasts, counts, strict=True)):
            if new > limit:
                continue
            for i in range(new):
                end = past + i + 1  # keys of positions 0..past+i
                start = max(0, end - window) if window else 0
                if past == padded_past:
                    kk, vv = keys[b, :, start:end], values[b, :, start:end]
                else:  # this session's past is zero-padded to the longest: skip the padding
                    stop = padded_past + i + 1
                    kk = torch.cat([keys[b, :, start:past], keys[b, :, padded_past:stop]], 1)
                    vv = torch.cat([values[b, :, start:past], values[b, :, padded_past:stop]], 1)
                    if start > past:
                        kk, vv = kk[:, start - past :], vv[:, start - past :]
                qi = q[b, :, i].reshape(1, kvh, rep, hd)
                out[b, :, :, i] = F.scaled_dot_product_attention(
                    qi, kk[None], vv[None], scale=self.scale
                )[0]
        return out.reshape(bsz, kvh, rep * t, hd)


class DecoderCore(nn.Module):
    """Layers [a, b) of a decoder; see the module docstring for the forward contract."""

    embedding: torch.Tensor
    final_norm: torch.Tensor

    def __init__(self, segment: PackedSegment) -> None:
        super().__init__()
        c = segment.config
        self.config = c
        self.layers = segment.layers
        a, b = segment.layers
        self.first = a == 0
        self.last = b == c.n_layers
        self.register_buffer("embedding", segment.embedding)
        self.blocks = nn.ModuleList(
            Block(c, packed, c.sliding_layers[a + i]) for i, packed in enumerate(segment.blocks)
        )
        self.register_buffer("final_norm", segment.final_norm)
        self.head = linear_from_packed(segment.head) if segment.head is not None else None
        if self.first and segment.embedding is None:
            raise ValueError("a segment starting at layer 0 needs the embedding")
        if self.last and (segment.head is None or segment.final_norm is None):
            raise ValueError("a segment ending at the last layer needs the final norm and head")

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = F.embedding(ids, self.embedding).to(dtype)
        if self.config.embed_scale != 1.0:
            # Gemma multiplies by sqrt(dim) rounded to the activation dtype.
            x = x * torch.tensor(self.config.embed_scale, dtype=dtype)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + output head on hidden states [..., dim] (last segment only)."""
        assert self.head is not None and self.final_norm is not None
        return self.head(rms_norm(hidden, self.final_norm, self.config.norm_eps))

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cos_local: torch.Tensor,
        sin_local: torch.Tensor,
        mask: torch.Tensor,
        mask_local: torch.Tensor,
        past_k: torch.Tensor,
        past_v: torch.Tensor,
        apply_head: bool = True,
        rows: tuple[Sequence[int], Sequence[int], int] | None = None,
        direct: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`rows` (torch backend only: (past lengths, new counts, limit)) runs attention token
        by token for sessions bringing at most `limit` tokens (Block._attention_by_row).
        `direct` (with `rows`, every session within the limit): each session's own cache
        buffers [n_layers, kvh, capacity, hd], which the layers write the new K/V into and
        read the past from (past_k/past_v unused); new_k/new_v are then empty."""
        h = self.embed(x, cos.dtype) if self.first else x
        # Mask rows tiled for grouped-query attention once per pass, not once per layer.
        mask, mask_local = gqa_mask(mask, self.config), gqa_mask(mask_local, self.config)
        new_k: list[torch.Tensor] = []
        new_v: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            local = block.sliding
            layer_kv = None if direct is None else [(kb[i], vb[i]) for kb, vb in direct]
            h, k, v = block(
                h, cos_local if local else cos, sin_local if local else sin,
                mask_local if local else mask, past_k[i], past_v[i], rows, layer_kv,
            )  # fmt: skip
            if direct is None:
                new_k.append(k)
                new_v.append(v)
        out = self.logits(h) if (self.last and apply_head) else h
        if direct is not None:
            return out, past_k[:, :, :, :0], past_v[:, :, :, :0]
        return out, torch.stack(new_k), torch.stack(new_v)
