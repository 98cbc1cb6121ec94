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
