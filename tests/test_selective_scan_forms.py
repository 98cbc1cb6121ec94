"""Time-invariant B / C (dim, dstate) and complex (S4D-style) scans: selective_scan_fn (PyTorch path),
selective_scan_ref and mamba_inner_fn / mamba_inner_ref against a float64 recurrence written here, values,
last state and every gradient; a forced CUDA backend refuses them by name, auto runs them on the PyTorch
path with one warning."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from mamba_ssm import backend
from mamba_ssm.backend import use_backend
from mamba_ssm.ops import selective_scan_interface as ssi
from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, mamba_inner_ref, selective_scan_fn, selective_scan_ref

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def oracle(u, delta, A, B, C, D, z, delta_bias, softplus):
    """h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t, y_t = C_t . h_t (2 Re of it for complex A) + D u_t, in float64."""
    batch, dim, L = u.shape
    N = A.shape[1]
    cplx = A.is_complex()
    dt = delta + (delta_bias[:, None] if delta_bias is not None else 0)
    dt = F.softplus(dt) if softplus else dt

    def at(X, t):
        if X.dim() == 2:
            return X.expand(batch, dim, N)
        if cplx:   # (re, im) interleaved along time
            X = torch.complex(X[..., 0::2], X[..., 1::2])
        if X.dim() == 3:
            return X[:, None, :, t].expand(batch, dim, N)
        return X[..., t].repeat_interleave(dim // X.shape[1], dim=1)

    h = torch.zeros(batch, dim, N, dtype=torch.complex128 if cplx else torch.float64)
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * u[:, :, t])[..., None] * at(B, t)
        y = (h * at(C, t)).sum(-1)
        ys.append(2 * y.real if cplx else y)
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h


def inputs(B_form, C_form, cplx, batch=2, dim=4, L=11, N=3, groups=2, extras=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    steps = 2 * L if cplx else L

    def make(form):
        if form == "invariant":
            return torch.complex(r(dim, N), r(dim, N)) if cplx else r(dim, N)
        return r(batch, N, steps) if form == "shared" else r(batch, groups, N, steps)

    A = -0.5 - torch.rand(dim, N, generator=g)
    if cplx:
        A = torch.complex(A, 3 * r(dim, N))
    ins = dict(u=r(batch, dim, L), delta=0.5 * r(batch, dim, L), A=A, B=make(B_form), C=make(C_form),
               D=r(dim) if extras else None, z=r(batch, dim, L) if extras else None,
               delta_bias=0.1 * r(dim) if extras else None)
    return {k: (v.requires_grad_() if v is not None else None) for k, v in ins.items()}


def close(a, e, tol, what):
    scale = max(1.0, e.abs().max().item())
    err = (a.detach().to(e.dtype) - e).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3e}"


FORMS = [("invariant", "shared", False), ("grouped", "invariant", False), ("invariant", "invariant", False),
         ("invariant", "invariant", True), ("shared", "grouped", True), ("grouped", "invariant", True)]


@pytest.mark.parametrize("B_form,C_form,cplx", FORMS, ids=[f"B-{b}_C-{c}{'_complex' if x else ''}" for b, c, x in FORMS])
@pytest.mark.parametrize("fn", [selective_scan_fn, selective_scan_ref], ids=["fn", "ref"])
def test_scan_forms_equal_the_float64_recurrence(fn, B_form, C_form, cplx):
    ins = inputs(B_form, C_form, cplx, extras=B_form != "invariant" or not cplx)
    with use_backend("torch"):
        out, last = fn(*[ins[k] for k in NAMES], delta_softplus=True, return_last_state=True)
    x64 = {k: (v.detach().to(torch.complex128 if v.is_complex() else torch.float64).requires_grad_()
               if v is not None else None) for k, v in ins.items()}
    want, want_last = oracle(*[x64[k] for k in NAMES], softplus=True)
    assert out.shape == ins["u"].shape and out.dtype == torch.float32 and last.is_complex() == cplx
    close(out, want, 2e-5, "out")
    close(last, want_last, 2e-5, "last_state")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    used = [k for k in NAMES if ins[k] is not None]
    got = torch.autograd.grad((out * w).sum(), [ins[k] for k in used])
    exp = torch.autograd.grad((want * w.double()).sum(), [x64[k] for k in used])
    for k, a, e in zip(used, got, exp):
        assert a.shape == ins[k].shape and a.dtype == ins[k].dtype, k
        close(a, e, 1e-4, f"grad {k}")


def _inner_params(cplx, given, seed=0, batch=2, d_model=4, N=3, dt_rank=2, width=3, L=9):
    """given: which of B and C are time-invariant arguments ("", "B", "C" or "BC"); x_proj projects the others."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    dim = 2 * d_model
    cols = 2 * N if cplx else N
    A = -0.5 - torch.rand(dim, N, generator=g)
    if cplx:
        A = torch.complex(A, 2 * r(dim, N))
    p = dict(xz=r(batch, 2 * dim, L), conv1d_weight=0.5 * r(dim, 1, width), conv1d_bias=0.1 * r(dim),
             x_proj_weight=0.3 * r(dt_rank + (2 - len(given)) * cols, dim), delta_proj_weight=0.5 * r(dim, dt_rank),
             out_proj_weight=0.3 * r(d_model, dim), out_proj_bias=0.1 * r(d_model), A=A,
             B=(torch.complex(r(dim, N), r(dim, N)) if cplx else r(dim, N)) if "B" in given else None,
             C=(torch.complex(r(dim, N), r(dim, N)) if cplx else r(dim, N)) if "C" in given else None,
             D=r(dim), delta_bias=0.1 * r(dim))
    return {k: (v.requires_grad_() if v is not None else None) for k, v in p.items()}


