"""The training benchmark (benchmarks/benchmark_training.py, logic in mambakit/bench/training.py) on the
CPU: its helpers, one mode measured in this process, and a tiny run through child processes with a
fake "upstream" (our own tree), a variant's environment and a variant whose tree has no mamba_ssm."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark_training", REPO / "benchmarks" / "benchmark_training.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)
bt = script.training_bench
SMOKE = ["--device", "cpu", "--shape", "tiny", "--seqlen", "64", "--batch-size", "2", "--steps", "2", "--warmup", "1"]


def test_bad_arguments_name_the_argument(tmp_path):
    for argv, needle in ((["--steps", "0"], "--steps must be >= 1"), (["--seqlen", "1"], "--seqlen must be >= 2"),
                         (["--modes", "full", "full"], "--modes"), (["--variants", "a b"], "--variants"),
                         (["--baseline", "nope"], "--baseline must name a variant"),
                         (["--child-timeout", "0"], "--child-timeout")):
        with pytest.raises(SystemExit, match=needle):
            bt.main(argv + ["--results-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_child_keeps_other_paths_but_not_another_mamba_ssm(tmp_path):
    other, tree = tmp_path / "site", tmp_path / "tree"
    (other / "peft").mkdir(parents=True)
    (tree / "mamba_ssm").mkdir(parents=True)
    base = {"PYTHONPATH": os.pathsep.join([str(tree), str(other), ""])}
    env = bt._v.child_env({"PYTHONPATH": "/up"}, base=base, keep_other_paths=True)
    assert env["PYTHONPATH"].split(os.pathsep) == ["/up", str(other)]
    assert bt._v.child_env({}, base=base)["PYTHONPATH"] == str(bt.REPO)  # decode's: the tree alone


def _run(tok, peak):
    return {"tokens_per_s": tok, "tokens_per_s_best": tok * 1.1, "peak_memory_gib": peak,
            "peak_memory_with_warmup_gib": peak + 1, "mixer_path": "fused mamba_inner_fn"}


def test_ratios_and_table():
    result = {"inputs": {"shape": "1.4b", "batch_size": 4, "seqlen": 2048, "modes": ["full", "lora_plain"]},
              "machine": {"device_name": "NVIDIA H100 80GB HBM3"},
              "variants": {"ours": {"runs": {"full": _run(30000.0, 30.0), "lora_plain": _run(20000.0, 20.0)}},
                           "upstream": {"runs": {"full": _run(25000.0, 32.0),
                                                 "lora_plain": {"error": bt.UPSTREAM_LORA_SKIPPED}}}}}
    bt.add_ratios(result, "upstream")
    r = result["variants"]["ours"]["vs_baseline"]
    assert r.keys() == {"full"}  # the baseline skipped lora_plain: no ratio
    assert r["full"]["tokens_per_s_ratio"] == 1.2 and r["full"]["peak_memory_ratio"] == 0.9375
    assert r["full"]["peak_memory_delta_gib"] == -2.0 and r["full"]["peak_memory_at_or_below_baseline"]
    text = bt.table(result)
    assert "training 1.4b, batch 4 x 2048, on NVIDIA H100 80GB HBM3 (baseline upstream)" in text
    assert "ERROR skipped: upstream's fused path" in text and "0.938" in text and "1.20" in text


def test_lora_recipe_in_this_process():
    pytest.importorskip("peft")
    res = bt.measure_mode("lora_recipe", "tiny", 1, 32, steps=2, warmup=1, device="cpu", rank=4)
    assert res["adapter_dtypes"] == ["float32"] and res["autocast"] == "bfloat16" and res["lora_alpha"] == 8
    assert res["adapter_path"].startswith("channel-first")  # the recipe imports mambakit: its resolver
    # lora_A and lora_B of 4 projections in 2 layers, every one with a gradient
    assert res["mixer_path"].startswith("unfused") and res["params_with_grad"] == res["trainable_tensors"] == 16
    assert len(res["step_ms"]) == 2 and len(res["warmup_ms"]) == 1 and res["tokens_per_s_best"] >= res["tokens_per_s"]
    assert res["tokens_per_step"] == 32 and res["peak_memory_kind"] == "process max RSS"


@pytest.mark.slow
def test_a_tiny_run_through_child_processes(tmp_path, capsys):
    pytest.importorskip("peft")
    empty = tmp_path / "no_tree"
    empty.mkdir()
    result = bt.main(SMOKE + ["--modes", "full", "lora_plain", "--upstream-path", str(REPO),
                              "--results-dir", str(tmp_path / "results"), "--out-dir", str(tmp_path / "out"),
                              "--variants", "ours:TRAINING_BENCH_PROBE=hello", f"broken:PYTHONPATH={empty}"])
    out = capsys.readouterr().out
    path = tmp_path / "results" / "training_tiny_cpu.json"
    assert path.is_file() and (tmp_path / "out" / path.name).is_file()
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result)) and saved["kind"] == "training_benchmark"
    assert saved["variants"].keys() == {"ours", "broken", "upstream"} and saved["baseline"] == "upstream"
    assert saved["inputs"]["shape_dims"] == {"d_model": 64, "n_layer": 2, "vocab": 50277, "pad_vocab_size_multiple": 8}
    assert saved["git"].get("commit") and "mode" not in saved["inputs"]
    ours, up = saved["variants"]["ours"]["runs"], saved["variants"]["upstream"]["runs"]
    assert ours["full"]["env"] == {"TRAINING_BENCH_PROBE": "hello"}
    assert Path(ours["full"]["mamba_ssm_file"]) == REPO / "mamba_ssm" == Path(up["full"]["mamba_ssm_file"])
    for run in (ours["full"], up["full"], ours["lora_plain"]):
        assert "error" not in run, run.get("traceback")
        assert run["tokens_per_s"] > 0 and len(run["step_ms"]) == 2 and len(run["losses"]) == 2
        assert run["peak_memory_with_warmup_gib"] >= run["peak_memory_gib"] > 0
    assert ours["full"]["mixer_path"] == "fused mamba_inner_fn" and ours["full"]["weights"] == "float32"
    assert ours["full"]["params_with_grad"] == ours["full"]["trainable_tensors"] == up["full"]["trainable_tensors"]
    plain = ours["lora_plain"]
    assert plain["weights"] == "bfloat16" and plain["autocast"] is None and plain["lora_alpha"] == 16
    assert plain["adapter_dtypes"] == ["float32"] and plain["adapter_path"].startswith("module")
    assert plain["params_with_grad"] == plain["trainable_tensors"] == 16
    assert up["lora_plain"]["error"].startswith("skipped: upstream's fused path")
    broken = saved["variants"]["broken"]["runs"]
    assert broken["full"]["error"].startswith("ModuleNotFoundError") and "mamba_ssm" in broken["full"]["error"]
    v = saved["variants"]["ours"]["vs_baseline"]
    assert v.keys() == {"full"} and v["full"]["tokens_per_s_ratio"] > 0
    assert "training tiny, batch 2 x 64, on cpu (baseline upstream)" in out and "wrote" in out


def test_a_spent_budget_and_a_timeout_are_recorded(tmp_path, capsys):
    result = bt.main(SMOKE + ["--modes", "full", "--results-dir", str(tmp_path), "--variants", "a", "b",
                              "--child-timeout", "0.05", "--budget-s", "0.01"])
    a, b = result["variants"]["a"]["runs"]["full"], result["variants"]["b"]["runs"]["full"]
    assert a["error"] == "timed out after 0.05 s" and b["error"].startswith("skipped: --budget-s")
    assert (tmp_path / "training_tiny_cpu.json").is_file() and "ERROR skipped" in capsys.readouterr().out
