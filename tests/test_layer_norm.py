import pytest
import torch

from mamba_ssm.ops.triton.layer_norm import RMSNorm, layer_norm_fn, layer_norm_ref, rms_norm_fn, rms_norm_ref
from mamba_ssm.ops.triton.selective_state_update import selective_state_update, selective_state_update_ref
from mamba_ssm.ops.selective_scan_interface import selective_scan_ref


@pytest.mark.parametrize("is_rms", [True, False])
@pytest.mark.parametrize("residual_in_fp32", [True, False])
def test_prenorm_residual_semantics(is_rms, residual_in_fp32):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    res = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    w = torch.rand(16) + 0.5
    b = None if is_rms else torch.randn(16)
    out, new_res = layer_norm_fn(x, w, b, residual=res, prenorm=True, residual_in_fp32=residual_in_fp32,
                                 eps=1e-5, is_rms_norm=is_rms)
    total = x.float() + res.float()
    assert new_res.dtype == (torch.float32 if residual_in_fp32 else torch.bfloat16)
    torch.testing.assert_close(new_res.float(), total, rtol=1e-2, atol=1e-2)
    ref = (rms_norm_ref if is_rms else layer_norm_ref)(total, w, b, eps=1e-5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    assert torch.is_tensor(layer_norm_fn(x, w, b, is_rms_norm=is_rms))


def test_rmsnorm_module_and_fn_agree():
    x = torch.randn(3, 8)
    norm = RMSNorm(8)
    torch.testing.assert_close(norm(x), rms_norm_fn(x, norm.weight, None, eps=norm.eps))
    torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))


@pytest.mark.parametrize("groups", [None, 2])
def test_state_update_is_one_step_of_the_scan(groups):
    torch.manual_seed(1)
    b, d, n = 2, 8, 4
    A = -torch.rand(d, n) - 0.5
    u, dt, z = torch.randn(b, d, 3), torch.randn(b, d, 3), torch.randn(b, d, 3)
    shape = (b, n, 3) if groups is None else (b, groups, n, 3)
    B, C = torch.randn(*shape), torch.randn(*shape)
    D, bias = torch.randn(d), torch.randn(d)
    out, last = selective_scan_ref(u, dt, A, B, C, D, z, bias, delta_softplus=True, return_last_state=True)
    _, state = selective_scan_ref(u[..., :2], dt[..., :2], A, B[..., :2], C[..., :2], D, z[..., :2], bias,
                                  delta_softplus=True, return_last_state=True)
    y = selective_state_update(state, u[..., 2], dt[..., 2], A, B[..., 2], C[..., 2], D, z[..., 2], bias, True)
    torch.testing.assert_close(y, out[..., 2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, last, rtol=1e-5, atol=1e-5)


def test_state_update_errors_name_the_argument():
    state = torch.zeros(2, 8, 4)
    with pytest.raises(ValueError, match="x must be"):
        selective_state_update_ref(state, torch.randn(2, 7), torch.randn(2, 8), torch.randn(8, 4),
                                   torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="B must be"):
        selective_state_update_ref(state, torch.randn(2, 8), torch.randn(2, 8), torch.randn(8, 4),
                                   torch.randn(2, 5), torch.randn(2, 4))


# The Triton add + norm (`_AddNormTriton`) against the PyTorch path: on a GPU, and on the CPU
# through Triton's interpreter when Triton is installed.
_NORM_CASES = [  # (rows, n, is_rms, with_residual, residual_in_fp32, x dtype)
    (6, 64, True, True, True, torch.bfloat16), (5, 48, False, True, True, torch.bfloat16),
    (7, 40, True, False, True, torch.bfloat16), (4, 32, True, True, False, torch.bfloat16),
    (3, 100, False, True, False, torch.float32), (9, 16, True, True, True, torch.float32)]


def _check_add_norm(device, rows, n, is_rms, with_residual, residual_in_fp32, dtype, prenorm=True,
                    weight_grad=True, residual_grad=True):
    from mamba_ssm.ops.triton import layer_norm as ln

    g = torch.Generator().manual_seed(rows * 100 + n)
    x = torch.randn(2, rows, n, generator=g).to(device, dtype).requires_grad_()
    res = (torch.randn(2, rows, n, generator=g) * 3).to(device, torch.float32 if residual_in_fp32 else dtype)
    res = res.requires_grad_(residual_grad) if with_residual else None
    w = (torch.rand(n, generator=g) + 0.5).to(device).requires_grad_(weight_grad)
    b = None if is_rms else torch.randn(n, generator=g).to(device).requires_grad_(weight_grad)
    fp32_res = residual_in_fp32 or (res is not None and res.dtype != x.dtype)
    y, new_res = ln._AddNormTriton.apply(x, res, w, b, 1e-5, is_rms, torch.float32 if fp32_res else dtype, dtype)
    from mamba_ssm.backend import use_backend

    with use_backend("torch"):
        y_ref, res_ref = layer_norm_fn(x, w, b, residual=res, prenorm=True, residual_in_fp32=residual_in_fp32,
                                       eps=1e-5, is_rms_norm=is_rms)
    assert y.dtype == y_ref.dtype and new_res.dtype == res_ref.dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(new_res, res_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=tol, atol=tol)
    dy = torch.randn(y.shape, generator=g).to(device, dtype)
    dr = torch.randn(new_res.shape, generator=g).to(device, new_res.dtype)
    outs, outs_ref = ((y, new_res), (y_ref, res_ref)) if prenorm else ((y,), (y_ref,))
    grads_in = (dy, dr) if prenorm else (dy,)
    leaves = [t for t in (x, res, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(outs, leaves, grads_in)
    grads_ref = torch.autograd.grad(outs_ref, leaves, grads_in)
    for a, r in zip(grads, grads_ref):
        assert a.dtype == r.dtype
        scale = r.float().abs().max().item() + 1
        torch.testing.assert_close(a.float(), r.float(), rtol=tol, atol=tol * scale)


@pytest.mark.cuda
@pytest.mark.parametrize("case", _NORM_CASES)
@pytest.mark.parametrize("prenorm", [True, False])
def test_triton_add_norm_on_gpu(case, prenorm):
    pytest.importorskip("triton")
    _check_add_norm("cuda", *case, prenorm=prenorm, weight_grad=prenorm, residual_grad=prenorm)


@pytest.mark.cuda
def test_triton_add_norm_is_chosen_and_wide_rows():
    """layer_norm_fn on CUDA takes the Triton path (a Block's add + norm), at a real width too."""
    pytest.importorskip("triton")
    x = torch.randn(2, 33, 2560, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    res = torch.randn(2, 33, 2560, device="cuda", requires_grad=True)
    w = torch.rand(2560, device="cuda") + 0.5
    y, new_res = layer_norm_fn(x, w, None, residual=res, prenorm=True, residual_in_fp32=True, eps=1e-5, is_rms_norm=True)
    assert "AddNormTriton" in type(y.grad_fn).__name__
    ref = rms_norm_ref(x.float() + res, w, None, eps=1e-5)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(__import__("importlib").util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test covers it")
@pytest.mark.parametrize("prenorm", [True, False])
def test_triton_add_norm_in_interpreter(monkeypatch, prenorm):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for case in _NORM_CASES:
        _check_add_norm("cpu", *case, prenorm=prenorm, weight_grad=prenorm, residual_grad=prenorm)