INNER = ("xz", "conv1d_weight", "conv1d_bias", "x_proj_weight", "delta_proj_weight", "out_proj_weight",
         "out_proj_bias", "A", "B", "C", "D", "delta_bias")


def inner_oracle(q):
    """The Mamba inner block in float64; complex A's projected B / C are (re, im) column pairs."""
    xz = q["xz"]
    dim = xz.shape[1] // 2
    x, z = xz[:, :dim], xz[:, dim:]
    w = q["conv1d_weight"][:, 0]
    width = w.shape[1]
    xp = F.pad(x, (width - 1, 0))
    x = F.silu(sum(w[None, :, k, None] * xp[:, :, k:k + x.shape[-1]] for k in range(width)) + q["conv1d_bias"][:, None])
    r = q["delta_proj_weight"].shape[1]
    x_dbl = torch.einsum("bdl,cd->bcl", x, q["x_proj_weight"])
    delta = torch.einsum("brl,dr->bdl", x_dbl[:, :r], q["delta_proj_weight"])
    cols = q["A"].shape[1] * (2 if q["A"].is_complex() else 1)

    def projected(t):   # complex A: (b, 2N, L) column pairs -> (b, N, 2L) interleaved along time
        return t.unflatten(1, (-1, 2)).transpose(2, 3).flatten(2) if q["A"].is_complex() else t

    B = q["B"] if q["B"] is not None else projected(x_dbl[:, r:r + cols])
    C = q["C"] if q["C"] is not None else projected(x_dbl[:, x_dbl.shape[1] - cols:])
    y, _ = oracle(x, delta, q["A"], B, C, q["D"], z, q["delta_bias"], softplus=True)
    return torch.einsum("bdl,md->blm", y, q["out_proj_weight"]) + q["out_proj_bias"]


INNER_CASES = [(True, ""), (True, "BC"), (True, "B"), (False, "BC"), (False, "B"), (False, "C")]


@pytest.mark.parametrize("cplx,given", INNER_CASES,
                         ids=[f"{'complex' if c else 'real'}-{g or 'projected'}" for c, g in INNER_CASES])
@pytest.mark.parametrize("fn", [mamba_inner_fn, mamba_inner_ref], ids=["fn", "ref"])
def test_inner_block_with_complex_or_time_invariant_weights(fn, cplx, given):
    # with one of B / C given, x_proj holds dt's rows and the other's only (upstream's test_mamba_inner_fn)
    p = _inner_params(cplx, given)
    with use_backend("torch"):
        out = fn(*[p[k] for k in INNER])
    q = {k: (v.detach().to(torch.complex128 if v.is_complex() else torch.float64).requires_grad_()
             if v is not None else None) for k, v in p.items()}
    want = inner_oracle(q)
    close(out, want, 2e-5, "out")
    used = [k for k in INNER if p[k] is not None]
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    got = torch.autograd.grad((out * w).sum(), [p[k] for k in used])
    exp = torch.autograd.grad((want * w.double()).sum(), [q[k] for k in used])
    for k, a, e in zip(used, got, exp):
        close(a, e, 1e-4, f"grad {k}")


@pytest.mark.parametrize("form,what", [(("invariant", "shared", False), "time-invariant B"),
                                       (("shared", "invariant", False), "time-invariant C"),
                                       (("shared", "shared", True), "complex A")])
