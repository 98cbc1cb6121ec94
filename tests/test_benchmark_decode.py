"""The decode benchmark (benchmarks/benchmark_decode.py, logic in mambakit/bench/decode.py) on the CPU:
its helpers, and a whole run of the tiny shape through child processes with a variant's environment."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark_decode", REPO / "benchmarks" / "benchmark_decode.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)
bd = script.decode_bench


def test_parse_variant():
    assert bd.parse_variant("fused:MAMBA_SSM_FUSED_STEP=1") == ("fused", {"MAMBA_SSM_FUSED_STEP": "1"})
    assert bd.parse_variant("base:PYTHONPATH=/tmp/a=b,X=") == ("base", {"PYTHONPATH": "/tmp/a=b", "X": ""})
    assert bd.parse_variant("plain") == ("plain", {})
    for bad in ("", ":A=1", "a b:A=1", "x:A", "x:=1"):
        with pytest.raises(ValueError, match="--variants"):
            bd.parse_variant(bad)


def test_child_environment_names_the_variant_tree():
    env = bd.child_env({"A": "1"}, base={"PYTHONPATH": "/elsewhere", "HOME": "/h"})
    assert env["PYTHONPATH"] == str(bd.REPO) and env["A"] == "1" and env["HOME"] == "/h"
    env = bd.child_env({"PYTHONPATH": "/tmp/base_tree"}, base={"PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"] == "/tmp/base_tree"  # alone: upstream's and a base tree's mamba_ssm come first


@pytest.mark.parametrize("name, tag", [("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("", "cpu")])
def test_card_tag(name, tag):
    assert bd.gpu_tag(name) == tag


def _run(ms, tok, prefill):
    return {"decode": {"ms_per_token": ms}, "generation": {"tokens_per_s": tok, "prefill_ms": prefill}}


def test_ratios_and_table():
    result = {"inputs": {"shape": "1.4b"}, "machine": {"device_name": "NVIDIA H100 80GB HBM3"},
              "variants": {"fused": {"runs": {"1": _run(1.0, 900.0, 50.0)}},
                           "upstream": {"runs": {"1": _run(2.5, 300.0, 60.0), "16": {"error": "boom"}}}}}
    result["variants"]["fused"]["runs"]["1"]["fused_step"] = {"ran": ["('block', (1, 2048))",
                                                                      "('step', 'gemm', (16, 2048))"]}
    bd.add_ratios(result, "upstream")
    assert result["variants"]["fused"]["vs_baseline"]["1"] == {"decode_speedup": 2.5, "tokens_per_s_ratio": 3.0,
                                                              "prefill_speedup": 1.2}
    assert result["variants"]["upstream"]["vs_baseline"]["1"]["decode_speedup"] == 1.0
    text = bd.table(result)
    assert "gemm,gemv" in text and "ERROR boom" in text and "2.50" in text


@pytest.mark.slow
def test_a_tiny_run_through_child_processes(tmp_path, capsys):
    # two variants of ours: each child gets its variant's environment (the compiled CPU step turned
    # off, so no child compiles for a minute; a probe variable passed through)
    args = ["--shape", "tiny", "--batch", "1", "2", "--gen-batch", "2", "--prompt", "3", "--new-tokens", "3",
            "--gen-prompt", "5", "--gen-new", "2", "--repeats", "1", "--results-dir", str(tmp_path / "results"),
            "--out-dir", str(tmp_path / "out"), "--variants", "eager:MAMBA_SSM_COMPILED_STEP=0",
            "probe:MAMBA_SSM_COMPILED_STEP=0,MAMBA_SSM_FUSED_STEP=0,DECODE_BENCH_PROBE=hello"]
    result = bd.main(args)
    out = capsys.readouterr().out
    path = tmp_path / "results" / "decode_tiny_cpu.json"
    assert path.is_file() and (tmp_path / "out" / path.name).is_file()
    saved = json.loads(path.read_text())
    assert saved["variants"].keys() == {"eager", "probe"} and saved["baseline"] == "eager"
    assert saved["inputs"]["shape_dims"] == {"d_model": 64, "n_layer": 2, "vocab": bd.VOCAB}
    assert saved["git"].get("commit")
    probe = saved["variants"]["probe"]["runs"]
    assert probe.keys() == {"1", "2"}
    assert probe["1"]["env"] == {"DECODE_BENCH_PROBE": "hello", "MAMBA_SSM_COMPILED_STEP": "0",
                                 "MAMBA_SSM_FUSED_STEP": "0"}
    assert Path(probe["1"]["mamba_ssm_file"]) == REPO / "mamba_ssm"
    assert probe["1"]["fused_step"]["mode"] == "0"
    assert "decode" in probe["1"] and "generation" not in probe["1"]  # batch 1: decode only
    assert "decode" in probe["2"] and "generation" in probe["2"]
    d = probe["2"]["decode"]
    # (a difference of two one-call timings on a shared CPU: its sign is noise)
    assert isinstance(d["ms_per_token"], float) and len(d["total_ms"]) == 1 and d["new_tokens"] == 3
    assert d["prompt"] == 3 and d["total_ms_median"] > 0 and d["prefill_ms"] > 0
    g = probe["2"]["generation"]
    assert g["tokens_per_s"] > 0 and g["prompt"] == 5 and g["new_tokens"] == 2
    assert saved["variants"]["probe"]["vs_baseline"]["2"].keys() == {"decode_speedup", "tokens_per_s_ratio",
                                                                   "prefill_speedup"}
    assert result["variants"]["eager"]["runs"]["1"]["decode"]["total_ms_median"] > 0
    assert "decode tiny on cpu (baseline eager)" in out and "wrote" in out


def test_a_spent_budget_skips_the_children(tmp_path, capsys):
    result = bd.main(["--shape", "tiny", "--batch", "1", "--gen-batch", "2", "--budget-s", "1e-9",
                      "--results-dir", str(tmp_path), "--variants", "a:X=1", "b", "--device", "cpu"])
    runs = [r for v in result["variants"].values() for r in v["runs"].values()]
    assert len(runs) == 4 and all(r["error"].startswith("skipped") for r in runs)
    assert (tmp_path / "decode_tiny_cpu.json").is_file() and "ERROR skipped" in capsys.readouterr().out


@pytest.mark.parametrize("key, name", [
    ("('block', (1, 2048), torch.bfloat16, 'cuda')", "gemv"),
    ("('step', 'partials', (4, 2048), torch.bfloat16)", "partials"),
    ("('step', 'gemm', (16, 2048), torch.bfloat16)", "gemm"),
    ("('mamba2', (1, 2048), torch.bfloat16, 'cuda')", "mamba2"),
    ("('other',)", "?"),
])
def test_the_table_names_each_fused_path(key, name):
    assert bd._path_name(key) == name
