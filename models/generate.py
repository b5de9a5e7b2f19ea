"""Single-process generation: the reusable `generate` loop and the `sled generate` command."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass

import torch

from models.backend import Backend
from models.sampling import SamplingParams, next_token, position_generator

PREFILL_CHUNK = 256


@dataclass(frozen=True)
class GenerationStats:
    prompt_tokens: int
    generated_tokens: int
    prefill_s: float
    decode_steps: int  # forward passes after the prefill (the first token comes from the prefill)
    decode_s: float
    stop_reason: str  # "stop" (a stop token), "length" (max_tokens), "context" (cache full)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class GenerationResult:
    tokens: tuple[int, ...]  # generated ids, without the stop token
    stats: GenerationStats


def check_generation(
    backend: Backend, prompt_ids: Sequence[int], max_tokens: int, prefill_chunk: int
) -> None:
    """ValueError unless a backend with these arguments can generate a reply."""
    n_layers = backend.config.n_layers
    if backend.layers != (0, n_layers):
        raise ValueError(f"generate needs all {n_layers} layers, backend has {backend.layers}")
    if not prompt_ids:
        raise ValueError("the prompt is empty (no tokens)")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if prefill_chunk < 1:
        raise ValueError("prefill_chunk must be >= 1")


def feed(backend: Backend, slot: int, ids: Sequence[int], chunk: int) -> torch.Tensor:
    """Append ids to a slot in chunks of `chunk`; the output row of the last one."""
    row = torch.empty(0)
    for i in range(0, len(ids), chunk):
        part = torch.tensor(list(ids[i : i + chunk]), dtype=torch.int64)
        row = backend.forward([slot], [part], last_only=True)[0][-1]
    return row


def prefill(backend: Backend, slot: int, prompt_ids: Sequence[int], chunk: int) -> torch.Tensor:
    """Read a prompt into an empty slot; the logits after its last token."""
    if len(prompt_ids) >= backend.cache.room(slot):
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens; this backend holds at most "
            f"{backend.cache.max_len} per session"
        )
    return feed(backend, slot, prompt_ids, chunk)


def generate(
    backend: Backend,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    max_tokens: int,
    stop_ids: Collection[int] = (),
    on_token: Callable[[int], None] | None = None,
    prefill_chunk: int = PREFILL_CHUNK,
) -> GenerationResult:
    """Prefill the prompt, then decode one token at a time until a stop id or max_tokens.

    Uses one KV cache slot of a backend that holds the whole model, and frees it at the end.
    `on_token` sees each generated id as soon as it is chosen (for streaming).
    """
    check_generation(backend, prompt_ids, max_tokens, prefill_chunk)
    cache = backend.cache
    slot = cache.allocate()
    try:
        start = time.perf_counter()
        logits = prefill(backend, slot, prompt_ids, prefill_chunk)
        prefill_s = time.perf_counter() - start

        tokens: list[int] = []
        stop_reason = "length"
        steps = 0
        start = time.perf_counter()
        while True:
            # Randomness keyed by absolute position: the same reply whichever node (or how many
            # nodes, after a failover) computes it.
            position = len(prompt_ids) + len(tokens)
            token = next_token(logits, params, position_generator(params.seed, position))
            if token in stop_ids:
                stop_reason = "stop"
                break
            tokens.append(token)
            if on_token is not None:
                on_token(token)
            if len(tokens) >= max_tokens:
                break
            if cache.room(slot) < 1:
                stop_reason = "context"
                break
            logits = backend.forward([slot], [torch.tensor([token])])[0][-1]
            steps += 1
        decode_s = time.perf_counter() - start
    finally:
        cache.free(slot)
    stats = GenerationStats(
        prompt_tokens=len(prompt_ids),
        generated_tokens=len(tokens),
        prefill_s=prefill_s,
        decode_steps=steps,
        decode_s=decode_s,
        stop_reason=stop_reason,
    )
    return GenerationResult(tokens=tuple(tokens), stats=stats)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input (model name/file, prompt, options), not a bug."""
    from models.backend import BadBatchError, UnsupportedBackendError
    from models.config import UnsupportedModelError
    from models.gguf_loader import GGUFFormatError, UnsupportedQuantizationError
    from models.kv_cache import CacheFullError
    from models.registry import RegistryError
    from models.sampling import InvalidSamplingParamsError
    from models.tokenizer import TokenizerError
    from models.weight_formats import UnsupportedWeightFormatError

    return (
        RegistryError,
        TokenizerError,
        UnsupportedModelError,
        UnsupportedQuantizationError,
        GGUFFormatError,
        UnsupportedBackendError,
        UnsupportedWeightFormatError,
        InvalidSamplingParamsError,
        BadBatchError,
        CacheFullError,
        FileNotFoundError,
        ValueError,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """`sled generate`: stream a completion to stdout, timings to stderr (or one JSON object)."""
    try:
        return _run(args)
    except _user_errors() as exc:
        print(f"sled generate: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from models.backend import load_backend
    from models.registry import resolve_model
    from models.tokenizer import Tokenizer

    params = SamplingParams(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed
    )
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    path = resolve_model(args.model)
    start = time.perf_counter()
    tokenizer = Tokenizer.from_gguf(path)
    if args.chat:
        prompt_ids = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = tokenizer.encode(args.prompt)
    backend = load_backend(
        path,
        backend=args.backend,
        weights=args.weights,
        max_slots=1,
        max_len=len(prompt_ids) + args.max_tokens,
        threads=args.threads,
    )
    load_s = time.perf_counter() - start

    stream = tokenizer.stream_decoder()
    pieces: list[str] = []

    def emit(token: int) -> None:
        text = stream.push(token)
        pieces.append(text)
        if not args.json and text:
            sys.stdout.write(text)
            sys.stdout.flush()

    speculative: dict[str, object] = {}
    draft = getattr(args, "draft", "none")
    if draft != "none":
        from models.drafter_loading import load_drafter
        from models.speculative_generate import generate_speculative

        drafter = load_drafter(
            draft, path, args.model, backend=args.drafter_backend, weights=args.drafter_weights,
            max_slots=1, max_len=len(prompt_ids) + args.max_tokens + 64, threads=args.threads,
        )  # fmt: skip
        load_s = time.perf_counter() - start
        assert drafter is not None
        spec_result = generate_speculative(
            backend, drafter, prompt_ids, params, args.max_tokens, tokenizer.stop_ids,
            draft_k=args.draft_k or None, on_token=emit,
        )  # fmt: skip
        result = GenerationResult(spec_result.tokens, spec_result.stats)
        sp = spec_result.speculative
        speculative = {
            "drafter": sp.kind,
            "draft_k": args.draft_k or "adaptive",
            "mean_draft_k": round(sp.mean_k, 2),
            "drafted_tokens": sp.drafted,
            "accepted_tokens": sp.accepted,
            "acceptance_rate": round(sp.acceptance, 4),
            "tokens_per_verify_step": round(sp.tokens_per_step, 3),
            "draft_s": round(sp.draft_s, 3),
            "verify_s": round(sp.verify_s, 3),
        }
    else:
        result = generate(backend, prompt_ids, params, args.max_tokens, tokenizer.stop_ids, emit)
    tail = stream.flush()
    pieces.append(tail)
    s = result.stats
    if args.json:
        report = {
            "model": str(path),
            "backend": backend.name,
            "weights": backend.weight_format,
            "threads": torch.get_num_threads(),
            "text": "".join(pieces),
            "tokens": list(result.tokens),
            "load_s": round(load_s, 3),
            "prefill_tokens_per_s": round(s.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(s.decode_tokens_per_s, 2),
            "tokens_per_s": round(s.generated_tokens / s.decode_s, 2) if s.decode_s > 0 else 0.0,
            **asdict(s),
            **({"speculative": speculative} if speculative else {}),
        }
        print(json.dumps(report))
    else:
        sys.stdout.write(tail + "\n")
        sys.stdout.flush()
        print(
            f"[{backend.name} {backend.weight_format}, {torch.get_num_threads()} threads] "
            f"load {load_s:.2f} s | prefill {s.prompt_tokens} tokens in {s.prefill_s:.2f} s "
            f"({s.prefill_tokens_per_s:.1f} tok/s) | decode {s.decode_steps} steps in "
            f"{s.decode_s:.2f} s ({s.decode_tokens_per_s:.2f} tok/s) | stop: {s.stop_reason}",
            file=sys.stderr,
        )
        if speculative:
            rate = s.generated_tokens / s.decode_s if s.decode_s > 0 else 0.0
            print(
                f"[speculative {speculative['drafter']}] {rate:.2f} tok/s after the first token | "
                f"acceptance {speculative['acceptance_rate']:.0%} | "
                f"{speculative['tokens_per_verify_step']} tokens per verify step | "
                f"mean k {speculative['mean_draft_k']}",
                file=sys.stderr,
            )
    return 0
