"""selective_scan_fn (PyTorch backend) and selective_scan_ref against a float64 recurrence written here."""
import pytest
import torch

from mamba_ssm.backend import use_backend
from mamba_ssm.ops.selective_scan_chunked import selective_scan_chunked
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def recurrence64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t,  y_t = C_t·h_t + D u_t,  out = y * silu(z); in float64."""
    f = lambda t: None if t is None else t.double()  # noqa: E731
    u, delta, A, B, C, D, z, delta_bias = map(f, (u, delta, A, B, C, D, z, delta_bias))
    batch, dim, seqlen = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = torch.where(delta > 20, delta, torch.log1p(torch.exp(delta)))

    def per_channel(X, t):  # (batch, dim or 1, dstate) at step t
        if X.dim() == 3:
            return X[:, None, :, t]
        return X[:, :, :, t].repeat_interleave(dim // X.shape[1], dim=1)

    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(seqlen):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * u[:, :, t, None] * per_channel(B, t)
        ys.append((h * per_channel(C, t)).sum(-1))
    out = torch.stack(ys, dim=-1)
    if D is not None:
        out = out + D[:, None] * u
    if z is not None:
        out = out * z * torch.sigmoid(z)
    return out, h


def make_inputs(batch, dim, seqlen, dstate, groups=None, D=True, z=True, delta_bias=True, dtype=torch.float32,
                seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    bc = (batch, dstate, seqlen) if groups is None else (batch, groups, dstate, seqlen)
    ins = {
        "u": r(batch, dim, seqlen).to(dtype),
        "delta": (0.5 * r(batch, dim, seqlen)).to(dtype),
        "A": -(0.2 + torch.rand(dim, dstate, generator=g) * 1.5),  # real fp32, as in Mamba
        "B": r(*bc).to(dtype),
        "C": r(*bc).to(dtype),
        "D": r(dim).to(dtype) if D else None,
        "z": r(batch, dim, seqlen).to(dtype) if z else None,
        "delta_bias": (0.3 * r(dim)).to(dtype) if delta_bias else None,
    }
    return {k: (v.requires_grad_() if v is not None else None) for k, v in ins.items()}


def close(actual, expected, tol, what):
    """max |actual - expected| <= tol * max(1, max |expected|)."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol * scale, f"{what}: max error {err:.3e} > {tol:.1e} * {scale:.3e}"


def check_against_recurrence(fn, ins, softplus, tol, grad_tol, last_state=True):
    tensors = [ins[k] for k in NAMES]
    out, last = fn(*tensors, delta_softplus=softplus, return_last_state=True)
    assert out.dtype == ins["u"].dtype and out.shape == ins["u"].shape
    assert last.shape == (ins["u"].shape[0], ins["u"].shape[1], ins["A"].shape[1])
    out64, last64 = recurrence64(*tensors, delta_softplus=softplus)
    close(out, out64, tol, "out")
    close(last, last64, tol, "last_state")
    g = torch.Generator().manual_seed(1)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    wl = torch.randn(last.shape, generator=g, dtype=torch.float64)
    used = [(k, ins[k]) for k in NAMES if ins[k] is not None]
    loss = (out.double() * w).sum() + ((last.double() * wl).sum() if last_state else 0)
    loss64 = (out64 * w).sum() + ((last64 * wl).sum() if last_state else 0)
    grads = torch.autograd.grad(loss, [t for _, t in used])
    grads64 = torch.autograd.grad(loss64, [t for _, t in used])
    for (name, t), ga, ge in zip(used, grads, grads64):
        assert ga.dtype == t.dtype and ga.shape == t.shape, name
        close(ga, ge, grad_tol, f"grad {name}")


