"""The gated RMSNorm / LayerNorm of Mamba-2 against the formula written per group here."""
import pytest
import torch

from mamba_ssm.ops.triton.layernorm_gated import LayerNorm, RMSNorm, layernorm_fn, rms_norm_ref, rmsnorm_fn


def oracle(x, w, b, z, eps, group_size, norm_before_gate, rms):
    x, w, z = x.double(), w.double(), None if z is None else z.double()
    silu = lambda t: t * torch.sigmoid(t)  # noqa: E731
    if z is not None and not norm_before_gate:
        x = x * silu(z)
    d = x.shape[-1]
    gs = group_size or d
    outs = []
    for i in range(0, d, gs):
        part = x[..., i:i + gs]
        if not rms:
            part = part - part.mean(-1, keepdim=True)
        outs.append(part / torch.sqrt((part ** 2).mean(-1, keepdim=True) + eps))
    out = torch.cat(outs, -1) * w
    if b is not None:
        out = out + b.double()
    if z is not None and norm_before_gate:
        out = out * silu(z)
    return out


@pytest.mark.parametrize("group_size", [None, 4, 6])
@pytest.mark.parametrize("norm_before_gate", [True, False])
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("rms", [True, False])
def test_against_oracle_with_gradients(group_size, norm_before_gate, gated, rms):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    z = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True) if gated else None
    w = torch.randn(12, dtype=torch.float64, requires_grad=True)
    b = None if rms else torch.randn(12, dtype=torch.float64, requires_grad=True)
    fn = rmsnorm_fn if rms else (lambda *a, **k: layernorm_fn(*a, **k))
    out = fn(x, w, b, z=z, eps=1e-5, group_size=group_size, norm_before_gate=norm_before_gate)
    ref = oracle(x, w, b, z, 1e-5, group_size, norm_before_gate, rms)
    torch.testing.assert_close(out, ref)
    leaves = [t for t in (x, z, w, b) if t is not None]
    gw = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad((out * gw).sum(), leaves), torch.autograd.grad((ref * gw).sum(), leaves)):
        torch.testing.assert_close(a, r)


def test_modules_and_low_precision():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5, group_size=4, norm_before_gate=False)
    assert norm.bias is None and norm.weight.shape == (8,)
    x, z = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(3, 8, dtype=torch.bfloat16)
    out = norm(x, z)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), oracle(x, norm.weight, None, z, 1e-5, 4, False, True), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(rms_norm_ref(x, norm.weight, None, z=z, eps=1e-5, group_size=4, norm_before_gate=False),
                               out)
    ln = LayerNorm(8, group_size=8)
    torch.testing.assert_close(ln(x.float()).double(), oracle(x.float(), ln.weight, ln.bias, None, 1e-5, 8, True, False))


@pytest.mark.parametrize("kw,match", [
    (dict(weight=torch.ones(7)), r"weight must be \(hidden,\) = \(8,\)"),
    (dict(z=torch.ones(2, 7)), r"z must have x's shape \(2, 8\)"),
    (dict(group_size=3), r"group_size must divide the hidden size 8, got 3"),
])
def test_bad_inputs(kw, match):
    args = dict(x=torch.ones(2, 8), weight=torch.ones(8), bias=None)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        rmsnorm_fn(**args)
