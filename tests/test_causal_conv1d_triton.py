"""The Triton causal conv (mamba_ssm/ops/triton/causal_conv1d.py) against the PyTorch
path: output and the gradients of x, weight and bias; on a GPU, and on the CPU through Triton's
interpreter when Triton is installed."""
import importlib.util

import pytest
import torch

from mamba_ssm.ops.causal_conv1d import causal_conv1d_fn

# (batch, dim, seqlen, width, bias, activation): lengths across and inside one time block (128),
# channel counts that do not fill a block of 16, widths 2 to 4
CASES = [(2, 20, 200, 4, True, "silu"), (1, 16, 3, 4, False, None), (3, 5, 130, 2, True, None),
         (2, 33, 129, 3, False, "silu")]


def _check(device, b, d, L, w, with_bias, act, dtype=torch.float32):
    from mamba_ssm.ops.triton.causal_conv1d import causal_conv1d_triton

    g = torch.Generator().manual_seed(b * 100 + d + L)
    # x as the mixer passes it: the first half of a (batch, 2*dim, seqlen) tensor
    xz = torch.randn(b, 2 * d, L, generator=g).to(device, dtype)
    weight = torch.randn(d, w, generator=g).to(device, dtype)
    bias = torch.randn(d, generator=g).to(device, dtype) if with_bias else None
    leaves = [t for t in (xz, weight, bias) if t is not None]
    for t in leaves:
        t.requires_grad_()
    out = causal_conv1d_triton(xz[:, :d], weight, bias, act)
    ref = causal_conv1d_fn(xz[:, :d].float(), weight.float(), None if bias is None else bias.float(), act)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    gout = torch.randn(out.shape, generator=g).to(device, dtype)
    grads = torch.autograd.grad(out, leaves, gout)
    grads_ref = torch.autograd.grad(ref, leaves, gout.float())
    for name, a, r in zip(("x", "weight", "bias"), grads, grads_ref):
        r = r.float()  # the leaves' dtype: bf16 grads for bf16 leaves
        scale = r.abs().max().item() + 1
        torch.testing.assert_close(a.float(), r, rtol=tol, atol=tol * scale, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_triton_conv_on_gpu(case, dtype):
    pytest.importorskip("triton")
    _check("cuda", *case, dtype=dtype)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test covers it")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_conv_in_interpreter(monkeypatch, dtype):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for case in CASES:
        _check("cpu", *case, dtype=dtype)


def test_turned_off_and_float64(monkeypatch):
    """MAMBA_SSM_TRITON_CONV=0 keeps the PyTorch conv; float64 never goes to the float32 kernel.
    Triton on a GPU is pretended, so this also checks the choice where one is present."""
    import mamba_ssm.ops.triton as triton_pkg
    from mamba_ssm import backend
    from mamba_ssm.ops import causal_conv1d as cc
    from mamba_ssm.ops.triton import causal_conv1d as tc

    monkeypatch.setattr(triton_pkg, "triton_on_cuda", lambda: True)
    monkeypatch.setattr(backend, "available_backends", lambda op: ["triton", "torch"])
    monkeypatch.setattr(backend, "_ENV_CHOICE", "auto")
    monkeypatch.setattr(tc, "ENABLED", True)
    fp32, fp64 = torch.zeros(1, dtype=torch.float32), torch.zeros(1, dtype=torch.float64)
    assert tc.is_available() and cc._triton_conv_chosen(fp32)
    assert not cc._triton_conv_chosen(fp64)
    monkeypatch.setattr(tc, "ENABLED", False)  # what MAMBA_SSM_TRITON_CONV=0 sets at import
    assert not tc.is_available() and not cc._triton_conv_chosen(fp32)
    assert tc.parse_setting("0") is tc.parse_setting("off") is False
    assert tc.parse_setting(None) is tc.parse_setting("1") is True
    with pytest.raises(ValueError, match="MAMBA_SSM_TRITON_CONV='2': expected one of 1"):
        tc.parse_setting("2")


@pytest.mark.cuda
def test_mixer_with_triton_conv_matches_pytorch_conv(monkeypatch):
    """The Triton conv (the default on CUDA) in a whole Mamba mixer under bf16 autocast against
    MAMBA_SSM_TRITON_CONV=0: same output and gradients."""
    pytest.importorskip("triton")
    from mamba_ssm.modules.mamba_simple import Mamba

    torch.manual_seed(0)
    m = Mamba(d_model=64, layer_idx=0, device="cuda")
    x = torch.randn(2, 300, 64, device="cuda")

    def run():
        m.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        return y.float(), {n: p.grad.clone() for n, p in m.named_parameters()}

    from mamba_ssm.ops import causal_conv1d as cc
    from mamba_ssm.ops.triton import causal_conv1d as tc

    monkeypatch.setattr(tc, "ENABLED", False)
    y0, g0 = run()
    monkeypatch.setattr(tc, "ENABLED", True)
    assert cc._triton_conv_chosen(x)
    y1, g1 = run()
    torch.testing.assert_close(y1, y0, rtol=2e-2, atol=2e-2)
    for n in g0:
        scale = g0[n].abs().max().item() + 1e-6
        torch.testing.assert_close(g1[n], g0[n], rtol=5e-2, atol=5e-2 * scale, msg=lambda s, n=n: f"{n}: {s}")
