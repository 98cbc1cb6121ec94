"""The LoRA throughput benchmark's same-process A/B (benchmarks/benchmark_finetune.py --ab-env), on CPU."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

pytest.importorskip("peft")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark_finetune.py"
_spec = importlib.util.spec_from_file_location("benchmark_finetune", _PATH)
bf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bf)


def test_parse_ab_env():
    assert bf.parse_ab_env("old:A=0,B=x=1") == ("old", {"A": "0", "B": "x=1"})
    for bad in ("old", "old:", ":A=1", "old:A", "default:A=1"):
        with pytest.raises(ValueError, match="ab-env"):
            bf.parse_ab_env(bad)


def test_environ_is_restored(monkeypatch):
    monkeypatch.setenv("MAMBAKIT_AB_SET", "before")
    monkeypatch.delenv("MAMBAKIT_AB_UNSET", raising=False)
    with bf._environ({"MAMBAKIT_AB_SET": "inside", "MAMBAKIT_AB_UNSET": "inside"}):
        assert os.environ["MAMBAKIT_AB_SET"] == "inside" and os.environ["MAMBAKIT_AB_UNSET"] == "inside"
    assert os.environ["MAMBAKIT_AB_SET"] == "before"
    assert "MAMBAKIT_AB_UNSET" not in os.environ
    with pytest.raises(RuntimeError):
        with bf._environ({"MAMBAKIT_AB_SET": "inside"}):
            raise RuntimeError("a failing step")
    assert os.environ["MAMBAKIT_AB_SET"] == "before"


def test_alternating_variants_on_cpu(monkeypatch):
    # each variant's steps run under its own environment, alternating with the default's
    seen = []
    import mambakit.finetune.trainer as ft

    real_loss = ft.response_loss

    def spy(out, labels):
        seen.append(os.environ.get("MAMBAKIT_AB_PROBE"))
        return real_loss(out, labels)

    monkeypatch.setattr(ft, "response_loss", spy)
    monkeypatch.delenv("MAMBAKIT_AB_PROBE", raising=False)
    res = bf.measure("tiny", batch_size=1, seqlen=32, rank=4, precision="fp32", base_dtype="fp32", steps=2,
                     warmup=1, device="cpu", ab=("probe", {"MAMBAKIT_AB_PROBE": "1"}))
    assert set(res["ab"]) == {"default", "probe"}
    for f in res["ab"].values():
        assert len(f["step_times_s"]) == 2 and len(f["fwdbwd_times_s"]) == 2 and f["train_step_tok_per_s"] > 0
        assert f["train_step_tok_per_s_best"] >= f["train_step_tok_per_s"]
    assert res["train_step_tok_per_s"] == res["ab"]["default"]["train_step_tok_per_s"]
    # warmup (default, probe), 2 rounds of steps, 2 rounds of forward+backward: always alternating
    assert seen == [None, "1"] * 5
    assert "MAMBAKIT_AB_PROBE" not in os.environ