# (seqlen, dstate, groups, D, z, delta_bias, softplus): seqlen 1, odd and long lengths, dstate 1..64,
# ungrouped (None) and grouped with 1 and 2 groups, every optional input on and off.
CASES = [
    (1, 4, None, True, True, True, True),
    (1, 1, 2, False, False, False, False),
    (7, 1, None, False, False, False, False),
    (7, 16, 1, True, False, True, True),
    (7, 3, 2, False, True, False, True),
    (65, 4, 2, True, True, True, True),
    (65, 64, None, False, True, True, False),
    (65, 8, 1, True, False, False, True),
    (300, 16, None, True, True, True, True),
    (300, 2, 2, False, False, True, True),
    (300, 5, None, True, False, False, False),
]


@pytest.mark.parametrize("seqlen,dstate,groups,D,z,delta_bias,softplus", CASES)
def test_selective_scan_fn_torch_backend(seqlen, dstate, groups, D, z, delta_bias, softplus):
    ins = make_inputs(2, 4, seqlen, dstate, groups, D, z, delta_bias, seed=seqlen * 100 + dstate)
    with use_backend("torch"):
        check_against_recurrence(selective_scan_fn, ins, softplus, 2e-5, 5e-5)


@pytest.mark.parametrize("seqlen,dstate,groups", [(1, 2, None), (65, 4, 2), (97, 16, None)])
def test_selective_scan_ref_against_recurrence(seqlen, dstate, groups):
    ins = make_inputs(2, 4, seqlen, dstate, groups, seed=7)
    check_against_recurrence(selective_scan_ref, ins, True, 2e-5, 5e-5)


@pytest.mark.parametrize("chunk_size,block_elems", [(1, None), (5, 1), (16, 200), (300, None), (64, 10_000)])
def test_chunking_and_channel_blocks(chunk_size, block_elems):
    """Chunk lengths that do and do not divide seqlen, one chunk, one step per chunk, many blocks."""
    ins = make_inputs(2, 6, 129, 4, 3, seed=3)

    def fn(*args, **kw):
        return selective_scan_chunked(*args, **kw, chunk_size=chunk_size, block_elems=block_elems)

    check_against_recurrence(fn, ins, True, 2e-5, 5e-5)


