"""Triton kernels of Mamba-2's chunked SSD scan, forward and backward. Imported only when the scan runs
on a GPU or in Triton's interpreter (mamba_ssm/ops/triton/ssd_triton.py has the launches, the autograd
Function and the math each kernel implements); module-level helpers so that they resolve both compiled
and interpreted.

Notation, per batch row b, head h and chunk c of Q steps (t, s: positions inside the chunk):
    cs_t = sum_{k<=t} dt_k A          (dA cumulative sum, fp32)
    S_c: the state before chunk c; E_c: the chunk's own contribution to the state at its end.
Per-chunk arrays (dt, cs, their gradients) are (b, h, nc, Q) fp32, contiguous; states (b, nc, h, p, n) fp32.
Packed sequences: seg (b, l) int32 nondecreasing segment numbers; decays between different segments are 0.
Dots take the operands in B's dtype (fp16/bf16 tensor cores) with fp32 accumulation; fp32 operands go
through tf32x3 (three tensor-core passes, close to fp32 products).
"""
import triton
import triton.language as tl


@triton.jit
def seg_bounds(seg_ptr, b, c, seqlen, Q):
    # segments of the position before the chunk (position 0 for chunk 0) and of its last position
    row = seg_ptr + b * seqlen
    before = tl.load(row + tl.maximum(c * Q - 1, 0))
    last = tl.load(row + tl.minimum((c + 1) * Q, seqlen) - 1)
    return before, last


