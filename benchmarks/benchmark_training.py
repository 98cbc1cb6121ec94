#!/usr/bin/env python
"""Training throughput and peak memory of a Mamba shape, ours in variants beside upstream mamba-ssm in
the same run, each (variant, mode) in its own child process: `full` (the whole model, fp32 weights
under bf16 autocast, forward + cross-entropy + backward, no optimizer), `lora_plain` (PEFT as its
user writes it: bf16 model, r 64, AdamW) and `lora_recipe` (the recipe's fp32 adapters under bf16
autocast). Upstream runs `full` only: its fused path ignores PEFT's adapters. The logic is
mambakit/bench/training.py (loaded by path, so children import no `mambakit` and only the `mamba_ssm`
their PYTHONPATH names).

    # GPU: ours, ours with longer scan segments, and upstream (1.4b, batch 4 x 2048, 5 steps after 2)
    python benchmarks/benchmark_training.py --shape 1.4b \\
        --upstream-path /tmp/upstream_build/mamba_ssm-2.3.2.post1 \\
        --variants ours: 'segment64:MAMBA_SSM_SCAN_SEGMENT=64' 'nosavey:MAMBA_SSM_SCAN_SAVE_Y=0' --out-dir $OUT
    # under a time limit: start no child after 8 minutes, none may run over 4
    python benchmarks/benchmark_training.py --upstream-path DIR --budget-s 480 --child-timeout 240
    # only the full model, an earlier tree of ours as the baseline
    python benchmarks/benchmark_training.py --modes full --variants ours base:PYTHONPATH=/tmp/base_tree \\
        --baseline base
    # CPU smoke (seconds): tiny shape; peak memory is the process's max RSS
    python benchmarks/benchmark_training.py --device cpu --shape tiny --seqlen 64 --batch-size 2 --steps 2 \\
        --warmup 1 --results-dir /tmp/training

Writes benchmarks/results/training_<shape>_<card>.json (and --out-dir) after every child; prints a
table. A failed child (out of memory, an import error) is recorded with its error and the run goes on.
"""
import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "mambakit" / "bench" / "training.py"
_spec = importlib.util.spec_from_file_location("_mamba_training_bench", _PATH)
training_bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = training_bench  # dataclasses and pickling look modules up by name
_spec.loader.exec_module(training_bench)

if __name__ == "__main__":
    training_bench.main()
