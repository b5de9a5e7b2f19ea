"""A drafter that drafts from the target's own features (EAGLE-style feature-level drafting).

The verifier already computes, for every token it reads, the target's final-normed hidden state
f_i (what its output head reads; it predicts token i+1). A feature drafter gets those features
with each verification answer and predicts the next ones: one trained block, the target's block
shape, reads x_i = fc([embed(t_{i+1}), f_i]) at position i (causal attention over the session)
and outputs f^_{i+1}; a reduced-vocabulary head on f^_{i+1} gives the draft token t_{i+2}. Later
draft tokens feed the drafter's own predicted features back in. Where the session's text repeats
itself (code edits, rewrites), prompt lookup drafts instead (`lookup`). The first layers of a
Kangaroo-style drafter (models/trained_drafter.py) must re-derive from tokens what the target
already knows; the features carry it all, so one block suffices (cost: ~1/n_layers of a target
step plus a cut head).

Positions: a session with committed tokens t_0..t_{M-1} has target features for t_0..t_{M-2}
(the verifier has read all but the last token, which it just produced). Drafter position i
(0 <= i <= M-2) reads (t_{i+1}, f_i); the output at M-2 drafts t_M, and each further draft token
adds one drafter position with a predicted feature. Those speculative positions are cut from the
drafter's cache before the next draft, when the real features have come.

File: a GGUF holding the trained tensors (fc, block, head rows), the reduced vocabulary's target
ids and the target file's sha256; the embedding is read from the target's GGUF at load time.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from models.config import ModelConfig
from models.drafters import draw_draft, lookup_continuation
from models.sampling import SamplingParams
from models.speculative import Draft, common_prefix
from models.torch_backend import TorchBackend
from models.trained_drafter import (
    ADAPTER_LINEARS,
    ADAPTER_NORMS,
    DrafterFileError,
    check_adapter,
    check_drafter_target,
    read_drafter_file,
    target_sha256,
    write_drafter_file,
)
from models.weight_formats import (
    PackedSegment,
    activation_dtype,
    check_format,
    linear_from_packed,
    pack_int4_wide,
    pack_linear,
)

FORMAT_VERSION = 1
ARCH = "sled_feature_drafter"
KEY = "sled.feature_drafter."


class MissingFeaturesError(ValueError):
    """A draft asked without the target features the drafter lacks for the session."""


def default_feature_drafter_path(target_name: str, root: Path | None = None) -> Path:
    """``<sled cache>/drafters/<target-name>.feature.gguf``: where training saves it and nodes
    look for it."""
    from models.registry import cache_root

    name = Path(target_name).name.removesuffix(".gguf")
    return (root if root is not None else cache_root()) / "drafters" / f"{name}.feature.gguf"


@dataclass(frozen=True)
class FeatureDrafterWeights:
    """The trained tensors of a feature drafter (float32) and what it was trained for."""

    target_sha256: str
    target_name: str
    vocab_ids: torch.Tensor  # [V'] int64: the target id of each head row
    fc: torch.Tensor  # [dim, 2 * dim]: [embedding, feature] -> block input
    block: dict[str, torch.Tensor]  # packed block tensors ("qkv.weight", "attn_norm", ...)
    head: torch.Tensor  # [V', dim]: reads predicted features directly (they are normed)
    info: dict[str, float]

    def __post_init__(self) -> None:
        v, dim = int(self.vocab_ids.shape[0]), int(self.head.shape[-1])
        if self.head.dim() != 2 or self.head.shape[0] != v:
            raise DrafterFileError(f"head {tuple(self.head.shape)} does not match {v} ids")
        if tuple(self.fc.shape) != (dim, 2 * dim):
            raise DrafterFileError(f"fc {tuple(self.fc.shape)} should be {(dim, 2 * dim)}")


def save_feature_drafter(weights: FeatureDrafterWeights, path: Path) -> Path:
    """Write the drafter file atomically (matrices float16, norms and biases float32)."""
    meta: dict[str, str | int] = {
        "format": FORMAT_VERSION,
        "target_sha256": weights.target_sha256,
        "target_name": weights.target_name,
    }
    tensors = {"vocab_ids": weights.vocab_ids, "fc": weights.fc, "output": weights.head} | {
        "block." + name: t for name, t in sorted(weights.block.items())
    }
    return write_drafter_file(path, ARCH, KEY, meta, weights.info, tensors)


def load_feature_drafter_weights(path: Path) -> FeatureDrafterWeights:
    """Read a feature drafter file; DrafterFileError (with the path) when it is not a whole one."""
    fields, tensors, info = read_drafter_file(path, KEY, FORMAT_VERSION, "feature drafter")
    try:
        return FeatureDrafterWeights(
            target_sha256=str(fields[KEY + "target_sha256"]),
            target_name=str(fields[KEY + "target_name"]),
            vocab_ids=tensors["vocab_ids"].to(torch.int64).reshape(-1),
            fc=tensors["fc"].float(),
            block={
                name.removeprefix("block."): t.float()
                for name, t in tensors.items()
                if name.startswith("block.")
            },
            head=tensors["output"].float(),
            info=info,
        )
    except KeyError as exc:
        raise DrafterFileError(f"{path} lacks {exc} (truncated or not a feature drafter)") from exc


def _pack_matrix(weight: torch.Tensor, bias: torch.Tensor | None, fmt: str) -> dict:
    """A drafter matrix in the backend's format: int4 keeps trained floats at 8 bits (there are
    no source 4-bit blocks to transcode), on the same kernel as the target's wide tensors."""
    if check_format(fmt) != "int4":
        return pack_linear(weight, bias, fmt)
    packed = pack_int4_wide(weight.float())
    if bias is not None:
        packed["bias"] = bias.to(activation_dtype(fmt)).contiguous()
    return packed


