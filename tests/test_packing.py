"""Packed sequences (mamba_ssm/ops/packing.py) in the selective scan, the causal conv and the fused
inner block: a packed row gives what each of its sequences gives run alone (outputs, final states,
every gradient), checked against a float64 recurrence and a float64 conv written here."""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

from mamba_ssm.ops import packing
from mamba_ssm.ops.causal_conv1d import causal_conv1d_fn
from mamba_ssm.ops.selective_scan_chunked import selective_scan_chunked
from mamba_ssm.ops.selective_scan_interface import (mamba_inner_fn, mamba_inner_ref, selective_scan_fn,
                                                    selective_scan_ref)

F64 = torch.float64


def oracle_scan(u, delta, A, B, C, D, z, delta_bias):
    """One sequence, float64, a step at a time. u, delta, z: (dim, l); B, C: (dstate, l).
    Returns y (dim, l) and the final state (dim, dstate)."""
    dt = F.softplus(delta + delta_bias[:, None])
    h = torch.zeros(A.shape, dtype=F64)
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, None] * A) * h + (dt[:, t] * u[:, t])[:, None] * B[None, :, t]
        ys.append(h @ C[:, t] + D * u[:, t])
    return torch.stack(ys, 1) * F.silu(z), h


def oracle_conv(x, weight, bias):
    """One sequence, float64: x (dim, l) -> silu(causal depthwise conv)."""
    width = weight.shape[1]
    return F.silu(F.conv1d(F.pad(x[None], (width - 1, 0)), weight[:, None], bias, groups=x.shape[0])[0])


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _scan_inputs(batch, dim, dstate, seqlen, seed):
    g = torch.Generator().manual_seed(seed)
    u, delta, z = (torch.randn(batch, dim, seqlen, generator=g, dtype=F64) for _ in range(3))
    B, C = (torch.randn(batch, dstate, seqlen, generator=g, dtype=F64) for _ in range(2))
    A = -torch.rand(dim, dstate, generator=g, dtype=F64) * 2 - 0.1
    D, bias = torch.randn(dim, generator=g, dtype=F64), torch.randn(dim, generator=g, dtype=F64) * 0.5
    leaves = [u, delta, A, B, C, D, z, bias]
    for t in leaves:
        t.requires_grad_()
    return leaves


def _oracle_packed(leaves, segs):
    """The oracle run on every (row, start, end) alone, laid back into rows; final states in order."""
    u, delta, A, B, C, D, z, bias = leaves
    rows = [[] for _ in range(u.shape[0])]
    finals = []
    for r, a, e in segs:
        y, h = oracle_scan(u[r, :, a:e], delta[r, :, a:e], A, B[r, :, a:e], C[r, :, a:e], D, z[r, :, a:e], bias)
        rows[r].append(y)
        finals.append(h)
    return torch.stack([torch.cat(p, 1) for p in rows]), torch.stack(finals)


def _compare(scan, leaves, segs, tol, **packed):
    """scan(..., **packed) against the oracle: out, final states (per sequence with cu_seqlens, else
    per row) and the gradients of every input."""
    out, last = scan(*leaves[:7], delta_bias=leaves[7], delta_softplus=True, return_last_state=True, **packed)
    ref_out, ref_finals = _oracle_packed(leaves, segs)
    if packed.get("cu_seqlens") is not None:
        ref_last = ref_finals
    else:
        last_of_row = {r: i for i, (r, _, _) in enumerate(segs)}
        ref_last = ref_finals[[last_of_row[r] for r in range(out.shape[0])]]
    torch.testing.assert_close(out.to(F64), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(last.to(F64), ref_last, rtol=tol, atol=tol)
    g = torch.Generator().manual_seed(7)
    gout = torch.randn(out.shape, generator=g, dtype=F64)
    glast = torch.randn(last.shape, generator=g, dtype=F64)
    grads = torch.autograd.grad((out.to(F64) * gout).sum() + (last.to(F64) * glast).sum(), leaves)
    refs = torch.autograd.grad((ref_out * gout).sum() + (ref_last * glast).sum(), leaves)
    for name, a, r in zip(("u", "delta", "A", "B", "C", "D", "z", "delta_bias"), grads, refs):
        scale = r.abs().max().item() + 1
        torch.testing.assert_close(a.to(F64), r, rtol=tol, atol=tol * scale, msg=lambda m, n=name: f"grad {n}: {m}")


SCANS = {
    "ref": selective_scan_ref,
    "fn": selective_scan_fn,
    "chunked4": lambda *a, **k: selective_scan_chunked(*a, chunk_size=4, **k),
}


@pytest.mark.parametrize("scan", SCANS)
def test_cu_seqlens_equals_each_sequence_alone(scan):
    lengths = [3, 1, 7, 2, 9, 1, 1, 5]
    leaves = _scan_inputs(1, 4, 3, sum(lengths), seed=1)
    cu = _cu(lengths)
    segs = [(0, int(cu[i]), int(cu[i + 1])) for i in range(len(lengths))]
    _compare(SCANS[scan], leaves, segs, 1e-5, cu_seqlens=cu)


@pytest.mark.parametrize("scan", SCANS)
def test_seq_idx_rows(scan):
    """Two rows packed differently (ids need not start at 0 or be consecutive); last state per row."""
    seq_idx = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3, 3],
                            [5, 5, 5, 5, 5, 5, 5, 9, 9, 9, 9, 11]], dtype=torch.int32)
    leaves = _scan_inputs(2, 4, 3, 12, seed=2)
    segs = packing.segments(seq_idx)
    assert segs[:2] == [(0, 0, 3), (0, 3, 4)] and segs[-1] == (1, 11, 12)
    _compare(SCANS[scan], leaves, segs, 1e-5, seq_idx=seq_idx)


