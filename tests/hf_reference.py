"""transformers as an independent reference on the same GGUF files (offline, float32).

transformers has its own GGUF loader (de-quantization, llama q/k un-permutation, Gemma norm
handling) and its own model code, so agreement with it checks our loader and decoder at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.backend import Backend
from models.generate import generate
from models.sampling import SamplingParams

# Prose, code and data: ~700 tokens for the Qwen and Gemma tokenizers, so it also runs past
# Gemma 3's 512-token sliding window.
FIXED_TEXT = """\
The lighthouse keeper woke before dawn, as he had every day for thirty years. He climbed the
spiral stairs, counted the hundred and twelve steps out of habit, and checked the lamp. Outside,
the sea was calm; a fishing boat was already heading north, its engine a faint rhythm across the
water. He wrote the time, the weather and the state of the light in the log book, then made tea.

def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    \"\"\"Merge two sorted lists into one sorted list in linear time.\"\"\"
    out: list[int] = []
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    out.extend(a[i:])
    out.extend(b[j:])
    return out

#include <stdio.h>

int main(void) {
    int counts[26] = {0};
    int c;
    while ((c = getchar()) != EOF) {
        if (c >= 'a' && c <= 'z') counts[c - 'a']++;
    }
    for (int k = 0; k < 26; k++) printf("%c: %d\\n", 'a' + k, counts[k]);
    return 0;
}

{"name": "sled", "version": "0.1.0", "nodes": [{"id": 1, "layers": [0, 14]}, {"id": 2, "layers": [14, 28]}]}

Photosynthesis converts light energy into chemical energy. In the light-dependent reactions,
water is split and oxygen is released; the energy captured is stored as ATP and NADPH, which the
Calvin cycle then uses to fix carbon dioxide into sugars. Most of the oxygen in the atmosphere
comes from this process, carried out by plants, algae and cyanobacteria over billions of years.

SELECT customer_id, COUNT(*) AS orders, SUM(total) AS revenue
FROM orders
WHERE created_at >= DATE '2024-01-01'
GROUP BY customer_id
HAVING COUNT(*) > 3
ORDER BY revenue DESC
LIMIT 10;

The committee met on Tuesday to review the budget. After a long discussion about maintenance
costs, the members agreed to postpone the new library wing until the next fiscal year, to repair
the roof of the town hall first, and to publish the minutes of every meeting on the website.
Les habitants ont salué cette décision; d'autres ont regretté le retard du projet de bibliothèque.
"""


def hf_model(path: Path, **config_overrides: Any) -> Any:
    """AutoModelForCausalLM on a GGUF file, float32, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **config_overrides
    )
    return model.eval()


def hf_logits(model: Any, ids: Sequence[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([list(ids)])).logits[0].float()


def hf_greedy(model: Any, ids: Sequence[int], n: int) -> list[int]:
    """n greedy tokens from transformers' own generate (its own KV cache), no early stop."""
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([list(ids)]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.int64),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
    return [int(t) for t in out[0, len(ids) :]]


def our_logits(backend: Backend, ids: Sequence[int], chunk: int = 256) -> torch.Tensor:
    """All positions' logits, prefilled in chunks (exercises the KV cache across chunks)."""
    slot = backend.cache.allocate()
    try:
        t = torch.tensor(list(ids))
        return torch.cat(
            [backend.forward([slot], [t[i : i + chunk]])[0] for i in range(0, len(t), chunk)]
        )
    finally:
        backend.cache.free(slot)


def our_greedy(backend: Backend, ids: Sequence[int], n: int) -> list[int]:
    return list(generate(backend, ids, SamplingParams(), max_tokens=n).tokens)


def perplexity(logits: torch.Tensor, ids: Sequence[int]) -> float:
    """exp(mean NLL) of ids[1:] given logits [len(ids), vocab] (position i predicts i + 1)."""
    targets = torch.tensor(list(ids[1:]))
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), targets)
    return math.exp(float(nll))


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())
