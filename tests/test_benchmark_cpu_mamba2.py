"""benchmarks/benchmark_cpu_mamba2.py on a tiny shape: same logits as transformers, every figure written."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_tiny_run_writes_every_figure(tmp_path):
    import benchmark_cpu_mamba2 as bench

    res = bench.main(["--size", "tiny", "--seqlen", "40", "--repeats", "1", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "cpu_mamba2_tiny.json").read_text())
    assert written["figures"] == res["figures"]
    fig = res["figures"]
    assert fig["max_rel_logit_diff_vs_hf"] < 1e-4
    for key in ("ours_fwd_s", "hf_fwd_s", "ours_fwdbwd_s", "hf_fwdbwd_s", "fwd_speedup_vs_hf", "fwdbwd_speedup_vs_hf",
                "matmul_floor_fwd_s", "ours_fwd_over_floor"):
        assert fig[key] > 0, key
