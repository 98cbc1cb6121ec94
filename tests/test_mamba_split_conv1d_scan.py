"""mamba_split_conv1d_scan_combined (the Mamba-2 mixer after in_proj) against a float64 composition written
here: a per-step causal conv, the per-step SSD recurrence of test_ssd, the gated RMSNorm per group."""
import pytest
import torch
import torch.nn.functional as F

from mamba_ssm.ops.causal_conv1d import causal_conv1d_fn
from mamba_ssm.ops.triton.ssd_combined import mamba_split_conv1d_scan_combined
from test_ssd import recurrence64


def conv64(x, w, bias, seq_idx=None):
    """x (b, l, c), w (c, width): out_t = bias + sum_k w_k x_{t-width+1+k}, taps inside the same sequence."""
    b, l, c = x.shape
    width = w.shape[1]
    out = torch.zeros(b, l, c, dtype=torch.float64)
    for t in range(l):
        acc = bias.double().expand(b, c).clone()
        for k in range(width):
            s = t - (width - 1) + k
            if s < 0:
                continue
            keep = torch.ones(b, 1, dtype=torch.float64) if seq_idx is None else \
                (seq_idx[:, s] == seq_idx[:, t]).double()[:, None]
            acc = acc + w[:, k].double() * x[:, s].double() * keep
        out[:, t] = acc
    return out


def gated_rms64(y, w, z, eps, groups, norm_before_gate):
    silu = lambda t: t * torch.sigmoid(t)  # noqa: E731
    if not norm_before_gate:
        y = y * silu(z)
    b, l, d = y.shape
    yg = y.view(b, l, groups, d // groups)
    y = (yg / torch.sqrt((yg ** 2).mean(-1, keepdim=True) + eps)).view(b, l, d) * w.double()
    return y * silu(z) if norm_before_gate else y


def setup(ngroups=2, D_hdim=False, seed=0, b=2, l=23):
    g = torch.Generator().manual_seed(seed)
    h, p, n, width = 4, 3, 5, 4
    dim = h * p
    conv_dim = dim + 2 * ngroups * n
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(zxbcdt=r(b, l, 2 * dim + 2 * ngroups * n + h), conv1d_weight=r(conv_dim, width) * 0.5,
                conv1d_bias=r(conv_dim), dt_bias=r(h) * 0.3, A=-torch.rand(h, generator=g, dtype=torch.float64) - 0.2,
                D=r(h, p) if D_hdim else r(h)), (h, p, n, ngroups, dim)


def oracle(t, dims, rmsnorm_weight=None, outproj_weight=None, seq_idx=None, initial_states=None,
           norm_before_gate=True, dt_limit=(0.0, float("inf"))):
    h, p, n, ng, dim = dims
    zx = t["zxbcdt"]
    b, l, _ = zx.shape
    z, xBC, dt = torch.split(zx, [dim, dim + 2 * ng * n, h], dim=-1)
    xBC = F.silu(conv64(xBC, t["conv1d_weight"], t["conv1d_bias"], seq_idx))
    x, B, C = torch.split(xBC, [dim, ng * n, ng * n], dim=-1)
    y, final, _ = recurrence64(x.reshape(b, l, h, p), dt, t["A"], B.reshape(b, l, ng, n), C.reshape(b, l, ng, n),
                               D=t["D"], z=None if rmsnorm_weight is not None else z.reshape(b, l, h, p),
                               dt_bias=t["dt_bias"], initial_states=initial_states, seq_idx=seq_idx,
                               dt_softplus=True, dt_limit=dt_limit)
    y = y.reshape(b, l, dim)
    if rmsnorm_weight is not None:
        y = gated_rms64(y, rmsnorm_weight, z, 1e-5, ng, norm_before_gate)
    if outproj_weight is not None:
        y = y @ outproj_weight.double().T
    return y, final


@pytest.mark.parametrize("norm,ngroups,D_hdim,norm_before_gate", [
    (True, 2, False, False), (True, 1, True, True), (False, 2, False, True)])
def test_against_composition_with_gradients(norm, ngroups, D_hdim, norm_before_gate):
    t, dims = setup(ngroups, D_hdim)
    h, p, n, ng, dim = dims
    g = torch.Generator().manual_seed(3)
    extra = dict(rmsnorm_weight=torch.randn(dim, generator=g, dtype=torch.float64) if norm else None,
                 outproj_weight=torch.randn(7, dim, generator=g, dtype=torch.float64),
                 initial_states=torch.randn(2, h, p, n, generator=g, dtype=torch.float64),
                 seq_idx=torch.tensor([[0] * 10 + [1] * 13, [0] * 23]))
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    for k in ("rmsnorm_weight", "outproj_weight", "initial_states"):
        if extra[k] is not None:
            leaves[k] = extra[k].clone().requires_grad_(True)
    out, final = mamba_split_conv1d_scan_combined(
        chunk_size=8, seq_idx=extra["seq_idx"], return_final_states=True, rmsnorm_eps=1e-5,
        headdim=None if D_hdim else p, ngroups=ng, norm_before_gate=norm_before_gate, dt_limit=(0.01, 5.0), **leaves)
    ref_leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    ref, ref_final = oracle({k: ref_leaves[k] for k in t}, dims, ref_leaves.get("rmsnorm_weight"),
                            ref_leaves["outproj_weight"], extra["seq_idx"], ref_leaves["initial_states"],
                            norm_before_gate, dt_limit=(0.01, 5.0))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(final, ref_final)
    w = torch.randn(ref.shape, dtype=torch.float64)
    names = list(leaves)
    for name, a, r in zip(names, torch.autograd.grad((out * w).sum() + final.sum(), [leaves[k] for k in names]),
                          torch.autograd.grad((ref * w).sum() + ref_final.sum(), [ref_leaves[k] for k in names])):
        torch.testing.assert_close(a, r, msg=lambda m: f"grad {name}: {m}")


def test_conv_with_seq_idx_matches_oracle_and_checks_shape():
    torch.manual_seed(0)
    x, w, bias = torch.randn(2, 6, 11, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2], [5] * 11], dtype=torch.int32)
    out = causal_conv1d_fn(x, w, bias, seq_idx=seq_idx)
    torch.testing.assert_close(out.transpose(1, 2), conv64(x.transpose(1, 2), w, bias, seq_idx))
    with pytest.raises(ValueError, match=r"seq_idx must be \(batch, seqlen\) = \(2, 11\), got \(2, 5\)"):
        causal_conv1d_fn(x, w, bias, seq_idx=seq_idx[:, :5])


@pytest.mark.parametrize("kw,match", [
    (dict(headdim=None), r"headdim must be given when D is 1-D"),
    (dict(ngroups=3), r"zxbcdt's last dim .* is not 2\*dim \+ 2\*ngroups\*dstate \+ nheads"),
    (dict(activation="relu"), r"activation must be 'silu'"),
])
def test_bad_inputs(kw, match):
    t, dims = setup(2, False)
    args = dict(chunk_size=8, headdim=dims[1], ngroups=2, **t)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        mamba_split_conv1d_scan_combined(**args)