@triton.jit
def load_dy(g_ptr, z_ptr, g_off, z_off, mask, HAS_Z: tl.constexpr):
    # gradient at y (before the gate): dout * silu(z)
    dy = tl.load(g_ptr + g_off, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        zz = tl.load(z_ptr + z_off, mask=mask, other=0.0).to(tl.float32)
        dy = dy * zz * tl.sigmoid(zz)
    return dy


@triton.jit
def mm(a, b, DT: tl.constexpr, DOT_F32: tl.constexpr):
    # a @ b, the operands rounded to DT; DOT_F32 multiplies the rounded values in fp32 (Triton's
    # interpreter gets bf16 products wrong)
    a = a.to(DT)
    b = b.to(DT)
    if DOT_F32:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def softplus(v):
    # log1p(exp(v)) with F.softplus's threshold 20; log(u) * e / (u - 1) keeps log1p's digits for small e
    e = tl.exp(tl.minimum(v, 20.0))
    u = 1.0 + e
    sp = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(v > 20.0, v, sp)


@triton.jit
def dt_fwd(dt_ptr, bias_ptr, a_ptr, dtp_ptr, cs_ptr, seqlen, H, NC, Q, s_db, s_dl, lo, hi,
           HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, BQ: tl.constexpr,
           BH: tl.constexpr):
    # dt + bias, softplus, clamp; cs = cumsum(dt * A) inside the chunk. Steps past seqlen get dt = 0.
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    hh = tl.program_id(2) * BH + tl.arange(0, BH)
    t = tl.arange(0, BQ)
    pos = c * Q + t
    hm = hh < H
    valid = ((t < Q) & (pos < seqlen))[:, None] & hm[None, :]
    v = tl.load(dt_ptr + b * s_db + pos[:, None] * s_dl + hh[None, :], mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + hh, mask=hm, other=0.0).to(tl.float32)[None, :]
    if SOFTPLUS:
        v = softplus(v)
    if CLAMP:
        v = tl.minimum(tl.maximum(v, lo), hi)
    v = tl.where(valid, v, 0.0)
    a = tl.load(a_ptr + hh, mask=hm, other=0.0).to(tl.float32)
    cs = tl.cumsum(v * a[None, :], axis=0)
    off = ((b * H + hh[None, :]) * NC + c) * Q + t[:, None]
    qm = (t < Q)[:, None] & hm[None, :]
    tl.store(dtp_ptr + off, v, mask=qm)
    tl.store(cs_ptr + off, cs, mask=qm)


@triton.jit
def chunk_state(x_ptr, z_ptr, y_ptr, dt_ptr, cs_ptr, seg_ptr, out_ptr, seqlen, H, P, N, NC, Q, HG,
                s_xb, s_xl, s_xh, s_zb, s_zl, s_zh, s_yb, s_yl, s_yg,
                BWD: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_F32: tl.constexpr,
                BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    # out[p, n] = sum_t w_t X_t[p] Y_t[n] over one chunk:
    #   forward (E_c):  X = x, Y = B, w_t = exp(cs_last - cs_t) dt_t, t in the last position's segment
    #   backward (dS_c from y): X = dy, Y = C, w_t = exp(cs_t), t in the segment of the state before the chunk
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    c = (pid // H) % NC
    b = pid // (H * NC)
    g = h // HG
    pp = tl.program_id(1) * BP + tl.arange(0, BP)
    nn = tl.program_id(2) * BN + tl.arange(0, BN)
    pm = pp < P
    nm = nn < N
    DT = y_ptr.dtype.element_ty
    cbase = ((b * H + h) * NC + c) * Q
    cs_last = tl.load(cs_ptr + cbase + Q - 1)
    if HAS_SEQ:
        before, last = seg_bounds(seg_ptr, b, c, seqlen, Q)
    acc = tl.zeros((BP, BN), dtype=tl.float32)
    for k0 in range(0, Q, BK):
        t = k0 + tl.arange(0, BK)
        pos = c * Q + t
        valid = (t < Q) & (pos < seqlen)
        cs_t = tl.load(cs_ptr + cbase + t, mask=t < Q, other=0.0)
        xm = valid[:, None] & pm[None, :]
        if BWD:
            w = tl.exp(cs_t)
            X = load_dy(x_ptr, z_ptr, b * s_xb + h * s_xh + pos[:, None] * s_xl + pp[None, :],
                        b * s_zb + h * s_zh + pos[:, None] * s_zl + pp[None, :], xm, HAS_Z)
        else:
            w = tl.exp(cs_last - cs_t) * tl.load(dt_ptr + cbase + t, mask=t < Q, other=0.0)
            X = tl.load(x_ptr + b * s_xb + h * s_xh + pos[:, None] * s_xl + pp[None, :], mask=xm, other=0.0)
        keep = valid
        if HAS_SEQ:
            seg_t = tl.load(seg_ptr + b * seqlen + pos, mask=valid, other=-1)
            if BWD:
                keep = keep & (seg_t == before)
            else:
                keep = keep & (seg_t == last)
        w = tl.where(keep, w, 0.0)
        Y = tl.load(y_ptr + b * s_yb + g * s_yg + pos[:, None] * s_yl + nn[None, :],
                    mask=valid[:, None] & nm[None, :], other=0.0).to(tl.float32)
        acc += mm(tl.trans(X.to(DT)), (Y * w[:, None]).to(DT), DT, DOT_F32)
    off = ((b * NC + c) * H + h) * P * N + pp[:, None] * N + nn[None, :]
    tl.store(out_ptr + off, acc, mask=pm[:, None] & nm[None, :])


@triton.jit
def state_pass_fwd(st_ptr, cs_ptr, seg_ptr, init_ptr, final_ptr, seqlen, H, PN, NC, Q,
                   HAS_INIT: tl.constexpr, HAS_SEQ: tl.constexpr, BS: tl.constexpr):
    # S_{c+1} = exp(cs_last_c) S_c + E_c (0 where the chunk's last segment is not the one before it);
    # in place: st holds E_c on entry and S_c (the state before chunk c) on return
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    b = pid // H
    i = tl.program_id(1) * BS + tl.arange(0, BS)
    m = i < PN
    if HAS_INIT:
        S = tl.load(init_ptr + (b * H + h) * PN + i, mask=m, other=0.0).to(tl.float32)
    else:
        S = tl.zeros((BS,), dtype=tl.float32)
    for c in range(NC):
        off = ((b * NC + c) * H + h) * PN + i
        E = tl.load(st_ptr + off, mask=m, other=0.0)
        tl.store(st_ptr + off, S, mask=m)
        decay = tl.exp(tl.load(cs_ptr + ((b * H + h) * NC + c) * Q + Q - 1))
        if HAS_SEQ:
            before, last = seg_bounds(seg_ptr, b, c, seqlen, Q)
            decay = tl.where(before == last, decay, 0.0)
        S = decay * S + E
    tl.store(final_ptr + (b * H + h) * PN + i, S, mask=m)


@triton.jit
def chunk_scan_fwd(x_ptr, z_ptr, b_ptr, c_ptr, dt_ptr, cs_ptr, seg_ptr, st_ptr, d_ptr, out_ptr, y_ptr,
                   seqlen, H, P, N, NC, Q, HG,
                   s_xb, s_xl, s_xh, s_zb, s_zl, s_zh, s_bb, s_bl, s_bg, s_cb, s_cl, s_cg, s_ob, s_ol, s_oh,
                   HAS_D: tl.constexpr, D_HP: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
                   DOT_F32: tl.constexpr,
                   BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    # y_t = exp(cs_t) C_t S_c + sum_{s<=t} (C_t.B_s) exp(cs_t - cs_s) dt_s x_s + D x_t; out = y silu(z)
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    c = (pid // H) % NC
    b = pid // (H * NC)
    g = h // HG
    mb = tl.program_id(1)
    t = mb * BM + tl.arange(0, BM)
    pp = tl.program_id(2) * BP + tl.arange(0, BP)
    nn = tl.arange(0, BN)
    pos_t = c * Q + t
    vt = (t < Q) & (pos_t < seqlen)
    pm = pp < P
    nm = nn < N
    DT = b_ptr.dtype.element_ty
    cbase = ((b * H + h) * NC + c) * Q
    cs_t = tl.load(cs_ptr + cbase + t, mask=t < Q, other=0.0)
    Ct = tl.load(c_ptr + b * s_cb + g * s_cg + pos_t[:, None] * s_cl + nn[None, :],
                 mask=vt[:, None] & nm[None, :], other=0.0).to(DT)
    S = tl.load(st_ptr + ((b * NC + c) * H + h) * P * N + pp[:, None] * N + nn[None, :],
                mask=pm[:, None] & nm[None, :], other=0.0)
    scale = tl.exp(cs_t)
    if HAS_SEQ:
        before, last = seg_bounds(seg_ptr, b, c, seqlen, Q)
        seg_t = tl.load(seg_ptr + b * seqlen + pos_t, mask=vt, other=-1)
        scale = tl.where(seg_t == before, scale, 0.0)
    acc = mm(Ct, tl.trans(S.to(DT)), DT, DOT_F32) * scale[:, None]
    for k0 in range(0, tl.minimum((mb + 1) * BM, Q), BK):
        s = k0 + tl.arange(0, BK)
        pos_s = c * Q + s
        vs = (s < Q) & (pos_s < seqlen)
        Bs = tl.load(b_ptr + b * s_bb + g * s_bg + pos_s[:, None] * s_bl + nn[None, :],
                     mask=vs[:, None] & nm[None, :], other=0.0).to(DT)
        xs = tl.load(x_ptr + b * s_xb + h * s_xh + pos_s[:, None] * s_xl + pp[None, :],
                     mask=vs[:, None] & pm[None, :], other=0.0).to(DT)
        cs_s = tl.load(cs_ptr + cbase + s, mask=s < Q, other=0.0)
        dt_s = tl.load(dt_ptr + cbase + s, mask=s < Q, other=0.0)
        keep = (s[None, :] <= t[:, None]) & vs[None, :]
        if HAS_SEQ:
            seg_s = tl.load(seg_ptr + b * seqlen + pos_s, mask=vs, other=-2)
            keep = keep & (seg_s[None, :] == seg_t[:, None])
        decay = tl.exp(tl.where(keep, cs_t[:, None] - cs_s[None, :], float("-inf")))
        CB = mm(Ct, tl.trans(Bs), DT, DOT_F32)
        acc += mm((CB * decay * dt_s[None, :]).to(DT), xs, DT, DOT_F32)
    tm = vt[:, None] & pm[None, :]
    if HAS_D:
        xt = tl.load(x_ptr + b * s_xb + h * s_xh + pos_t[:, None] * s_xl + pp[None, :], mask=tm, other=0.0)
        if D_HP:
            Dv = tl.load(d_ptr + h * P + pp, mask=pm, other=0.0).to(tl.float32)[None, :]
        else:
            Dv = tl.load(d_ptr + h).to(tl.float32)
        acc += xt.to(tl.float32) * Dv
    o_off = b * s_ob + h * s_oh + pos_t[:, None] * s_ol + pp[None, :]
    if HAS_Z:
        tl.store(y_ptr + o_off, acc.to(y_ptr.dtype.element_ty), mask=tm)
        zt = tl.load(z_ptr + b * s_zb + h * s_zh + pos_t[:, None] * s_zl + pp[None, :], mask=tm,
                     other=0.0).to(tl.float32)
        acc = acc * zt * tl.sigmoid(zt)
    tl.store(out_ptr + o_off, acc.to(out_ptr.dtype.element_ty), mask=tm)


@triton.jit
def state_pass_bwd(ds_ptr, st_ptr, cs_ptr, seg_ptr, dfin_ptr, dinit_ptr, ddl_ptr, seqlen, H, PN, NC, Q, NSB,
                   HAS_DFIN: tl.constexpr, HAS_SEQ: tl.constexpr, BS: tl.constexpr):
    # reverse of state_pass_fwd. In place: ds holds dS_c from the outputs (chunk_state BWD) on entry and
    # dE_c (the gradient of the state after chunk c) on return; ddl gets this program's part of the
    # gradient of cs_last_c, exp(cs_last_c) sum(dE_c * S_c)
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    b = pid // H
    sb = tl.program_id(1)
    i = sb * BS + tl.arange(0, BS)
    m = i < PN
    if HAS_DFIN:
        dS = tl.load(dfin_ptr + (b * H + h) * PN + i, mask=m, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros((BS,), dtype=tl.float32)
    for cc in range(NC):
        c = NC - 1 - cc
        off = ((b * NC + c) * H + h) * PN + i
        dy_part = tl.load(ds_ptr + off, mask=m, other=0.0)
        tl.store(ds_ptr + off, dS, mask=m)
        S = tl.load(st_ptr + off, mask=m, other=0.0)
        decay = tl.exp(tl.load(cs_ptr + ((b * H + h) * NC + c) * Q + Q - 1))
        if HAS_SEQ:
            before, last = seg_bounds(seg_ptr, b, c, seqlen, Q)
            decay = tl.where(before == last, decay, 0.0)
        tl.store(ddl_ptr + ((b * H + h) * NC + c) * NSB + sb, decay * tl.sum(dS * S, axis=0))
        dS = decay * dS + dy_part
    tl.store(dinit_ptr + (b * H + h) * PN + i, dS, mask=m)


@triton.jit
def chunk_scan_bwd_dx(x_ptr, z_ptr, g_ptr, y_ptr, b_ptr, c_ptr, dt_ptr, cs_ptr, seg_ptr, ds_ptr, d_ptr,
                      dx_ptr, dz_ptr, db_ptr, ddt_ptr, dcs_ptr, dlast_ptr, dd_ptr,
                      seqlen, H, P, N, NC, Q, HG, NMB,
                      s_xb, s_xl, s_xh, s_zb, s_zl, s_zh, s_gb, s_gl, s_gh, s_bb, s_bl, s_bg, s_cb, s_cl, s_cg,
                      HAS_D: tl.constexpr, D_HP: tl.constexpr, HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr,
                   DOT_F32: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    # Rows s of one chunk (all of p and n): the gradients that x_s and B_s get from
    #   E_c (w_s = exp(cs_last - cs_s) dt_s):  dx_s += w_s B_s dE^T,  dB_s += w_s x_s dE
    #   y_t, t >= s (G_ts = (C_t.B_s) exp(cs_t - cs_s) dt_s):  dx_s += sum_t G_ts dy_t,
    #       dB_s += sum_t (dy_t.x_s) exp(cs_t - cs_s) dt_s C_t
    #   D:  dx_s += D dy_s
    # and their parts of d dt_s, d cs_s (row-owned) and d cs_last (one partial per program); dz.
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    c = (pid // H) % NC
    b = pid // (H * NC)
    g = h // HG
    mb = tl.program_id(1)
    s = mb * BM + tl.arange(0, BM)
    pp = tl.arange(0, BP)
    nn = tl.arange(0, BN)
    pos_s = c * Q + s
    vs = (s < Q) & (pos_s < seqlen)
    pm = pp < P
    nm = nn < N
    DT = b_ptr.dtype.element_ty
    cbase = ((b * H + h) * NC + c) * Q
    cs_s = tl.load(cs_ptr + cbase + s, mask=s < Q, other=0.0)
    dt_s = tl.load(dt_ptr + cbase + s, mask=s < Q, other=0.0)
    cs_last = tl.load(cs_ptr + cbase + Q - 1)
    sm = vs[:, None] & pm[None, :]
    xs = tl.load(x_ptr + b * s_xb + h * s_xh + pos_s[:, None] * s_xl + pp[None, :], mask=sm, other=0.0)
    Bs = tl.load(b_ptr + b * s_bb + g * s_bg + pos_s[:, None] * s_bl + nn[None, :],
                 mask=vs[:, None] & nm[None, :], other=0.0).to(DT)
    dE = tl.load(ds_ptr + ((b * NC + c) * H + h) * P * N + pp[:, None] * N + nn[None, :],
                 mask=pm[:, None] & nm[None, :], other=0.0).to(DT)
    keep_s = vs
    if HAS_SEQ:
        before, last = seg_bounds(seg_ptr, b, c, seqlen, Q)
        seg_s = tl.load(seg_ptr + b * seqlen + pos_s, mask=vs, other=-1)
        keep_s = keep_s & (seg_s == last)
    w = tl.where(keep_s, tl.exp(cs_last - cs_s), 0.0)
    BdE = mm(Bs, tl.trans(dE), DT, DOT_F32)                        # (BM, BP)
    dx = BdE * (w * dt_s)[:, None]
    dw = tl.sum(xs.to(tl.float32) * BdE, axis=1)
    ddt = dw * w
    dcs = -dw * w * dt_s
    dlast = tl.sum(dw * w * dt_s, axis=0)
    dB = mm(xs.to(DT), dE, DT, DOT_F32) * (w * dt_s)[:, None]       # (BM, BN)
    xs = xs.to(DT)
    for k0 in range(mb * BM, Q, BK):
        t = k0 + tl.arange(0, BK)
        pos_t = c * Q + t
        vt = (t < Q) & (pos_t < seqlen)
        tm = vt[:, None] & pm[None, :]
        dyt = load_dy(g_ptr, z_ptr, b * s_gb + h * s_gh + pos_t[:, None] * s_gl + pp[None, :],
                      b * s_zb + h * s_zh + pos_t[:, None] * s_zl + pp[None, :], tm, HAS_Z).to(DT)
        Ct = tl.load(c_ptr + b * s_cb + g * s_cg + pos_t[:, None] * s_cl + nn[None, :],
                     mask=vt[:, None] & nm[None, :], other=0.0).to(DT)
        cs_t = tl.load(cs_ptr + cbase + t, mask=t < Q, other=0.0)
        keep = (t[None, :] >= s[:, None]) & vt[None, :]
        if HAS_SEQ:
            seg_t = tl.load(seg_ptr + b * seqlen + pos_t, mask=vt, other=-2)
            keep = keep & (seg_t[None, :] == seg_s[:, None])
        decay = tl.exp(tl.where(keep, cs_t[None, :] - cs_s[:, None], float("-inf")))   # (BM, BK) [s, t]
        Gp = mm(Bs, tl.trans(Ct), DT, DOT_F32) * decay
        dG = mm(xs, tl.trans(dyt), DT, DOT_F32)
        dx += mm((Gp * dt_s[:, None]).to(DT), dyt, DT, DOT_F32)
        dGG = tl.sum(dG * Gp, axis=1)
        ddt += dGG
        dcs -= dGG * dt_s
        dB += mm((dG * decay * dt_s[:, None]).to(DT), Ct, DT, DOT_F32)
    if HAS_D or HAS_Z:
        g_off = b * s_gb + h * s_gh + pos_s[:, None] * s_gl + pp[None, :]
        z_off = b * s_zb + h * s_zh + pos_s[:, None] * s_zl + pp[None, :]
    if HAS_D:
        dys = load_dy(g_ptr, z_ptr, g_off, z_off, sm, HAS_Z)
        if D_HP:
            Dv = tl.load(d_ptr + h * P + pp, mask=pm, other=0.0).to(tl.float32)[None, :]
        else:
            Dv = tl.load(d_ptr + h).to(tl.float32)
        dx += dys * Dv
        tl.store(dd_ptr + (((b * NC + c) * H + h) * NMB + mb) * P + pp,
                 tl.sum(dys * xs.to(tl.float32), axis=0), mask=pm)
    x_off = ((b * seqlen + pos_s[:, None]) * H + h) * P + pp[None, :]
    if HAS_Z:
        gz = tl.load(g_ptr + g_off, mask=sm, other=0.0).to(tl.float32)
        zs = tl.load(z_ptr + z_off, mask=sm, other=0.0).to(tl.float32)
        ys = tl.load(y_ptr + x_off, mask=sm, other=0.0).to(tl.float32)
        sig = tl.sigmoid(zs)
        tl.store(dz_ptr + x_off, (gz * ys * sig * (1.0 + zs * (1.0 - sig))).to(dz_ptr.dtype.element_ty), mask=sm)
    tl.store(dx_ptr + x_off, dx.to(dx_ptr.dtype.element_ty), mask=sm)
    tl.store(db_ptr + ((b * seqlen + pos_s[:, None]) * H + h) * N + nn[None, :], dB,
             mask=vs[:, None] & nm[None, :])
    tl.store(ddt_ptr + cbase + s, ddt, mask=s < Q)
    tl.store(dcs_ptr + cbase + s, dcs, mask=s < Q)
    tl.store(dlast_ptr + ((b * H + h) * NC + c) * NMB + mb, dlast)


@triton.jit
def chunk_scan_bwd_dc(x_ptr, z_ptr, g_ptr, b_ptr, c_ptr, dt_ptr, cs_ptr, seg_ptr, st_ptr, dc_ptr, dcs_ptr,
                      seqlen, H, P, N, NC, Q, HG,
                      s_xb, s_xl, s_xh, s_zb, s_zl, s_zh, s_gb, s_gl, s_gh, s_bb, s_bl, s_bg, s_cb, s_cl, s_cg,
                      HAS_Z: tl.constexpr, HAS_SEQ: tl.constexpr, DOT_F32: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr, BP: tl.constexpr, BN: tl.constexpr):
    # Rows t of one chunk: dC_t = exp(cs_t) dy_t S_c + sum_{s<=t} (dy_t.x_s) exp(cs_t - cs_s) dt_s B_s,
    # and d cs_t += y_t.dy_t of the two terms (added to what chunk_scan_bwd_dx stored)
    pid = tl.program_id(0).to(tl.int64)
    h = pid % H
    c = (pid // H) % NC
    b = pid // (H * NC)
    g = h // HG
    mb = tl.program_id(1)
    t = mb * BM + tl.arange(0, BM)
    pp = tl.arange(0, BP)
    nn = tl.arange(0, BN)
    pos_t = c * Q + t
    vt = (t < Q) & (pos_t < seqlen)
    pm = pp < P
    nm = nn < N
    DT = b_ptr.dtype.element_ty
    cbase = ((b * H + h) * NC + c) * Q
    cs_t = tl.load(cs_ptr + cbase + t, mask=t < Q, other=0.0)
    tm = vt[:, None] & pm[None, :]
    dyt = load_dy(g_ptr, z_ptr, b * s_gb + h * s_gh + pos_t[:, None] * s_gl + pp[None, :],
                  b * s_zb + h * s_zh + pos_t[:, None] * s_zl + pp[None, :], tm, HAS_Z).to(DT)
    Ct = tl.load(c_ptr + b * s_cb + g * s_cg + pos_t[:, None] * s_cl + nn[None, :],
                 mask=vt[:, None] & nm[None, :], other=0.0).to(DT)
    S = tl.load(st_ptr + ((b * NC + c) * H + h) * P * N + pp[:, None] * N + nn[None, :],
                mask=pm[:, None] & nm[None, :], other=0.0).to(DT)
    scale = tl.exp(cs_t)
    if HAS_SEQ:
        before, last = seg_bounds(seg_ptr, b, c, seqlen, Q)
        seg_t = tl.load(seg_ptr + b * seqlen + pos_t, mask=vt, other=-1)
        scale = tl.where(seg_t == before, scale, 0.0)
    dC = mm(dyt, S, DT, DOT_F32) * scale[:, None]                  # (BM, BN)
    dcs = tl.sum(Ct.to(tl.float32) * dC, axis=1)
    for k0 in range(0, tl.minimum((mb + 1) * BM, Q), BK):
        s = k0 + tl.arange(0, BK)
        pos_s = c * Q + s
        vs = (s < Q) & (pos_s < seqlen)
        Bs = tl.load(b_ptr + b * s_bb + g * s_bg + pos_s[:, None] * s_bl + nn[None, :],
                     mask=vs[:, None] & nm[None, :], other=0.0).to(DT)
        xs = tl.load(x_ptr + b * s_xb + h * s_xh + pos_s[:, None] * s_xl + pp[None, :],
                     mask=vs[:, None] & pm[None, :], other=0.0).to(DT)
        cs_s = tl.load(cs_ptr + cbase + s, mask=s < Q, other=0.0)
        dt_s = tl.load(dt_ptr + cbase + s, mask=s < Q, other=0.0)
        keep = (s[None, :] <= t[:, None]) & vs[None, :]
        if HAS_SEQ:
            seg_s = tl.load(seg_ptr + b * seqlen + pos_s, mask=vs, other=-2)
            keep = keep & (seg_s[None, :] == seg_t[:, None])
        decay = tl.exp(tl.where(keep, cs_t[:, None] - cs_s[None, :], float("-inf")))   # (BM, BK) [t, s]
        dCB = mm(dyt, tl.trans(xs), DT, DOT_F32) * decay * dt_s[None, :]
        CB = mm(Ct, tl.trans(Bs), DT, DOT_F32)
        dcs += tl.sum(dCB * CB, axis=1)
        dC += mm(dCB.to(DT), Bs, DT, DOT_F32)
    tl.store(dc_ptr + ((b * seqlen + pos_t[:, None]) * H + h) * N + nn[None, :], dC,
             mask=vt[:, None] & nm[None, :])
    prev = tl.load(dcs_ptr + cbase + t, mask=t < Q, other=0.0)
    tl.store(dcs_ptr + cbase + t, prev + dcs, mask=t < Q)


@triton.jit
def dt_bwd(dt_ptr, bias_ptr, a_ptr, dtp_ptr, ddt_ptr, dcs_ptr, dlast_ptr, out_ptr, da_ptr, dbias_ptr,
           seqlen, H, NC, Q, s_db, s_dl, lo, hi,
           HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, CLAMP: tl.constexpr, BQ: tl.constexpr,
           BH: tl.constexpr):
    # d cs -> d a_k = sum_{t>=k} d cs_t (d cs_last added at Q-1); d dt = d dt (direct) + A d a;
    # dA and d bias as one partial sum per (b, c, head); d dt back through clamp, softplus and bias
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64)
    hh = tl.program_id(2) * BH + tl.arange(0, BH)
    t = tl.arange(0, BQ)
    pos = c * Q + t
    hm = hh < H
    qm = (t < Q)[:, None] & hm[None, :]
    off = ((b * H + hh[None, :]) * NC + c) * Q + t[:, None]
    dcs = tl.load(dcs_ptr + off, mask=qm, other=0.0)
    dlast = tl.load(dlast_ptr + (b * H + hh) * NC + c, mask=hm, other=0.0)
    dcs += tl.where(t[:, None] == Q - 1, dlast[None, :], 0.0)
    da = tl.sum(dcs, axis=0)[None, :] - tl.cumsum(dcs, axis=0) + dcs
    a = tl.load(a_ptr + hh, mask=hm, other=0.0).to(tl.float32)
    dtp = tl.load(dtp_ptr + off, mask=qm, other=0.0)
    ddt = tl.load(ddt_ptr + off, mask=qm, other=0.0) + a[None, :] * da
    tl.store(da_ptr + (b * NC + c) * H + hh, tl.sum(dtp * da, axis=0), mask=hm)
    valid = (t < Q)[:, None] & (pos < seqlen)[:, None] & hm[None, :]
    v = tl.load(dt_ptr + b * s_db + pos[:, None] * s_dl + hh[None, :], mask=valid, other=0.0).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(bias_ptr + hh, mask=hm, other=0.0).to(tl.float32)[None, :]
    if CLAMP:
        u = v
        if SOFTPLUS:
            u = softplus(v)
        ddt = tl.where((u >= lo) & (u <= hi), ddt, 0.0)
    if SOFTPLUS:
        ddt = tl.where(v > 20.0, ddt, ddt * tl.sigmoid(v))
    ddt = tl.where(valid, ddt, 0.0)
    tl.store(out_ptr + (b * seqlen + pos[:, None]) * H + hh[None, :], ddt.to(out_ptr.dtype.element_ty), mask=valid)
    tl.store(dbias_ptr + (b * NC + c) * H + hh, tl.sum(ddt, axis=0), mask=hm)
