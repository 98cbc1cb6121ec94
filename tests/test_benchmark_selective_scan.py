"""CPU tests of benchmarks/benchmark_selective_scan.py's helpers (the benchmark itself needs a GPU)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark_selective_scan.py"
_spec = importlib.util.spec_from_file_location("benchmark_selective_scan", _PATH)
bss = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bss)


@pytest.mark.parametrize("name, tag", [
    ("NVIDIA H200", "h200"),
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA A100-SXM4-80GB", "a100"),
    ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090"),
    ("", "gpu"),
])
def test_result_file_names_the_card(name, tag):
    # result files are named after the card that ran them (an H100 run once went to an h200 name)
    from mambakit.bench.results import gpu_tag

    assert gpu_tag(name) == tag


def test_default_shapes_cover_batch1_prefill_sizes():
    # the three shapes, and two batch-1 shapes of smaller models (time-parallel forward, split)
    assert bss.SHAPES[:3] == [(8, 4096, 2048, 16), (1, 4096, 16384, 16), (8, 1536, 2048, 16)]
    assert (1, 2048, 2048, 16) in bss.SHAPES and (1, 1536, 1024, 16) in bss.SHAPES