def test_a_forced_cuda_backend_refuses_what_its_kernel_lacks(monkeypatch, form, what):
    monkeypatch.setattr(ssi, "choose_backend", lambda op, is_cuda: "cuda")
    monkeypatch.setattr(ssi, "requested_backend", lambda: "cuda")
    ins = inputs(*form)
    with pytest.raises(NotImplementedError, match=f"{what}.* not supported by this package's CUDA kernel.*"
                                                  r"use_backend\('torch'\)"):
        selective_scan_fn(*[ins[k] for k in NAMES])


@pytest.mark.parametrize("form,what", [(("invariant", "shared", False), "time-invariant B"),
                                       (("shared", "shared", True), "complex A")])
def test_auto_runs_what_the_kernel_lacks_on_the_pytorch_path_with_one_warning(monkeypatch, form, what):
    ins = inputs(*form)
    want = selective_scan_fn(*[ins[k] for k in NAMES], delta_softplus=True)  # CPU tensors: the PyTorch path
    monkeypatch.setattr(ssi, "choose_backend", lambda op, is_cuda: "cuda")  # as for CUDA tensors
    monkeypatch.setattr(backend, "_warned", set())
    with pytest.warns(RuntimeWarning, match=f"{what}.* runs on the PyTorch path on CUDA"):
        got = selective_scan_fn(*[ins[k] for k in NAMES], delta_softplus=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per form
        again = selective_scan_fn(*[ins[k] for k in NAMES], delta_softplus=True)
    assert torch.equal(got, want) and torch.equal(again, want)


BAD = [
    ("invariant B shape", lambda a: a.update(B=torch.randn(4, 2)), r"time-invariant B must be \(dim, dstate\) = \(4, 3\)"),
    ("complex B, real A", lambda a: a.update(C=torch.complex(torch.randn(4, 3), torch.randn(4, 3))),
     "time-invariant C must be real like A"),
    ("real invariant B, complex A", lambda a: a.update(A=torch.complex(a["A"].detach(), a["A"].detach())),
     "time-invariant B must be complex like A"),
    ("complex variable C", lambda a: a.update(C=torch.complex(torch.randn(2, 3, 11), torch.randn(2, 3, 11))),
     "an input-dependent C must be real"),
]


@pytest.mark.parametrize("case,mutate,match", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("fn", [selective_scan_fn, selective_scan_ref], ids=["fn", "ref"])
def test_bad_forms_name_the_argument(fn, case, mutate, match):
    ins = inputs("invariant", "shared", False)
    mutate(ins)
    with pytest.raises(ValueError, match=match):
        fn(*[ins[k] for k in NAMES])


def test_x_proj_rows_with_one_of_B_C_given_are_checked():
    p = _inner_params(False, "B")
    p["x_proj_weight"] = torch.randn(2 + 3 + 1, 8)
    with pytest.raises(ValueError, match=r"x_proj_weight must be \(rows, dim\) with dim = 8 and dt_rank \+ dstate or "
                                         r"dt_rank \+ 2\*dstate = 2 \+ 3 or 2 \+ 2\*3 rows, got \(6, 8\)"):
        mamba_inner_fn(*[p[k] for k in INNER])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("B_form,C_form,cplx", FORMS, ids=[f"B-{b}_C-{c}{'_complex' if x else ''}" for b, c, x in FORMS])
def test_forms_on_a_gpu_equal_the_float64_recurrence(monkeypatch, B_form, C_form, cplx):
    # auto mode: the forms the CUDA kernel lacks run on the PyTorch path there, values and gradients
    monkeypatch.setattr(backend, "_warned", set())
    ins = inputs(B_form, C_form, cplx, extras=B_form != "invariant" or not cplx)
    dev = {k: (v.detach().cuda().requires_grad_() if v is not None else None) for k, v in ins.items()}
    with pytest.warns(RuntimeWarning, match="runs on the PyTorch path on CUDA"):
        out, last = selective_scan_fn(*[dev[k] for k in NAMES], delta_softplus=True, return_last_state=True)
    x64 = {k: (v.detach().to(torch.complex128 if v.is_complex() else torch.float64).requires_grad_()
               if v is not None else None) for k, v in ins.items()}
    want, want_last = oracle(*[x64[k] for k in NAMES], softplus=True)
    close(out.cpu(), want, 2e-5, "out")
    close(last.cpu(), want_last, 2e-5, "last_state")
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    used = [k for k in NAMES if ins[k] is not None]
    got = torch.autograd.grad((out * w.cuda()).sum(), [dev[k] for k in used])
    exp = torch.autograd.grad((want * w.double()).sum(), [x64[k] for k in used])
    for k, a, e in zip(used, got, exp):
        close(a.cpu(), e, 1e-4, f"grad {k}")
