"""The Triton SSD scan (mamba_ssm/ops/triton/ssd_triton.py) against the PyTorch chunked scan and the
float64 per-step recurrence of test_ssd.py: output, final states and the gradient of every input.
On the CPU through Triton's interpreter (tiny shapes: it is slow), on a GPU with the cuda marker."""
import importlib.util

import pytest
import torch

from mamba_ssm.ops.ssd_chunked import ssd_chunked
from test_ssd import make, recurrence64

HAS_TRITON = importlib.util.find_spec("triton") is not None
# the interpreter runs the kernels on CPU tensors; on a GPU machine the cuda tests cover the same
interpreter = pytest.mark.skipif(not HAS_TRITON or torch.cuda.is_available(),
                                 reason="needs Triton, and no GPU (the GPU tests cover it)")
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states")


def ssd_triton(*args, **kwargs):
    from mamba_ssm.ops.triton.ssd_triton import ssd_triton as fn

    return fn(*args, **kwargs)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def outputs_and_grads(fn, t, chunk, loss_on=("out", "final"), **kw):
    """(out, final, {name: grad}) of fn on fresh leaves, for a fixed random linear loss."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    out, final = fn(chunk_size=chunk, return_final_states=True, **leaves, **kw)[:2]
    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.device)
    w_fin = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(out.device)
    loss = 0.0
    if "out" in loss_on:
        loss = loss + (out.double() * w_out).sum()
    if "final" in loss_on:
        loss = loss + (final.double() * w_fin).sum()
    names = [k for k in NAMES if k in leaves]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
    grads = [torch.zeros_like(leaves[k]) if g is None else g for k, g in zip(names, grads)]
    return out.detach(), final.detach(), dict(zip(names, grads))


def compare(t, chunk, low=torch.float32, tol=None, loss_on=("out", "final"), **kw):
    """Triton on inputs in `low` against the PyTorch chunked scan on the same inputs and the float64
    recurrence; errors as norms relative to the reference's."""
    tol = tol or {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[low]
    low_t = {k: v.to(low) for k, v in t.items()}
    got = outputs_and_grads(ssd_triton, low_t, chunk, loss_on, **kw)
    ref = outputs_and_grads(ssd_chunked, low_t, chunk, loss_on, **kw)
    exact = outputs_and_grads(recurrence_fn, {k: v.double() for k, v in low_t.items()}, chunk, loss_on, **kw)
    assert got[0].dtype == low and got[1].dtype == torch.float32
    for name, a, r, e in [("out", got[0], ref[0], exact[0]), ("final", got[1], ref[1], exact[1])] + \
            [(k, got[2][k], ref[2][k], exact[2][k]) for k in got[2]]:
        assert a.dtype == r.dtype and a.shape == r.shape, name
        assert torch.isfinite(a).all(), name
        # against the reference in the same precision, and against the exact result no worse than it (+ tol)
        assert rel(a, r) < tol, f"{name}: {rel(a, r):.3g} from the PyTorch scan"
        assert rel(a, e) < rel(r, e) + tol, f"{name}: {rel(a, e):.3g} from float64 (PyTorch scan: {rel(r, e):.3g})"


def recurrence_fn(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                  dt_softplus=False, dt_limit=(0.0, float("inf")), return_final_states=True):
    out, final, _ = recurrence64(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                                 seq_idx=seq_idx, dt_softplus=dt_softplus, dt_limit=dt_limit)
    return out, final


def small(**kw):
    base = dict(b=2, l=37, h=4, p=8, g=2, n=8)
    base.update(kw)
    return make(**base)


# (inputs, chunk, keywords): lengths off and on the chunk grid, one short chunk, chunk sizes 1 and 12 (not a
# power of two), groups of 1, 2 and 4 heads, D (h,) / (h, p) / none, z or none, bias, softplus, dt_limit
CASES = {
    "base": (dict(), 16, dict(dt_softplus=True)),
    "exact_chunks_one_group": (dict(l=32, g=1), 16, dict(dt_softplus=True)),
    "short_sequence": (dict(l=5, h=2, g=2), 16, dict(dt_softplus=True)),
    "chunk_12": (dict(l=30, h=2, p=5, g=1, n=3), 12, dict(dt_softplus=True)),
    "chunk_1": (dict(l=5, h=2, p=3, g=1, n=2), 1, dict(dt_softplus=True)),
    "D_hp_no_z_no_bias_no_init": (dict(D_shape="hp", z=False, bias=False, init=False), 16, dict()),
    "no_D_with_z": (dict(D_shape=None, l=20, p=16, n=16), 16, dict(dt_softplus=True)),
    "dt_limit": (dict(l=24), 16, dict(dt_softplus=True, dt_limit=(0.2, 0.9))),
    "dt_limit_without_softplus": (dict(l=24, bias=False), 16, dict(dt_limit=(0.05, 1.5))),
}


def _positive_dt(t, kw):
    if not kw.get("dt_softplus"):
        t["dt"] = t["dt"].abs() * 0.5
    return t


@interpreter
@pytest.mark.parametrize("case", sorted(CASES))
def test_in_interpreter(case):
    shape, chunk, kw = CASES[case]
    compare(_positive_dt(small(**shape), kw), chunk, **kw)


@interpreter
@pytest.mark.parametrize("boundaries", ["mid_chunk", "at_chunk_starts", "one_per_step_at_the_end"])
def test_seq_idx_in_interpreter(boundaries):
    # b = 2, l = 40, chunk 16: chunk starts at 16 and 32
    rows = {"mid_chunk": ([0] * 5 + [1] * 20 + [2] * 15, [3] * 30 + [4] * 10),
            "at_chunk_starts": ([0] * 16 + [1] * 16 + [2] * 8, [5] * 32 + [6] * 8),
            "one_per_step_at_the_end": ([0] * 31 + [1, 2, 3, 4, 5, 6, 7, 8, 9], [0] * 15 + [1] * 25)}[boundaries]
    seq_idx = torch.tensor(rows, dtype=torch.int32)
    compare(small(l=40), 16, dt_softplus=True, seq_idx=seq_idx)


@interpreter
@pytest.mark.parametrize("loss_on", [("out",), ("final",)])
def test_only_one_output_has_a_gradient_in_interpreter(loss_on):
    compare(small(l=21), 16, loss_on=loss_on, dt_softplus=True)


@interpreter
@pytest.mark.parametrize("low", [torch.float16, torch.bfloat16])
def test_half_precision_in_interpreter(low):
    t = small(l=40, p=16, n=16)
    compare(t, 16, low=low, dt_softplus=True, seq_idx=torch.tensor([[0] * 10 + [1] * 30, [2] * 40]))


@interpreter
def test_varlen_states_in_interpreter():
    lengths = [3, 9, 1, 17, 8]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    t = {k: v.float() for k, v in small(b=1, l=sum(lengths), init=False).items()}
    got = ssd_triton(chunk_size=8, cu_seqlens=cu, dt_softplus=True, return_final_states=True,
                     return_varlen_states=True, **t)
    ref = ssd_chunked(chunk_size=8, cu_seqlens=cu, dt_softplus=True, return_final_states=True,
                      return_varlen_states=True, **t)
    for a, r in zip(got, ref):
        assert a.shape == r.shape and rel(a, r) < 2e-5


@interpreter
def test_non_contiguous_inputs_in_interpreter():
    """x, B, C and z as views of one projection (as Mamba-2 splits them), dt a strided slice."""
    b, l, h, p, g, n = 2, 19, 4, 8, 2, 8
    gen = torch.Generator().manual_seed(3)
    proj = torch.randn(b, l, 2 * h * p + 2 * g * n + h, generator=gen)
    z, x, B, C, dt = torch.split(proj, [h * p, h * p, g * n, g * n, h], dim=-1)
    t = dict(x=x.reshape(b, l, h, p), z=z.reshape(b, l, h, p), B=B.reshape(b, l, g, n), C=C.reshape(b, l, g, n),
             dt=dt, A=-torch.rand(h, generator=gen) - 0.5, D=torch.randn(h, generator=gen),
             dt_bias=torch.randn(h, generator=gen) * 0.3)
    assert not t["x"].is_contiguous() and not t["dt"].is_contiguous()
    got = outputs_and_grads(ssd_triton, t, 8, dt_softplus=True)
    ref = outputs_and_grads(ssd_chunked, t, 8, dt_softplus=True)
    assert rel(got[0], ref[0]) < 2e-5 and rel(got[1], ref[1]) < 2e-5
    for k in ref[2]:
        assert rel(got[2][k], ref[2][k]) < 2e-5, k


def test_unsupported_inputs_name_what_they_got():
    t = small(l=6)  # float64
    with pytest.raises(ValueError, match=r"ssd_triton: x \(2, 6, 4, 8\) torch.float64 .* float16/bfloat16/float32"):
        ssd_triton(chunk_size=4, **t)
    with pytest.raises(ValueError, match=r"ssd_triton: A must be \(nheads,\) = \(4,\), got \(3,\)"):
        ssd_triton(chunk_size=4, **{**t, "A": torch.zeros(3)})


def test_dispatch(monkeypatch):
    """CUDA tensors go to the kernels when the switch picks Triton; float64, headdim > 128, headdim 128 with
    dstate 256, and varlen
    states that need a gradient stay in PyTorch; MAMBA_SSM_BACKEND=torch keeps PyTorch. A GPU is pretended."""
    from mamba_ssm import backend
    from mamba_ssm.ops.triton import ssd_combined as sc

    monkeypatch.setattr(backend, "available_backends", lambda op: ["triton", "torch"])
    monkeypatch.setattr(backend, "_ENV_CHOICE", "auto")
    x, B = torch.zeros(1, 2, 2, 64), torch.zeros(1, 2, 1, 128)
    leaves = (x, B)
    assert sc._triton_ssd_chosen(x, B, False, leaves)
    assert sc._triton_ssd_chosen(x.bfloat16(), B.bfloat16(), False, leaves)
    assert not sc._triton_ssd_chosen(x.double(), B.double(), False, leaves)
    assert not sc._triton_ssd_chosen(torch.zeros(1, 2, 2, 256), B, False, leaves)
    assert not sc._triton_ssd_chosen(torch.zeros(1, 2, 2, 128), torch.zeros(1, 2, 1, 256), False, leaves)
    assert sc._triton_ssd_chosen(torch.zeros(1, 2, 2, 128), B, False, leaves)
    needs_grad = (x.clone().requires_grad_(), B)
    assert sc._triton_ssd_chosen(x, B, True, leaves)
    assert not sc._triton_ssd_chosen(x, B, True, needs_grad)
    with torch.no_grad():
        assert sc._triton_ssd_chosen(x, B, True, needs_grad)
    with backend.use_backend("torch"):
        assert not sc._triton_ssd_chosen(x, B, False, leaves)
    assert "ssd" in backend._TRITON_PROVIDERS


# ---- on a GPU (the lead runs these) ----

def _big(dtype, b=2, l=1024, h=24, p=64, g=1, n=128, seed=0):
    # tolerances below: in the interpreter (l=200, h=2) bf16 was 4e-3 (out) and <1e-2 (grads) from the
    # PyTorch scan, fp32 2e-7 and <1e-4
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    t = dict(x=r(b, l, h, p), dt=r(b, l, h) - 2.0, A=-torch.exp(torch.rand(h, generator=gen) * 2.5),
             B=r(b, l, g, n) * n ** -0.5, C=r(b, l, g, n) * n ** -0.5, D=r(h), z=r(b, l, h, p),
             dt_bias=r(h) * 0.5, initial_states=r(b, h, p, n))
    t = {k: v.cuda() for k, v in t.items()}
    # parameters stay fp32, activations in the compute dtype (as Mamba-2 under autocast)
    return {k: (v.to(dtype) if k in ("x", "dt", "B", "C", "z") else v) for k, v in t.items()}


def _gpu_compare(t, chunk, tol_out, tol_grad, **kw):
    got = outputs_and_grads(ssd_triton, t, chunk, **kw)
    ref = outputs_and_grads(ssd_chunked, t, chunk, **kw)
    assert rel(got[0], ref[0]) < tol_out, f"out: {rel(got[0], ref[0]):.3g}"
    assert rel(got[1], ref[1]) < tol_out, f"final: {rel(got[1], ref[1]):.3g}"
    for k in ref[2]:
        assert got[2][k].dtype == ref[2][k].dtype, k
        assert rel(got[2][k], ref[2][k]) < tol_grad, f"grad {k}: {rel(got[2][k], ref[2][k]):.3g}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,tol_out,tol_grad", [(torch.bfloat16, 1e-2, 3e-2), (torch.float16, 3e-3, 1e-2),
                                                    (torch.float32, 1e-5, 5e-4)])
