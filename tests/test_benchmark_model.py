"""The model benchmark (benchmarks/benchmark_model.py, logic in mambakit/bench/model.py) on the CPU: its
arguments, the order of its children, the JSON's frame and ratios from fake children, a spent budget,
and a tiny run through real child processes with a fake "upstream" (our own tree)."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark_model", REPO / "benchmarks" / "benchmark_model.py")
script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(script)
bm = script.model_bench
TINY = ["--device", "cpu", "--shape", "tiny"]
H100 = "NVIDIA H100 80GB HBM3"


def test_bad_arguments_name_the_argument(tmp_path):
    for argv, needle in ((["--batch", "0"], "--batch: batch sizes must be >= 1"),
                         (["--gen-batch", "1", "-2"], "--gen-batch: batch sizes must be >= 1"),
                         (["--gen-new", "1"], "--gen-new must be >= 2"), (["--steps", "0"], "--steps must be >= 1"),
                         (["--modes", "full", "full"], "--modes: each mode once"),
                         (["--no-decode", "--no-generation", "--no-training"], "expected at most two of them"),
                         (["--variants", "a b"], "--variants"), (["--baseline", "nope"], "--baseline must name"),
                         (["--child-timeout", "0"], "--child-timeout must be > 0"), (["--child"], "--child"),
                         (["--upstream-path", str(tmp_path)], "--upstream-path: expected a directory holding"),
                         (["--tag", "a/b"], "--tag: expected letters, digits and '-'")):
        with pytest.raises(SystemExit, match=needle):
            bm.main(TINY + argv + ["--results-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def _upstream(tmp_path) -> Path:
    """A fake upstream tree (the fake children import nothing from it)."""
    (tmp_path / "up" / "mamba_ssm").mkdir(parents=True)
    return tmp_path / "up"


def _fakes(monkeypatch, calls, on_disk=None, sleep=0.0):
    """decode's and training's run_child replaced: figures by variant (upstream: PYTHONPATH in its env)."""
    def decode_child(env, batch, args, kinds):
        up = "PYTHONPATH" in env
        calls.append(("upstream" if up else env["NAME"], batch, tuple(kinds)))
        if on_disk:
            on_disk(len(calls))
        time.sleep(sleep)
        r = {"batch": batch, "env": {}, "device_name": H100, "mamba_ssm_version": "2.3.2.post1" if up else "2.2.4",
             "wall_s": 0.1}
        if "gen" in kinds:
            r["generation"] = {"tokens_per_s": 200.0 if up else 300.0, "prefill_ms": 50.0 if up else 40.0,
                               "prompt": args.gen_prompt, "new_tokens": args.gen_new}
        if "decode" in kinds:
            r["decode"] = {"ms_per_token": 2.0 if up else 1.0, "prompt": args.prompt}
        return r

    def training_child(env, mode, args):
        up = "PYTHONPATH" in env
        calls.append(("upstream" if up else env["NAME"], mode))
        if on_disk:
            on_disk(len(calls))
        time.sleep(sleep)
        tok, peak = (25000.0, 32.0) if up else (30000.0, 30.0)
        return {"mode": mode, "tokens_per_s": tok, "tokens_per_s_best": tok, "peak_memory_gib": peak,
                "peak_memory_with_warmup_gib": peak, "mixer_path": "fused mamba_inner_fn",
                "peak_memory_kind": "cuda max_memory_allocated", "wall_s": 0.2}

    monkeypatch.setattr(bm.decode, "run_child", decode_child)
    monkeypatch.setattr(bm.training, "run_child", training_child)


def test_order_frame_and_ratios_from_fake_children(tmp_path, monkeypatch, capsys):
    path = tmp_path / "model_tiny_h100.json"
    seen = []

    def on_disk(n):  # the JSON on disk before the n-th child holds the n-1 records before it (one skipped)
        if n > 1:
            saved = json.loads(path.read_text())
            seen.append(sum(len(s) for v in saved["variants"].values() for s in v["runs"].values()))
    calls = []
    _fakes(monkeypatch, calls, on_disk)
    result = bm.main(TINY + ["--upstream-path", str(_upstream(tmp_path)), "--variants", "ours:NAME=ours",
                             "--batch", "1", "16", "--gen-batch", "1", "16", "64", "--results-dir", str(tmp_path)])
    out = capsys.readouterr().out
    # the smallest batch, the training modes, the larger batches; upstream's LoRA modes skipped unrun
    assert calls == [("ours", 1, ("gen", "decode")), ("upstream", 1, ("gen", "decode")), ("ours", "full"),
                     ("upstream", "full"), ("ours", "lora_plain"), ("ours", "lora_recipe"),
                     ("ours", 16, ("gen", "decode")), ("upstream", 16, ("gen", "decode")),
                     ("ours", 64, ("gen",)), ("upstream", 64, ("gen",))]
    assert seen == [1, 2, 3, 4, 6, 8, 9, 10, 11]  # written after every child (upstream's LoRA: records, no call)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, "up"]  # the card from the children; no .tmp
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result)) and saved["kind"] == "model_benchmark"
    assert {"date", "machine", "versions", "git", "inputs", "variants", "baseline"} <= saved.keys()
    assert saved["baseline"] == "upstream" and saved["machine"]["device_name"] == H100
    assert saved["inputs"]["shape_dims"] == {"d_model": 64, "n_layer": 2, "vocab": {"decode": 50280, "training": 50277},
                                             "pad_vocab_size_multiple": 8}
    assert saved["inputs"]["gen_batch"] == [1, 16, 64] and saved["inputs"]["modes"] == list(bm.training.MODES)
    ours, up = saved["variants"]["ours"], saved["variants"]["upstream"]
    assert ours["runs"].keys() == {"decode", "training"} and ours["runs"]["decode"].keys() == {"1", "16", "64"}
    assert ours["runs"]["training"].keys() == {"full", "lora_plain", "lora_recipe"}
    assert up["runs"]["training"]["lora_recipe"]["error"].startswith("skipped: upstream's fused path")
    assert up["env"] == {"PYTHONPATH": str((tmp_path / "up").resolve())}
    r = ours["vs_baseline"]
    assert r["decode"]["1"] == r["decode"]["16"] == {"decode_speedup": 2.0, "tokens_per_s_ratio": 1.5,
                                                     "prefill_speedup": 1.25}
    assert r["decode"]["64"] == {"tokens_per_s_ratio": 1.5, "prefill_speedup": 1.25}
    assert r["training"].keys() == {"full"}  # the baseline ran no LoRA mode: no ratio
    assert r["training"]["full"]["tokens_per_s_ratio"] == 1.2 and r["training"]["full"]["peak_memory_ratio"] == 0.9375
    assert up["vs_baseline"]["training"]["full"]["tokens_per_s_ratio"] == 1.0
    assert "[ours batch 1] decode 1.0 ms/token, generation 300.0 tok/s, prefill 40.0 ms (0.1 s)" in out
    assert "[upstream lora_plain] ERROR skipped: upstream's fused path" in out
    assert f"decode tiny on {H100} (baseline upstream)" in out and "training tiny, batch 4 x 2048" in out
    assert "   2.00 " in out and "   1.20 " in out and "wrote " + str(path) in out


def test_a_spent_budget_keeps_what_finished(tmp_path, monkeypatch, capsys):
    calls = []
    _fakes(monkeypatch, calls, sleep=0.05)
    result = bm.main(TINY + ["--variants", "ours:NAME=ours", "other:NAME=other", "--batch", "1",
                             "--gen-batch", "1", "2", "--modes", "full", "--budget-s", "0.01",
                             "--results-dir", str(tmp_path)])
    assert calls == [("ours", 1, ("gen", "decode"))]
    saved = json.loads((tmp_path / "model_tiny_h100.json").read_text())
    assert saved == json.loads(json.dumps(result)) and saved["baseline"] == "ours"
    assert saved["variants"]["ours"]["runs"]["decode"]["1"]["decode"]["ms_per_token"] == 1.0
    skipped = [saved["variants"]["ours"]["runs"]["training"]["full"], saved["variants"]["ours"]["runs"]["decode"]["2"]]
    skipped += [r for s in saved["variants"]["other"]["runs"].values() for r in s.values()]
    assert len(skipped) == 5 and all(r["error"] == "skipped: --budget-s spent" for r in skipped)
    assert "[other full] ERROR skipped: --budget-s spent" in capsys.readouterr().out


def test_parts_left_out(tmp_path, monkeypatch):
    calls = []
    _fakes(monkeypatch, calls)
    bm.main(TINY + ["--variants", "ours:NAME=ours", "--no-decode", "--gen-batch", "4", "--no-training",
                    "--results-dir", str(tmp_path)])
    assert calls == [("ours", 4, ("gen",))]
    bm.main(TINY + ["--variants", "ours:NAME=ours", "--no-decode", "--no-generation", "--modes", "lora_recipe",
                    "--results-dir", str(tmp_path)])
    assert calls[1:] == [("ours", "lora_recipe")]
    saved = json.loads((tmp_path / "model_tiny_cpu.json").read_text())  # (the fake training child names no card)
    assert saved["variants"]["ours"]["runs"].keys() == {"training"}  # the latest run of the shape and card, whole


def test_the_generation_script_hands_its_upstream_run_to_this_benchmark(tmp_path, monkeypatch, capsys):
    from mambakit.bench import generation

    calls = []
    _fakes(monkeypatch, calls)
    assert generation.model_bench_argv(generation.build_parser().parse_args(
        ["--model-name", "state-spaces/mamba-1.4b", "--upstream-path", "/up", "--cg"])) == [
        "--shape", "1.4b", "--upstream-path", "/up", "--no-decode", "--no-training", "--gen-batch", "1",
        "--gen-prompt", "100", "--gen-new", "100", "--repeats", "3", "--seed", "0"]
    result = generation.main(["--model-name", "tiny", "--promptlen", "8", "--genlen", "3", "--batch", "1", "4",
                              "--device", "cpu", "--dtype", "float32", "--upstream-path", str(_upstream(tmp_path)),
                              "--variants", "ours:NAME=ours", "--results-dir", str(tmp_path)])
    assert calls == [("ours", 1, ("gen",)), ("upstream", 1, ("gen",)), ("ours", 4, ("gen",)),
                     ("upstream", 4, ("gen",))]  # through this module: the one the script loads
    inp = result["inputs"]
    assert (inp["gen_prompt"], inp["gen_new"], inp["gen_batch"], inp["dtype"], inp["no_cg"]) == (8, 3, [1, 4], "fp32",
                                                                                                  True)
    assert (tmp_path / "model_tiny_h100.json").is_file()
    assert result["variants"]["ours"]["vs_baseline"]["decode"]["4"] == {"tokens_per_s_ratio": 1.5,
                                                                        "prefill_speedup": 1.25}
    for argv, needle in ((["--topk", "5"], "--topk: not with --upstream-path"),
                         (["--attn-every", "2"], "--attn-every: not with --upstream-path"),
                         (["--model-name", "some/dir"], "--model-name: with --upstream-path, expected a size")):
        with pytest.raises(SystemExit, match=needle):
            generation.main(["--model-name", "tiny", "--upstream-path", "/up"] + argv)
    with pytest.raises(SystemExit):  # without --upstream-path, an option of benchmark_model.py is an error
        generation.main(["--model-name", "tiny", "--budget-s", "5"])
    assert "unrecognized arguments: --budget-s 5" in capsys.readouterr().err


def test_a_tagged_run_keeps_its_own_file(tmp_path, monkeypatch):
    calls = []
    _fakes(monkeypatch, calls)
    (tmp_path / "model_tiny_h100.json").write_text("{}")  # a whole run's file: left as it is
    bm.main(TINY + ["--upstream-path", str(_upstream(tmp_path)), "--variants", "ours:NAME=ours", "--no-decode",
                    "--gen-batch", "16", "--no-training",
                    "--tag", "large-batches", "--results-dir", str(tmp_path)])
    assert calls == [("ours", 16, ("gen",)), ("upstream", 16, ("gen",))]
    assert (tmp_path / "model_tiny_h100.json").read_text() == "{}"
    saved = json.loads((tmp_path / "model_large-batches_tiny_h100.json").read_text())
    assert saved["inputs"]["tag"] == "large-batches" and saved["variants"]["ours"]["runs"]["decode"].keys() == {"16"}


@pytest.mark.slow
def test_a_tiny_run_through_child_processes(tmp_path, capsys):
    pytest.importorskip("peft")
    # ours and a fake upstream (this tree); generate(cg=False): no child compiles a step
    result = bm.main(TINY + ["--upstream-path", str(REPO), "--variants", "ours:MODEL_BENCH_PROBE=hello",
                             "--batch", "1", "--gen-batch", "1", "--prompt", "3", "--new-tokens", "3",
                             "--gen-prompt", "5", "--gen-new", "2", "--repeats", "1", "--no-cg",
                             "--modes", "full", "lora_plain", "--rank", "4", "--seqlen", "16", "--batch-size", "1",
                             "--steps", "1", "--warmup", "0", "--results-dir", str(tmp_path / "results"),
                             "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    path = tmp_path / "results" / "model_tiny_cpu.json"
    assert path.is_file() and (tmp_path / "out" / path.name).is_file()
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result)) and saved["git"].get("commit")
    ours, up = saved["variants"]["ours"]["runs"], saved["variants"]["upstream"]["runs"]
    for run in (ours["decode"]["1"], up["decode"]["1"], ours["training"]["full"], up["training"]["full"],
                ours["training"]["lora_plain"]):
        assert "error" not in run, run.get("traceback")
        assert Path(run["mamba_ssm_file"]) == REPO / "mamba_ssm"
    assert ours["decode"]["1"]["env"] == ours["training"]["full"]["env"] == {"MODEL_BENCH_PROBE": "hello"}
    d, g = ours["decode"]["1"]["decode"], ours["decode"]["1"]["generation"]
    assert d["prompt"] == 3 and d["new_tokens"] == 3 and isinstance(d["ms_per_token"], float)
    assert g["prompt"] == 5 and g["new_tokens"] == 2 and g["tokens_per_s"] > 0 and g["prefill_ms"] > 0
    full = ours["training"]["full"]
    assert full["tokens_per_s"] > 0 and full["peak_memory_gib"] > 0 and full["tokens_per_step"] == 16
    assert ours["training"]["lora_plain"]["lora_rank"] == 4 and "error" in up["training"]["lora_plain"]
    v = saved["variants"]["ours"]["vs_baseline"]
    assert v["decode"]["1"].keys() == {"decode_speedup", "tokens_per_s_ratio", "prefill_speedup"}
    assert v["training"].keys() == {"full"} and v["training"]["full"]["peak_memory_ratio"] > 0
    assert "decode tiny on cpu (baseline upstream)" in out and "training tiny, batch 1 x 16" in out
