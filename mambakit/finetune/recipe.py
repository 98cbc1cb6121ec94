"""Supervised fine-tuning of a Mamba language model on math word problems (LoRA or full).

The recipe is a short sequence of named steps::

    cfg = FinetuneConfig(model=..., dataset=..., output_dir=...)
    result = run(cfg)        # = the steps below, in order

    model     = load_model(cfg)                    # inputs.py: either checkpoint layout, fp32 masters
    tokenizer = load_tokenizer_checked(cfg, model)  # inputs.py: vocabulary must fit the embedding
    data      = load_data(cfg, tokenizer, model)   # inputs.py: template, response-only labels, packing, held-out split
    model     = apply_lora(cfg, model)             # lora.py: PEFT LoRA on the projections, or full
    prepare_output_dir(cfg)                        # outputs.py: only now is anything written
    base      = evaluate(cfg, model, ..., "base")  # evaluate.py: exact match before training (cached)
    status, steps = train(cfg, model, tokenizer, data)  # trainer.py: checkpoints, resume, signals
    tuned     = evaluate(cfg, model, ..., "finetuned")
    save_final(cfg, model, tokenizer)              # outputs.py: adapter (or model) + tokenizer, atomically
    write_summary(cfg, ...)                        # outputs.py: summary.json, log.csv, loss_curve.png, DONE

Every input is checked before the output directory is created, so a bad argument leaves nothing
behind. A run that stops early (error, signal) leaves checkpoints but never ``summary.json`` or
``DONE``. Checkpoints are written to ``.tmp-checkpoint-N`` and renamed to ``checkpoint-N`` when
whole; ``resume=True`` continues from the newest. SIGTERM or SIGUSR1 (SLURM's warning before
preemption) finishes the current optimizer step, writes a checkpoint and stops; `run` then
returns status "preempted" (the command line exits with code 3).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mambakit.finetune.callbacks import PreemptionCallback
from mambakit.finetune.config import FinetuneConfig
from mambakit.finetune import distributed
from mambakit.finetune.evaluate import evaluate
from mambakit.finetune.inputs import load_data, load_model, load_tokenizer_checked
from mambakit.finetune.lora import apply_lora
from mambakit.finetune.outputs import DONE_MARKER, SUMMARY_NAME, prepare_output_dir, save_final, write_summary
from mambakit.finetune.trainer import train, training_arguments


@dataclass
class FinetuneResult:
    status: str  # "completed" or "preempted"
    output_dir: str
    summary: dict | None = None
    model: Any = None


def run(cfg: FinetuneConfig) -> FinetuneResult:
    t0 = time.time()
    cfg.validate()
    out = Path(cfg.output_dir)
    if cfg.resume and (out / DONE_MARKER).exists() and (out / SUMMARY_NAME).exists():
        print(f"{out} already holds a finished run; nothing to do", flush=True)
        return FinetuneResult("completed", str(out), json.loads((out / SUMMARY_NAME).read_text()))
    preemption = PreemptionCallback(stop_after_steps=cfg.stop_after_steps)
    preemption.install()
    try:
        args = training_arguments(cfg)  # also sets up the process group under torchrun
        model = load_model(cfg)
        tokenizer = load_tokenizer_checked(cfg, model)
        data = load_data(cfg, tokenizer, model)
        model = apply_lora(cfg, model)
        if not cfg.full_finetune:
            model.print_trainable_parameters()
        prepare_output_dir(cfg)
        device = args.device
        base = evaluate(cfg, model, tokenizer, data.eval_examples, "base", device=device) if cfg.eval_base else None
        if preemption.received is not None:
            print("signal received before training: stopping without a checkpoint", flush=True)
            return FinetuneResult("preempted", str(out))
        status, steps = train(cfg, model, tokenizer, data, args=args, preemption=preemption)
        if status == "preempted" or preemption.received is not None:
            # a signal after the last step: the final checkpoint is written; --resume evaluates and saves
            return FinetuneResult("preempted", str(out), model=model)
        # the fine-tuned weights are new: never take their evaluation from an earlier attempt's cache
        cache = out / "eval_finetuned.json"
        if cache.exists() and distributed.is_main():
            cache.unlink()
        distributed.barrier()
        if cfg.fsdp and (out / "model").is_dir():
            # written by trainer.save_fsdp_final from the gathered weights; evaluate that, unsharded
            final = out / "model"
            model = load_model(dataclasses.replace(cfg, model=str(final)))
            model.to(args.device)
        else:
            final = None
        tuned = evaluate(cfg, model, tokenizer, data.eval_examples, "finetuned") if cfg.eval_finetuned else None
        if final is None:
            final = save_final(cfg, model, tokenizer)
        extra = {}
        if cfg.merge and not cfg.full_finetune:
            from mambakit.finetune.merge import MergeConfig, merge

            if distributed.is_main():
                mres = merge(MergeConfig(base=cfg.model, adapter=str(final), out=str(out / "merged"),
                                         tokenizer=str(final), overwrite=True))
                extra["merged"] = {"path": str(out / "merged"), "max_abs_diff": mres["max_abs_diff"]}
            distributed.barrier()
        summary = write_summary(cfg, data, base, tuned, final, steps, time.time() - t0, extra)
        return FinetuneResult("completed", str(out), summary, model=model)
    finally:
        preemption.uninstall()
