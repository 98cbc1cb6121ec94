"""Packed against padded LoRA training: real tokens per second on the same examples, one process.

The examples are math word problems tokenised as the fine-tune does (template, response-only labels),
so their lengths follow the data set's own distribution (GSM8K: ~100-400 tokens). Padded: steps of
``batch_size`` examples, right-padded to the step's longest (the recipe with ``--no-packing``).
Packed: rows of at most ``pack_length`` tokens holding whole examples with their ``seq_idx`` (the
recipe's default), ``rows_per_step`` rows a step. One pass is all the examples; passes alternate
between the two modes after a warm-up pass of each, so both see the same machine state. Real tokens
are the examples' tokens (no padding); both modes see exactly the same ones.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from mambakit.data.math_data import DataCollator, format_prompt, pack_examples, tokenize_examples


def load_examples(jsonl: str | Path, tokenizer, n: int | None = None, max_length: int = 1024):
    """(input_ids, labels) of the first n GSM8K-style rows ({question, answer}) of a jsonl file."""
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    rows = rows[:n] if n else rows
    ids, labels, _ = tokenize_examples([format_prompt(r["question"]) for r in rows], [r["answer"] for r in rows],
                                       tokenizer, max_length)
    return ids, labels


def make_steps(ids, labels, mode: str, batch_size: int, pack_length: int, rows_per_step: int, pad_id: int = 0):
    """The collated batches of one pass over the examples: mode "padded" or "packed"."""
    collate = DataCollator(pad_id)
    if mode == "padded":
        rows = [{"input_ids": i, "labels": l} for i, l in zip(ids, labels)]
        per = batch_size
    elif mode == "packed":
        p_ids, p_labels, p_lengths = pack_examples(ids, labels, pack_length)
        rows = [{"input_ids": i, "labels": l, "seq_lengths": s} for i, l, s in zip(p_ids, p_labels, p_lengths)]
        per = rows_per_step
    else:
        raise ValueError(f"mode must be 'padded' or 'packed', got {mode!r}")
    return [collate(rows[k:k + per]) for k in range(0, len(rows), per)]


def measure_packing(model, ids, labels, batch_size=8, pack_length=2048, rows_per_step=1, passes=3,
                    precision="bf16", device=None) -> dict:
    """Real tokens/s of LoRA training steps (forward, response loss, backward, AdamW) on the same
    examples, padded and packed; ``model``: a PEFT model on ``device`` with trainable adapters."""
    from mambakit.finetune.trainer import response_loss

    device = device or next(model.parameters()).device.type
    cuda = str(device).startswith("cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    model.train()
    steps = {m: make_steps(ids, labels, m, batch_size, pack_length, rows_per_step) for m in ("padded", "packed")}
    real = sum(len(x) for x in ids)
    amp = (lambda: torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16)) \
        if precision == "bf16" else None

    def one_pass(mode):
        for batch in steps[mode]:
            batch = {k: v.to(device) for k, v in batch.items()}
            lab = batch.pop("labels")
            if amp is not None:
                with amp():
                    out = model(**batch)
            else:
                out = model(**batch)
            response_loss(out, lab).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()

    times = {"padded": [], "packed": []}
    for mode in times:
        one_pass(mode)  # warm-up
    for _ in range(passes):
        for mode in times:
            t0 = time.perf_counter()
            one_pass(mode)
            times[mode].append(time.perf_counter() - t0)
    out = {"examples": len(ids), "real_tokens": real, "batch_size_padded": batch_size, "pack_length": pack_length,
           "rows_per_step_packed": rows_per_step, "precision": precision, "passes": passes}
    for mode, ts in times.items():
        out[mode] = {"steps": len(steps[mode]), "tokens_computed": sum(b["input_ids"].numel() for b in steps[mode]),
                     "pass_times_s": ts, "real_tok_per_s": real / statistics.median(ts)}
    out["speedup"] = out["packed"]["real_tok_per_s"] / out["padded"]["real_tok_per_s"]
    lengths = sorted(len(x) for x in ids)
    out["length_quartiles"] = [lengths[len(lengths) * q // 4] for q in (0, 1, 2, 3)] + [lengths[-1]]
    return out
