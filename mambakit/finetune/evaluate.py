"""Exact-match accuracy on the held-out problems before and after fine-tuning, split across ranks."""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from mambakit.finetune.config import FinetuneConfig
from mambakit.finetune import distributed
from mambakit.finetune.outputs import atomic_write_text


def _autocast(cfg, device):
    if cfg.resolved_precision() == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(cfg: FinetuneConfig, model, tokenizer, examples: list[dict], tag: str, device=None) -> dict | None:
    """Greedy exact-match accuracy on the held-out examples, shared across ranks; cached in
    output_dir/eval_{tag}.json (so a resumed run does not evaluate the base model again)."""
    from mambakit.evaluation.math_answers import evaluate_exact_match

    if not examples:
        return None
    cache = Path(cfg.output_dir) / f"eval_{tag}.json"
    key = {k: getattr(cfg, k) for k in ("model", "dataset", "preset", "prompt_field", "response_field", "split",
                                        "eval_split", "eval_size", "eval_max_examples", "seed",
                                        "eval_max_new_tokens", "precision")}
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    d = distributed.process_group()
    rank, world = distributed.rank_and_world()
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    t0 = time.time()
    with _autocast(cfg, dev):
        part = evaluate_exact_match(model, tokenizer, examples[rank::world], max_new_tokens=cfg.eval_max_new_tokens,
                                    batch_size=cfg.eval_batch_size, progress=cfg.progress and rank == 0)
    if d is not None:
        parts = [None] * world
        d.all_gather_object(parts, part)
    else:
        parts = [part]
    correct = sum(p["correct"] for p in parts)
    n = sum(p["n"] for p in parts)
    res = {"accuracy": correct / n, "correct": correct, "n": n, "seconds": round(time.time() - t0, 2),
           "samples": parts[0]["samples"], "key": key}
    if distributed.is_main():
        print(f"exact match ({tag}): {correct}/{n} = {res['accuracy']:.4f}", flush=True)
        atomic_write_text(cache, json.dumps(res, indent=2) + "\n")
    distributed.barrier()
    return res
