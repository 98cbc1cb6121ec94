"""Mamba-2's SSD scan (mamba_chunk_scan_combined) against a float64 per-step recurrence written here."""
import math

import pytest
import torch
import torch.nn.functional as F

from mamba_ssm.ops.ssd_chunked import segment_sums, ssd_minimal_discrete
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

INF = float("inf")


def recurrence64(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                 dt_softplus=False, dt_limit=(0.0, INF)):
    """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T (S reset where seq_idx changes), y_t = S_t C_t + D x_t,
    out = y * silu(z). Returns (out, final state, [state after every step])."""
    x, dt, A, B, C = (t.double() for t in (x, dt, A, B, C))
    b, l, h, p = x.shape
    g, n = B.shape[2:]
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = torch.where(dt > 20, dt, torch.log1p(torch.exp(dt)))
    if tuple(dt_limit) != (0.0, INF):
        dt = dt.clamp(dt_limit[0], dt_limit[1])
    Bh = B.repeat_interleave(h // g, dim=2)
    Ch = C.repeat_interleave(h // g, dim=2)
    S = torch.zeros(b, h, p, n, dtype=torch.float64) if initial_states is None else initial_states.double()
    ys, states = [], []
    for t in range(l):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).double().view(b, 1, 1, 1)
            S = S * keep
        d = dt[:, t, :, None, None]
        S = torch.exp(d * A.view(h, 1, 1)) * S + d * x[:, t, :, :, None] * Bh[:, t, :, None, :]
        states.append(S)
        ys.append((S * Ch[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        Dd = D.double()
        y = y + x * (Dd if Dd.dim() == 2 else Dd[:, None])
    if z is not None:
        zd = z.double()
        y = y * zd * torch.sigmoid(zd)
    return y, S, states


def make(b=2, l=37, h=4, p=3, g=2, n=5, D_shape="h", z=True, bias=True, init=True, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)  # noqa: E731
    t = dict(x=r(b, l, h, p), dt=r(b, l, h) - 1.0, A=-torch.rand(h, generator=gen, dtype=dtype) * 3 - 0.1,
             B=r(b, l, g, n), C=r(b, l, g, n))
    if D_shape == "h":
        t["D"] = r(h)
    elif D_shape == "hp":
        t["D"] = r(h, p)
    if z:
        t["z"] = r(b, l, h, p)
    if bias:
        t["dt_bias"] = r(h) * 0.5
    if init:
        t["initial_states"] = r(b, h, p, n)
    return t


def run_both(t, chunk, **kw):
    """Our scan and the recurrence on the same leaves; returns (ours (out, final), ref (out, final), leaves)."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    ours = mamba_chunk_scan_combined(chunk_size=chunk, return_final_states=True, **leaves, **kw)
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    ref = recurrence64(**ref_leaves, **kw)[:2]
    return ours, ref, leaves, ref_leaves


def assert_close_with_grads(t, chunk, atol=1e-9, rtol=1e-7, **kw):
    ours, ref, leaves, ref_leaves = run_both(t, chunk, **kw)
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a.double(), r, atol=atol, rtol=rtol)
    gen = torch.Generator().manual_seed(1)
    w_out = torch.randn(ref[0].shape, generator=gen, dtype=torch.float64)
    w_state = torch.randn(ref[1].shape, generator=gen, dtype=torch.float64)
    loss = lambda o: (o[0].double() * w_out).sum() + (o[1].double() * w_state).sum()  # noqa: E731
    names = list(leaves)
    g_ours = torch.autograd.grad(loss(ours), [leaves[k] for k in names])
    g_ref = torch.autograd.grad(loss(ref), [ref_leaves[k] for k in names])
    for name, a, r in zip(names, g_ours, g_ref):
        torch.testing.assert_close(a.double(), r, atol=atol * 10, rtol=rtol * 10, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("l,chunk", [(1, 8), (37, 8), (32, 8), (37, 64), (5, 1)])
@pytest.mark.parametrize("g", [1, 2, 4])
def test_lengths_and_groups(l, chunk, g):
    assert_close_with_grads(make(l=l, g=g), chunk, dt_softplus=True)


@pytest.mark.parametrize("D_shape", ["h", "hp", None])
@pytest.mark.parametrize("z", [True, False])
def test_D_shapes_and_gate(D_shape, z):
    assert_close_with_grads(make(D_shape=D_shape, z=z), 8, dt_softplus=True)


def test_without_bias_softplus_and_initial_states():
    t = make(bias=False, init=False)
    t["dt"] = t["dt"].abs() * 0.3
    assert_close_with_grads(t, 16)


def test_dt_limit():
    assert_close_with_grads(make(), 8, dt_softplus=True, dt_limit=(0.2, 0.9))


def test_seq_idx_resets_state_and_keeps_initial_state_for_the_first_sequence():
    t = make(b=2, l=29)
    seq_idx = torch.tensor([[0] * 5 + [1] * 11 + [2] * 13, [3] * 20 + [7] * 9], dtype=torch.int32)
    assert_close_with_grads(t, 8, dt_softplus=True, seq_idx=seq_idx)


def test_packed_sequences_equal_each_alone_and_varlen_states():
    lengths = [3, 9, 1, 17, 8]
    total = sum(lengths)
    t = make(b=1, l=total, init=False)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    out, final, varlen = mamba_chunk_scan_combined(chunk_size=8, cu_seqlens=cu, dt_softplus=True,
                                                   return_final_states=True, return_varlen_states=True, **t)
    assert varlen.shape == (len(lengths), 4, 3, 5)
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        part = {k: (v[:, s:e] if v.dim() >= 3 else v) for k, v in t.items()}
        alone, state, _ = recurrence64(dt_softplus=True, **part)
        torch.testing.assert_close(out[:, s:e], alone, atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(varlen[i], state[0], atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(final, varlen[-1:], atol=1e-9, rtol=1e-7)
    # the same with seq_idx given instead, and only varlen states asked for
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).unsqueeze(0)
    out2, varlen2 = mamba_chunk_scan_combined(chunk_size=5, seq_idx=seq_idx, cu_seqlens=cu, dt_softplus=True,
                                              return_varlen_states=True, **t)
    torch.testing.assert_close(out2, out, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(varlen2, varlen, atol=1e-9, rtol=1e-7)


def test_varlen_states_gradients():
    lengths = [6, 11, 4]
    t = make(b=1, l=sum(lengths), init=False)
    cu = torch.tensor([0, 6, 17, 21])
    leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    out, varlen = mamba_chunk_scan_combined(chunk_size=4, cu_seqlens=cu, dt_softplus=True,
                                            return_varlen_states=True, **leaves)
    ref_states = []
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in t.items()}
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part = {k: (v[:, s:e] if v.dim() >= 3 else v) for k, v in ref_leaves.items()}
        ref_states.append(recurrence64(dt_softplus=True, **part)[1][0])
    ref_states = torch.stack(ref_states)
    torch.testing.assert_close(varlen, ref_states, atol=1e-9, rtol=1e-7)
    w = torch.randn(ref_states.shape, dtype=torch.float64)
    used = ["x", "dt", "A", "B", "dt_bias"]          # C, D and z do not reach the states
    g1 = torch.autograd.grad((varlen * w).sum(), [leaves[k] for k in used])
    g2 = torch.autograd.grad((ref_states * w).sum(), [ref_leaves[k] for k in used])
    for name, a, r in zip(used, g1, g2):
        torch.testing.assert_close(a, r, atol=1e-8, rtol=1e-6, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 2e-4), (torch.bfloat16, 5e-2)])
def test_low_precision_inputs(dtype, atol):
    t = make(l=40, dtype=torch.float64)
    low = {k: v.to(dtype) for k, v in t.items()}
    out, final = mamba_chunk_scan_combined(chunk_size=16, dt_softplus=True, return_final_states=True, **low)
    assert out.dtype == dtype and final.dtype == torch.float32
    ref, ref_final, _ = recurrence64(dt_softplus=True, **{k: v.double() for k, v in low.items()})
    scale = ref.abs().max()
    assert (out.double() - ref).abs().max() <= atol * scale
    assert (final.double() - ref_final).abs().max() <= atol * ref_final.abs().max()


def test_long_sequence_decay_stays_accurate_in_float32():
    # many chunks with slow decay: chunk-to-chunk decays are summed directly, not as differences of large sums
    t = make(b=1, l=600, h=2, p=2, g=1, n=3, D_shape=None, z=False, init=True, bias=False)
    t["dt"] = torch.full_like(t["dt"], 0.05)
    low = {k: v.float() for k, v in t.items()}
    out, final = mamba_chunk_scan_combined(chunk_size=8, return_final_states=True, **low)
    ref, ref_final, _ = recurrence64(**t)
    torch.testing.assert_close(out.double(), ref, atol=1e-4 * ref.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(final.double(), ref_final, atol=1e-4 * ref_final.abs().max().item(), rtol=1e-4)


def test_segment_sums():
    v = torch.randn(6, dtype=torch.float64)
    s = segment_sums(v)
    for i in range(6):
        for j in range(6):
            want = v[j + 1:i + 1].sum() if j <= i else -INF
            assert s[i, j].item() == pytest.approx(float(want), abs=1e-12)


def test_ssd_minimal_discrete_matches_the_recurrence():
    t = make(b=2, l=19, h=3, p=2, g=3, n=4, D_shape=None, z=False, bias=False)
    dt = F.softplus(t["dt"])
    X = t["x"] * dt[..., None]
    Astep = dt * t["A"]
    Y, final = ssd_minimal_discrete(X, Astep, t["B"], t["C"], 4, initial_states=t["initial_states"])
    ref, ref_final, _ = recurrence64(dt_softplus=True, **{k: t[k] for k in ("x", "dt", "A", "B", "C", "initial_states")})
    torch.testing.assert_close(Y, ref, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(final, ref_final, atol=1e-9, rtol=1e-7)


def _bad(**changes):
    t = make(b=1, l=6)
    t.update(changes)
    return t


@pytest.mark.parametrize("changes,kw,match", [
    (dict(dt=torch.randn(1, 6, 3)), {}, r"dt must be \(batch, seqlen, nheads\) = \(1, 6, 4\)"),
    (dict(A=torch.randn(3)), {}, r"A must be \(nheads,\) = \(4,\)"),
    (dict(B=torch.randn(1, 6, 3, 5), C=torch.randn(1, 6, 3, 5)), {}, r"nheads \(4\) must be divisible by ngroups \(3"),
    (dict(C=torch.randn(1, 6, 2, 4)), {}, r"C must have B's shape"),
    (dict(D=torch.randn(4, 2)), {}, r"D must be \(nheads,\)"),
    (dict(z=torch.randn(1, 6, 4, 2)), {}, r"z must have x's shape"),
    (dict(dt_bias=torch.randn(5)), {}, r"dt_bias must be \(nheads,\)"),
    (dict(initial_states=torch.randn(1, 4, 3, 4)), {}, r"initial_states must be \(batch, nheads, headdim, dstate\) = \(1, 4, 3, 5\)"),
    ({}, dict(seq_idx=torch.zeros(1, 5, dtype=torch.int32)), r"seq_idx must be an integer tensor \(batch, seqlen\) = \(1, 6\)"),
    ({}, dict(seq_idx=torch.zeros(1, 6)), r"seq_idx must be an integer tensor .* torch.float32"),
    ({}, dict(cu_seqlens=torch.tensor([0, 4, 3, 6])), r"cu_seqlens must start at 0 and be strictly increasing"),
    ({}, dict(cu_seqlens=torch.tensor([0, 2, 5])), r"cu_seqlens must end at the packed length seqlen = 6"),
    ({}, dict(cu_seqlens=torch.tensor([0.0, 6.0])), r"cu_seqlens must be a 1-D integer tensor"),
    ({}, dict(return_varlen_states=True), r"return_varlen_states=True needs cu_seqlens"),
    ({}, dict(dt_limit=(1.0, 0.5)), r"dt_limit must be \(min, max\) with min <= max"),
    ({}, dict(chunk_size=0), r"chunk_size must be a positive integer"),
])
def test_bad_inputs(changes, kw, match):
    kw = {"chunk_size": 4, **kw}
    with pytest.raises(ValueError, match=match):
        mamba_chunk_scan_combined(**_bad(**changes), **kw)


def test_cu_seqlens_needs_batch_one():
    with pytest.raises(ValueError, match="cu_seqlens needs the sequences packed into batch 1, got x of batch 2"):
        mamba_chunk_scan_combined(**make(b=2, l=6), chunk_size=4, cu_seqlens=torch.tensor([0, 6]))


def test_not_a_per_token_loop():
    # the chunked scan's cost must not grow like one op per token: 2048 steps in well under a second
    import time
    t = {k: v.float() for k, v in make(b=1, l=2048, h=8, p=16, g=1, n=16).items()}
    mamba_chunk_scan_combined(chunk_size=128, dt_softplus=True, **t)
    start = time.perf_counter()
    mamba_chunk_scan_combined(chunk_size=128, dt_softplus=True, **t)
    assert time.perf_counter() - start < 2.0


def test_upstream_module_paths_import():
    from mamba_ssm.modules import ssd_minimal
    from mamba_ssm.ops.triton import layernorm_gated, selective_state_update, ssd_combined

    assert ssd_minimal.ssd_minimal_discrete is ssd_minimal_discrete and ssd_minimal.segsum is segment_sums
    assert callable(ssd_combined.mamba_split_conv1d_scan_combined) and callable(layernorm_gated.RMSNorm)
    assert callable(selective_state_update.selective_state_update)


def test_float32_keeps_small_decays_after_large_ones_inside_a_chunk():
    # 32 steps of strong decay, then slow ones: inside the chunk the decays between the slow steps are
    # differences of cumulative sums near -3000, which float32 sums would leave exact to ~2e-4 only
    t = make(b=1, l=64, h=2, p=3, g=1, n=4, D_shape=None, z=False, init=False, bias=False)
    t["A"] = torch.full((2,), -16.0, dtype=torch.float64)
    t["dt"] = torch.cat([torch.full((1, 32, 2), 6.0), torch.full((1, 32, 2), 0.002)], 1).double()
    out = mamba_chunk_scan_combined(chunk_size=64, **{k: v.float() for k, v in t.items()})
    ref, _, _ = recurrence64(**{k: v.float().double() for k, v in t.items()})
    err = ((out.double() - ref).abs().max() / ref[:, 32:].abs().max()).item()
    assert err < 2e-5, err


def test_pair_difference_gradient():
    from mamba_ssm.ops.ssd_chunked import _PairDiff

    v = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _PairDiff.apply(t, torch.float64), (v,))
    out = _PairDiff.apply(v, torch.float32)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 5, 5)
