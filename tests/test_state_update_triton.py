"""The Triton decoding step against its PyTorch reference: on a GPU, and on the CPU through
Triton's interpreter when Triton is installed (TRITON_INTERPRET=1)."""
import importlib.util

import pytest
import torch

from mamba_ssm.ops.triton.selective_state_update import selective_state_update_ref, selective_state_update_triton

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