def test_boundary_at_every_offset():
    """Chunks of 4 over 13 steps: a boundary at every offset, inside chunks and on their edges."""
    L = 13
    leaves = _scan_inputs(1, 3, 2, L, seed=3)
    for p in range(1, L):
        for scan in ("chunked4", "fn"):
            _compare(SCANS[scan], leaves, [(0, 0, p), (0, p, L)], 1e-5, cu_seqlens=_cu([p, L - p]))


def test_more_than_64_sequences_in_a_row():
    g = torch.Generator().manual_seed(4)
    lengths = torch.randint(1, 4, (70,), generator=g).tolist()
    lengths[5] = 1
    leaves = _scan_inputs(1, 3, 2, sum(lengths), seed=4)
    cu = _cu(lengths)
    segs = [(0, int(cu[i]), int(cu[i + 1])) for i in range(len(lengths))]
    _compare(SCANS["fn"], leaves, segs, 1e-5, cu_seqlens=cu)
    _compare(SCANS["chunked4"], leaves, segs, 1e-5, cu_seqlens=cu)


def test_one_sequence_and_no_packing_agree():
    leaves = _scan_inputs(2, 3, 2, 9, seed=5)
    plain = selective_scan_fn(*leaves[:7], delta_bias=leaves[7], delta_softplus=True)
    packed = selective_scan_fn(*leaves[:7], delta_bias=leaves[7], delta_softplus=True,
                               seq_idx=torch.zeros(2, 9, dtype=torch.int32))
    torch.testing.assert_close(packed, plain, rtol=0, atol=0)


