"""Packed sequences (mamba_ssm/ops/packing.py) in the selective scan, the causal conv and the fused
inner block: a packed row gives what each of its sequences gives run alone (outputs, final states,
every gradient), checked against a float64 recurrence and a float64 conv written here."""
import importlib.util
import warnings

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
    # the GPU's route (one sequence per row, left-padded), here around the chunked scan
    "by_sequences": lambda *a, seq_idx=None, cu_seqlens=None, **k: packing.scan_by_sequences(
        selective_scan_chunked, *a, **k, seq_idx=packing.resolve(seq_idx, cu_seqlens, a[0].shape[0],
                                                                 a[0].shape[2], a[0].device)[0],
        cu_seqlens=cu_seqlens),
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
    _compare(SCANS["by_sequences"], leaves, segs, 1e-5, cu_seqlens=cu)


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
    """selective_scan_fn on CUDA with cu_seqlens against the unpacked kernel on each sequence alone:
    outputs, per-sequence final states and every gradient; 70 sequences, lengths 1 to 300."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (70,), generator=g).tolist() + [1, 300, 1]
    L, dim, dstate = sum(lengths), 64, 16
    leaves = [t.to("cuda", F64) for t in _scan_inputs(1, dim, dstate, L, seed=9)]
    leaves = [(t.to(dtype) if i not in (2, 5, 7) else t.float()).detach().requires_grad_() for i, t in enumerate(leaves)]
    cu = _cu(lengths).cuda()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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


@pytest.mark.cuda
def test_packed_triton_conv_on_gpu():
    pytest.importorskip("triton")
    _check_conv(_triton_conv, _long_layout(300, 0).cuda(), 4, dtype=torch.float32, tol=1e-5)


def test_repack_maps_are_shared_until_seq_idx_changes():
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2]], dtype=torch.int32)
    rp = packing._repack_of(seq_idx)
    assert packing._repack_of(seq_idx) is rp and (rp.num_seqs, rp.max_len) == (3, 3)
    seq_idx[0, 5] = 1
    assert packing._repack_of(seq_idx).num_seqs == 2


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
