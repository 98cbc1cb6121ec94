"""Triton kernels of the causal depthwise conv1d (+ SiLU): forward, and the backward's two passes.
Imported only when a conv runs on a GPU (mamba_ssm/ops/triton/causal_conv1d.py has the autograd
Function and the launches); module-level so that the shared helper works both compiled and in
Triton's interpreter (which resolves called functions through the module's globals).

Tiles are (BD channels, BT steps) of one batch row, computed in fp32; W is the conv width.
Packed sequences (HAS_SEQ): seq_idx (batch, seqlen) int32, contiguous; a tap reads x only from the
output position's own sequence (the window restarts where seq_idx changes).
"""
import triton
import triton.language as tl


@triton.jit
def same_sequence(seq_ptr, b, t, s, seqlen, HAS_SEQ: tl.constexpr):
    # (BT,) mask: position s lies in [0, seqlen) and, when packed, in position t's sequence
    m = (s >= 0) & (s < seqlen)
    if HAS_SEQ:
        row = seq_ptr + b * seqlen
        mine = tl.load(row + t, mask=t < seqlen, other=-1)
        theirs = tl.load(row + s, mask=m, other=-2)
        m = m & (mine == theirs)
    return m


@triton.jit
def pre_activation(x_ptr, w_ptr, b_ptr, seq_ptr, b, d, t, dmask, seqlen, s_xb, s_xd,
                   W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, BD: tl.constexpr,
                   BT: tl.constexpr):
    # bias[d] + sum_k weight[d, k] x[b, d, t - (W-1) + k] for a (BD, BT) tile, in fp32
    xrow = x_ptr + b * s_xb + d[:, None].to(tl.int64) * s_xd
    acc = tl.zeros((BD, BT), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + d, mask=dmask, other=0.0).to(tl.float32)[:, None]
    for k in tl.static_range(W):
        tt = t - (W - 1) + k
        m = dmask[:, None] & same_sequence(seq_ptr, b, t, tt, seqlen, HAS_SEQ)[None, :]
        xk = tl.load(xrow + tt[None, :], mask=m, other=0.0).to(tl.float32)
        wk = tl.load(w_ptr + d * W + k, mask=dmask, other=0.0).to(tl.float32)
        acc += wk[:, None] * xk
    return acc


@triton.jit
def fwd(x_ptr, w_ptr, b_ptr, seq_ptr, out_ptr, dim, seqlen, s_xb, s_xd, s_ob, s_od,
        W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr, BD: tl.constexpr,
        BT: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    dmask = d < dim
    acc = pre_activation(x_ptr, w_ptr, b_ptr, seq_ptr, b, d, t, dmask, seqlen, s_xb, s_xd, W, HAS_BIAS, HAS_SEQ,
                         BD, BT)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    om = dmask[:, None] & (t[None, :] < seqlen)
    tl.store(out_ptr + b * s_ob + d[:, None].to(tl.int64) * s_od + t[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=om)


@triton.jit
def bwd_pre(x_ptr, w_ptr, b_ptr, seq_ptr, g_ptr, gp_ptr, gw_ptr, gb_ptr, dim, seqlen, s_xb, s_xd, s_gb, s_gd,
            W: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SEQ: tl.constexpr, SILU: tl.constexpr,
            NEED_W: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr):
    # gpre(t) = gout(t) * act'(pre(t)), pre recomputed from x as in the forward;
    # gw_k = sum_t gpre(t) x(t - (W-1) + k), gbias = sum_t gpre(t): one partial per program
    pid_t = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    t = pid_t * BT + tl.arange(0, BT)
    dmask = d < dim
    pre = pre_activation(x_ptr, w_ptr, b_ptr, seq_ptr, b, d, t, dmask, seqlen, s_xb, s_xd, W, HAS_BIAS, HAS_SEQ,
                         BD, BT)
    tm = dmask[:, None] & (t[None, :] < seqlen)
    gpre = tl.load(g_ptr + b * s_gb + d[:, None].to(tl.int64) * s_gd + t[None, :], mask=tm, other=0.0).to(tl.float32)
    if SILU:
        sig = tl.sigmoid(pre)
        gpre = gpre * sig * (1.0 + pre * (1.0 - sig))
    tl.store(gp_ptr + (b * dim + d[:, None].to(tl.int64)) * seqlen + t[None, :], gpre, mask=tm)
    if NEED_W:  # (x is read again here: those loads hit the cache, and NEED_W is full fine-tuning only)
        xrow = x_ptr + b * s_xb + d[:, None].to(tl.int64) * s_xd
        row = b * tl.num_programs(0) + pid_t
        tl.store(gb_ptr + row * dim + d, tl.sum(gpre, axis=1), mask=dmask)
        for j in tl.static_range(W):
            tt = t - (W - 1) + j
            m = dmask[:, None] & same_sequence(seq_ptr, b, t, tt, seqlen, HAS_SEQ)[None, :]
            xj = tl.load(xrow + tt[None, :], mask=m, other=0.0).to(tl.float32)
            tl.store(gw_ptr + (row * dim + d) * W + j, tl.sum(gpre * xj, axis=1), mask=dmask)


@triton.jit
def bwd_x(gp_ptr, w_ptr, seq_ptr, gx_ptr, dim, seqlen, s_gxb, s_gxd, W: tl.constexpr, HAS_SEQ: tl.constexpr,
          BD: tl.constexpr, BT: tl.constexpr):
    # x(t) feeds the outputs s = t + (W-1) - k through tap k: gx(t) = sum_k w_k gpre(t + (W-1) - k)
    b = tl.program_id(2).to(tl.int64)
    d = tl.program_id(1) * BD + tl.arange(0, BD)
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    dmask = d < dim
    grow = gp_ptr + (b * dim + d[:, None].to(tl.int64)) * seqlen
    gx = tl.zeros((BD, BT), dtype=tl.float32)
    for k in tl.static_range(W):
        s = t + (W - 1) - k
        m = dmask[:, None] & same_sequence(seq_ptr, b, t, s, seqlen, HAS_SEQ)[None, :]
        wk = tl.load(w_ptr + d * W + k, mask=dmask, other=0.0).to(tl.float32)
        gx += wk[:, None] * tl.load(grow + s[None, :], mask=m, other=0.0)
    tm = dmask[:, None] & (t[None, :] < seqlen)
    tl.store(gx_ptr + b * s_gxb + d[:, None].to(tl.int64) * s_gxd + t[None, :], gx.to(gx_ptr.dtype.element_ty),
             mask=tm)
