"""Recomputation in the backward (mamba_ssm/ops/recompute.py): the mixer saves less for the
backward and every gradient stays the same, on the fused path, with LoRA adapters (dropout's
random mask replayed) and with packed sequences."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.ops import recompute


def _run(module, h, enabled, monkeypatch, seed=0, **kw):
    """(bytes of the tensors autograd saved during the forward, the output, gradients of h and every
    trainable parameter)."""
    monkeypatch.setattr(recompute, "ENABLED", enabled)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(seed)
    h = h.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(h, **kw)
    (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    grads["hidden_states"] = h.grad
    module.zero_grad(set_to_none=True)
    return sum(storages.values()), out.detach(), grads


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("falcon", [False, True])
def test_fused_path_saves_less_same_gradients(monkeypatch, falcon):
    torch.manual_seed(0)
    m = Mamba(32, d_state=8, b_c_dt_rms_eps=1e-6 if falcon else None)
    h = torch.randn(2, 40, 32)
    assert m.projections_are_plain()
    saved0, out0, g0 = _run(m, h, False, monkeypatch)
    saved, out, g = _run(m, h, True, monkeypatch)
    torch.testing.assert_close(out, out0, rtol=0, atol=0)
    _same(g, g0)
    assert saved < 0.6 * saved0, (saved, saved0)


@pytest.mark.parametrize("channel_first", [True, False])
def test_adapters_with_dropout_same_gradients(monkeypatch, channel_first):
    """PEFT's LoRA described to the channel-first path (mambakit's resolver) and run as modules."""
    peft = pytest.importorskip("peft")
    from mamba_ssm.ops import adapters
    from mambakit import peft_lora

    monkeypatch.setattr(adapters, "_RESOLVERS", [peft_lora.describe_peft_lora] if channel_first else [])
    torch.manual_seed(0)
    m = peft.get_peft_model(torch.nn.Sequential(Mamba(32, d_state=8)), peft.LoraConfig(
        r=4, lora_dropout=0.3, target_modules=["in_proj", "x_proj", "dt_proj", "out_proj"], init_lora_weights=False))
    m.train()
    mixer = m.get_base_model()[0]
    assert not mixer.projections_are_plain()
    h = torch.randn(2, 24, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        saved0, out0, g0 = _run(mixer, h, False, monkeypatch, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the as-module notice
        saved, out, g = _run(mixer, h, True, monkeypatch, seed=5)
    assert any("lora_A" in k for k in g)
    torch.testing.assert_close(out, out0, rtol=0, atol=0)
    _same(g, g0)
    assert saved < 0.8 * saved0, (saved, saved0)


def test_packed_same_gradients(monkeypatch):
    torch.manual_seed(0)
    m = Mamba(32, d_state=8)
    h = torch.randn(1, 30, 32)
    seq_idx = torch.tensor([[0] * 7 + [1] * 15 + [2] * 8], dtype=torch.int32)
    _, out0, g0 = _run(m, h, False, monkeypatch, seq_idx=seq_idx)
    _, out, g = _run(m, h, True, monkeypatch, seq_idx=seq_idx)
    torch.testing.assert_close(out, out0, rtol=0, atol=0)
    _same(g, g0)


def test_no_grad_or_disabled_runs_plainly(monkeypatch):
    """Without autograd recording (or when turned off) fn runs as itself, never through checkpoint."""
    def no_checkpoint(*a, **k):
        raise AssertionError("checkpoint used")

    monkeypatch.setattr(recompute, "checkpoint", no_checkpoint)
    monkeypatch.setattr(recompute, "ENABLED", True)
    with torch.no_grad():
        assert recompute.recompute_in_backward(torch.neg, torch.ones(2)).tolist() == [-1.0, -1.0]
    monkeypatch.setattr(recompute, "ENABLED", False)
    assert recompute.recompute_in_backward(torch.neg, torch.ones(2, requires_grad=True)).requires_grad
    monkeypatch.setattr(recompute, "ENABLED", True)
    with pytest.raises(AssertionError, match="checkpoint used"):
        recompute.recompute_in_backward(torch.neg, torch.ones(2, requires_grad=True))


def test_bad_setting_named():
    code = "import mamba_ssm.ops.recompute"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"MAMBA_SSM_RECOMPUTE": "scan", "PATH": ""}, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
    assert r.returncode != 0 and "MAMBA_SSM_RECOMPUTE='scan': expected one of 1" in r.stderr
