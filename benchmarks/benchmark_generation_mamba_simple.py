#!/usr/bin/env python
"""Generation speed of Mamba, upstream's command line, with a same-size transformer measured in
the same run and a sweep over batch sizes (the logic lives in mambakit.bench.generation).

    # CPU smoke (random weights, seconds)
    python benchmarks/benchmark_generation_mamba_simple.py --model-name tiny --promptlen 32 --genlen 16 --batch 1 4
    # GPU, the study's measurement (random weights when the checkpoint is not reachable)
    python benchmarks/benchmark_generation_mamba_simple.py --model-name state-spaces/mamba-1.4b \
        --promptlen 2048 --genlen 128 --batch 1 16 64 --cg
    # a hybrid of that size (random weights): attention at every 8th layer
    python benchmarks/benchmark_generation_mamba_simple.py --model-name 1.4b --attn-every 8 \
        --promptlen 2048 --genlen 128 --batch 1 16 --cg
    # ours beside upstream mamba-ssm (built in DIR) instead of the transformer, each batch in child
    # processes: handed to benchmarks/benchmark_model.py (generation only; its options pass through)
    python benchmarks/benchmark_generation_mamba_simple.py --model-name 1.4b --promptlen 2048 --genlen 128 \
        --batch 1 16 64 128 --cg --upstream-path DIR --budget-s 480

Prints the decoded text of the prompt's continuation, the prompt and generation lengths and, per
model and batch size, the prompt processing + decoding time (mean of --repeats calls after a
warm-up); writes a JSON (machine, versions, date, inputs, every figure) and a PNG of throughput
against batch size to benchmarks/results/generation_<size>_<card>.json and .png (card: h100,
h200, ... or cpu; the next run of that size on that card overwrites them), or --out-json /
--out-png. With --upstream-path the result is benchmark_model.py's, model_<size>_<card>.json.
"""
from mambakit.bench.generation import main

if __name__ == "__main__":
    main()