def pack_feature_block(block: Mapping[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in ADAPTER_LINEARS:
        packed = _pack_matrix(block[f"{name}.weight"], block.get(f"{name}.bias"), fmt)
        out |= {f"{name}.{k}": v for k, v in packed.items()}
    for name in ADAPTER_NORMS:
        if name in block:
            out[name] = block[name].float().contiguous()
    return out


class FeatureDrafter:
    """Drafts from target features: embedding (the target's), fc, one block, reduced head."""

    kind = "feature"
    uses_features = True

    def __init__(
        self,
        backend: TorchBackend,
        embedding: torch.Tensor,
        fc: dict[str, torch.Tensor],
        head: dict[str, torch.Tensor],
        vocab_ids: torch.Tensor,
        prefill_chunk: int = 256,
        weights: FeatureDrafterWeights | None = None,
        lookup: bool = True,
    ) -> None:
        self.backend = backend
        # Prompt lookup first: where the text so far repeats, its continuation is right more
        # often than the block's first token (measured: 78% vs ~50%), and it costs nothing.
        self.lookup = lookup
        self.dtype = backend.dtype
        self.embedding = embedding.to(self.dtype)
        self.fc = linear_from_packed(fc)
        self.head = linear_from_packed(head)
        self.vocab_ids = vocab_ids.to(torch.int64)
        self.prefill_chunk = prefill_chunk
        self.weights = weights

    @classmethod
    def load(
        cls,
        path: Path,
        target_path: Path,
        weights: str = "bf16",
        max_slots: int = 8,
        max_len: int = 2048,
        cache_root: Path | None = None,
        check_target: bool = True,
    ) -> FeatureDrafter:
        """Load a drafter file against the target GGUF it was trained for."""
        trained = load_feature_drafter_weights(path)
        if check_target:
            check_drafter_target(
                path, target_path, trained.target_sha256, trained.target_name, " --kind feature"
            )
        return cls.from_weights(trained, target_path, weights, max_slots, max_len, cache_root)

    @classmethod
    def from_weights(
        cls,
        trained: FeatureDrafterWeights,
        target_path: Path,
        weights: str = "bf16",
        max_slots: int = 8,
        max_len: int = 2048,
        cache_root: Path | None = None,
    ) -> FeatureDrafter:
        from models.weight_cache import WeightCache

        # The target's embedding (layer 0's block comes along, cached, and is dropped).
        first = WeightCache(cache_root).load_segment(Path(target_path), (0, 1), weights)
        config = first.config
        assert first.embedding is not None
        if trained.head.shape[1] != config.dim:
            raise DrafterFileError(f"drafter width {trained.head.shape[1]} != target {config.dim}")
        ids = trained.vocab_ids
        if ids.numel() == 0 or int(ids.max()) >= config.vocab_size or int(ids.min()) < 0:
            raise DrafterFileError("drafter vocabulary ids fall outside the target's vocabulary")
        check_adapter(trained.block, config)
        # The block runs as a middle segment (hidden states in, hidden states out) with its own
        # KV cache; layer index 1 of the target's config (a full-attention layer where the
        # target has sliding ones is not guaranteed, so take the config's flag for layer 1).
        layer = min(1, config.n_layers - 2)
        segment = PackedSegment(
            config=config,
            layers=(layer, layer + 1),
            fmt=weights,
            embedding=None,
            blocks=(pack_feature_block(trained.block, weights),),
            final_norm=None,
            head=None,
            rope_freq_factors=first.rope_freq_factors,
        )
        backend = TorchBackend(segment, max_slots=max_slots, max_len=max_len)
        return cls(
            backend,
            first.embedding,
            _pack_matrix(trained.fc, None, weights),
            _pack_matrix(trained.head, None, weights),
            ids,
            weights=trained,
        )

    @property
    def config(self) -> ModelConfig:
        return self.backend.config

    def inputs(self, next_ids: Sequence[int], features: torch.Tensor) -> torch.Tensor:
        """Block inputs [T, dim] for positions reading (t_{i+1}, f_i)."""
        with torch.inference_mode():
            ids = torch.as_tensor(list(next_ids), dtype=torch.int64)
            emb = torch.nn.functional.embedding(ids, self.embedding)
            if self.config.embed_scale != 1.0:
                emb = emb * torch.tensor(self.config.embed_scale, dtype=self.dtype)
            return self.fc(torch.cat([emb, features.to(self.dtype)], dim=-1))

    def logits(self, predicted: torch.Tensor) -> torch.Tensor:
        """Reduced-vocabulary logits [..., V'] (float32) from predicted features."""
        with torch.inference_mode():
            return self.head(predicted.to(self.dtype)).float()

    def open(self, params: SamplingParams) -> FeatureSession:
        return FeatureSession(self, params)


class FeatureSession:
    """One session's drafting state: a KV slot of drafter positions and what fed them."""

    uses_features = True

    def __init__(self, drafter: FeatureDrafter, params: SamplingParams) -> None:
        self.kind = drafter.kind
        self._drafter = drafter
        self._backend = drafter.backend
        self._params = params
        self._slot = self._backend.cache.allocate()
        # Target features held for positions 0..len-1 (rows beyond `_real` are not kept), and
        # the tokens t_0.. those positions belong to.
        self._features = torch.empty(0, drafter.config.dim, dtype=drafter.dtype)
        self._tokens: list[int] = []
        self._fed = 0  # drafter positions in the slot computed from real features

    @property
    def held(self) -> int:
        """Positions whose target features this session holds (send features from here)."""
        return int(self._features.shape[0])

    def propose(
        self,
        committed: Sequence[int],
        k: int,
        features: torch.Tensor | None = None,
        features_from: int = 0,
    ) -> Draft:
        """Draft up to k tokens after `committed`. `features` holds the target's features for
        positions features_from .. len(committed)-2 (rows [len(committed)-1-features_from,
        dim]); positions before features_from must already be held for the same tokens."""
        start = time.perf_counter()
        m = len(committed)
        cache = self._backend.cache
        k = min(k, cache.max_len - m)
        # What stands from before: f_i depends on t_0..t_i only, so held features of a common
        # token prefix stay; drafter position i also read t_{i+1}.
        prefix = common_prefix(self._tokens, committed)
        same = min(prefix, self.held)
        if features is None:
            features = torch.empty(0, self._drafter.config.dim)
        rows = int(features.shape[0])
        if features.dim() != 2 or features.shape[1] != self._drafter.config.dim:
            raise MissingFeaturesError(
                f"features must be [n, {self._drafter.config.dim}], got {tuple(features.shape)}"
            )
        if features_from > same or features_from + rows != max(0, m - 1):
            raise MissingFeaturesError(
                f"features for positions {features_from}..{features_from + rows - 1} do not "
                f"complete the {same} held for a session of {m} tokens: send them from {same}"
            )
        held = torch.cat([self._features[:features_from], features.to(self._drafter.dtype)])
        self._features, self._tokens = held, list(committed)
        if k < 1 or m < 2:
            return Draft(m, (), kind=self.kind)
        if self._drafter.lookup:
            follow = lookup_continuation(committed, k)
            if follow:
                return Draft(m, tuple(follow), kind=self.kind, draft_s=time.perf_counter() - start)
        # Drafter positions 0..m-2; those computed before from the same tokens and features stay.
        # (Position m-2 is always recomputed: its output drafts the first token.)
        keep = max(0, min(self._fed, features_from, prefix - 1, m - 2))
        cache.truncate(self._slot, keep)
        hidden = self._feed(list(committed[keep + 1 : m]), held[keep : m - 1])
        self._fed = m - 1
        tokens: list[int] = []
        ids_rows: list[torch.Tensor] = []
        prob_rows: list[torch.Tensor] = []
        vocab_ids = self._drafter.vocab_ids
        while True:
            logits = self._drafter.logits(hidden)
            index, q_idx, q_probs = draw_draft(logits, self._params, m + len(tokens), "sampled")
            token = int(vocab_ids[index])
            tokens.append(token)
            if q_idx is not None and q_probs is not None:
                ids_rows.append(vocab_ids[q_idx])
                prob_rows.append(q_probs)
            if len(tokens) >= k or cache.room(self._slot) < 1:
                break
            hidden = self._feed([token], hidden[None])  # a predicted feature feeds the next step
        sparse = bool(ids_rows)
        return Draft(
            m,
            tuple(tokens),
            torch.stack(ids_rows) if sparse else None,
            torch.stack(prob_rows) if sparse else None,
            kind=self.kind,
            draft_s=time.perf_counter() - start,
        )

    def _feed(self, next_ids: Sequence[int], features: torch.Tensor) -> torch.Tensor:
        """Append drafter positions; the output (predicted feature) of the last one."""
        chunk = self._drafter.prefill_chunk
        out = torch.empty(0)
        for i in range(0, len(next_ids), chunk):
            x = self._drafter.inputs(next_ids[i : i + chunk], features[i : i + chunk])
            out = self._backend.forward([self._slot], [x], last_only=True)[0][-1]
        return out

    def close(self) -> None:
        if self._slot in self._backend.cache.slots:
            self._backend.cache.free(self._slot)


def initial_feature_weights(
    target_path: Path,
    vocab_ids: torch.Tensor,
    init_layer: int = -1,
    target_name: str | None = None,
    sha256: str | None = None,
) -> FeatureDrafterWeights:
    """Untrained weights to start training from (and for tests): fc = [I, I] (embedding plus
    feature), the block copied from a target layer (default: the last), head = the target's
    rows for `vocab_ids`."""
    from models.gguf_loader import GGUFFile
    from models.weight_formats import pack_block

    target_path = Path(target_path)
    gf = GGUFFile(target_path)
    config = gf.config
    layer = config.n_layers - 1 if init_layer < 0 else init_layer
    eye = torch.eye(config.dim)
    return FeatureDrafterWeights(
        target_sha256=sha256 if sha256 is not None else target_sha256(target_path),
        target_name=target_name or target_path.name.removesuffix(".gguf"),
        vocab_ids=vocab_ids.to(torch.int64),
        fc=torch.cat([eye, eye], dim=1),
        block=pack_block(gf.block(layer, torch.float32), "fp32"),
        head=gf.head(torch.float32)[vocab_ids].clone(),
        info={},
    )


def check_features(features: torch.Tensor, dim: int) -> None:
    """Features from a peer: [n, dim], a float dtype, finite."""
    if features.dim() != 2 or features.shape[1] != dim or not features.is_floating_point():
        raise MissingFeaturesError(
            f"features must be float [n, {dim}], got {features.dtype}{tuple(features.shape)}"
        )
    if not bool(torch.isfinite(features).all()):
        raise MissingFeaturesError("features hold non-finite values")


__all__ = [
    "FeatureDrafter",
    "FeatureDrafterWeights",
    "FeatureSession",
    "MissingFeaturesError",
    "default_feature_drafter_path",
    "initial_feature_weights",
    "load_feature_drafter_weights",
    "save_feature_drafter",
]
