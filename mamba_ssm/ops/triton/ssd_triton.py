"""Mamba-2's chunked SSD scan as Triton kernels, forward and backward (kernels: _ssd_kernels.py).

Same signature and results as the PyTorch reference `mamba_ssm.ops.ssd_chunked.ssd_chunked` (the
recurrence is in that module's docstring). Per chunk of Q = min(chunk_size, seqlen) steps:

forward   dt_fwd          dt + bias, softplus, clamp; cs = cumsum(dt A) inside the chunk
          chunk_state     E_c = sum_t exp(cs_last - cs_t) dt_t x_t B_t^T
          state_pass_fwd  S_{c+1} = exp(cs_last) S_c + E_c, sequential over chunks; final state
          chunk_scan_fwd  y = exp(cs_t) C_t S_c + causal (C B^T * decay * dt) x + D x; out = y silu(z)
backward  chunk_state     dS_c from the outputs: sum_t exp(cs_t) dy_t C_t^T
          state_pass_bwd  dE_c, d initial_states, the cs_last part of the passing
          chunk_scan_bwd_dx  rows s: dx, dB (per head), dz, d dt and d cs parts, dD parts
          chunk_scan_bwd_dc  rows t: dC (per head), the rest of d cs
          dt_bwd          d cs -> d dt, dA, d dt_bias (through clamp and softplus)
The few PyTorch ops left are reductions of small per-program partial sums (dA, d dt_bias, dD, the
cs_last gradient), the sum of per-head dB / dC over the heads of a group, the segment numbers of
seq_idx, and the states at cu_seqlens' ends (return_varlen_states; without gradient).

Differences from the reference: the cumulative sums inside a chunk are fp32 (the reference sums in
float64), so decays between steps late in a chunk whose sum of dt A is large lose digits (~1e-7 |cs|);
fp16/bf16 inputs enter the matrix products in their own dtype (fp32 accumulation), as do the fp32
states and decay-scaled operands, rounded to it; fp32 inputs multiply in tf32x3. float64 is not supported
here (the dispatcher keeps it in PyTorch).
"""
from __future__ import annotations

import torch

from mamba_ssm.ops.packing import seq_idx_from_cu_seqlens
from mamba_ssm.ops.ssd_chunked import _segments, check_ssd_inputs

_INF = float("inf")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# the backward keeps a whole (p, n) state tile per program: headdim <= 128, dstate <= 256, and
# p * n (each rounded up to a power of two) <= 128 * 128 (p = 128 with n = 256 overflows shared memory)
MAX_HEADDIM, MAX_DSTATE, MAX_STATE = 128, 256, 128 * 128


def is_available():
    """Triton imports and a CUDA device is present."""
    from mamba_ssm.ops.triton import triton_on_cuda

    return triton_on_cuda()


def supports(x, B) -> bool:
    """Inputs these kernels take: 16/32-bit floats, seqlen >= 1, headdim <= 128, dstate <= 256 (product
    <= 128 * 128)."""
    p, n = x.shape[-1], B.shape[-1]
    return (x.shape[1] > 0 and x.dtype in DTYPES and B.dtype in DTYPES and p <= MAX_HEADDIM and n <= MAX_DSTATE
            and _p2(p) * _p2(n) <= MAX_STATE)


def _kernels():
    from mamba_ssm.ops.triton import _ssd_kernels

    return _ssd_kernels


def _p2(v, least=16):
    return max(least, 1 << (int(v) - 1).bit_length())


