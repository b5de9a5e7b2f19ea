"""Drafter specs (`ngram`, `model:NAME`, `text:NAME`, `trained[:PATH]`, `feature[:PATH]`,
`none`) and loading the drafter a spec names for a target model.

- `ngram`: prompt lookup over the session's own text; no model, no memory.
- `model:NAME`: a small model that shares the target's token ids (a registry name or a .gguf).
- `text:NAME`: a small model with its own tokenizer, drafting through text (e.g.
  `text:gemma3-270m` for the Qwen target).
- `trained` / `trained:PATH`: the drafter `sled models train-drafter` made for this target
  (default path under the sled cache).
- `feature` / `feature:PATH`: the feature drafter (EAGLE-style: drafts from the target's own
  final-normed hidden states, which the verifier sends with each request) that
  `sled models train-drafter --kind feature` made for this target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from models.drafters import Drafter, ModelDrafter, NgramDrafter

DRAFTER_KINDS = ("none", "ngram", "model", "text", "trained", "feature")


class DrafterSpecError(ValueError):
    """A drafter spec that names no known kind, or lacks the model it needs."""


@dataclass(frozen=True)
class DrafterSpec:
    kind: str  # one of DRAFTER_KINDS
    source: str = ""  # model name or path (model/text), drafter file (trained/feature; "": default)

    def __str__(self) -> str:
        return f"{self.kind}:{self.source}" if self.source else self.kind


def parse_drafter_spec(text: str) -> DrafterSpec:
    kind, _, source = text.strip().partition(":")
    kind, source = kind.strip().lower(), source.strip()
    if kind not in DRAFTER_KINDS:
        raise DrafterSpecError(
            f"unknown drafter {text!r}: use none, ngram, model:NAME, text:NAME, trained[:PATH] "
            "or feature[:PATH]"
        )
    if kind in ("model", "text") and not source:
        raise DrafterSpecError(
            f"drafter {kind!r} needs a model: {kind}:NAME (e.g. text:gemma3-270m)"
        )
    if kind in ("none", "ngram") and source:
        raise DrafterSpecError(f"drafter {kind!r} takes no model (got {text!r})")
    return DrafterSpec(kind, source)


def load_drafter(
    spec: DrafterSpec | str,
    target_path: Path,
    target_name: str,
    *,
    backend: str = "torch",
    weights: str = "bf16",
    max_slots: int = 8,
    max_len: int = 2048,
    threads: int = 0,
    cache_root: Path | None = None,
) -> Drafter | None:
    """The drafter for `target_path` that the spec names (None for `none`). Blocking: loads
    weights. Raises DrafterSpecError, FileNotFoundError or the loaders' own errors."""
    if isinstance(spec, str):
        spec = parse_drafter_spec(spec)
    if spec.kind == "none":
        return None
    if spec.kind == "ngram":
        return NgramDrafter()
    if spec.kind == "trained":
        from models.trained_drafter import TrainedDrafter, default_drafter_path

        path = Path(spec.source) if spec.source else default_drafter_path(target_name)
        if not path.is_file():
            raise FileNotFoundError(
                f"no trained drafter at {path}; make one with "
                f"`sled models train-drafter --target {target_name}`"
            )
        return TrainedDrafter.load(
            path, Path(target_path), weights=weights, max_slots=max_slots, max_len=max_len,
            cache_root=cache_root,
        )  # fmt: skip
    if spec.kind == "feature":
        from models.feature_drafter import FeatureDrafter, default_feature_drafter_path

        path = Path(spec.source) if spec.source else default_feature_drafter_path(target_name)
        if not path.is_file():
            raise FileNotFoundError(
                f"no feature drafter at {path}; make one with "
                f"`sled models train-drafter --target {target_name} --kind feature`"
            )
        return FeatureDrafter.load(
            path, Path(target_path), weights=weights, max_slots=max_slots, max_len=max_len,
            cache_root=cache_root,
        )  # fmt: skip
    if spec.kind == "text":
        from models.text_drafter import load_text_drafter

        return load_text_drafter(
            target_path, spec.source, backend=backend, weights=weights, max_slots=max_slots,
            max_len=max_len, threads=threads, cache_root=cache_root,
        )  # fmt: skip
    from models.backend import load_backend
    from models.registry import resolve_model
    from models.tokenizer import Tokenizer

    path = resolve_model(spec.source)
    target_vocab = Tokenizer.from_gguf(target_path).vocab_size
    if Tokenizer.from_gguf(path).vocab_size != target_vocab:
        raise DrafterSpecError(
            f"{spec.source} has another vocabulary than {target_name}; "
            f"draft through text instead: text:{spec.source}"
        )
    model = load_backend(
        path, backend=backend, weights=weights, max_slots=max_slots, max_len=max_len,
        threads=threads, cache_root=cache_root,
    )  # fmt: skip
    return ModelDrafter(model)
