"""The benchmark scripts' default result files: one stable name per benchmark and configuration."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_path_has_no_date():
    import mambakit.bench.results as rn

    assert rn.results_path("selective_scan", rn.gpu_tag("NVIDIA H100 80GB HBM3")) == \
        BENCH / "results" / "selective_scan_h100.json"
    assert rn.results_path("finetune_lora", "1.4b", "h200").name == "finetune_lora_1.4b_h200.json"
    assert rn.results_path("cpu_scan", results_dir="/x").as_posix() == "/x/cpu_scan.json"
    assert rn.card_tag("cpu") == "cpu"


def test_generation_benchmark_default_name():
    pytest.importorskip("matplotlib")
    from mambakit.bench.generation import default_stem

    class Cfg:
        model_name = "mambakit/assets/tiny-mamba-arith/"

    res = {"models": {"mamba": {"size": None}}, "machine": {}, "inputs": {"device": "cpu"}}
    assert default_stem(Cfg, res) == "generation_tiny-mamba-arith_cpu"
    res = {"models": {"mamba": {"size": "1.4b"}}, "machine": {"gpu": "NVIDIA H200"}, "inputs": {"device": "cuda"}}
    assert default_stem(Cfg, res) == "generation_1.4b_h200"


@pytest.mark.parametrize("script", sorted(p.stem for p in BENCH.glob("benchmark_*.py")))
def test_no_dated_default_names(script):
    """No benchmark script stamps its default file name with a date or time."""
    for line in (BENCH / f"{script}.py").read_text().splitlines():
        if ".json" in line and not line.lstrip().startswith("#"):
            for stamp in ("%Y", "{date", "{now", "stamp}", "strftime"):
                assert stamp not in line, (script, line)
