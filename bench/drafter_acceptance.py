"""Acceptance and cost of a cross-tokenizer drafter against the target, greedy.

For each prompt of bench/speculative_prompts.json (chat-rendered for the target) and each k, a
plain speculative loop: the drafter proposes k tokens after the committed ones, one target pass
over [last committed, d_1..d_k] gives k+1 rows of logits, `verify_draft` keeps a prefix and the
next token, and the target's KV cache drops the rest. Reported per k: mean accepted draft tokens
per verify step, the fraction of steps with at least one accepted, how the context/draft
boundary went, and the drafter's cost per drafted target token relative to one target decode
step (a 1-token target pass timed in the same process, at the prompt's context length). The
machine is shared, so the cost ratio is also taken from 1-token passes of the target and the
drafter model timed alternately ("interleaved").

    python -m bench.drafter_acceptance [--quick] [--ks 2,4,8] [--max-tokens 64]

Runs on one thread (torch.set_num_threads(1)); prints one line per (prompt, k) and a final
JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from models.backend import Backend, load_backend
from models.registry import resolve_model
from models.sampling import SamplingParams
from models.speculative import verify_draft
from models.text_drafter import TextDrafter, TextSession, load_text_drafter
from models.tokenizer import Tokenizer

PROMPTS = Path(__file__).with_name("speculative_prompts.json")


def timed_decode_step(target: Backend, slot: int, token: int, repeats: int = 2) -> float:
    """Seconds of one 1-token target pass at the slot's current length (then rolled back)."""
    cache = target.cache
    length = cache.length(slot)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        target.forward([slot], [torch.tensor([token])], last_only=True)
        times.append(time.perf_counter() - start)
        cache.truncate(slot, length)
    return min(times)


def interleaved_costs(target: Backend, drafter: TextDrafter, pairs: int = 12) -> dict[str, float]:
    """Medians of 1-token passes of the target and the drafter model, taken alternately at a
    context of ~200 tokens, so that the load of a shared machine hits both alike."""
    t_slot, d_slot = target.cache.allocate(), drafter.backend.cache.allocate()
    try:
        target.forward([t_slot], [torch.arange(200) + 1000], last_only=True)
        drafter.backend.forward([d_slot], [torch.arange(200) + 1000], last_only=True)
        target_s, drafter_s = [], []
        for i in range(pairs):
            target_s.append(timed_decode_step(target, t_slot, 1000 + i, repeats=1))
            drafter_s.append(timed_decode_step(drafter.backend, d_slot, 1000 + i, repeats=1))
    finally:
        target.cache.free(t_slot)
        drafter.backend.cache.free(d_slot)
    ratios = [d / t for d, t in zip(drafter_s, target_s, strict=True)]
    return {
        "target_step_ms": 1000 * statistics.median(target_s),
        "drafter_step_ms": 1000 * statistics.median(drafter_s),
        "drafter_vs_target_step": statistics.median(ratios),
    }


def run_prompt(
    target: Backend,
    tokenizer: Tokenizer,
    drafter: TextDrafter,
    prompt: str,
    k: int,
    max_tokens: int,
) -> dict[str, object]:
    params = SamplingParams(temperature=0.0)
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}])
    cache = target.cache
    slot = cache.allocate()
    session: TextSession = drafter.open(params)
    try:
        logits = target.forward([slot], [torch.tensor(ids[:-1])], last_only=True)
        step_s = timed_decode_step(target, slot, ids[-1])
        committed = list(ids)
        accepted_runs: list[int] = []
        drafted = 0
        draft_s = verify_s = 0.0
        while len(committed) - len(ids) < max_tokens:
            draft = session.propose(committed, k)
            draft_s += draft.draft_s
            drafted += draft.k
            start = time.perf_counter()
            batch = torch.tensor([committed[-1], *draft.tokens], dtype=torch.int64)
            logits = target.forward([slot], [batch])[0]
            verdict = verify_draft(logits, draft, params)
            verify_s += time.perf_counter() - start
            cache.truncate(slot, len(committed) + verdict.accepted)
            new = [*draft.tokens[: verdict.accepted], verdict.token]
            accepted_runs.append(verdict.accepted)
            # An accepted draft token may end the turn: generation stops there.
            stops = [i for i, t in enumerate(new) if t in tokenizer.stop_ids]
            committed.extend(new[: stops[0] + 1] if stops else new)
            if stops:
                break
        stats = session.stats
        generated = len(committed) - len(ids)
        return {
            "k": k,
            "generated": generated,
            "steps": len(accepted_runs),
            "accepted": sum(accepted_runs),
            "hit_steps": sum(1 for a in accepted_runs if a >= 1),
            "drafted": drafted,
            "draft_s": draft_s,
            "verify_s": verify_s,
            "target_step_s": step_s,
            "drafter_forward_s": stats.forward_s,
            "drafter_forwards": stats.forwards,
            "drafter_steps": stats.steps,
            "boundary": {
                "aligned": stats.aligned,
                "straddled": stats.straddled,
                "mismatched": stats.mismatched,
                "skipped": stats.skipped,
            },
            "text": tokenizer.decode(committed[len(ids) :]),
        }
    finally:
        session.close()
        cache.free(slot)


