#!/usr/bin/env python
"""Mamba-2's SSD scan (`mamba_chunk_scan_combined`, bf16, chunk 256, dt_bias + softplus as Mamba2 calls
it): forward and forward+backward times of ours in variants beside upstream mamba-ssm in the same run,
each (variant, shape) in its own child process, with each child's relative error against a float64
recurrence on a slice of its output. The logic is mambakit/bench/ssd.py (loaded by path, so children
import no `mambakit` and only the `mamba_ssm` their PYTHONPATH names).

    # GPU (issue 22's acceptance): ours (Triton), ours on the PyTorch chunked path, and upstream, at
    # (8, 2048) and (1, 16384) with 64 heads of 64, dstate 128, 1 group
    python benchmarks/benchmark_ssd.py --upstream-path /tmp/upstream_build/mamba_ssm-2.3.2.post1 \\
        --variants ours: torch:MAMBA_SSM_BACKEND=torch --out-dir $OUT --budget-s 120
    # other shapes: b,l,h,p,n[,g]
    python benchmarks/benchmark_ssd.py --shapes 4,4096,32,64,128,8 1,2048,24,64,128
    # CPU smoke (seconds): tiny shapes, the PyTorch path
    python benchmarks/benchmark_ssd.py --device cpu --shapes 1,64,2,8,16 --chunk-size 16 --rep-ms 5 \\
        --warmup-ms 1 --results-dir /tmp/ssd

Writes benchmarks/results/ssd_<card>.json (and --out-dir) after every child; prints a table. A failed
child (out of memory, an import error, a timeout) is recorded with its error and the run goes on.
"""
import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "mambakit" / "bench" / "ssd.py"
_spec = importlib.util.spec_from_file_location("_mamba_ssd_bench", _PATH)
ssd_bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ssd_bench  # dataclasses and pickling look modules up by name
_spec.loader.exec_module(ssd_bench)

if __name__ == "__main__":
    ssd_bench.main()
