"""mamba_inner_fn against mamba_inner_ref and against the block written out here step by step."""
import pytest
import torch
import torch.nn.functional as F

from mamba_ssm.backend import use_backend
from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, mamba_inner_ref

PARAMS = ("xz", "conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight", "out_proj_weight",
          "out_proj_bias", "A", "B", "C", "D", "delta_bias", "B_proj_bias", "C_proj_bias")


def make_params(batch=2, d_model=4, expand=2, dstate=4, dt_rank=2, width=4, seqlen=13, conv_3d=True,
                out_bias=True, given_BC=False, proj_bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    dim = expand * d_model
    p = {
        "xz": r(batch, 2 * dim, seqlen),
        "conv1d_weight": 0.5 * (r(dim, 1, width) if conv_3d else r(dim, width)),
        "conv1d_bias": 0.1 * r(dim),
        "x_proj_weight": 0.3 * r(dt_rank + 2 * dstate, dim),
        "delta_proj_weight": 0.5 * r(dim, dt_rank),
        "out_proj_weight": 0.3 * r(d_model, dim),
        "out_proj_bias": 0.1 * r(d_model) if out_bias else None,
        "A": -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1) * (0.5 + torch.rand(dim, 1, generator=g)),
        "B": r(batch, dstate, seqlen) if given_BC else None,
        "C": r(batch, dstate, seqlen) if given_BC else None,
        "D": torch.ones(dim) + 0.1 * r(dim),
        "delta_bias": torch.log(torch.expm1(0.001 + 0.1 * torch.rand(dim, generator=g))),
        "B_proj_bias": 0.1 * r(dstate) if proj_bias else None,
        "C_proj_bias": 0.1 * r(dstate) if proj_bias else None,
    }
    return {k: (v.requires_grad_() if v is not None else None) for k, v in p.items()}


