"""benchmarks/benchmark_cpu_mamba2.py on a tiny shape: same logits and greedy tokens as transformers, every
figure written, and each part (forward, decoding) runs alone."""
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

FORWARD = ("ours_fwd_s", "hf_fwd_s", "ours_fwdbwd_s", "hf_fwdbwd_s", "fwd_speedup_vs_hf", "fwdbwd_speedup_vs_hf",
           "matmul_floor_fwd_s", "ours_fwd_over_floor")
DECODE = ("ours_greedy_compile_s", "ours_greedy_tok_per_s", "ours_eager_greedy_tok_per_s", "hf_greedy_tok_per_s",
          "greedy_speedup_vs_hf", "greedy_compiled_speedup_vs_eager")
TINY = ["--size", "tiny", "--seqlen", "40", "--repeats", "1", "--prompt-len", "4", "--gen-len", "6"]


@pytest.mark.slow  # the decoding part compiles the tiny shape's step (~10-30 s on 2 cores, once per process)
@pytest.mark.parametrize("skip", [None, "--no-forward", "--no-decode"])
def test_tiny_run_writes_every_figure(tmp_path, skip):
    import benchmark_cpu_mamba2 as bench

    res = bench.main(TINY + ["--out", str(tmp_path)] + ([skip] if skip else []))
    written = json.loads((tmp_path / "cpu_mamba2_tiny.json").read_text())
    assert written["figures"] == res["figures"]
    fig, inputs = res["figures"], res["inputs"]
    forward, decode = skip != "--no-forward", skip != "--no-decode"
    assert inputs["parts"] == [p for p, on in (("forward", forward), ("decode", decode)) if on]
    if forward:
        assert fig["max_rel_logit_diff_vs_hf"] < 1e-4
    for key in FORWARD:
        assert (fig[key] > 0) if forward else key not in fig, key
    for key in DECODE:
        assert (fig[key] > 0) if decode else key not in fig, key
    if decode:
        assert inputs["greedy_mode"] == "compiled step (generate cg=True)"
        assert (inputs["prompt_len"], inputs["gen_len"]) == (4, 6)
        assert fig["greedy_tokens_all_agree"] is True
        assert fig["greedy_tokens_hf_equal_ours"] == fig["greedy_tokens_ours_eager_equal_ours"] == 6
