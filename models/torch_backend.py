"""The torch execution backend: DecoderCore in eager mode over a shared KVCache."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from models.batch_inputs import BadBatchError, prepare_pass, rows_kept
from models.config import ModelConfig
from models.decoder import DecoderCore, rms_norm
from models.kv_cache import KVCache
from models.weight_formats import PackedSegment, activation_dtype

# Sessions that bring at most this many tokens to a pass (decode steps, verify passes, short
# prompts) get attention token by token, so a token's result is the same in any pass (decoder
# `_attention_by_row`); longer ones (prefill chunks) share one batched masked call.
ROW_ATTENTION_MAX = 16


class TorchBackend:
    """Runs layers [a, b) for a batch of sessions; one KV cache slot per session."""

    name = "torch"

    def __init__(self, segment: PackedSegment, max_slots: int = 8, max_len: int = 2048) -> None:
        self.config: ModelConfig = segment.config
        self.layers = segment.layers
        self.weight_format = segment.fmt
        self.dtype = activation_dtype(segment.fmt)
        self.core = DecoderCore(segment).eval()
        self.rope_freq_factors = segment.rope_freq_factors
        c = self.config
        self.cache = KVCache(
            n_layers=self.layers[1] - self.layers[0],
            n_kv_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            max_slots=max_slots,
            max_len=min(max_len, c.context_length),
            dtype=self.dtype,
        )
        # Stands in for the padded past in passes that read the cache in place (per layer).
        self._no_past = torch.zeros(self.cache.n_layers, 1, c.n_kv_heads, 0, c.head_dim)

    @property
    def first(self) -> bool:
        return self.layers[0] == 0

    @property
    def last(self) -> bool:
        return self.layers[1] == self.config.n_layers

    def _pass(
        self, slots: Sequence[int], inputs: Sequence[torch.Tensor], apply_head: bool
    ) -> tuple[torch.Tensor, list[int]]:
        """The padded pass itself: outputs [B, T, ...] (logits or hidden) and the new counts."""
        if len(slots) != len(inputs):
            raise BadBatchError(f"{len(slots)} slots for {len(inputs)} inputs")
        self.cache.check_room(slots, [int(x.shape[0]) for x in inputs])
        past = [self.cache.length(s) for s in slots]
        prepared = prepare_pass(
            self.config, self.first, past, inputs, self.dtype, self.rope_freq_factors
        )
        counts, bi = prepared.counts, prepared.inputs
        with torch.inference_mode():
            rows = (past, counts, ROW_ATTENTION_MAX) if ROW_ATTENTION_MAX else None
            direct = None
            if rows is not None and max(counts) <= ROW_ATTENTION_MAX:
                # Decode steps and verify passes: attention reads and writes each session's
                # own cache buffers (no padded copy of every past, about 30% of a
                # 32-session decode pass at 400-token contexts).
                direct = [self.cache.buffers_for(s, n) for s, n in zip(slots, counts, strict=True)]
                past_k = past_v = self._no_past
            else:
                past_k, past_v = self.cache.gather(slots, bi.past_len)
            out, new_k, new_v = self.core(
                prepared.x, bi.cos, bi.sin, bi.cos_local, bi.sin_local, bi.mask, bi.mask_local,
                past_k, past_v, apply_head=apply_head, rows=rows, direct=direct,
            )  # fmt: skip
            if direct is None:
                self.cache.write(slots, new_k, new_v, counts)
            else:
                self.cache.commit(slots, counts)
        return out, counts

    def forward_features(
        self,
        slots: Sequence[int],
        inputs: Sequence[torch.Tensor],
        keep: Sequence[int] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """A whole-model pass that also returns the target's features: per session, logits of
        the last keep[i] rows (default 1) and the final-normed hidden states of every new row
        [T_i, dim] (activation dtype), i.e. what the output head reads. Feature drafters draft
        from these (models/feature_drafter.py)."""
        if not (self.first and self.last):
            raise BadBatchError("features come from a backend holding the whole model")
        out, counts = self._pass(slots, inputs, apply_head=False)
        wanted = rows_kept(counts, keep, keep is None)
        c = self.config
        with torch.inference_mode():
            normed = rms_norm(out, self.core.final_norm, c.norm_eps)
            features = [normed[i, :n].clone() for i, n in enumerate(counts)]
            rows = torch.cat([normed[i, n - m : n] for i, (n, m) in enumerate(wanted)])
            assert self.core.head is not None
            logits = self.core.head(rows[None])[0].float()
        return list(logits.split([m for _, m in wanted])), features

    def forward(
        self,
        slots: Sequence[int],
        inputs: Sequence[torch.Tensor],
        last_only: bool = False,
        keep: Sequence[int] | None = None,
    ) -> list[torch.Tensor]:
        """One padded pass over several sessions (see models.backend.Backend.forward)."""
        out, counts = self._pass(slots, inputs, apply_head=not last_only and keep is None)
        with torch.inference_mode():
            if last_only or keep is not None:
                wanted = rows_kept(counts, keep, last_only)
                # Only the kept rows go through the head: a verifier needs k+1 rows of a session
                # that also brought a 256-token prefill chunk.
                rows = torch.cat([out[i, n - m : n] for i, (n, m) in enumerate(wanted)])
                if self.last:
                    rows = self.core.logits(rows[None])[0].float()
                return list(rows.split([m for _, m in wanted]))
            return [
                out[i, :n].float() if self.last else out[i, :n].clone()
                for i, n in enumerate(counts)
            ]