def _last_unit(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


class _Plan:
    """Sizes and tile shapes of one call."""

    def __init__(self, x, B, chunk_size):
        self.b, self.l, self.h, self.p = x.shape
        self.g, self.n = B.shape[2], B.shape[3]
        self.hg = self.h // self.g
        self.Q = max(1, min(chunk_size, self.l))
        self.nc = -(-self.l // self.Q)
        self.BQ = _p2(self.Q, 1)
        self.BH = max(1, min(_p2(self.h, 1), 1024 // self.BQ))
        self.BP_full, self.BN_full = _p2(self.p), _p2(self.n)
        wide = B.element_size() >= 4  # fp32 products (tf32x3) hold about three times the registers
        self.BM = min(32 if wide else 64, _p2(self.Q))
        self.BP = min(64, self.BP_full)
        # the backward's row tiles hold (BM, p) and (BM, n) accumulators and the whole (p, n) state
        # (sm_90 compiles: tools/check_ssd_compile.py)
        state = self.BP_full * self.BN_full * B.element_size()
        self.BM_bwd = min(64 if state <= 2 * 64 * 64 else 32 if state <= 2 * 64 * 128 else 16, self.BM)
        self.stages_bwd = 2
        self.BS = min(1024, _p2(self.p * self.n))
        self.NMB = -(-self.Q // self.BM_bwd)
        # CPU tensors run in Triton's interpreter, whose bf16 products are wrong: it multiplies in fp32
        self.dot_f32 = not x.is_cuda and B.dtype == torch.bfloat16


def _dt_forward(K, plan, dt, dt_bias, A, dt_softplus, dt_limit):
    b, h, nc, Q = plan.b, plan.h, plan.nc, plan.Q
    dtp = torch.empty(b, h, nc, Q, device=dt.device, dtype=torch.float32)
    cs = torch.empty_like(dtp)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    grid = (b, nc, -(-h // plan.BH))
    K.dt_fwd[grid](dt, dt_bias if dt_bias is not None else A, A, dtp, cs, plan.l, h, nc, Q, dt.stride(0),
                   dt.stride(1), lo, hi if hi != _INF else 3.0e38, HAS_BIAS=dt_bias is not None,
                   SOFTPLUS=bool(dt_softplus), CLAMP=(lo, hi) != (0.0, _INF), BQ=plan.BQ, BH=plan.BH)
    return dtp, cs


def _chunk_state(K, plan, X, Z, Y, dtp, cs, seg, bwd):
    """E_c (forward: X = x, Y = B) or dS_c from the outputs (backward: X = dout, Z = z, Y = C)."""
    out = torch.empty(plan.b, plan.nc, plan.h, plan.p, plan.n, device=X.device, dtype=torch.float32)
    BP, BN = min(64, plan.BP_full), min(64, plan.BN_full)
    grid = (plan.b * plan.nc * plan.h, -(-plan.p // BP), -(-plan.n // BN))
    Zs = Z if Z is not None else X
    K.chunk_state[grid](X, Zs, Y, dtp, cs, seg if seg is not None else cs, out, plan.l, plan.h, plan.p, plan.n,
                        plan.nc, plan.Q, plan.hg, X.stride(0), X.stride(1), X.stride(2), Zs.stride(0),
                        Zs.stride(1), Zs.stride(2), Y.stride(0), Y.stride(1), Y.stride(2),
                        BWD=bwd, HAS_Z=Z is not None, HAS_SEQ=seg is not None, DOT_F32=plan.dot_f32, BK=plan.BM,
                        BP=BP, BN=BN)
    return out


def _forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seg, chunk_size, dt_softplus, dt_limit):
    K = _kernels()
    plan = _Plan(x, B, chunk_size)
    b, l, h, p, n, nc = plan.b, plan.l, plan.h, plan.p, plan.n, plan.nc
    dtp, cs = _dt_forward(K, plan, dt, dt_bias, A, dt_softplus, dt_limit)
    states = _chunk_state(K, plan, x, None, B, dtp, cs, seg, False)
    final = torch.empty(b, h, p, n, device=x.device, dtype=torch.float32)
    init = None if initial_states is None else initial_states.contiguous()
    segp = seg if seg is not None else cs
    K.state_pass_fwd[(b * h, -(-(p * n) // plan.BS))](
        states, cs, segp, init if init is not None else final, final, l, h, p * n, nc, plan.Q,
        HAS_INIT=init is not None, HAS_SEQ=seg is not None, BS=plan.BS)
    out = torch.empty(b, l, h, p, device=x.device, dtype=x.dtype)
    ypre = torch.empty_like(out) if z is not None else None
    zs = z if z is not None else x
    grid = (b * nc * h, -(-plan.Q // plan.BM), -(-p // plan.BP))
    K.chunk_scan_fwd[grid](
        x, zs, B, C, dtp, cs, segp, states, D if D is not None else A, out, ypre if ypre is not None else out,
        l, h, p, n, nc, plan.Q, plan.hg, x.stride(0), x.stride(1), x.stride(2), zs.stride(0), zs.stride(1),
        zs.stride(2), B.stride(0), B.stride(1), B.stride(2), C.stride(0), C.stride(1), C.stride(2),
        out.stride(0), out.stride(1), out.stride(2), HAS_D=D is not None, D_HP=D is not None and D.dim() == 2,
        HAS_Z=z is not None, HAS_SEQ=seg is not None, DOT_F32=plan.dot_f32, BM=plan.BM, BK=plan.BM, BP=plan.BP,
        BN=plan.BN_full, num_warps=4)
    return out, final, ypre, dtp, cs, states, plan


def _backward(ctx_tensors, plan, gout, gfinal, dt_softplus, dt_limit, has_init):
    x, dt, A, B, C, D, z, dt_bias, seg, ypre, dtp, cs, states = ctx_tensors
    K = _kernels()
    b, l, h, p, n, nc, Q, g = plan.b, plan.l, plan.h, plan.p, plan.n, plan.nc, plan.Q, plan.g
    dev = x.device
    gout = torch.zeros(b, l, h, p, device=dev, dtype=x.dtype) if gout is None else _last_unit(gout)
    zs = z if z is not None else x
    segp = seg if seg is not None else cs
    # dS_c from the outputs, then the passing in reverse (in place: ds becomes dE_c)
    ds = _chunk_state(K, plan, gout, z, C, dtp, cs, seg, True)
    nsb = -(-(p * n) // plan.BS)
    dinit = torch.empty(b, h, p, n, device=dev, dtype=torch.float32)
    ddl = torch.empty(b, h, nc, nsb, device=dev, dtype=torch.float32)
    gfinal = None if gfinal is None else gfinal.contiguous()
    K.state_pass_bwd[(b * h, nsb)](ds, states, cs, segp, gfinal if gfinal is not None else dinit, dinit, ddl,
                                   l, h, p * n, nc, Q, nsb, HAS_DFIN=gfinal is not None,
                                   HAS_SEQ=seg is not None, BS=plan.BS)
    BM, nmb = plan.BM_bwd, plan.NMB
    dx = torch.empty(b, l, h, p, device=dev, dtype=x.dtype)
    dz = torch.empty(b, l, h, p, device=dev, dtype=z.dtype) if z is not None else None
    dB = torch.empty(b, l, h, n, device=dev, dtype=torch.float32)
    dC = torch.empty_like(dB)
    ddt_part = torch.empty(b, h, nc, Q, device=dev, dtype=torch.float32)
    dcs = torch.empty_like(ddt_part)
    dlast = torch.empty(b, h, nc, nmb, device=dev, dtype=torch.float32)
    dD_part = torch.empty(b, nc, h, nmb, p, device=dev, dtype=torch.float32) if D is not None else None
    strides = (x.stride(0), x.stride(1), x.stride(2), zs.stride(0), zs.stride(1), zs.stride(2),
               gout.stride(0), gout.stride(1), gout.stride(2), B.stride(0), B.stride(1), B.stride(2),
               C.stride(0), C.stride(1), C.stride(2))
    grid = (b * nc * h, nmb)
    K.chunk_scan_bwd_dx[grid](
        x, zs, gout, ypre if ypre is not None else x, B, C, dtp, cs, segp, ds, D if D is not None else A,
        dx, dz if dz is not None else dx, dB, ddt_part, dcs, dlast, dD_part if dD_part is not None else dlast,
        l, h, p, n, nc, Q, plan.hg, nmb, *strides,
        HAS_D=D is not None, D_HP=D is not None and D.dim() == 2, HAS_Z=z is not None, HAS_SEQ=seg is not None,
        DOT_F32=plan.dot_f32, BM=BM, BK=BM, BP=plan.BP_full, BN=plan.BN_full, num_warps=8,
        num_stages=plan.stages_bwd)
    K.chunk_scan_bwd_dc[grid](
        x, zs, gout, B, C, dtp, cs, segp, states, dC, dcs, l, h, p, n, nc, Q, plan.hg, *strides,
        HAS_Z=z is not None, HAS_SEQ=seg is not None, DOT_F32=plan.dot_f32, BM=BM, BK=BM, BP=plan.BP_full,
        BN=plan.BN_full, num_warps=8, num_stages=plan.stages_bwd)
    dlast_total = (dlast.sum(-1) + ddl.sum(-1)).contiguous()
    ddt = torch.empty(b, l, h, device=dev, dtype=dt.dtype)
    dA_part = torch.empty(b, nc, h, device=dev, dtype=torch.float32)
    dbias_part = torch.empty_like(dA_part)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    K.dt_bwd[(b, nc, -(-h // plan.BH))](
        dt, dt_bias if dt_bias is not None else A, A, dtp, ddt_part, dcs, dlast_total, ddt, dA_part, dbias_part,
        l, h, nc, Q, dt.stride(0), dt.stride(1), lo, hi if hi != _INF else 3.0e38, HAS_BIAS=dt_bias is not None,
        SOFTPLUS=bool(dt_softplus), CLAMP=(lo, hi) != (0.0, _INF), BQ=plan.BQ, BH=plan.BH)
    dA = dA_part.sum((0, 1)).to(A.dtype)
    dbias = dbias_part.sum((0, 1)).to(dt_bias.dtype) if dt_bias is not None else None
    dB = dB.view(b, l, g, plan.hg, n).sum(3).to(B.dtype)
    dC = dC.view(b, l, g, plan.hg, n).sum(3).to(C.dtype)
    dD = None
    if D is not None:
        dD = dD_part.sum((0, 1, 3))
        dD = (dD if D.dim() == 2 else dD.sum(-1)).to(D.dtype)
    return dx, ddt, dA, dB, dC, dD, dz, dbias, dinit if has_init else None


class SSDTritonFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, D, z, dt_bias, initial_states, seg, chunk_size, dt_softplus, dt_limit):
        x, dt, B, C, z = (_last_unit(t) for t in (x, dt, B, C, z))
        D = None if D is None else D.contiguous()
        out, final, ypre, dtp, cs, states, plan = _forward(x, dt, A, B, C, D, z, dt_bias, initial_states, seg,
                                                           chunk_size, dt_softplus, dt_limit)
        ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, seg, ypre, dtp, cs, states)
        ctx.plan, ctx.dt_softplus, ctx.dt_limit = plan, dt_softplus, dt_limit
        ctx.has_init = initial_states is not None
        ctx.init_dtype = None if initial_states is None else initial_states.dtype
        ctx.mark_non_differentiable(dtp, cs, states)
        ctx.set_materialize_grads(False)  # no zero tensor for an unused final state
        return out, final, dtp, cs, states  # the last three for return_varlen_states

    @staticmethod
    def backward(ctx, gout, gfinal, *_):
        dx, ddt, dA, dB, dC, dD, dz, dbias, dinit = _backward(
            ctx.saved_tensors, ctx.plan, gout, gfinal, ctx.dt_softplus, ctx.dt_limit, ctx.has_init)
        if dinit is not None:
            dinit = dinit.to(ctx.init_dtype)
        return dx, ddt, dA, dB, dC, dD, dz, dbias, dinit, None, None, None, None


def _varlen_states(ends, plan, x, B, dtp, cs, prev, seg):
    """The state after each position of `ends` (row 0), from the forward's chunk intermediates."""
    Q, l, hg = plan.Q, plan.l, plan.hg
    c, r = ends // Q, ends % Q
    j = torch.arange(Q, device=x.device)
    pos = c[:, None] * Q + j[None, :]                                             # (k, Q)
    upto = (j[None, :] <= r[:, None]) & (pos < l)
    pos = pos.clamp(max=l - 1)
    carried = torch.ones_like(ends, dtype=torch.bool)
    if seg is not None:
        s0 = seg[0]
        upto = upto & (s0[pos] == s0[ends][:, None])
        carried = s0[(c * Q - 1).clamp(min=0)] == s0[ends]
    cs_c = cs[0][:, c]                                                            # (h, k, Q)
    cs_r = cs_c.gather(-1, r.view(1, -1, 1).expand(cs_c.shape[0], -1, 1))        # (h, k, 1)
    w = torch.exp(cs_r - cs_c) * dtp[0][:, c] * upto[None].float()
    xg = x[0, pos].float()                                                        # (k, Q, h, p)
    Bg = B[0, pos].float().repeat_interleave(hg, dim=2)                           # (k, Q, h, n)
    own = torch.einsum("hkq,kqhp,kqhn->khpn", w, xg, Bg)
    decay = torch.exp(cs_r[..., 0]).transpose(0, 1) * carried[:, None].float()    # (k, h)
    return own + prev[0, c] * decay[..., None, None]


def ssd_triton(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
               cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, _INF), return_final_states=False,
               return_varlen_states=False):
    """The SSD scan on the Triton kernels: `ssd_chunked`'s signature and results (module docstring)."""
    check_ssd_inputs(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, seq_idx, cu_seqlens, dt_limit,
                     return_varlen_states, name="ssd_triton")
    if not supports(x, B):
        raise ValueError(f"ssd_triton: x {tuple(x.shape)} {x.dtype} and B {tuple(B.shape)} {B.dtype} must be "
                         f"float16/bfloat16/float32, seqlen >= 1, headdim <= {MAX_HEADDIM}, dstate <= {MAX_DSTATE} and "
                         f"headdim * dstate (powers of two) <= {MAX_STATE}")
    if seq_idx is None and cu_seqlens is not None:
        seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, x.shape[1])
    seg = None if seq_idx is None else _segments(seq_idx).contiguous()
    out, final, dtp, cs, prev = SSDTritonFn.apply(x, dt, A, B, C, D, z, dt_bias, initial_states, seg, chunk_size,
                                                  dt_softplus, (float(dt_limit[0]), float(dt_limit[1])))
    extra = []
    if return_final_states:
        extra.append(final)
    if return_varlen_states:
        # from the forward's intermediates, without gradient (the dispatcher sends calls that need one
        # to the PyTorch scan)
        with torch.no_grad():
            extra.append(_varlen_states((cu_seqlens[1:] - 1).long(), _Plan(x, B, chunk_size), x, B, dtp, cs, prev,
                                        seg))
    if not extra:
        return out
    return (out, *extra)
