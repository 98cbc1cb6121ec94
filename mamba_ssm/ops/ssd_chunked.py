"""The SSD scan of Mamba-2 in PyTorch, chunked: matrix products inside chunks, a recurrence between them.

Shapes (upstream's `mamba_chunk_scan_combined`): x (b, l, h, p), dt (b, l, h), A (h,), B and C (b, l, g, n)
with h % g == 0 (head i reads group i // (h / g)), D (h,) or (h, p), z like x, dt_bias (h,),
initial_states (b, h, p, n), seq_idx (b, l) integers, cu_seqlens (num_seqs + 1,) integers with b == 1.

The recurrence, per head, with dt after bias / softplus / clamp to dt_limit:
    S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T          S: (p, n), S_{-1} = initial_states
    y_t = S_t C_t + D x_t,      out_t = y_t * silu(z_t)
A new sequence starts (S reset to 0) wherever seq_idx changes; initial_states is the state before
position 0 only. Without seq_idx, cu_seqlens gives it.

Chunked form, chunk of Q steps, a_t = dt_t A, cumulative sums within the chunk:
    y_l = sum_{s<=l} exp(a_{s+1..l}) (C_l.B_s) dt_s x_s   (a Q x Q matrix product per chunk and head)
        + exp(a_{0..l}) C_l . S_before_chunk
    S_after_chunk = exp(a_chunk) S_before_chunk + sum_s exp(a_{s+1..end}) dt_s x_s B_s^T
The chunk-to-chunk recurrence is solved as one (chunks+1)^2 product with decays summed stably
(`segment_sums`), so nothing loops over time. Everything is differentiable by autograd.
Computed in float32 (float64 for float64 inputs); out has x's dtype, states the compute dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mamba_ssm.ops.packing import seq_idx_from_cu_seqlens

_INF = float("inf")
# On the CPU the scan runs in chunks of at most this many steps, whatever the model's chunk_size (the
# result is the same function; only rounding differs): the (q, q) work inside a chunk shrinks with q.
# 2-core EPYC, fp32, forward (2026-12-07): 64 was fastest or tied of 32/64/128/256 at (1, 1024, 24 heads
# of 64, dstate 128) 25 ms against 65 at 256, (1, 4096) 143 against 381, (4, 512, 32 heads) 72 against
# 208, 8 groups (1, 2048, 64 heads) 352 against 687; forward+backward at the first: 63 against 111 ms.
CPU_CHUNK = 64


def _shape(t):
    return None if t is None else tuple(t.shape)


def _is_int(t):
    return not t.dtype.is_floating_point and not t.dtype.is_complex and t.dtype != torch.bool


def check_ssd_inputs(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                     seq_idx=None, cu_seqlens=None, dt_limit=(0.0, _INF), return_varlen_states=False,
                     name="mamba_chunk_scan_combined"):
    """Raise a ValueError naming the first argument whose shape, dtype or value does not fit."""
    def err(msg):
        raise ValueError(f"{name}: {msg}")

    for arg, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        err(f"x must be (batch, seqlen, nheads, headdim), got {_shape(x)}")
    b, l, h, p = x.shape
    if tuple(dt.shape) != (b, l, h):
        err(f"dt must be (batch, seqlen, nheads) = {(b, l, h)}, got {_shape(dt)}")
    if tuple(A.shape) != (h,):
        err(f"A must be (nheads,) = ({h},), got {_shape(A)}")
    if B.dim() != 4 or B.shape[:2] != (b, l):
        err(f"B must be (batch, seqlen, ngroups, dstate) with batch, seqlen = {(b, l)}, got {_shape(B)}")
    g, n = B.shape[2], B.shape[3]
    if g == 0 or h % g != 0:
        err(f"nheads ({h}) must be divisible by ngroups ({g}, B's dim 2); B is {_shape(B)}")
    if tuple(C.shape) != tuple(B.shape):
        err(f"C must have B's shape {_shape(B)}, got {_shape(C)}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        err(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        err(f"D must be (nheads,) = ({h},) or (nheads, headdim) = {(h, p)}, got {_shape(D)}")
    if z is not None and tuple(z.shape) != tuple(x.shape):
        err(f"z must have x's shape {_shape(x)}, got {_shape(z)}")
    if dt_bias is not None and tuple(dt_bias.shape) != (h,):
        err(f"dt_bias must be (nheads,) = ({h},), got {_shape(dt_bias)}")
    if initial_states is not None and tuple(initial_states.shape) != (b, h, p, n):
        err(f"initial_states must be (batch, nheads, headdim, dstate) = {(b, h, p, n)}, got {_shape(initial_states)}")
    try:
        lo, hi = dt_limit
        lo, hi = float(lo), float(hi)
    except (TypeError, ValueError):
        err(f"dt_limit must be a pair (min, max), got {dt_limit!r}")
    if not lo <= hi:
        err(f"dt_limit must be (min, max) with min <= max, got {dt_limit!r}")
    if seq_idx is not None:
        if not isinstance(seq_idx, torch.Tensor) or tuple(seq_idx.shape) != (b, l) or not _is_int(seq_idx):
            got = f"{_shape(seq_idx)} {seq_idx.dtype}" if isinstance(seq_idx, torch.Tensor) else repr(seq_idx)
            err(f"seq_idx must be an integer tensor (batch, seqlen) = {(b, l)}, got {got}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or not _is_int(cu_seqlens) \
                or cu_seqlens.numel() < 2:
            got = f"{_shape(cu_seqlens)} {cu_seqlens.dtype}" if isinstance(cu_seqlens, torch.Tensor) else repr(cu_seqlens)
            err(f"cu_seqlens must be a 1-D integer tensor (num_seqs + 1,) with num_seqs >= 1, got {got}")
        if b != 1:
            err(f"cu_seqlens needs the sequences packed into batch 1, got x of batch {b}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or any(cu[i + 1] <= cu[i] for i in range(len(cu) - 1)):
            err(f"cu_seqlens must start at 0 and be strictly increasing, got {cu}")
        if cu[-1] != l:
            err(f"cu_seqlens must end at the packed length seqlen = {l}, got {cu}")
    if return_varlen_states and cu_seqlens is None:
        err("return_varlen_states=True needs cu_seqlens")


def segment_sums(v):
    """v (..., T) -> (..., T, T): out[..., i, j] = v[j+1] + ... + v[i] for j <= i, -inf above the diagonal.

    Summed directly (a masked cumulative sum), not as a difference of prefix sums, which loses the
    small differences of two large sums in float32.
    """
    T = v.shape[-1]
    strict = torch.ones(T, T, dtype=torch.bool, device=v.device).tril(-1)       # [k, j]: k > j
    parts = v.unsqueeze(-1).expand(*v.shape, T).masked_fill(~strict, 0.0)    # [k, j] = v_k if k > j
    sums = parts.cumsum(-2)                                                  # [i, j] = sum_{j<k<=i} v_k
    return sums.masked_fill(~strict.logical_or(torch.eye(T, dtype=torch.bool, device=v.device)), -_INF)


def conv_seq_idx(seq_idx):
    """seq_idx as the causal conv takes it (int32, mamba_ssm/ops/packing.py): SSD accepts any integer dtype."""
    if isinstance(seq_idx, torch.Tensor) and not seq_idx.dtype.is_floating_point and seq_idx.dtype != torch.bool:
        return seq_idx.to(torch.int32)
    return seq_idx


def _segments(seq_idx):
    """(b, l) -> nondecreasing segment numbers: a new one wherever seq_idx changes."""
    change = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int32)
    return torch.cat([torch.zeros_like(change[:, :1]), change.cumsum(1, dtype=torch.int32)], dim=1)


def process_dt(dt, dt_bias=None, dt_softplus=False, dt_limit=(0.0, _INF), dtype=torch.float32):
    """dt (..., h) -> dt + bias, softplus (threshold 20, as F.softplus), clamped to dt_limit; in `dtype`."""
    dt = dt.to(dtype)
    if dt_bias is not None:
        dt = dt + dt_bias.to(dtype)
    if dt_softplus:
        dt = F.softplus(dt)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if (lo, hi) != (0.0, _INF):
        dt = dt.clamp(min=lo, max=hi)
    return dt


def ssd_chunked(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, _INF), return_final_states=False,
                return_varlen_states=False):
    """The SSD scan (module docstring). Returns out (b, l, h, p) in x's dtype, then final_states
    (b, h, p, n) if return_final_states, then varlen_states (num_seqs, h, p, n) if return_varlen_states:
    the state at the end of each sequence of cu_seqlens."""
    check_ssd_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_limit,
                     return_varlen_states)
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    if seq_idx is None and cu_seqlens is not None:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, x.shape[1])
    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit, f)                      # (b, l, h)
    xf = x.to(f)
    ends = None if not return_varlen_states else (cu_seqlens[1:] - 1).long()
    y, final, varlen = ssd_core(xf * dt.unsqueeze(-1), dt * A.to(f), B.to(f), C.to(f), chunk_size,
                                initial_states, seq_idx, ends)
    if D is not None:
        y = y + xf * (D.to(f) if D.dim() == 2 else D.to(f)[:, None])
    if z is not None:
        y = y * F.silu(z.to(f))
    out = y.to(x.dtype)
    extra = []
    if return_final_states:
        extra.append(final)
    if return_varlen_states:
        extra.append(varlen)
    if not extra:
        return out
    return (out, *extra)


def ssd_core(xdt, a, B, C, chunk_size, initial_states=None, seq_idx=None, state_positions=None):
    """S_t = exp(a_t) S_{t-1} + xdt_t B_t^T, y_t = S_t C_t, chunked (module docstring).

    xdt (b, l, h, p) (dt already applied), a (b, l, h) (dt * A), B and C (b, l, g, n), all in one float
    dtype; initial_states (b, h, p, n); seq_idx (b, l); state_positions (k,) positions of row 0 whose
    states to return. Returns (y (b, l, h, p), final states (b, h, p, n), states at state_positions
    (k, h, p, n) or None).
    """
    f = xdt.dtype
    b, l, h, p = xdt.shape
    g, n = B.shape[2], B.shape[3]
    hg = h // g
    seg = None if seq_idx is None else _segments(seq_idx)
    if xdt.device.type == "cpu":
        chunk_size = min(chunk_size, CPU_CHUNK)
    q = max(1, min(chunk_size, l))   # a chunk longer than the sequence only adds padding
    nc = math.ceil(l / q)
    pad = nc * q - l
    # padded steps have a = 0 and no input: the final state is the state at l - 1
    xc = F.pad(xdt, (0, 0, 0, 0, 0, pad)).view(b, nc, q, g, hg, p)
    Bc = F.pad(B, (0, 0, 0, 0, 0, pad)).view(b, nc, q, g, n)
    Cc = F.pad(C, (0, 0, 0, 0, 0, pad)).view(b, nc, q, g, n)
    # decays are differences of these sums: summed in float64, so that a difference of two large sums
    # keeps its digits (in float32 a sum of -4000 leaves differences only ~5e-4 exact)
    Acum = F.pad(a, (0, 0, 0, pad)).view(b, nc, q, g, hg).permute(0, 1, 3, 4, 2).to(torch.float64).cumsum(-1)

    if seg is not None:
        segc = F.pad(seg, (0, pad), value=0)
        if pad:
            segc[:, l:] = seg[:, -1:]
        segc = segc.view(b, nc, q)
        # segment at the end of each chunk; index 0 is "before position 0", the first segment
        seg_end = torch.cat([seg[:, :1], segc[:, :, -1]], dim=1)                  # (b, c + 1)

    # inside chunks: y_l = sum_{s<=l} exp(Acum_l - Acum_s) (C_l.B_s) xdt_s
    causal = torch.ones(q, q, dtype=torch.bool, device=xdt.device).tril()
    same = causal if seg is None else causal & (segc[..., :, None] == segc[..., None, :])[:, :, None, None]
    decay = torch.exp(_PairDiff.apply(Acum, f).masked_fill(~same, -_INF))            # (b, c, g, hg, l, s)
    CB = torch.einsum("bclgn,bcsgn->bcgls", Cc, Bc)
    y = torch.einsum("bcghls,bcsghp->bclghp", decay * CB.unsqueeze(3), xc)

    # each chunk's own contribution to the state at its end
    to_end = torch.exp((Acum[..., -1:] - Acum).to(f))                              # (b, c, g, hg, q)
    if seg is not None:
        to_end = to_end * (segc == segc[..., -1:])[:, :, None, None, :]
    E = torch.einsum("bcghs,bcsghp,bcsgn->bcghpn", to_end, xc, Bc)

    # between chunks: S[j] (state before chunk j; S[nc] the final one) = sum_{k<=j} W[j, k] E'[k],
    # E'[0] = initial_states, E'[k] = E[k - 1]
    init = torch.zeros(b, 1, g, hg, p, n, dtype=f, device=xdt.device) if initial_states is None \
        else initial_states.to(f).view(b, 1, g, hg, p, n)
    E = torch.cat([init, E], dim=1)
    chunk_decay = F.pad(Acum[..., -1], (0, 0, 0, 0, 1, 0)).permute(0, 2, 3, 1)      # (b, g, hg, c + 1)
    W = torch.exp(segment_sums(chunk_decay).to(f))                                 # (b, g, hg, j, k)
    if seg is not None:
        W = W * (seg_end[:, :, None] == seg_end[:, None, :])[:, None, None]
    S = torch.einsum("bghjk,bkghpn->bjghpn", W, E)                                 # (b, c + 1, g, hg, p, n)

    # the state before each chunk, seen from each of its positions
    from_start = torch.exp(Acum.to(f))
    if seg is not None:
        from_start = from_start * (segc == seg_end[:, :nc, None])[:, :, None, None, :]
    y = y + torch.einsum("bclgn,bcghpn,bcghl->bclghp", Cc, S[:, :nc], from_start)

    y = y.reshape(b, nc * q, h, p)[:, :l]
    final = S[:, nc].reshape(b, h, p, n)
    states = None
    if state_positions is not None:
        states = _states_at(state_positions, q, Acum[0], xc[0], Bc[0], S[0],
                            None if seg is None else (segc[0], seg_end[0])).reshape(-1, h, p, n)
    return y, final, states


class _PairDiff(torch.autograd.Function):
    """v (..., q) float64 -> (..., q, q) in `dtype`: out[..., l, s] = v[l] - v[s], subtracted in float64.
    The backward reduces the (q, q) gradient in `dtype` (no float64 tensor of that size is kept)."""

    @staticmethod
    def forward(ctx, v, dtype):
        ctx.v_dtype = v.dtype
        return (v[..., :, None] - v[..., None, :]).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        return (grad.sum(-1) - grad.sum(-2)).to(ctx.v_dtype), None


def _states_at(t, q, Acum, xc, Bc, S, segs):
    """The state right after each position t (k,) of one sequence row -> (k, g, hg, p, n).

    Acum (c, g, hg, q); xc (c, q, g, hg, p); Bc (c, q, g, n); S (c + 1, g, hg, p, n) states before
    each chunk; segs None or (segc (c, q), seg_end (c + 1,)).
    """
    c, r = t // q, t % q
    A_c = Acum[c]                                                                  # (k, g, hg, q)
    A_t = A_c.gather(-1, r.view(-1, 1, 1, 1).expand(*A_c.shape[:-1], 1))         # (k, g, hg, 1)
    upto = torch.arange(q, device=t.device)[None, :] <= r[:, None]               # (k, q)
    before = torch.ones_like(r, dtype=torch.float64)
    if segs is not None:
        segc, seg_end = segs
        seg_t = segc[c, r]
        upto = upto & (segc[c] == seg_t[:, None])
        before = (seg_end[c] == seg_t).to(torch.float64)
    f = xc.dtype
    w = torch.exp((A_t - A_c).to(f).masked_fill(~upto[:, None, None, :], -_INF))
    own = torch.einsum("kghs,ksghp,ksgn->kghpn", w, xc[c], Bc[c])
    carried = S[c] * (torch.exp(A_t[..., 0].to(f)) * before.to(f).view(-1, 1, 1))[..., None, None]
    return own + carried


def ssd_minimal_discrete(X, A, B, C, block_len, initial_states=None):
    """Upstream's minimal SSD reference, by name: X (b, l, h, p) (already times dt), A (b, l, h)
    (already dt * A), B and C (b, l, h, n) (one group per head), initial_states (b, h, p, n).
    Returns (Y (b, l, h, p), final_state (b, h, p, n)), in X's dtype (states in float32 or float64)."""
    f = torch.float64 if X.dtype == torch.float64 else torch.float32
    y, final, _ = ssd_core(X.to(f), A.to(f), B.to(f), C.to(f), block_len, initial_states)
    return y.to(X.dtype), final
