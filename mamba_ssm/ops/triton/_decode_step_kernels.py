"""Triton kernels of the fused decoding step (mamba_ssm/ops/triton/decode_step.py has the launches,
the references and the dispatch). Imported only when a fused step runs; module-level so that the
shared helpers work both compiled and in Triton's interpreter.

Every program owns one batch row and a block of channels; all arithmetic is in fp32 registers.
Names: R = dt_rank, N = d_state, E = R + 2 N (x_proj's outputs), W = d_conv; *_P2 is the next power
of two (a tile's extent, masked).

Each kernel issues all its loads before its first reduction or barrier: a reduction across warps
goes through shared memory behind a barrier, the compiler does not move loads across one, and every
load left after it costs another memory round trip (~1 us at batch 1; seen in the SASS of a first
version: 4 to 7 round trips a kernel). tools/check_decode_step_compile.py compiles these for
sm_90 without a GPU and prints registers and spills.

PDL (programmatic dependent launch, Hopper on): each kernel loads weights, then waits for the kernel
before it (`_dependency_wait`) and lets the next one launch. Before the wait a kernel reads nothing
that a decoding kernel writes (weights only): its first weight tiles are in flight while the kernel
before it finishes. Every program waits, so a kernel's completion implies its predecessors'. (1.4b,
batch 1, H100, 2026-12-08, decode_step_sweep.py: 1.416 against 1.516 ms/token without PDL; asking L2
for every weight line at a kernel's start as well made both matrix-vector kernels slower, 1.46-1.49.)
"""
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # a Triton without PDL: the launchers never set PDL, these are never compiled
    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass


@triton.jit
def _dependency_wait(PDL: tl.constexpr):
    """With PDL: wait until the previous kernel has finished and its writes are visible, then allow the
    next kernel to launch (its weight loads then overlap this kernel's work)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _softplus(x):
    # log1p(exp(x)) below 20 (x above), log1p in Goldberg's form: accurate where exp(x) << 1
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    lp = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    return tl.where(x <= 20.0, lp, x)


@triton.jit
def _conv_weights(c, cmask, cw_ptr, s_cwc, s_cww, cb_ptr, W: tl.constexpr, W_P2: tl.constexpr,
                  HAS_CONV_BIAS: tl.constexpr):
    """The conv weight (BLOCK_C, W_P2) and bias (BLOCK_C,) of the channels c (BLOCK_C,), fp32."""
    k = tl.arange(0, W_P2)
    w = tl.load(cw_ptr + c[:, None] * s_cwc + k[None, :] * s_cww, mask=cmask[:, None] & (k[None, :] < W),
                other=0.0).to(tl.float32)
    if HAS_CONV_BIAS:
        bias = tl.load(cb_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros_like(c).to(tl.float32)
    return w, bias


@triton.jit
def _conv_state_load(cs_row, c, cmask, s_csc, s_csw, W: tl.constexpr, W_P2: tl.constexpr):
    """old = window[c, 1:W] of one row's conv state (cs_row) at positions 0..W-2 (BLOCK_C, W_P2)."""
    k = tl.arange(0, W_P2)
    return tl.load(cs_row + c[:, None] * s_csc + (k[None, :] + 1) * s_csw,
                   mask=cmask[:, None] & (k[None, :] < W - 1), other=0.0)


@triton.jit
def _conv_finish(x, old, w, bias, cs_row, c, cmask, s_csc, s_csw, W: tl.constexpr, W_P2: tl.constexpr):
    """The window shifted left with x (BLOCK_C,) appended, stored in place; returns silu(bias + window . w)."""
    k = tl.arange(0, W_P2)
    win = tl.where(k[None, :] == W - 1, x[:, None].to(old.dtype), old)
    # threads holding copies of a channel must all have read the old window before it is overwritten
    tl.debug_barrier()
    tl.store(cs_row + c[:, None] * s_csc + k[None, :] * s_csw, win, mask=cmask[:, None] & (k[None, :] < W))
    acc = tl.sum(win.to(tl.float32) * w, axis=1) + bias
    return acc * tl.sigmoid(acc)


