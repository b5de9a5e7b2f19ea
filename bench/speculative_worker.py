"""Child processes of bench/speculative.py, each pinned to its cores by the parent.

python -m bench.speculative_worker cost --weights int4 --threads 1
    the target's cost of one pass holding t new tokens (t = 1..64, as B sessions x T
    tokens), after a 128-token context per session; prints {"ms": {"BxT": ms}} last.
python -m bench.speculative_worker llamacpp --threads 1 --max-tokens N --k K
    llama.cpp on the same prompts (their chat template applied by sled's tokenizer, the
    same token ids), target-only and with its own prompt-lookup decoding; prints tokens/s
    per prompt last.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench.common import json_line

PROMPTS = Path(__file__).with_name("speculative_prompts.json")
TARGET = "qwen2.5-coder-1.5b-instruct"
CONTEXT = 128
SHAPES = ((1, 1), (1, 2), (1, 3), (1, 5), (1, 9), (2, 3), (4, 3), (8, 1), (8, 3), (8, 5), (16, 3))


def load_prompts(path: Path = PROMPTS) -> list[dict[str, str]]:
    return list(json.loads(path.read_text())["prompts"])


def cost(args: argparse.Namespace) -> dict[str, object]:
    import torch

    from models.backend import load_backend
    from models.registry import resolve_model

    torch.set_num_threads(args.threads)
    backend = load_backend(
        resolve_model(TARGET), backend="torch", weights=args.weights, max_slots=16, max_len=512
    )
    # Every session's 128-token context is prefilled once, in one batched pass; each timed
    # pass appends t tokens to b of them, then rolls the caches back.
    most = max(b for b, _ in SHAPES)
    generator = torch.Generator().manual_seed(0)
    slots = [backend.cache.allocate() for _ in range(most)]
    contexts = [torch.randint(100, 20000, (CONTEXT,), generator=generator) for _ in slots]
    backend.forward(slots, contexts, last_only=True)
    out: dict[str, float] = {}
    for b, t in SHAPES:
        times = []
        for _ in range(args.repeats):
            new = [torch.randint(100, 20000, (t,), generator=generator) for _ in range(b)]
            start = time.perf_counter()
            backend.forward(slots[:b], new, keep=[t] * b)
            times.append(time.perf_counter() - start)
            for s in slots[:b]:
                backend.cache.truncate(s, CONTEXT)
        out[f"{b}x{t}"] = round(1000 * sorted(times)[len(times) // 2], 2)
    return {"weights": args.weights, "threads": args.threads, "ms": out}


def llamacpp(args: argparse.Namespace) -> dict[str, object]:
    import llama_cpp
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    from models.registry import resolve_model
    from models.tokenizer import Tokenizer

    path = resolve_model(TARGET)
    tokenizer = Tokenizer.from_gguf(path)
    results: dict[str, list[dict[str, object]]] = {}
    for mode in ("target", "prompt_lookup"):
        draft = LlamaPromptLookupDecoding(num_pred_tokens=args.k) if mode != "target" else None
        llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=2048, n_threads=args.threads,
            n_threads_batch=args.threads, draft_model=draft, verbose=False,
        )  # fmt: skip
        rows = []
        for item in load_prompts():
            ids = tokenizer.encode_chat([{"role": "user", "content": item["prompt"]}])
            llm.reset()
            tokens: list[int] = []
            times: list[float] = []
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                times.append(time.perf_counter())
                if token in tokenizer.stop_ids:
                    break
                tokens.append(int(token))
                if len(tokens) >= args.max_tokens:
                    break
            n = len(tokens)
            rate = (n - 1) / (times[n - 1] - times[0]) if n > 1 else 0.0
            rows.append({"kind": item["kind"], "tokens": n, "tokens_per_s": round(rate, 3)})
        results[mode] = rows
        del llm
    return {"threads": args.threads, "k": args.k, "results": results}


def warm(args: argparse.Namespace) -> dict[str, object]:
    """Convert a model's weights into the weight cache once, before many nodes load them."""
    from models.backend import load_backend
    from models.registry import resolve_model

    start = time.perf_counter()
    load_backend(resolve_model(args.model), backend="torch", weights=args.weights, max_slots=1)
    return {
        "model": args.model,
        "weights": args.weights,
        "s": round(time.perf_counter() - start, 2),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.speculative_worker")
    sub = parser.add_subparsers(dest="job", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--weights", default="int4")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--repeats", type=int, default=5)
    c.set_defaults(func=cost)
    lc = sub.add_parser("llamacpp")
    lc.add_argument("--threads", type=int, default=1)
    lc.add_argument("--max-tokens", type=int, default=96)
    lc.add_argument("--k", type=int, default=3)
    lc.set_defaults(func=llamacpp)
    w = sub.add_parser("warm")
    w.add_argument("--model", default=TARGET)
    w.add_argument("--weights", default="bf16")
    w.set_defaults(func=warm)
    args = parser.parse_args(argv)
    print(json_line(args.func(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
