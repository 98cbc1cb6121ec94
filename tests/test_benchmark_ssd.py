"""The SSD scan benchmark (benchmarks/benchmark_ssd.py, logic in mambakit/bench/ssd.py) on the CPU: its
helpers, the float64 reference slice, one shape measured in this process, and a tiny run through child
processes with a fake "upstream" (our own tree), a variant's environment and a variant without mamba_ssm."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark_ssd", REPO / "benchmarks" / "benchmark_ssd.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)
bs = script.ssd_bench
TINY = ["--device", "cpu", "--chunk-size", "16", "--warmup-ms", "1", "--rep-ms", "5"]


def test_parse_shape():
    assert bs.parse_shape("8,2048,64,64,128") == (8, 2048, 64, 64, 128, 1)
    assert bs.shape_key(bs.parse_shape("1,16,4,8,16,2")) == "1,16,4,8,16,2"
    for bad in ("8,2048,64", "1,2,3,4,5,6,7", "1,16,3,8,16,2", "1,0,2,8,16", "a,b,c,d,e"):
        with pytest.raises(ValueError, match="--shapes"):
            bs.parse_shape(bad)


def test_bad_arguments_name_the_argument(tmp_path):
    for argv, needle in ((["--shapes", "1,2"], "--shapes"), (["--shapes", "1,16,2,8,16", "1,16,2,8,16,1"], "--shapes"),
                         (["--chunk-size", "0"], "--chunk-size must be >= 1"), (["--rep-ms", "0"], "--rep-ms"),
                         (["--ref-steps", "-1"], "--ref-steps"), (["--variants", "a b"], "--variants"),
                         (["--baseline", "nope"], "--baseline must name a variant"),
                         (["--child-timeout", "0"], "--child-timeout")):
        with pytest.raises(SystemExit, match=needle):
            bs.main(argv + ["--results-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_inputs_are_those_mamba2_passes_and_seeded():
    inp, gout = bs.make_inputs((2, 32, 4, 8, 16, 2), seed=3)
    assert {k: str(t.dtype)[6:] for k, t in inp.items()} == {
        "x": "bfloat16", "dt": "bfloat16", "A": "float32", "B": "bfloat16", "C": "bfloat16", "D": "float32",
        "dt_bias": "float32"}
    assert inp["B"].shape == (2, 32, 2, 16) and gout.shape == inp["x"].shape and (inp["A"] < -1).all()
    dt = torch.nn.functional.softplus(inp["dt_bias"])
    assert ((dt > 0.9e-3) & (dt < 0.11)).all()
    again, _ = bs.make_inputs((2, 32, 4, 8, 16, 2), seed=3)
    assert all(torch.equal(inp[k], again[k]) for k in inp)


def test_reference_slice_is_the_recurrence():
    from mamba_ssm.ops.ssd_chunked import ssd_chunked

    inp, _ = bs.make_inputs((2, 40, 4, 8, 16, 2), seed=1)
    d = {k: t.double() for k, t in inp.items()}
    full = ssd_chunked(d["x"], d["dt"], d["A"], d["B"], d["C"], 16, D=d["D"], dt_bias=d["dt_bias"], dt_softplus=True)
    ref = bs.reference_slice(inp, 24, [0, 3])  # head 3 reads group 1
    torch.testing.assert_close(ref, full[0, :24, [0, 3]], rtol=1e-9, atol=1e-9)
    err, where = bs.relerr_vs_float64(full.to(torch.bfloat16), inp, 512)  # steps clipped to seqlen
    assert 0 < err < 1e-2 and where == "batch 0, heads [0, 3], steps 0..39"


def test_measure_shape_in_this_process():
    res = bs.measure_shape((1, 48, 2, 8, 16, 1), 16, "cpu", warmup_ms=1, rep_ms=2, ref_steps=32)
    assert res["ssd_path"] == "torch" and res["out_dtype"] == "bfloat16" and len(res["grad_dtypes"]) == 7
    assert res["fwdbwd_ms"] > 0 and res["fwd_ms"] > 0 and res["timer"].startswith("median of perf_counter")
    assert res["relerr_vs_float64"] < 1e-2 and res["ref_slice"].endswith("steps 0..31")
    assert res["dims"] == {"batch": 1, "seqlen": 48, "nheads": 2, "headdim": 8, "dstate": 16, "ngroups": 1}
    assert "peak_memory_gib" not in res


def _run(fwd, fb):
    return {"fwd_ms": fwd, "fwdbwd_ms": fb, "relerr_vs_float64": 3e-3, "ssd_path": "triton"}


def test_ratios_acceptance_and_table():
    a, b = "8,2048,64,64,128,1", "1,16384,64,64,128,1"
    result = {"inputs": {"chunk_size": 256}, "machine": {"device_name": "NVIDIA H100 80GB HBM3"}, "shapes": [a, b],
              "variants": {"ours": {"runs": {a: _run(1.0, 3.0), b: _run(1.0, 4.0)}},
                           "torch": {"runs": {a: _run(5.0, 12.0), b: {"shape": b, "error": "timed out after 180 s"}}},
                           "upstream": {"runs": {a: _run(1.5, 3.9), b: _run(1.2, 4.4)}}}}
    bs.add_ratios(result, "upstream")
    ours = result["variants"]["ours"]["vs_baseline"]
    assert ours[a] == {"fwd_speedup": 1.5, "fwdbwd_speedup": 1.3} and ours[b]["fwdbwd_speedup"] == 1.1
    assert result["variants"]["torch"]["vs_baseline"].keys() == {a}
    acc = result["acceptance"]
    assert acc["shapes"][a]["met"] and not acc["shapes"][b]["met"] and acc["met"] is False and acc["target"] == 1.2
    text = bs.table(result)
    assert "on NVIDIA H100 80GB HBM3 (baseline upstream" in text and "ERROR timed out after 180 s" in text
    assert "acceptance" in text and "NOT met" in text and "1.30x" in text


@pytest.mark.slow
def test_a_tiny_run_through_child_processes(tmp_path, capsys):
    empty = tmp_path / "no_tree"
    empty.mkdir()
    result = bs.main(TINY + ["--shapes", "1,40,2,8,16", "--upstream-path", str(REPO),
                             "--results-dir", str(tmp_path / "results"), "--out-dir", str(tmp_path / "out"),
                             "--variants", "ours:SSD_BENCH_PROBE=hello", "torch:MAMBA_SSM_BACKEND=torch",
                             f"broken:PYTHONPATH={empty}"])
    out = capsys.readouterr().out
    path = tmp_path / "results" / "ssd_cpu.json"
    assert path.is_file() and (tmp_path / "out" / path.name).is_file()
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result)) and saved["kind"] == "ssd_benchmark"
    assert saved["variants"].keys() == {"ours", "torch", "broken", "upstream"} and saved["baseline"] == "upstream"
    key = "1,40,2,8,16,1"
    assert saved["shapes"] == [key] and saved["inputs"]["shape_dims"][key]["ngroups"] == 1
    runs = {n: v["runs"][key] for n, v in saved["variants"].items()}
    assert runs["ours"]["env"] == {"SSD_BENCH_PROBE": "hello"}
    assert runs["torch"]["env"] == {"MAMBA_SSM_BACKEND": "torch"}
    assert Path(runs["ours"]["mamba_ssm_file"]) == REPO / "mamba_ssm" == Path(runs["upstream"]["mamba_ssm_file"])
    for name in ("ours", "torch", "upstream"):
        run = runs[name]
        assert "error" not in run, run.get("traceback")
        assert run["fwd_ms"] > 0 and run["fwdbwd_ms"] > 0 and run["relerr_vs_float64"] < 1e-2
        assert run["ssd_path"] == "torch" and run["ref_slice"] == "batch 0, heads [0, 1], steps 0..39"
    assert runs["broken"]["error"].startswith("ModuleNotFoundError") and "mamba_ssm" in runs["broken"]["error"]
    assert saved["variants"]["ours"]["vs_baseline"][key]["fwdbwd_speedup"] > 0
    assert saved["acceptance"]["shapes"][key]["fwdbwd_speedup"] > 0
    assert "SSD scan, bf16, chunk 16" in out and "ERROR ModuleNotFoundError" in out and "wrote" in out


def test_a_spent_budget_and_a_timeout_are_recorded(tmp_path, capsys):
    result = bs.main(TINY + ["--shapes", "1,16,2,8,16", "1,32,2,8,16", "--results-dir", str(tmp_path),
                             "--variants", "a", "--child-timeout", "0.05", "--budget-s", "0.01"])
    runs = result["variants"]["a"]["runs"]
    assert runs["1,16,2,8,16,1"]["error"] == "timed out after 0.05 s"
    assert runs["1,32,2,8,16,1"]["error"].startswith("skipped: --budget-s")
    assert (tmp_path / "ssd_cpu.json").is_file() and "ERROR skipped" in capsys.readouterr().out


def test_the_comparison_runs_first(tmp_path, monkeypatch):
    calls = []

    def fake(env, key, args):
        calls.append((env.get("NAME"), key))
        return {"shape": key, "fwd_ms": 1.0, "fwdbwd_ms": 2.0 if env.get("NAME") == "c" else 3.0, "ssd_path": "x"}

    monkeypatch.setattr(bs, "run_child", fake)
    result = bs.main(TINY + ["--shapes", "1,16,2,8,16", "1,32,2,8,16", "--results-dir", str(tmp_path),
                             "--variants", "a:NAME=a", "b:NAME=b", "c:NAME=c", "--baseline", "c"])
    s1, s2 = "1,16,2,8,16,1", "1,32,2,8,16,1"
    assert calls == [("a", s1), ("c", s1), ("a", s2), ("c", s2), ("b", s1), ("b", s2)]
    assert list(result["variants"]) == ["a", "b", "c"] and "acceptance" not in result
    assert result["variants"]["b"]["vs_baseline"][s2] == {"fwd_speedup": 1.0, "fwdbwd_speedup": 0.6667}