def summarise(rows: list[dict[str, object]]) -> dict[str, float]:
    def total(key: str) -> float:
        return float(sum(float(r[key]) for r in rows))  # type: ignore[arg-type]

    steps = total("steps")
    step_s = statistics.median(float(r["target_step_s"]) for r in rows)  # type: ignore[arg-type]
    drafted = max(total("drafted"), 1.0)
    return {
        "mean_accepted_run": total("accepted") / steps,
        "hit_fraction": total("hit_steps") / steps,
        "acceptance": total("accepted") / drafted,
        "tokens_per_step": (total("accepted") + steps) / steps,
        "target_step_ms": 1000 * step_s,
        "draft_ms_per_draft_token": 1000 * total("draft_s") / drafted,
        "draft_cost_vs_target_step": total("draft_s") / drafted / step_s,
        "drafter_forward_ms": 1000 * total("drafter_forward_s") / total("drafter_forwards"),
        "drafter_forward_vs_target_step": total("drafter_forward_s")
        / total("drafter_forwards")
        / step_s,
        "verify_ms_per_step": 1000 * total("verify_s") / steps,
        "steps": steps,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--drafter", default="gemma3-270m")
    parser.add_argument("--target-weights", default="bf16")
    parser.add_argument("--drafter-backend", default="torch")
    parser.add_argument("--drafter-weights", default="bf16")
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=0, help="first N prompts (0: all)")
    parser.add_argument("--quick", action="store_true", help="2 prompts, 24 tokens, k=4")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ks = [4] if args.quick else [int(k) for k in args.ks.split(",")]
    max_tokens = 24 if args.quick else args.max_tokens
    prompts = [p["prompt"] for p in json.loads(PROMPTS.read_text())["prompts"]]
    count = 2 if args.quick else (args.prompts or len(prompts))
    prompts = prompts[:count]

    target_path = resolve_model(args.target)
    started = time.perf_counter()
    target = load_backend(target_path, weights=args.target_weights, max_slots=1, max_len=1024)
    tokenizer = Tokenizer.from_gguf(target_path)
    drafter = load_text_drafter(
        target_path, args.drafter, backend=args.drafter_backend, weights=args.drafter_weights,
        max_slots=1, max_len=1024,
    )  # fmt: skip
    print(f"loaded in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)

    costs = interleaved_costs(target, drafter)
    print(json.dumps({"interleaved": costs}), flush=True)
    by_k: dict[int, list[dict[str, object]]] = {k: [] for k in ks}
    for i, prompt in enumerate(prompts):
        for k in ks:
            row = run_prompt(target, tokenizer, drafter, prompt, k, max_tokens)
            by_k[k].append(row)
            shown = {key: v for key, v in row.items() if key != "text" or k == ks[0]}
            print(json.dumps({"prompt": i, **shown}), flush=True)
    result = {
        "target": args.target,
        "target_weights": args.target_weights,
        "drafter": args.drafter,
        "drafter_backend": args.drafter_backend,
        "drafter_weights": args.drafter_weights,
        "threads": args.threads,
        "prompts": len(prompts),
        "max_tokens": max_tokens,
        "interleaved": costs,
        "by_k": {str(k): summarise(rows) for k, rows in by_k.items()},
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
