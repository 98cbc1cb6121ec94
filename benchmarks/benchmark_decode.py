#!/usr/bin/env python
"""Decoding speed (ms/token at batch 1 16 64 in a CUDA graph), generation throughput and prefill time of
a Mamba shape: ours in variants against upstream, each (variant, batch) in its own child process.
The logic is mambakit/bench/decode.py (loaded by path, so children import no `mambakit` and only the
`mamba_ssm` their PYTHONPATH names).

    # H100: the fused step against the eager step, a base tree and upstream
    python benchmarks/benchmark_decode.py --shape 1.4b \\
        --variants fused:MAMBA_SSM_FUSED_STEP=1 eager:MAMBA_SSM_FUSED_STEP=0 \\
                   base:PYTHONPATH=/tmp/base_tree --upstream-path /tmp/upstream_build/mamba_ssm-2.3.2.post1
    # CPU smoke (seconds): tiny shape, fp32, no compiled step
    python benchmarks/benchmark_decode.py --shape tiny --batch 1 --gen-batch 1 --gen-prompt 8 --gen-new 4 \\
        --new-tokens 4 --repeats 1 --variants eager:MAMBA_SSM_COMPILED_STEP=0 --results-dir /tmp/decode

Writes benchmarks/results/decode_<shape>_<card>.json (and --out-dir), after every child; prints a table.
"""
import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "mambakit" / "bench" / "decode.py"
_spec = importlib.util.spec_from_file_location("_mamba_decode_bench", _PATH)
decode_bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = decode_bench  # dataclasses and pickling look modules up by name
_spec.loader.exec_module(decode_bench)

if __name__ == "__main__":
    decode_bench.main()