def composed64(p, delta_softplus=True):
    """conv1d + SiLU, x_proj, dt_proj, the S6 recurrence gated by z, out_proj; float64, written out."""
    q = {k: (v.double() if v is not None else None) for k, v in p.items()}
    xz = q["xz"]
    batch, two_dim, seqlen = xz.shape
    dim = two_dim // 2
    x, z = xz[:, :dim], xz[:, dim:]
    w = q["conv1d_weight"].reshape(dim, -1)
    width = w.shape[1]
    xpad = F.pad(x, (width - 1, 0))
    conv = sum(w[None, :, k, None] * xpad[:, :, k:k + seqlen] for k in range(width)) + q["conv1d_bias"][None, :, None]
    x = conv * torch.sigmoid(conv)
    dt_rank = q["delta_proj_weight"].shape[1]
    dstate = q["A"].shape[1]
    x_dbl = torch.einsum("bdl,rd->blr", x, q["x_proj_weight"])
    delta = torch.einsum("blr,dr->bdl", x_dbl[..., :dt_rank], q["delta_proj_weight"]) + q["delta_bias"][None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B = q["B"] if q["B"] is not None else (x_dbl[..., dt_rank:dt_rank + dstate] + (
        q["B_proj_bias"] if q["B_proj_bias"] is not None else 0)).transpose(1, 2)
    C = q["C"] if q["C"] is not None else (x_dbl[..., -dstate:] + (
        q["C_proj_bias"] if q["C_proj_bias"] is not None else 0)).transpose(1, 2)
    h = torch.zeros(batch, dim, dstate, dtype=torch.float64)
    ys = []
    for t in range(seqlen):
        h = torch.exp(delta[:, :, t, None] * q["A"]) * h + (delta[:, :, t] * x[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = (torch.stack(ys, -1) + q["D"][:, None] * x) * (z * torch.sigmoid(z))
    out = torch.einsum("bdl,md->blm", y, q["out_proj_weight"])
    if q["out_proj_bias"] is not None:
        out = out + q["out_proj_bias"]
    return out


def grads(out, p, w):
    used = [k for k in PARAMS if p[k] is not None]
    gs = torch.autograd.grad((out.double() * w).sum(), [p[k] for k in used])
    return dict(zip(used, gs))


def close(a, e, tol, what):
    a, e = a.double(), e.double()
    scale = max(1.0, e.abs().max().item())
    err = (a - e).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3e}"


CONFIGS = [
    dict(),
    dict(conv_3d=False, out_bias=False, seqlen=1),
    dict(given_BC=True, seqlen=40, dstate=8),
    dict(proj_bias=True, width=2, seqlen=70, dt_rank=3),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["default", "2d-conv-weight-seqlen1", "given-B-C", "proj-biases"])
@pytest.mark.parametrize("checkpoint_lvl", [0, 1])
def test_mamba_inner_fn_matches_ref_and_composition(cfg, checkpoint_lvl):
    p = make_params(**cfg)
    args = [p[k] for k in PARAMS]
    with use_backend("torch"):
        out = mamba_inner_fn(*args, delta_softplus=True, checkpoint_lvl=checkpoint_lvl)
    ref = mamba_inner_ref(*args, delta_softplus=True, checkpoint_lvl=checkpoint_lvl)
    exp64 = composed64(p)
    assert out.shape == (p["xz"].shape[0], p["xz"].shape[2], p["out_proj_weight"].shape[0])
    assert out.dtype == p["xz"].dtype
    close(out, exp64, 2e-5, "out vs composition")
    close(ref, exp64, 2e-5, "ref vs composition")
    w = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g_fn, g_ref, g64 = grads(out, p, w), grads(ref, p, w), grads(exp64, p, w)
    for k in g64:
        assert g_fn[k].shape == p[k].shape and g_fn[k].dtype == p[k].dtype, k
        close(g_fn[k], g64[k], 5e-5, f"grad {k} (fn vs composition)")
        close(g_fn[k], g_ref[k], 5e-5, f"grad {k} (fn vs ref)")


def test_without_softplus():
    p = make_params(seed=3)
    with torch.no_grad():  # keep delta positive without softplus so that the state decays
        p["delta_proj_weight"].mul_(0.01)
        p["delta_bias"].copy_(0.2 + 0.1 * torch.rand(p["delta_bias"].shape))
    args = [p[k] for k in PARAMS]
    with use_backend("torch"):
        out = mamba_inner_fn(*args, delta_softplus=False)
    close(out, composed64(p, delta_softplus=False), 2e-5, "out")
    close(mamba_inner_ref(*args, delta_softplus=False), composed64(p, delta_softplus=False), 2e-5, "ref")


BAD = [
    ("xz", lambda p: p.update(xz=p["xz"][:, :-1])),
    ("conv1d_weight", lambda p: p.update(conv1d_weight=p["conv1d_weight"][:-1])),
    ("conv1d_bias", lambda p: p.update(conv1d_bias=torch.zeros(3))),
    ("x_proj_weight", lambda p: p.update(x_proj_weight=p["x_proj_weight"][:-1])),
    ("delta_proj_weight", lambda p: p.update(delta_proj_weight=p["delta_proj_weight"][:-1])),
    ("out_proj_weight", lambda p: p.update(out_proj_weight=p["out_proj_weight"][:, :-1])),
    ("out_proj_bias", lambda p: p.update(out_proj_bias=torch.zeros(7))),
    ("A", lambda p: p.update(A=p["A"][:-1])),
    ("complex A", lambda p: p.update(A=torch.complex(p["A"], p["A"]).detach())),
    ("B_proj_bias", lambda p: p.update(B_proj_bias=torch.zeros(5))),
]


@pytest.mark.parametrize("name,mutate", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("fn", [mamba_inner_fn, mamba_inner_ref], ids=["fn", "ref"])
def test_bad_shapes_name_the_argument(name, mutate, fn):
    p = make_params()
    mutate(p)
    with use_backend("torch"), pytest.raises(ValueError, match=rf"\b{name}\b"):
        fn(*[p[k] for k in PARAMS])


def test_bad_checkpoint_lvl():
    p = make_params()
    with pytest.raises(ValueError, match="checkpoint_lvl"):
        mamba_inner_fn(*[p[k] for k in PARAMS], checkpoint_lvl=3)
