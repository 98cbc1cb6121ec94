#!/usr/bin/env python
"""Every model-level speed figure of a Mamba shape in one run and one JSON, ours in variants beside
upstream mamba-ssm: decoding ms/token (batches 1 16 64), generation tokens/s and prefill (prompt 2048 +
128 new, batches 1 16 64 128), training tokens/s and peak memory (the full model; the LoRA step as
PEFT users write it and as the recipe sets it up), each figure's ratio to upstream. Each child runs in
its own process: benchmark_decode.py's per (variant, batch), benchmark_training.py's per (variant,
mode). The logic is mambakit/bench/model.py (loaded by path, like the drivers it runs).

    # GPU: ours and upstream at 1.4b, every figure, under a time limit
    python benchmarks/benchmark_model.py --shape 1.4b --upstream-path /tmp/upstream_build/mamba_ssm-2.3.2.post1 \\
        --budget-s 480 --child-timeout 240 --out-dir $OUT
    # two variants of ours beside upstream, generation and training only
    python benchmarks/benchmark_model.py --upstream-path DIR --variants ours: eager:MAMBA_SSM_FUSED_STEP=0 --no-decode
    # CPU smoke (seconds): tiny shape, tiny lengths, no compiled step
    python benchmarks/benchmark_model.py --device cpu --shape tiny --batch 1 --gen-batch 2 --prompt 4 \\
        --new-tokens 3 --gen-prompt 8 --gen-new 3 --repeats 1 --no-cg --modes full --seqlen 32 --batch-size 1 \\
        --steps 1 --warmup 0 --results-dir /tmp/model

Writes benchmarks/results/model_<shape>_<card>.json (and --out-dir) after every child; prints the
decode and training tables. A failed child (out of memory, an import error, a timeout) is recorded with
its error and the run goes on.
"""
import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "mambakit" / "bench" / "model.py"
_spec = importlib.util.spec_from_file_location("_mamba_model_bench", _PATH)
model_bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = model_bench  # dataclasses and pickling look modules up by name
_spec.loader.exec_module(model_bench)

if __name__ == "__main__":
    model_bench.main()
