"""The Triton decoding step against its PyTorch reference: on a GPU, and on the CPU through
Triton's interpreter when Triton is installed (TRITON_INTERPRET=1)."""
import importlib.util

import pytest
import torch

from mamba_ssm.ops.triton.selective_state_update import (selective_state_update, selective_state_update_heads_triton,
                                                         selective_state_update_ref, selective_state_update_triton)

CASES = [(2, 64, 16, None, torch.float32), (3, 40, 5, 2, torch.float32), (2, 32, 256, 1, torch.bfloat16),
         (1, 100, 1, None, torch.float16)]


def _run(device, b, d, n, groups, dtype):
    g = torch.Generator().manual_seed(b * 1000 + d + n)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state = r(b, d, n).to(device)
    x, dt, z = (r(b, d).to(device, dtype) for _ in range(3))
    A = (-torch.rand(d, n, generator=g)).to(device)
    Bshape = (b, n) if groups is None else (b, groups, n)
    B, C = r(*Bshape).to(device, dtype), r(*Bshape).to(device, dtype)
    D, bias = r(d).to(device), r(d).to(device)
    s_ref, s_tri = state.clone(), state.clone()
    ref = selective_state_update_ref(s_ref, x, dt, A, B, C, D, z, bias, True)
    out = selective_state_update_triton(s_tri, x, dt, A, B, C, D, z, bias, True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(s_tri, s_ref, rtol=tol, atol=tol)
    scale = ref.float().abs().max().item() + 1
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * scale)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test covers it")
def test_triton_state_update_with_b_and_c_in_different_groups(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    state, x, dt, z = r(2, 12, 4), r(2, 12), r(2, 12), r(2, 12)
    A, B, C, D, bias = -torch.rand(12, 4, generator=g), r(2, 2, 4), r(2, 3, 4), r(12), r(12)
    s_ref, s_tri = state.clone(), state.clone()
    ref = selective_state_update_ref(s_ref, x, dt, A, B, C, D, z, bias, True)
    out = selective_state_update_triton(s_tri, x, dt, A, B, C, D, z, bias, True)
    torch.testing.assert_close(s_tri, s_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# (batch, nheads, headdim, dstate, ngroups, dtype, per_head): per_head passes dt, A, D and dt_bias as
# expanded views of per-head values (stride 0), as upstream's Mamba2.step does
HEAD_CASES = [(2, 4, 8, 16, 2, torch.float32, True), (1, 6, 5, 7, 3, torch.float32, False),
              (3, 2, 64, 128, 1, torch.bfloat16, True), (2, 4, 16, 4, 4, torch.float16, False)]


def _run_heads(device, b, h, p, n, g, dtype, per_head):
    gen = torch.Generator().manual_seed(b * 100 + h * 10 + p + n)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    state = r(b, h, p, n).to(device)
    x, z = r(b, h, p).to(device, dtype), r(b, h, p).to(device, dtype)
    if per_head:
        dt = r(b, h).to(device, dtype)[:, :, None].expand(b, h, p)
        A = (-torch.rand(h, generator=gen)).to(device)[:, None, None].expand(h, p, n)
        D, bias = (r(h).to(device)[:, None].expand(h, p) for _ in range(2))
    else:
        dt = r(b, h, p).to(device, dtype)
        A = (-torch.rand(h, p, n, generator=gen)).to(device)
        D, bias = r(h, p).to(device), r(h, p).to(device)
    B, C = r(b, g, n).to(device, dtype), r(b, g, n).to(device, dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for zz in (z, None):
        s_ref, s_tri = state.clone(), state.clone()
        ref = selective_state_update_ref(s_ref, x, dt, A, B, C, D, zz, bias, True)
        out = selective_state_update_heads_triton(s_tri, x, dt, A, B, C, D, zz, bias, True)
        torch.testing.assert_close(s_tri, s_ref, rtol=tol, atol=tol)
        scale = ref.float().abs().max().item() + 1
        torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol * scale)
        # float64 oracle of the state: h' = h exp(dt A) + dt x B
        dt64 = torch.nn.functional.softplus(dt.double() + bias.double())
        Bh = B.double().repeat_interleave(h // g, dim=1)[:, :, None, :]
        h64 = state.double() * torch.exp(dt64[..., None] * A.double()) + (dt64 * x.double())[..., None] * Bh
        torch.testing.assert_close(s_tri.double(), h64, rtol=tol, atol=tol * (h64.abs().max().item() + 1))


@pytest.mark.cuda
@pytest.mark.parametrize("case", HEAD_CASES)
def test_triton_heads_state_update_on_gpu(case):
    pytest.importorskip("triton")
    _run_heads("cuda", *case)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test covers it")
def test_triton_heads_state_update_in_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for case in HEAD_CASES[:2]:
        _run_heads("cpu", *case)


def test_heads_arguments_are_checked_by_name():
    st, x = torch.zeros(2, 4, 8, 16), torch.zeros(2, 4, 8)
    A, B = torch.zeros(4, 8, 16), torch.zeros(2, 2, 16)
    from mamba_ssm.ops.triton.selective_state_update import _check_heads
    with pytest.raises(ValueError, match=r"dt must be \(batch, nheads, headdim\) = \(2, 4, 8\), got \(2, 4\)"):
        _check_heads(st, x, torch.zeros(2, 4), A, B, B, None, None, None)
    with pytest.raises(ValueError, match=r"B must be \(batch, ngroups, dstate\) with ngroups dividing nheads = 4"):
        _check_heads(st, x, x, A, torch.zeros(2, 3, 16), B, None, None, None)
    with pytest.raises(ValueError, match=r"A must be \(nheads, headdim, dstate\) = \(4, 8, 16\)"):
        _check_heads(st, x, x, torch.zeros(4, 16), B, B, None, None, None)
    assert selective_state_update(st, x, x, A, B, B).shape == (2, 4, 8)  # the CPU: the reference


@pytest.mark.cuda
@pytest.mark.parametrize("b,d,n,groups,dtype", CASES)
def test_triton_state_update_on_gpu(b, d, n, groups, dtype):
    pytest.importorskip("triton")
    _run("cuda", b, d, n, groups, dtype)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test covers it")
def test_triton_state_update_in_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for case in CASES[:2]:
        _run("cpu", *case)
