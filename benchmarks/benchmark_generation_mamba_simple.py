#!/usr/bin/env python
"""Generation speed of Mamba, upstream's command line, with a same-size transformer measured in
the same run and a sweep over batch sizes (the logic lives in mambakit.generation_benchmark).

    # CPU smoke (random weights, seconds)
    python benchmarks/benchmark_generation_mamba_simple.py --model-name tiny --promptlen 32 --genlen 16 --batch 1 4
    # GPU, the study's measurement (random weights when the checkpoint is not reachable)
    python benchmarks/benchmark_generation_mamba_simple.py --model-name state-spaces/mamba-1.4b \
        --promptlen 2048 --genlen 128 --batch 1 16 64 --cg

Prints the decoded text of the prompt's continuation, the prompt and generation lengths and, per
model and batch size, the prompt processing + decoding time (mean of --repeats calls after a
warm-up); writes a JSON (machine, versions, date, inputs, every figure) and a PNG of throughput
against batch size to benchmarks/results/generation_<size>_<card>.json and .png (card: h100,
h200, ... or cpu; the next run of that size on that card overwrites them), or --out-json /
--out-png.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mambakit.generation_benchmark as generation_benchmark  # noqa: E402
from result_names import gpu_tag  # noqa: E402


def stable_stem(cfg, results: dict) -> str:
    """generation_<size>_<card>: one file per model size and card (the date is inside)."""
    size = results["models"]["mamba"].get("size") or Path(cfg.model_name.rstrip("/")).name
    gpu = results.get("machine", {}).get("gpu")
    on_cuda = str(results["inputs"]["device"]).startswith("cuda")
    return f"generation_{size}_{gpu_tag(gpu) if on_cuda and gpu else 'cpu'}"


# the default names of mambakit.generation_benchmark carry a time stamp
generation_benchmark.default_stem = stable_stem

if __name__ == "__main__":
    generation_benchmark.main()
