"""Fine-tuning a Mamba model on math word problems (LoRA through PEFT, or full), one file per concern:

    config.py       FinetuneConfig (the experiment; its fields are the CLI flags and config-file keys)
    recipe.py       run(cfg): the steps in order, and what each step may leave behind
    inputs.py       the base model, its tokenizer, the data
    lora.py         LoRA adapters on the projections; weight-decay groups
    trainer.py      transformers' Trainer with the response-only loss, atomic checkpoints, resume
    callbacks.py    preemption (SIGTERM/SIGUSR1), log.jsonl, TensorBoard, profiling
    evaluate.py     exact match before and after, across ranks
    outputs.py      output directory, final adapter/model, log.csv, loss curve, summary.json + DONE
    distributed.py  rank, world size, barrier
    cli.py          the command line of finetune/finetune.py
    merge.py        fold an adapter into its base model, checked (finetune/merge.py)
    pretrain_tiny.py  the embedded study's tiny base model (finetune/pretrain_tiny.py)
"""
from mambakit.finetune.cli import main
from mambakit.finetune.config import FinetuneConfig
from mambakit.finetune.recipe import FinetuneResult, run

__all__ = ["FinetuneConfig", "FinetuneResult", "run", "main"]