def test_threaded_channel_parts(monkeypatch):
    """The CPU scan split over worker threads (big calls) keeps the packing of every part."""
    import mamba_ssm.ops.selective_scan_chunked as ch

    monkeypatch.setattr(ch, "PARALLEL_MIN_WORK", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    lengths = [4, 1, 6, 3]
    leaves = _scan_inputs(1, 4, 2, sum(lengths), seed=6)
    cu = _cu(lengths)
    assert len(ch._channel_parts(leaves[0], 1, 2)) == 2
    _compare(SCANS["chunked4"], leaves, [(0, int(cu[i]), int(cu[i + 1])) for i in range(4)], 1e-5, cu_seqlens=cu)


# --- bad boundaries -------------------------------------------------------------------------------------------

def _bad(match, **packed):
    u = torch.randn(1, 2, 6)
    A = -torch.rand(2, 3)
    B = torch.randn(1, 3, 6)
    with pytest.raises((ValueError, TypeError), match=match):
        selective_scan_fn(u, u, A, B, B, **packed)


def test_bad_seq_idx():
    _bad(r"seq_idx must be non-decreasing along each row; row 0 goes from 1 to 0 at position 3",
         seq_idx=torch.tensor([[0, 0, 1, 0, 1, 1]], dtype=torch.int32))
    _bad(r"seq_idx must be \(batch, seqlen\) = \(1, 6\), got \(1, 5\)", seq_idx=torch.zeros(1, 5, dtype=torch.int32))
    _bad(r"seq_idx must be \(batch, seqlen\) = \(1, 6\), got \(6,\)", seq_idx=torch.zeros(6, dtype=torch.int32))
    _bad(r"seq_idx must have dtype torch.int32, got torch.int64", seq_idx=torch.zeros(1, 6, dtype=torch.int64))
    _bad(r"seq_idx must be a torch.Tensor", seq_idx=[0, 0, 0, 1, 1, 1])


def test_bad_cu_seqlens():
    _bad(r"cu_seqlens must start at 0, got 1", cu_seqlens=torch.tensor([1, 3, 6], dtype=torch.int32))
    _bad(r"cu_seqlens must be strictly increasing \(no empty sequence\); cu_seqlens\[1\] = 3, cu_seqlens\[2\] = 3",
         cu_seqlens=torch.tensor([0, 3, 3, 6], dtype=torch.int32))
    _bad(r"strictly increasing.*cu_seqlens\[1\] = 4, cu_seqlens\[2\] = 2",
         cu_seqlens=torch.tensor([0, 4, 2, 6], dtype=torch.int32))
    _bad(r"cu_seqlens must end at the packed length seqlen = 6, got 5",
         cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
    _bad(r"cu_seqlens must have dtype torch.int32 or torch.int64, got torch.float32",
         cu_seqlens=torch.tensor([0.0, 6.0]))
    _bad(r"cu_seqlens must be 1-D \(num_seqs \+ 1,\) with num_seqs >= 1, got \(1, 2\)",
         cu_seqlens=torch.tensor([[0, 6]], dtype=torch.int32))
    _bad(r"seq_idx and cu_seqlens disagree", cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32),
         seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1]], dtype=torch.int32))
    u = torch.randn(2, 2, 6)
    with pytest.raises(ValueError, match=r"cu_seqlens packs sequences into a single row, so the batch must be 1, "
                                         r"got batch 2"):
        selective_scan_fn(u, u, -torch.rand(2, 3), torch.randn(2, 3, 6), torch.randn(2, 3, 6),
                          cu_seqlens=torch.tensor([0, 6]))


def test_bad_boundaries_named_by_conv_and_inner():
    x = torch.randn(1, 2, 6)
    with pytest.raises(ValueError, match="causal_conv1d_fn: seq_idx must be non-decreasing"):
        causal_conv1d_fn(x, torch.randn(2, 4), seq_idx=torch.tensor([[1, 1, 1, 0, 0, 0]], dtype=torch.int32))
    w = torch.randn(2, 4)
    torch.testing.assert_close(causal_conv1d_fn(x, w, None, "silu"), causal_conv1d_fn(x, w, activation="silu"))
    m = _inner_weights(2, 2, 6, seed=0)
    with pytest.raises(ValueError, match="mamba_inner_fn: cu_seqlens must end at the packed length seqlen = 6"):
        mamba_inner_fn(*m, cu_seqlens=torch.tensor([0, 5]))


def test_seq_idx_checked_once_per_tensor():
    """The non-decreasing check (a device sync on a GPU) runs once per seq_idx tensor, again after a change."""
    seq_idx = torch.tensor([[0, 0, 1, 1]], dtype=torch.int32)
    packing.check_seq_idx(seq_idx, 1, 4)
    assert packing._last_checked[0]() is seq_idx
    seq_idx[0, 3] = 0  # bumps the version: checked again
    with pytest.raises(ValueError, match="non-decreasing"):
        packing.check_seq_idx(seq_idx, 1, 4)


# --- causal conv ----------------------------------------------------------------------------------------------

def _conv_leaves(batch, dim, seqlen, width, seed, dtype=F64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(batch, dim, seqlen, generator=g, dtype=F64), torch.randn(dim, width, generator=g, dtype=F64),
              torch.randn(dim, generator=g, dtype=F64)]
    return [t.to(device, dtype).requires_grad_() for t in leaves]


def _check_conv(conv, seq_idx, width, dtype=F64, tol=1e-10, seed=0):
    batch, seqlen = seq_idx.shape
    x, w, b = _conv_leaves(batch, 5, seqlen, width, seed, dtype, seq_idx.device)
    out = conv(x, w, b, seq_idx)
    rows = [[] for _ in range(batch)]
    x64, w64, b64 = (t.to("cpu", F64) for t in (x, w, b))
    for r, a, e in packing.segments(seq_idx):
        rows[r].append(oracle_conv(x64[r, :, a:e], w64, b64))
    ref = torch.stack([torch.cat(p, 1) for p in rows])
    out = out.to("cpu", F64)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    grads = torch.autograd.grad((out * gout).sum(), (x, w, b))
    refs = torch.autograd.grad((ref * gout).sum(), (x, w, b))
    for name, a, r in zip(("x", "weight", "bias"), grads, refs):
        scale = r.abs().max().item() + 1
        torch.testing.assert_close(a.to("cpu", F64), r.to("cpu", F64), rtol=tol, atol=tol * scale, msg=lambda m, n=name: f"grad {n}: {m}")