@triton.jit
def _xproj_load(xw_ptr, c, cmask, s_xwe, s_xwc, E, i: tl.constexpr, EC: tl.constexpr):
    """Rows i*EC .. i*EC+EC-1 of x_proj.weight[:, c] (EC, BLOCK_C), zero past E."""
    e = i * EC + tl.arange(0, EC)
    return tl.load(xw_ptr + e[:, None] * s_xwe + c[None, :] * s_xwc, mask=(e[:, None] < E) & cmask[None, :],
                   other=0.0)


@triton.jit
def _xproj_partials(xc, w0, c, cmask, xw_ptr, s_xwe, s_xwc, part_ptr, E, EC: tl.constexpr, N_EC: tl.constexpr):
    """part_ptr[e] = sum over the channels c of x_proj.weight[e, c] xc[c], for e < E. xc: (BLOCK_C,)
    fp32, zero off cmask; w0: the rows 0..EC-1, loaded early by the caller (with E <= EC, all of them)."""
    e = tl.arange(0, EC)
    tl.store(part_ptr + e, tl.sum(w0.to(tl.float32) * xc[None, :], axis=1), mask=e < E)
    for i in tl.static_range(1, N_EC):  # only when E > EC: one more round trip per chunk
        w = _xproj_load(xw_ptr, c, cmask, s_xwe, s_xwc, E, i, EC).to(tl.float32)
        tl.store(part_ptr + i * EC + e, tl.sum(w * xc[None, :], axis=1), mask=i * EC + e < E)