def test_channel_parts_on_worker_threads(monkeypatch):
    """Big CPU calls are split over channels into one part per intra-op thread; force it on a small one."""
    import mamba_ssm.ops.selective_scan_chunked as ssc

    monkeypatch.setattr(ssc, "PARALLEL_MIN_WORK", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert len(ssc._channel_parts(torch.zeros(1, 7, 5), 1, 4)) == 3
        ins = make_inputs(2, 7, 50, 4, None, seed=9)
        check_against_recurrence(selective_scan_chunked, ins, True, 2e-5, 5e-5)
        ins = make_inputs(2, 8, 20, 4, 2, seed=9)  # grouped: one part
        check_against_recurrence(selective_scan_chunked, ins, True, 2e-5, 5e-5)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads


def test_time_major_rows_round_trip():
    """_to_rows / _from_rows: zero rows past L, batch rows, a channel slice of a bigger tensor in and out."""
    import mamba_ssm.ops.selective_scan_chunked as ssc

    x = torch.randn(3, 10, 23)[:, 2:9]  # (3, 7, 23), rows not contiguous across the batch
    rows = ssc._to_rows(x, 4, 6)
    assert rows.shape == (3, 24, 7)
    torch.testing.assert_close(rows[:, :23], x.transpose(1, 2), rtol=0, atol=0)
    assert (rows[:, 23:] == 0).all()
    out = torch.full((3, 10, 23), 7.0)
    ssc._from_rows(rows, 23, out=out[:, 2:9])
    torch.testing.assert_close(out[:, 2:9], x, rtol=0, atol=0)
    assert (out[:, :2] == 7).all() and (out[:, 9:] == 7).all()
    torch.testing.assert_close(ssc._from_rows(rows, 23), x, rtol=0, atol=0)


@pytest.mark.parametrize("options", [True, False])
def test_channel_parts_with_strided_inputs(monkeypatch, options):
    """Worker-thread parts (each computing its own softplus, Δu, D skip and gate) on u, delta, z that are
    channel slices of one (batch, 3*dim, L) tensor, as Mamba's in_proj output is; seqlen not a multiple of
    the chunk length."""
    import mamba_ssm.ops.selective_scan_chunked as ssc

    monkeypatch.setattr(ssc, "PARALLEL_MIN_WORK", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ins = make_inputs(2, 6, 37, 4, None, D=options, z=options, delta_bias=options, seed=21)
        big = torch.randn(2, 18, 37)
        for i, k in enumerate(("u", "delta", "z")):
            if ins[k] is not None:
                big[:, 6 * i:6 * (i + 1)] = ins[k].detach()
        leaf = big.requires_grad_()
        ins.update(u=leaf[:, :6], delta=leaf[:, 6:12], z=leaf[:, 12:] if options else None)
        assert not ins["u"].is_contiguous()

        def fn(*args, **kw):
            return selective_scan_chunked(*args, **kw, chunk_size=8)

        check_against_recurrence(fn, ins, options, 2e-5, 5e-5)
    finally:
        torch.set_num_threads(threads)


def test_output_only_gradient_and_no_last_state():
    ins = make_inputs(1, 4, 33, 4, None, seed=5)
    tensors = [ins[k] for k in NAMES]
    with use_backend("torch"):
        out = selective_scan_fn(*tensors, delta_softplus=True)
    assert isinstance(out, torch.Tensor)
    out64, _ = recurrence64(*tensors, delta_softplus=True)
    close(out, out64, 2e-5, "out")
    grads = torch.autograd.grad(out.sum(), tensors)
    grads64 = torch.autograd.grad(out64.sum(), tensors)
    for name, ga, ge in zip(NAMES, grads, grads64):
        close(ga, ge, 5e-5, f"grad {name}")


@pytest.mark.parametrize("batch,seqlen", [(0, 12), (2, 0)])
@pytest.mark.parametrize("fn", [selective_scan_fn, selective_scan_ref], ids=["fn", "ref"])
def test_empty_batch_or_sequence(fn, batch, seqlen):
    # zero-size outputs, the zero state, and zero gradients (seqlen 0 used to crash both)
    ins = make_inputs(batch, 4, seqlen, 8, None, seed=3)
    tensors = [ins[k] for k in NAMES]
    with use_backend("torch"):
        out, last = fn(*tensors, delta_softplus=True, return_last_state=True)
    assert out.shape == (batch, 4, seqlen) and last.shape == (batch, 4, 8)
    assert torch.all(last == 0)
    grads = torch.autograd.grad(out.sum() + last.sum(), tensors, allow_unused=True)
    for name, g, t in zip(NAMES, grads, tensors):
        assert g is None or (g.shape == t.shape and torch.all(g == 0)), name


def test_bf16_inputs():
    ins = make_inputs(2, 4, 65, 8, 2, dtype=torch.bfloat16, seed=11)
    tensors = [ins[k] for k in NAMES]
    with use_backend("torch"):
        out, last = selective_scan_fn(*tensors, delta_softplus=True, return_last_state=True)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    out64, last64 = recurrence64(*tensors, delta_softplus=True)  # on the same bf16-rounded inputs
    close(out, out64, 1e-2, "out")  # bf16 has 8 bits of mantissa: ~4e-3 relative rounding of out
    close(last, last64, 1e-4, "last_state")  # computed and returned in fp32
    grads = torch.autograd.grad(out.float().sum(), tensors)
    grads64 = torch.autograd.grad(out64.sum(), tensors)
    for name, t, ga, ge in zip(NAMES, tensors, grads, grads64):
        assert ga.dtype == t.dtype, name
        close(ga, ge, 2e-2, f"grad {name}")


def test_large_decay_is_stable():
    """Δ A down to about -1e4 per step and -1e6 over a chunk: exp of a cumulative sum in log space would
    overflow; the scan must stay finite and exact (the state forgets almost at once)."""
    batch, dim, seqlen, dstate = 1, 4, 256, 8
    g = torch.Generator().manual_seed(0)
    u = torch.randn(batch, dim, seqlen, generator=g, requires_grad=True)
    delta = torch.full((batch, dim, seqlen), 50.0)
    delta[:, 1] = 0.01  # a slowly decaying channel next to fast ones
    delta[:, 2, ::3] = 1e-3
    delta.requires_grad_()
    A = -torch.logspace(0, 2.3, dstate).repeat(dim, 1)
    A[3] = -0.5
    A.requires_grad_()
    B = torch.randn(batch, dstate, seqlen, generator=g, requires_grad=True)
    C = torch.randn(batch, dstate, seqlen, generator=g, requires_grad=True)
    ins = dict(u=u, delta=delta, A=A, B=B, C=C, D=None, z=None, delta_bias=None)

    def fn(*args, **kw):
        return selective_scan_chunked(*args, **kw, chunk_size=seqlen)  # one long chunk

    check_against_recurrence(fn, ins, True, 2e-5, 5e-5)
    with use_backend("torch"):
        check_against_recurrence(selective_scan_fn, ins, False, 2e-5, 5e-5)


def _ok():
    return make_inputs(2, 4, 9, 4, None, seed=0)


BAD = [
    ("u rank", lambda a: a.update(u=a["u"][0]), "u"),
    ("delta shape", lambda a: a.update(delta=a["delta"][:, :, :-1]), "delta"),
    ("A rows", lambda a: a.update(A=a["A"][:-1]), "A"),
    ("complex A", lambda a: a.update(A=torch.complex(a["A"], a["A"]).detach()), "complex A"),
    ("dstate 257", lambda a: a.update(A=-torch.ones(4, 257), B=torch.randn(2, 257, 9), C=torch.randn(2, 257, 9)),
     "dstate"),
    ("B seqlen", lambda a: a.update(B=a["B"][..., :-1]), "B"),
    ("B groups", lambda a: a.update(B=torch.randn(2, 3, 4, 9)), "B"),
    ("C rank", lambda a: a.update(C=a["C"][0]), "C"),
    ("D shape", lambda a: a.update(D=torch.ones(5)), "D"),
    ("z shape", lambda a: a.update(z=a["z"][:1]), "z"),
    ("delta_bias shape", lambda a: a.update(delta_bias=torch.ones(4, 1)), "delta_bias"),
]


@pytest.mark.parametrize("case,mutate,name", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("fn", [selective_scan_fn, selective_scan_ref], ids=["fn", "ref"])
def test_bad_inputs_name_the_argument(case, mutate, name, fn):
    args = _ok()
    mutate(args)
    with use_backend("torch"), pytest.raises(ValueError, match=rf"\b{name}\b"):
        fn(*[args[k] for k in NAMES], delta_softplus=True)


def test_dispatch_goes_to_the_chunked_scan(monkeypatch):
    import mamba_ssm.ops.selective_scan_interface as ssi

    calls = []
    monkeypatch.setattr(ssi, "selective_scan_chunked", lambda *a, **k: calls.append(1) or "chunked")
    ins = _ok()
    with use_backend("torch"):
        assert ssi.selective_scan_fn(*[ins[k] for k in NAMES]) == "chunked"
    assert calls == [1]


def test_chunked_scan_split_over_threads_runs_under_inference_mode():
    # Big enough to be split into parts run by worker threads, which write into the caller's output.
    from mamba_ssm.ops.selective_scan_chunked import PARALLEL_MIN_WORK, selective_scan_chunked

    torch.manual_seed(0)
    b, d, n = 1, 64, 16
    L = max(8, PARALLEL_MIN_WORK // (b * d * n))
    u, delta, z = torch.randn(b, d, L), torch.randn(b, d, L) - 2, torch.randn(b, d, L)
    A, B, C = -torch.rand(d, n) - 0.5, torch.randn(b, n, L), torch.randn(b, n, L)
    with torch.no_grad():
        expected = selective_scan_chunked(u, delta, A, B, C, z=z, delta_softplus=True)
    with torch.inference_mode():
        got = selective_scan_chunked(u, delta, A, B, C, z=z, delta_softplus=True)
    torch.testing.assert_close(got, expected)