def _torch_conv(x, w, b, seq_idx):
    return causal_conv1d_fn(x, w, b, seq_idx=seq_idx, activation="silu")


CONV_LAYOUTS = [
    [[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3]],                         # lengths 3, 2, 5, 1
    [[0] * 2 + [1] * 9, [4] * 8 + [5] + [6] * 2],                # two rows
    [list(range(11))],                                           # every sequence of length 1
]


@pytest.mark.parametrize("width", [2, 4])
@pytest.mark.parametrize("layout", range(len(CONV_LAYOUTS)))
def test_conv_packed_equals_each_sequence_alone(layout, width):
    _check_conv(_torch_conv, torch.tensor(CONV_LAYOUTS[layout], dtype=torch.int32), width)


def test_conv_cu_seqlens_and_inference():
    x, w, b = (t.detach() for t in _conv_leaves(1, 5, 11, 4, 3, torch.float32))
    cu = _cu([3, 2, 5, 1])
    a = causal_conv1d_fn(x, w, b, activation="silu", cu_seqlens=cu)
    with torch.no_grad():  # the inference path (no autograd) gives the same
        c = causal_conv1d_fn(x, w, b, seq_idx=packing.seq_idx_from_cu_seqlens(cu, 11), activation="silu")
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    _check_conv(lambda x, w, b, s: causal_conv1d_fn(x, w, b, activation="silu", cu_seqlens=cu),
                packing.seq_idx_from_cu_seqlens(cu, 11), 4)


def _triton_conv(x, w, b, seq_idx):
    from mamba_ssm.ops.triton.causal_conv1d import causal_conv1d_triton

    return causal_conv1d_triton(x, w, b, "silu", seq_idx=seq_idx.to(x.device))


def _long_layout(seqlen, seed):
    """One row of 300 steps (3 Triton time blocks) with boundaries on and next to block edges."""
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(set([1, 127, 128, 129, 256, 257] + torch.randint(1, seqlen, (20,), generator=g).tolist()))
    seq_idx = torch.zeros(1, seqlen, dtype=torch.int32)
    for c in cuts:
        seq_idx[0, c:] += 1
    return seq_idx


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU test covers it")
def test_triton_conv_packed_in_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    _check_conv(_triton_conv, _long_layout(300, 0), 4, dtype=torch.float32, tol=1e-5)
    _check_conv(_triton_conv, torch.tensor(CONV_LAYOUTS[1], dtype=torch.int32), 3, dtype=torch.float32, tol=1e-5)


# --- the fused inner block -------------------------------------------------------------------------------------

def _inner_weights(dim, dstate, seqlen, seed, batch=1, d_model=3, dt_rank=2):
    g = torch.Generator().manual_seed(seed)

    def r(*s, scale=1.0):
        return (torch.randn(*s, generator=g, dtype=F64) * scale).requires_grad_()

    return [r(batch, 2 * dim, seqlen), r(dim, 1, 4, scale=0.5), r(dim), r(dt_rank + 2 * dstate, dim, scale=0.5),
            r(dim, dt_rank, scale=0.5), r(d_model, dim), None, (-torch.rand(dim, dstate, generator=g, dtype=F64) - 0.5)
            .requires_grad_()]