@triton.jit
def conv_xproj(x_ptr, cs_ptr, cw_ptr, cb_ptr, xc_ptr, xw_ptr, part_ptr,
               d_inner, E,
               s_xb, s_xc, s_csb, s_csc, s_csw, s_cwc, s_cww, s_xcb, s_xcc, s_xwe, s_xwc, s_pb, s_pp,
               W: tl.constexpr, W_P2: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, XPROJ: tl.constexpr,
               EC: tl.constexpr, N_EC: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """grid (cdiv(d_inner, BLOCK_C), batch). x (batch, d_inner) -> conv state step, x_conv (batch,
    d_inner) and, with XPROJ, partials[b, pid, :E] = x_proj.weight[:, block] @ x_conv[b, block]."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < d_inner
    cs_row = cs_ptr + b * s_csb
    if XPROJ:
        w0 = _xproj_load(xw_ptr, c, cmask, s_xwe, s_xwc, E, 0, EC)
    w, bias = _conv_weights(c, cmask, cw_ptr, s_cwc, s_cww, cb_ptr, W, W_P2, HAS_CONV_BIAS)
    _dependency_wait(PDL)
    x = tl.load(x_ptr + b * s_xb + c * s_xc, mask=cmask, other=0.0)
    old = _conv_state_load(cs_row, c, cmask, s_csc, s_csw, W, W_P2)
    xc = _conv_finish(x, old, w, bias, cs_row, c, cmask, s_csc, s_csw, W, W_P2)
    xq = xc.to(xc_ptr.dtype.element_ty)
    tl.store(xc_ptr + b * s_xcb + c * s_xcc, xq, mask=cmask)
    if XPROJ:
        # from x_conv as stored (rounded to the activation dtype), as x_proj would see it
        _xproj_partials(tl.where(cmask, xq.to(tl.float32), 0.0), w0, c, cmask, xw_ptr, s_xwe, s_xwc,
                        part_ptr + b * s_pb + pid * s_pp, E, EC, N_EC)


@triton.jit
def ssm_update(state_ptr, xc_ptr, z_ptr, alog_ptr, D_ptr, dtb_ptr, dtw_ptr, part_ptr, dt_ptr, B_ptr, C_ptr, y_ptr,
               d_inner, R, N, NP,
               s_sb, s_sc, s_sn, s_xcb, s_xcc, s_zb, s_zc, s_ac, s_an, s_dtwc, s_dtwr, s_pb, s_pp,
               s_dtb, s_dtc, s_Bb, s_Bn, s_Cb, s_Cn, s_yb, s_yc,
               FROM_PARTIALS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
               R_P2: tl.constexpr, N_P2: tl.constexpr, NPC: tl.constexpr, N_CHUNKS: tl.constexpr,
               BLOCK_C: tl.constexpr, PDL: tl.constexpr):
    """grid (cdiv(d_inner, BLOCK_C), batch). The selective-state step of the channels of one row:

        FROM_PARTIALS: [dt_low, B, C] = sum over the NP partials (chunks of NPC, a fixed order);
                       dt = dt_proj.weight[c] @ dt_low.   Else dt (before bias), B, C are given.
        dt = softplus(dt + dt_bias); A = -exp(A_log)
        h = exp(dt A) h + dt x B  (in place);  y = (C . h + D x) silu(z)
    """
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < d_inner
    n = tl.arange(0, N_P2)
    nmask = n < N
    m2 = cmask[:, None] & nmask[None, :]
    # the weights, then (after the previous kernel) the activations and the state
    dt_bias = tl.load(dtb_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    A_log = tl.load(alog_ptr + c[:, None] * s_ac + n[None, :] * s_an, mask=m2, other=0.0).to(tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if FROM_PARTIALS:
        r = tl.arange(0, R_P2)
        wdt = tl.load(dtw_ptr + c[:, None] * s_dtwc + r[None, :] * s_dtwr, mask=cmask[:, None] & (r[None, :] < R),
                      other=0.0)
    _dependency_wait(PDL)
    if FROM_PARTIALS:
        p = tl.arange(0, NPC)
        base = part_ptr + b * s_pb
        acc_r = tl.zeros((NPC, R_P2), dtype=tl.float32)
        acc_b = tl.zeros((NPC, N_P2), dtype=tl.float32)
        acc_c = tl.zeros((NPC, N_P2), dtype=tl.float32)
        for i in tl.static_range(N_CHUNKS):
            pp = i * NPC + p
            pm = pp < NP
            rows = base + pp[:, None] * s_pp
            acc_r += tl.load(rows + r[None, :], mask=pm[:, None] & (r[None, :] < R), other=0.0)
            acc_b += tl.load(rows + R + n[None, :], mask=pm[:, None] & nmask[None, :], other=0.0)
            acc_c += tl.load(rows + R + N + n[None, :], mask=pm[:, None] & nmask[None, :], other=0.0)
    else:
        dt = tl.load(dt_ptr + b * s_dtb + c * s_dtc, mask=cmask, other=0.0).to(tl.float32)
        Bv = tl.load(B_ptr + b * s_Bb + n * s_Bn, mask=nmask, other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + b * s_Cb + n * s_Cn, mask=nmask, other=0.0).to(tl.float32)
    x = tl.load(xc_ptr + b * s_xcb + c * s_xcc, mask=cmask, other=0.0).to(tl.float32)
    if HAS_Z:
        z = tl.load(z_ptr + b * s_zb + c * s_zc, mask=cmask, other=0.0).to(tl.float32)
    sp = state_ptr + b * s_sb + c[:, None] * s_sc + n[None, :] * s_sn
    h = tl.load(sp, mask=m2, other=0.0).to(tl.float32)
    # arithmetic
    if FROM_PARTIALS:
        Bv = tl.sum(acc_b, axis=0)
        Cv = tl.sum(acc_c, axis=0)
        dt = tl.sum(wdt.to(tl.float32) * tl.sum(acc_r, axis=0)[None, :], axis=1)
    dt = _softplus(dt + dt_bias)
    h = h * tl.exp(dt[:, None] * -tl.exp(A_log)) + (dt * x)[:, None] * Bv[None, :]
    tl.debug_barrier()  # every copy of the old state read before it is overwritten
    tl.store(sp, h.to(state_ptr.dtype.element_ty), mask=m2)
    y = tl.sum(h * Cv[None, :], axis=1)
    if HAS_D:
        y += x * Dv
    if HAS_Z:
        y *= z * tl.sigmoid(z)
    tl.store(y_ptr + b * s_yb + c * s_yc, y.to(y_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _normed_chunk(hrow, rrow, ro_ptr, nw_ptr, nb_ptr, k, km, mean, rstd,
                  HAS_RES: tl.constexpr, HAS_NORM_BIAS: tl.constexpr):
    """The normalised activation at columns k of one row (hrow, rrow: the row of hidden and residual)
    as the unfused norm would store it (rounded to hidden's dtype), in fp32; zero off km."""
    s = tl.load(hrow + k, mask=km, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(rrow + k, mask=km, other=0.0).to(tl.float32)
    s = s.to(ro_ptr.dtype.element_ty).to(tl.float32)
    h = (s - mean) * rstd * tl.load(nw_ptr + k, mask=km, other=0.0).to(tl.float32)
    if HAS_NORM_BIAS:
        h += tl.load(nb_ptr + k, mask=km, other=0.0).to(tl.float32)
    return tl.where(km, h, 0.0).to(hrow.dtype.element_ty).to(tl.float32)


@triton.jit
def norm_in_proj(hid_ptr, res_ptr, ro_ptr, nw_ptr, nb_ptr, win_ptr, inb_ptr, z_ptr,
                 cs_ptr, cw_ptr, cb_ptr, xc_ptr, xw_ptr, part_ptr,
                 d_model, d_inner, E, n_xblk, eps,
                 s_hb, s_rb, s_rob, s_wn, s_wk, s_zb, s_csb, s_csc, s_csw, s_cwc, s_cww, s_xcb, s_xwe, s_xwc,
                 s_pb, s_pp,
                 HAS_RES: tl.constexpr, IS_RMS: tl.constexpr, HAS_NORM_BIAS: tl.constexpr,
                 HAS_IN_BIAS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, W: tl.constexpr, W_P2: tl.constexpr,
                 EC: tl.constexpr, N_EC: tl.constexpr, D_P2: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """grid (batch, 2 n_xblk). Residual add + norm as a prologue of in_proj's matrix-vector product,
    rows split in blocks of BLOCK_N: programs 0..n_xblk-1 take x's rows and finish with the conv step
    and the x_proj partials (as conv_xproj); the others take z's rows and store z.
    Program 0 of a row stores the new residual."""
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    is_x = pid < n_xblk
    blk = tl.where(is_x, pid, pid - n_xblk)
    ch = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    chm = ch < d_inner
    rows = tl.where(is_x, ch, d_inner + ch)
    hrow, rrow = hid_ptr + b * s_hb, res_ptr + b * s_rb
    w_rows = win_ptr + rows[:, None] * s_wn
    # the first weight tile and the whole row (for the norm's statistics; 2-16 KiB) together
    kb = tl.arange(0, BLOCK_K)
    km = kb < d_model
    w_next = tl.load(w_rows + kb[None, :] * s_wk, mask=chm[:, None] & km[None, :], other=0.0)
    _dependency_wait(PDL)
    d = tl.arange(0, D_P2)
    dm = d < d_model
    s = tl.load(hrow + d, mask=dm, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(rrow + d, mask=dm, other=0.0).to(tl.float32)
    s_out = s.to(ro_ptr.dtype.element_ty)
    tl.store(ro_ptr + b * s_rob + d, s_out, mask=(d + pid * D_P2) < d_model)  # program 0 only
    s = s_out.to(tl.float32)  # the norm sees the residual as stored
    if IS_RMS:
        mean = 0.0
        xc = s
    else:
        mean = tl.sum(s, axis=0) / d_model
        xc = tl.where(dm, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / d_model + eps)

    # one tile ahead: its loads are in flight while the current one is multiplied
    h_next = _normed_chunk(hrow, rrow, ro_ptr, nw_ptr, nb_ptr, kb, km, mean, rstd, HAS_RES, HAS_NORM_BIAS)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(BLOCK_K, d_model + BLOCK_K, BLOCK_K):
        w, h = w_next, h_next
        k = k0 + kb
        km = k < d_model
        w_next = tl.load(w_rows + k[None, :] * s_wk, mask=chm[:, None] & km[None, :], other=0.0)
        h_next = _normed_chunk(hrow, rrow, ro_ptr, nw_ptr, nb_ptr, k, km, mean, rstd, HAS_RES, HAS_NORM_BIAS)
        acc += w.to(tl.float32) * h[None, :]
    # the epilogue's loads (x programs only: masked elsewhere) after the product, before the row sums'
    # barriers; issued before the product they cost registers and time (H100, 2026-12-07: 15.4 against
    # 16.2 us a 1.4b layer)
    xm = chm & ((pid + 0 * ch) < n_xblk)  # (a vector: the interpreter rejects a scalar in a mask)
    cs_row = cs_ptr + b * s_csb
    w0 = _xproj_load(xw_ptr, ch, xm, s_xwe, s_xwc, E, 0, EC)
    cw, cbias = _conv_weights(ch, xm, cw_ptr, s_cwc, s_cww, cb_ptr, W, W_P2, HAS_CONV_BIAS)
    old = _conv_state_load(cs_row, ch, xm, s_csc, s_csw, W, W_P2)
    if HAS_IN_BIAS:
        inb = tl.load(inb_ptr + rows, mask=chm, other=0.0).to(tl.float32)
    v = tl.sum(acc, axis=1)
    if HAS_IN_BIAS:
        v += inb
    vq = v.to(z_ptr.dtype.element_ty)
    if is_x:
        xcv = _conv_finish(vq, old, cw, cbias, cs_row, ch, chm, s_csc, s_csw, W, W_P2)
        xq = xcv.to(xc_ptr.dtype.element_ty)
        tl.store(xc_ptr + b * s_xcb + ch, xq, mask=chm)
        _xproj_partials(tl.where(chm, xq.to(tl.float32), 0.0), w0, ch, chm, xw_ptr, s_xwe, s_xwc,
                        part_ptr + b * s_pb + blk * s_pp, E, EC, N_EC)
    else:
        tl.store(z_ptr + b * s_zb + ch, vq, mask=chm)


@triton.jit
def gemv(x_ptr, w_ptr, b_ptr, out_ptr, N, K, s_xb, s_xk, s_wn, s_wk, s_ob,
         HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    """grid (cdiv(N, BLOCK_N), batch). out[b, n] = w[n, :] . x[b, :] (+ bias[n]): one matrix-vector product,
    fp32 sums (one per row, reduced every tile), the next weight tile in flight while the current one is
    multiplied."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    kb = tl.arange(0, BLOCK_K)
    km = kb < K
    w_rows = w_ptr + n[:, None] * s_wn
    xrow = x_ptr + b * s_xb
    w_next = tl.load(w_rows + kb[None, :] * s_wk, mask=nm[:, None] & km[None, :], other=0.0)
    _dependency_wait(PDL)
    x_next = tl.load(xrow + kb * s_xk, mask=km, other=0.0)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):
        w, xv = w_next, x_next
        k = k0 + kb
        km = k < K
        w_next = tl.load(w_rows + k[None, :] * s_wk, mask=nm[:, None] & km[None, :], other=0.0)
        x_next = tl.load(xrow + k * s_xk, mask=km, other=0.0)
        acc += tl.sum(w.to(tl.float32) * xv.to(tl.float32)[None, :], axis=1)
    v = acc
    if HAS_BIAS:
        v += tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)
    tl.store(out_ptr + b * s_ob + n, v.to(out_ptr.dtype.element_ty), mask=nm)


@triton.jit
def gated_rmsnorm(x_ptr, z_ptr, w_ptr, out_ptr, group_size, eps, s_xb, s_zb, s_ob,
                  NORM_BEFORE_GATE: tl.constexpr, GS_P2: tl.constexpr):
    """grid (groups, batch). Mamba-2's gated RMSNorm of one group of one row (forward only):
    norm_before_gate: rms(x) w silu(z); else rms(x silu(z)) w; fp32 math, one rounding at the store."""
    g = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c = tl.arange(0, GS_P2)
    m = c < group_size
    col = g * group_size + c
    x = tl.load(x_ptr + b * s_xb + col, mask=m, other=0.0).to(tl.float32)
    z = tl.load(z_ptr + b * s_zb + col, mask=m, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + col, mask=m, other=0.0).to(tl.float32)
    gate = z * tl.sigmoid(z)
    if not NORM_BEFORE_GATE:
        x = x * gate
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / group_size + eps)
    y = x * rstd * w
    if NORM_BEFORE_GATE:
        y = y * gate
    tl.store(out_ptr + b * s_ob + col, y.to(out_ptr.dtype.element_ty), mask=m)


# --------------------------------------------------------------------------- a few rows at a time
# At batch > 1 each program takes a tile of BLOCK_B rows, so a weight tile is read once for all of
# them: the products are tl.dot (tensor cores) of a weight tile and the rows' activations.


@triton.jit
def _dot(a, b, acc, DOT_F32: tl.constexpr):
    """acc + a @ b, fp32 sums: 16-bit operands as they are (their products are exact in fp32), else
    both in fp32 without TF32."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _residual_tile(hid_ptr, res_ptr, ro_ptr, bb, bm, k, km, s_hb, s_rb, HAS_RES: tl.constexpr):
    """hidden (+ residual) at rows bb, columns k (BLOCK_B, BLOCK_K), as the new residual is stored
    (rounded to its dtype), in fp32; zero off the masks."""
    m2 = bm[:, None] & km[None, :]
    s = tl.load(hid_ptr + bb[:, None] * s_hb + k[None, :], mask=m2, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(res_ptr + bb[:, None] * s_rb + k[None, :], mask=m2, other=0.0).to(tl.float32)
    return s.to(ro_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _normed_rows(hid_ptr, res_ptr, ro_ptr, nw_ptr, nb_ptr, bb, bm, k, km, mean, rstd, s_hb, s_rb,
                 HAS_RES: tl.constexpr, HAS_NORM_BIAS: tl.constexpr):
    """The normalised activation (BLOCK_B, BLOCK_K) at rows bb, columns k, in hidden's dtype as the
    unfused norm stores it; zero off the masks."""
    s = _residual_tile(hid_ptr, res_ptr, ro_ptr, bb, bm, k, km, s_hb, s_rb, HAS_RES)
    h = (s - mean[:, None]) * rstd[:, None] * tl.load(nw_ptr + k, mask=km, other=0.0).to(tl.float32)[None, :]
    if HAS_NORM_BIAS:
        h += tl.load(nb_ptr + k, mask=km, other=0.0).to(tl.float32)[None, :]
    return tl.where(bm[:, None] & km[None, :], h, 0.0).to(hid_ptr.dtype.element_ty)


@triton.jit
def norm_in_proj_rows(hid_ptr, res_ptr, ro_ptr, nw_ptr, nb_ptr, win_ptr, inb_ptr, z_ptr,
                      cs_ptr, cw_ptr, cb_ptr, xc_ptr, xw_ptr, part_ptr,
                      batch, d_model, d_inner, E, n_xblk, eps,
                      s_hb, s_rb, s_rob, s_wn, s_wk, s_zb, s_csb, s_csc, s_csw, s_cwc, s_cww, s_xcb, s_xwe, s_xwc,
                      s_pb, s_pp,
                      HAS_RES: tl.constexpr, IS_RMS: tl.constexpr, HAS_NORM_BIAS: tl.constexpr,
                      HAS_IN_BIAS: tl.constexpr, HAS_CONV_BIAS: tl.constexpr, W: tl.constexpr, W_P2: tl.constexpr,
                      EC: tl.constexpr, N_EC: tl.constexpr, DOT_F32: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr, PDL: tl.constexpr):
    """grid (2 n_xblk, cdiv(batch, BLOCK_B)). norm_in_proj for a tile of BLOCK_B rows: the rows'
    statistics in a first pass over them (two for LayerNorm), then in_proj's block of BLOCK_N rows
    times the normalised tile, then the conv step and x_proj's partials (x programs) or z's store.
    Program (0, t) stores tile t's new residual."""
    pid = tl.program_id(0)
    bb = (tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    bm = bb < batch
    is_x = pid < n_xblk
    blk = tl.where(is_x, pid, pid - n_xblk)
    ch = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    chm = ch < d_inner
    rows = tl.where(is_x, ch, d_inner + ch)
    w_rows = win_ptr + rows[:, None] * s_wn
    kb = tl.arange(0, BLOCK_K)
    w_first = tl.load(w_rows + kb[None, :] * s_wk, mask=chm[:, None] & (kb[None, :] < d_model), other=0.0)
    _dependency_wait(PDL)
    tot = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for k0 in range(0, d_model, BLOCK_K):
        k = k0 + kb
        km = k < d_model
        s = _residual_tile(hid_ptr, res_ptr, ro_ptr, bb, bm, k, km, s_hb, s_rb, HAS_RES)
        if pid == 0:
            tl.store(ro_ptr + bb[:, None] * s_rob + k[None, :], s, mask=bm[:, None] & km[None, :])
        if IS_RMS:
            tot += tl.sum(s * s, axis=1)
        else:
            tot += tl.sum(s, axis=1)
    if IS_RMS:
        mean = tl.zeros((BLOCK_B,), dtype=tl.float32)
        rstd = 1.0 / tl.sqrt(tot / d_model + eps)
    else:
        mean = tot / d_model
        var = tl.zeros((BLOCK_B,), dtype=tl.float32)
        for k0 in range(0, d_model, BLOCK_K):
            k = k0 + kb
            km = k < d_model
            s = _residual_tile(hid_ptr, res_ptr, ro_ptr, bb, bm, k, km, s_hb, s_rb, HAS_RES)
            xc = tl.where(bm[:, None] & km[None, :], s - mean[:, None], 0.0)
            var += tl.sum(xc * xc, axis=1)
        rstd = 1.0 / tl.sqrt(var / d_model + eps)

    # one tile ahead, as norm_in_proj (the last loads are masked off entirely)
    w_next = w_first
    h_next = _normed_rows(hid_ptr, res_ptr, ro_ptr, nw_ptr, nb_ptr, bb, bm, kb, kb < d_model, mean, rstd, s_hb,
                          s_rb, HAS_RES, HAS_NORM_BIAS)
    acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for k0 in range(BLOCK_K, d_model + BLOCK_K, BLOCK_K):
        w, h = w_next, h_next
        k = k0 + kb
        km = k < d_model
        w_next = tl.load(w_rows + k[None, :] * s_wk, mask=chm[:, None] & km[None, :], other=0.0)
        h_next = _normed_rows(hid_ptr, res_ptr, ro_ptr, nw_ptr, nb_ptr, bb, bm, k, km, mean, rstd, s_hb, s_rb,
                              HAS_RES, HAS_NORM_BIAS)
        acc = _dot(w, tl.trans(h), acc, DOT_F32)

    v = acc
    if HAS_IN_BIAS:
        v += tl.load(inb_ptr + rows, mask=chm, other=0.0).to(tl.float32)[:, None]
    vq = v.to(z_ptr.dtype.element_ty)  # (BLOCK_N, BLOCK_B)
    out_m = chm[:, None] & bm[None, :]
    if is_x:
        kw = tl.arange(0, W_P2)
        m3 = out_m[:, :, None]
        cs = cs_ptr + bb[None, :, None] * s_csb + ch[:, None, None] * s_csc + kw[None, None, :] * s_csw
        old = tl.load(cs + s_csw, mask=m3 & (kw[None, None, :] < W - 1), other=0.0)
        cw, cbias = _conv_weights(ch, chm, cw_ptr, s_cwc, s_cww, cb_ptr, W, W_P2, HAS_CONV_BIAS)
        win = tl.where(kw[None, None, :] == W - 1, vq[:, :, None].to(old.dtype), old)
        tl.debug_barrier()  # every copy of the old window read before it is overwritten
        tl.store(cs, win, mask=m3 & (kw[None, None, :] < W))
        pre = tl.sum(win.to(tl.float32) * cw[:, None, :], axis=2) + cbias[:, None]
        xq = (pre * tl.sigmoid(pre)).to(xc_ptr.dtype.element_ty)
        tl.store(xc_ptr + bb[None, :] * s_xcb + ch[:, None], xq, mask=out_m)
        xq = tl.where(out_m, xq, 0.0).to(xc_ptr.dtype.element_ty)
        # partials[b, blk, e] = x_proj.weight[e, block] @ x_conv[b, block]: (EC, BLOCK_N) @ (BLOCK_N, BLOCK_B)
        e0 = tl.arange(0, EC)
        for i in tl.static_range(N_EC):
            wx = _xproj_load(xw_ptr, ch, chm, s_xwe, s_xwc, E, i, EC)
            pe = _dot(wx, xq, tl.zeros((EC, BLOCK_B), dtype=tl.float32), DOT_F32)
            e = i * EC + e0
            tl.store(part_ptr + bb[None, :] * s_pb + blk * s_pp + e[:, None], pe, mask=(e[:, None] < E) & bm[None, :])
    else:
        tl.store(z_ptr + bb[None, :] * s_zb + ch[:, None], vq, mask=out_m)


@triton.jit
def gemm_rows(x_ptr, w_ptr, b_ptr, out_ptr, batch, N, K, s_xb, s_xk, s_wn, s_wk, s_ob,
              HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              BLOCK_B: tl.constexpr, PDL: tl.constexpr):
    """grid (cdiv(N, BLOCK_N), cdiv(batch, BLOCK_B)). out[b, n] = w[n, :] . x[b, :] (+ bias[n]) for a
    tile of BLOCK_B rows: each weight tile read once for the tile, fp32 sums."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    bb = (tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    bm = bb < batch
    kb = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + n[:, None] * s_wn
    w_first = tl.load(w_rows + kb[None, :] * s_wk, mask=nm[:, None] & (kb[None, :] < K), other=0.0)
    _dependency_wait(PDL)
    w_next = w_first
    x_next = tl.load(x_ptr + bb[None, :] * s_xb + kb[:, None] * s_xk, mask=(kb < K)[:, None] & bm[None, :], other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):  # one tile ahead
        w, xt = w_next, x_next
        k = k0 + kb
        km = k < K
        w_next = tl.load(w_rows + k[None, :] * s_wk, mask=nm[:, None] & km[None, :], other=0.0)
        x_next = tl.load(x_ptr + bb[None, :] * s_xb + k[:, None] * s_xk, mask=km[:, None] & bm[None, :], other=0.0)
        acc = _dot(w, xt, acc, DOT_F32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=nm, other=0.0).to(tl.float32)[:, None]
    tl.store(out_ptr + bb[None, :] * s_ob + n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=nm[:, None] & bm[None, :])