@pytest.mark.parametrize("packed", [False, True])
def test_gpu_large_against_pytorch(dtype, tol_out, tol_grad, packed):
    pytest.importorskip("triton")
    t = _big(dtype)
    kw = dict(dt_softplus=True, dt_limit=(0.0, 100.0))
    if packed:  # boundaries inside chunks and at a chunk start (256)
        seq_idx = torch.tensor([0] * 100 + [1] * 156 + [2] * 500 + [3] * 268)
        kw["seq_idx"] = torch.stack([seq_idx, torch.zeros_like(seq_idx)]).to(torch.int32).cuda()
    _gpu_compare(t, 256, tol_out, tol_grad, **kw)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [dict(l=1000, g=8, p=64, n=64), dict(l=77, h=8, g=2, p=128, n=128, b=1),
                                   dict(l=300, h=4, p=32, n=16, g=4)])
def test_gpu_other_shapes(shape):
    pytest.importorskip("triton")
    t = _big(torch.bfloat16, **shape)
    t["D"] = torch.randn(t["A"].shape[0], t["x"].shape[-1], device="cuda")
    _gpu_compare(t, 64 if shape["l"] == 300 else 256, 1e-2, 3e-2, dt_softplus=True)


@pytest.mark.cuda
def test_gpu_dispatch_and_mamba2_mixer(monkeypatch):
    """mamba_chunk_scan_combined and the fused split-conv-scan pick the kernels on CUDA; a Mamba-2 mixer
    under bf16 autocast gives the output and gradients of MAMBA_SSM_BACKEND=torch."""
    pytest.importorskip("triton")
    from mamba_ssm import backend
    from mamba_ssm.modules.mamba2 import Mamba2
    from mamba_ssm.ops.triton import ssd_combined as sc
    from mamba_ssm.ops.triton import ssd_triton as st

    monkeypatch.setattr(backend, "_ENV_CHOICE", "auto")
    calls = []
    real = st.ssd_triton
    monkeypatch.setattr(st, "ssd_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    t = _big(torch.bfloat16, b=1, l=300, h=4, n=16, p=32)
    sc.mamba_chunk_scan_combined(chunk_size=64, **t)
    assert calls
    torch.manual_seed(0)
    for fused in (True, False):
        m = Mamba2(d_model=256, d_state=64, headdim=64, chunk_size=128, use_mem_eff_path=fused, device="cuda")
        u = torch.randn(2, 500, 256, device="cuda")

        def run():
            m.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = m(u)
            y.float().square().mean().backward()
            return y.float(), {n: p.grad.clone() for n, p in m.named_parameters()}

        calls.clear()
        y1, g1 = run()
        assert calls, f"use_mem_eff_path={fused} did not reach the kernels"
        with backend.use_backend("torch"):
            y0, g0 = run()
        assert rel(y1, y0) < 2e-2
        for n in g0:
            assert rel(g1[n], g0[n]) < 5e-2, n