@pytest.mark.parametrize("inner", [mamba_inner_fn, mamba_inner_ref])
def test_inner_packed_equals_each_sequence_alone(inner):
    lengths = [4, 1, 6, 2]
    L = sum(lengths)
    m = _inner_weights(4, 3, L, seed=8)
    D = torch.randn(4, dtype=F64, requires_grad=True)
    bias = torch.randn(4, dtype=F64, requires_grad=True)
    cu = _cu(lengths)
    out = inner(*m, D=D, delta_bias=bias, cu_seqlens=cu)
    alone = torch.cat([mamba_inner_ref(m[0][..., a:e], *m[1:], D=D, delta_bias=bias)
                       for a, e in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)
    torch.testing.assert_close(out, alone, rtol=1e-5, atol=1e-5)
    leaves = [t for t in m if t is not None] + [D, bias]
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    for a, r in zip(torch.autograd.grad((out * gout).sum(), leaves), torch.autograd.grad((alone * gout).sum(), leaves)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5 * (r.abs().max().item() + 1))


# --- GPU -------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_packed_scan_on_gpu_equals_unpacked_kernel(dtype):
    """selective_scan_fn on CUDA with cu_seqlens (the packed kernels) against the unpacked kernels on
    each sequence alone: outputs, per-sequence final states and every gradient; 73 sequences,
    lengths 1 to 300."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (70,), generator=g).tolist() + [1, 300, 1]
    L, dim, dstate = sum(lengths), 64, 16
    leaves = [t.to("cuda", F64) for t in _scan_inputs(1, dim, dstate, L, seed=9)]
    leaves = [(t.to(dtype) if i not in (2, 5, 7) else t.float()).detach().requires_grad_() for i, t in enumerate(leaves)]
    cu = _cu(lengths).cuda()
    out, last = selective_scan_fn(*leaves[:7], delta_bias=leaves[7], delta_softplus=True, return_last_state=True,
                                  cu_seqlens=cu)
    outs, lasts = [], []
    u, delta, A, B, C, D, z, bias = leaves
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o, h = selective_scan_fn(u[..., a:e], delta[..., a:e], A, B[..., a:e], C[..., a:e], D, z[..., a:e], bias,
                                 True, return_last_state=True)
        outs.append(o)
        lasts.append(h[0])
    ref_out, ref_last = torch.cat(outs, -1), torch.stack(lasts)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), ref_out.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(last, ref_last, rtol=tol, atol=tol)
    gout, glast = torch.randn_like(out), torch.randn_like(last)
    grads = torch.autograd.grad((out.float() * gout).sum() + (last * glast).sum(), leaves)
    refs = torch.autograd.grad((ref_out.float() * gout).sum() + (ref_last * glast).sum(), leaves)
    for a, r in zip(grads, refs):
        torch.testing.assert_close(a.float(), r.float(), rtol=tol, atol=tol * (r.abs().max().item() + 1))


# The CUDA kernels with seq_idx, checked as tests/test_selective_scan_cuda.py checks them: against a
# float64 recurrence run on the same low-precision values, the packed kernels' error within a small
# multiple of the unpacked kernels' error on each sequence alone (or under a per-dtype floor), and the
# two kernels' results within that floor of each other. Outputs are poisoned with NaN before each
# launch, so an element (a final state) that no kernel writes shows up.
CUDA_FLOOR = {torch.float32: 6e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
CUDA_MULT = 4.0
CUDA_NAMES = ("out", "last_state", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias")


def _scan64_packed(u, delta, A, B, C, D, z, bias, seq_idx, ends=None):
    """The packed recurrence in float64 on the inputs' device, differentiable: the decay is 0 where
    seq_idx changes. B, C (batch, dstate, L) or (batch, groups, dstate, L). Returns out and the
    states at the steps `ends` of row 0 (cu_seqlens), or each row's last state."""
    batch, dim, L = u.shape
    dt = F.softplus(delta + bias[:, None])

    def expand(X):
        if X.dim() == 4:
            return X.repeat_interleave(dim // X.shape[1], dim=1)
        return X[:, None].expand(batch, dim, *X.shape[1:])

    Bx, Cx = expand(B), expand(C)                                          # (b, dim, n, L)
    decay = torch.exp(dt[..., None] * A[None, :, None, :]) * packing.keep_mask(seq_idx, u.dtype)[:, None, :, None]
    inp = (dt * u)[..., None] * Bx.permute(0, 1, 3, 2)                    # (b, dim, L, n)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys, finals, ends = [], [], set(ends or ())
    for t in range(L):
        h = decay[:, :, t] * h + inp[:, :, t]
        ys.append((h * Cx[..., t]).sum(-1))
        if t in ends:
            finals.append(h[0])
    y = (torch.stack(ys, -1) + D[:, None] * u) * F.silu(z)
    return y, (torch.stack(finals) if ends else h)


def _alone_cuda(x, segs, per_sequence):
    """Each (row, start, end) through the unpacked CUDA kernels alone, laid back into rows; the final
    states of every sequence (per_sequence) or of each row's last one."""
    from mamba_ssm.ops.selective_scan_cuda import selective_scan_cuda

    u, delta, A, B, C, D, z, bias = x
    rows, lasts, last_of_row = [[] for _ in range(u.shape[0])], [], {}
    for i, (r, a, e) in enumerate(segs):
        u_s, delta_s, B_s, C_s, z_s = (t[r:r + 1, ..., a:e] for t in (u, delta, B, C, z))
        o, h = selective_scan_cuda(u_s, delta_s, A, B_s, C_s, D, z_s, bias, True, True)
        rows[r].append(o)
        lasts.append(h[0])
        last_of_row[r] = i
    out = torch.cat([torch.cat(p, -1) for p in rows])
    return out, torch.stack(lasts if per_sequence else [lasts[last_of_row[r]] for r in range(u.shape[0])])


def _check_packed_cuda(dtype, dim, dstate, seed, kernel, seq_idx=None, lengths=None, groups=None, **settings):
    """The packed kernels (selective_scan_fn, seq_idx or cu_seqlens from `lengths`, batch 1) against
    each sequence alone through the unpacked kernels and against float64: outputs, final states (per
    sequence with cu_seqlens, per row with seq_idx) and the gradients of every input. kernel: "fwd2"
    or "fwd_tp", the forward asserted through forward_plan; settings: override_settings' fields."""
    from mamba_ssm.backend import use_backend
    from mamba_ssm.ops import selective_scan_cuda as ssc
    from mamba_ssm.ops.selective_scan_settings import override_settings

    if ssc._ext is None:
        pytest.fail(f"CUDA is available but mamba_ssm._selective_scan_cuda did not load: {ssc.import_error()}")
    cu = _cu(lengths).cuda() if lengths is not None else None
    if cu is not None:
        seq_idx = packing.seq_idx_from_cu_seqlens(cu, int(cu[-1]))
    seq_idx = seq_idx.cuda()
    batch, L = seq_idx.shape
    g = torch.Generator().manual_seed(seed)
    u, delta, z = (torch.randn(batch, dim, L, generator=g) for _ in range(3))
    delta = delta - 1.0
    bc_shape = (batch, dstate, L) if groups is None else (batch, groups, dstate, L)
    B, C = (torch.randn(*bc_shape, generator=g) for _ in range(2))
    A = -(0.2 + torch.rand(dim, dstate, generator=g) * 1.5)
    D, bias = torch.randn(dim, generator=g), torch.rand(dim, generator=g) * 0.5
    # the low-precision values, then three leaf copies: packed, alone, float64
    base = [t.to("cuda", dtype if i not in (2, 5, 7) else torch.float32)
            for i, t in enumerate((u, delta, A, B, C, D, z, bias))]
    x_packed, x_alone, x_64 = ([t.detach().clone().to(dt or t.dtype).requires_grad_() for t in base]
                               for dt in (None, None, F64))
    segs = packing.segments(seq_idx)
    if cu is not None:
        assert len(segs) == len(lengths)
    with use_backend("cuda"), override_settings(poison=True, fwd_tp=kernel == "fwd_tp", **settings):
        assert ssc.forward_plan(*base[:7], base[7], True)["kernel"] == kernel
        packed = selective_scan_fn(*x_packed[:7], delta_bias=x_packed[7], delta_softplus=True, return_last_state=True,
                                   **({"cu_seqlens": cu} if cu is not None else {"seq_idx": seq_idx}))
        alone = _alone_cuda(x_alone, segs, per_sequence=cu is not None)
    ref = _scan64_packed(*x_64, seq_idx, packing.sequence_ends(cu) if cu is not None else None)
    assert packed[0].dtype == dtype and packed[0].shape == (batch, dim, L)
    assert packed[1].dtype == torch.float32 and packed[1].shape == ref[1].shape
    g2 = torch.Generator().manual_seed(seed + 1)
    gout = torch.randn(batch, dim, L, generator=g2, dtype=F64).cuda()
    glast = torch.randn(ref[1].shape, generator=g2, dtype=F64).cuda()
    results = []
    for (out, last), leaves in ((packed, x_packed), (alone, x_alone), (ref, x_64)):
        grads = torch.autograd.grad((out.to(F64) * gout).sum() + (last.to(F64) * glast).sum(), leaves)
        results.append([out, last, *grads])
    floor, failures = CUDA_FLOOR[dtype], []
    for name, o, a, r in zip(CUDA_NAMES, *results):
        assert o.dtype == a.dtype and o.shape == a.shape, name
        if not torch.isfinite(o).all():
            failures.append(f"{name}: non-finite values (unwritten or overflow)")
            continue
        o, a, r = o.double(), a.double(), r.double()
        norm, scale = r.norm().clamp_min(1e-30).item(), r.abs().max().item()
        e_o, e_a, e_oa = (o - r).norm().item() / norm, (a - r).norm().item() / norm, (o - a).norm().item() / norm
        m_o, m_a = (o - r).abs().max().item(), (a - r).abs().max().item()
        if e_o > max(CUDA_MULT * e_a, floor):
            failures.append(f"{name}: rel err {e_o:.3e} vs the kernels alone's {e_a:.3e} (floor {floor})")
        if m_o > max(CUDA_MULT * m_a, floor * scale) + 1e-30:
            failures.append(f"{name}: max abs err {m_o:.3e} vs the kernels alone's {m_a:.3e} (scale {scale:.3e})")
        if e_oa > floor:
            failures.append(f"{name}: packed against alone, rel diff {e_oa:.3e} (floor {floor})")
    assert not failures, "; ".join(failures)


def _two_sequences_per_row(L):
    """L - 1 rows of length L, row p - 1 holding sequences [0, p) and [p, L): a start at every offset."""
    p = torch.arange(1, L)[:, None]
    return (torch.arange(L)[None, :] >= p).to(torch.int32) + 3 * p.to(torch.int32)  # (ids need not start at 0)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["fwd2", "fwd_tp"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L, split, segment", [(96, 1, 16), (100, None, 16), (100, 4, 48), (96, 3, 32)])
def test_cuda_kernels_start_at_every_offset(kernel, dtype, L, split, segment):
    """A sequence start at every offset 1..L-1 (one row each: multiples of 16, fwd_tp's 8-step slices
    and 32-step sub-chunks, segment starts, the split's group edges included), both forwards, 96 steps
    (the instantiations without bounds checks) and 100, unsplit, auto-split and split, segments of 16,
    32 and 48 steps; final states per row."""
    _check_packed_cuda(dtype, 16, 16, seed=L + 7 * (split or 0) + segment, kernel=kernel,
                       seq_idx=_two_sequences_per_row(L), split=split, segment=segment)


def _lengths(seed, n, longest):
    """n sequence lengths 1..longest, with sequences of length 1 first and last (starts at 1 and at
    seqlen - 1) and lengths 16 and 32 among them."""
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(1, longest + 1, (n,), generator=g).tolist() + [16, 32, 1, 1]


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["fwd2", "fwd_tp"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split, segment", [(None, 16), (1, 32), (5, 16)])
def test_cuda_kernels_per_sequence_final_states(kernel, dtype, split, segment):
    """cu_seqlens with return_last_state: each of 75 sequences' final state (and its gradient) from the
    packed kernels, several starts in one 16-step sub-chunk or 8-step slice, lengths 1 to 40."""
    _check_packed_cuda(dtype, 16, 16, seed=11 + (split or 0) + segment, kernel=kernel, lengths=_lengths(3, 70, 40),
                       split=split, segment=segment)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["fwd2", "fwd_tp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_kernels_every_sequence_of_length_1(kernel, dtype):
    """A start at every step: 100 sequences of length 1 in one row (final states per sequence), and
    rows where seq_idx changes at every step."""
    _check_packed_cuda(dtype, 16, 16, seed=5, kernel=kernel, lengths=[1] * 100)
    every_step = torch.arange(3 * 77, dtype=torch.int32).view(3, 77)
    _check_packed_cuda(dtype, 16, 16, seed=6, kernel=kernel, seq_idx=every_step)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["fwd2", "fwd_tp"])
def test_cuda_kernels_long_sequences(kernel):
    """Sequences of hundreds of steps next to short ones, in a row of 1500 steps split into groups:
    starts and no starts inside a group (the split's composition), per-sequence final states."""
    lengths = [700, 3, 1, 96, 300, 1, 399]
    _check_packed_cuda(torch.bfloat16, 16, 16, seed=8, kernel=kernel, lengths=lengths, split=6)
    _check_packed_cuda(torch.float32, 16, 16, seed=9, kernel=kernel, lengths=lengths, segment=64)


@pytest.mark.cuda
@pytest.mark.parametrize("dim, dstate, groups, kernel, dtype, save_y", [
    (16, 20, None, "fwd2", torch.bfloat16, True),   # 2 state slots, the second partly past dstate
    (32, 64, 2, "fwd2", torch.float32, True),       # 4 slots, grouped B / C
    (16, 7, 2, "fwd_tp", torch.float16, False),     # dstate below a lane's 4 states; y recomputed
    (12, 16, 3, "fwd_tp", torch.bfloat16, True),    # blocks of 4 channels
    (6, 16, None, "fwd2", torch.float32, False),    # 2 channels per block: the per-channel dB/dC sum
    (16, 16, None, "fwd2", torch.float16, False),   # the lane-permuted dB/dC sum, y recomputed
])
def test_cuda_kernels_shapes(dim, dstate, groups, kernel, dtype, save_y):
    """The packed kernels' other layouts and instantiations (state slots, groups, the backward's
    reduction modes, y saved or recomputed): per-sequence final states and per-row ones (two rows with
    ids that need not be consecutive)."""
    _check_packed_cuda(dtype, dim, dstate, seed=dim + dstate, kernel=kernel, lengths=_lengths(4, 30, 20), groups=groups,
                       save_y=save_y)
    rows = torch.tensor([[0] * 5 + [1] * 40 + [2] * 16 + [3] + [4] * 38, [7] * 64 + [9] * 35 + [12]], dtype=torch.int32)
    _check_packed_cuda(dtype, dim, dstate, seed=dim + dstate + 1, kernel=kernel, seq_idx=rows, groups=groups,
                       save_y=save_y, split=2)


@pytest.mark.cuda
def test_cuda_scan_packing_arguments():
    """selective_scan_cuda takes seq_idx / cu_seqlens as selective_scan_ref does, with selective_scan_fn's
    bits; given both, seq_idx's ids need not number the sequences (the per-sequence final states follow
    cu_seqlens); a bad seq_idx is named."""
    from mamba_ssm.backend import use_backend
    from mamba_ssm.ops.selective_scan_cuda import selective_scan_cuda

    lengths = [5, 1, 40, 17, 1]
    L, cu = sum(lengths), _cu(lengths).cuda()
    x = [t.detach().float().cuda() for t in _scan_inputs(1, 16, 16, L, seed=12)]
    ids = packing.seq_idx_from_cu_seqlens(cu, L) * 3 + 2  # the same starts, other ids
    a = selective_scan_cuda(*x[:7], x[7], True, True, cu_seqlens=cu)
    b = selective_scan_cuda(*x[:7], x[7], True, True, ids, cu)
    with use_backend("cuda"):
        c = selective_scan_fn(*x[:7], delta_bias=x[7], delta_softplus=True, return_last_state=True, cu_seqlens=cu)
    assert a[1].shape == (len(lengths), 16, 16)
    for p, q, r in zip(a, b, c):
        assert torch.equal(p, q) and torch.equal(p, r)
    with pytest.raises(ValueError, match="selective_scan_cuda: seq_idx must be non-decreasing along each row"):
        selective_scan_cuda(*x[:7], x[7], True, seq_idx=torch.flip(ids, [1]).contiguous())


@pytest.mark.cuda
def test_packed_triton_conv_on_gpu():
    pytest.importorskip("triton")
    _check_conv(_triton_conv, _long_layout(300, 0).cuda(), 4, dtype=torch.float32, tol=1e-5)


def test_grouped_B_C_packed():
    """B and C in groups (batch, groups, dstate, seqlen): the chunked scan against the reference,
    outputs, per-sequence final states and gradients."""
    g = torch.Generator().manual_seed(11)
    lengths = [3, 1, 6, 4]
    L, dim, n = sum(lengths), 4, 3
    u, delta, z = (torch.randn(1, dim, L, generator=g, dtype=F64).requires_grad_() for _ in range(3))
    B, C = (torch.randn(1, 2, n, L, generator=g, dtype=F64).requires_grad_() for _ in range(2))
    A = (-torch.rand(dim, n, generator=g, dtype=F64) - 0.1).requires_grad_()
    leaves = [u, delta, A, B, C, z]
    cu = _cu(lengths)
    res = [f(u, delta, A, B, C, None, z, None, True, return_last_state=True, cu_seqlens=cu)
           for f in (selective_scan_ref, SCANS["chunked4"])]
    for a, b in zip(*res):
        torch.testing.assert_close(a.to(F64), b.to(F64), rtol=1e-5, atol=1e-5)
    go = torch.randn(res[0][0].shape, generator=g, dtype=F64)
    gl = torch.randn(res[0][1].shape, generator=g, dtype=F64)
    grads = [torch.autograd.grad((o.to(F64) * go).sum() + (h.to(F64) * gl).sum(), leaves) for o, h in res]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * (b.abs().max().item() + 1))
