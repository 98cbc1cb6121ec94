"""LayerNorm / RMSNorm with an optional residual add, upstream's `layer_norm_fn` semantics.

Given x and an optional residual: x = x + residual; the new residual is that sum (kept in
fp32 when residual_in_fp32); out = norm(x) * weight + bias. With prenorm=True the function
returns (out, new_residual) so the next block can add to it, else out alone.

On CUDA the add and the norm run as one Triton kernel each way (`_AddNormTriton`); elsewhere, and
for the options it does not cover (dropout, zero-centred weights, rows over 16384), in PyTorch.
Why: in PyTorch the add and the norm of a block are about ten elementwise kernels each way over
the (batch, seqlen, d_model) activations, in fp32.
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F


def _residual_dtype(x, residual, residual_in_fp32):
    """The new residual's dtype: fp32 when asked for or when x and the residual differ, else x's."""
    if residual_in_fp32 or (residual is not None and residual.dtype != x.dtype):
        return torch.float32
    return x.dtype


def _add_residual(x, residual, residual_in_fp32):
    dtype = _residual_dtype(x, residual, residual_in_fp32)
    return x.to(dtype) if residual is None else x.to(dtype) + residual.to(dtype)


def _normalize(x, weight, bias, eps, is_rms_norm, zero_centered_weight=False):
    xf = x.float()
    if is_rms_norm:
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    else:
        y = F.layer_norm(xf, (xf.shape[-1],), eps=eps)
    w = weight.float() + 1.0 if zero_centered_weight else weight.float()
    y = y * w
    if bias is not None:
        y = y + bias.float()
    return y


def is_available():
    """Triton imports and a CUDA device is present (the backend switch asks this)."""
    from mamba_ssm.ops.triton import triton_on_cuda

    return triton_on_cuda()


_MAX_TRITON_WIDTH = 16384  # one row per program, held in registers


def _use_triton(x, residual, dropout_p, zero_centered_weight, residual_in_fp32):
    if not x.is_cuda or dropout_p > 0.0 or zero_centered_weight or x.shape[-1] > _MAX_TRITON_WIDTH:
        return False
    if residual is None and not residual_in_fp32:
        return False  # the new residual is x itself: nothing to fuse
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)
    if x.numel() == 0 or compiling():  # torch.compile traces (and fuses) the PyTorch path
        return False
    from mamba_ssm.backend import choose_backend

    return choose_backend("layer_norm", True) == "triton"


def layer_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6,
                  dropout_p=0.0, rowscale=None, prenorm=False, residual_in_fp32=False,
                  zero_centered_weight=False, is_rms_norm=False, return_dropout_mask=False,
                  out_dtype=None, norm_dtype=None, out=None, residual_out=None):
    """x: (..., hidden); weight, bias: (hidden,). Returns out, or (out, residual) if prenorm."""
    if x1 is not None or weight1 is not None or rowscale is not None or return_dropout_mask:
        raise NotImplementedError("layer_norm_fn: x1, weight1, rowscale and return_dropout_mask are not supported")
    if weight.shape[-1] != x.shape[-1]:
        raise ValueError(f"layer_norm_fn: weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"layer_norm_fn: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    in_dtype = x.dtype
    if _use_triton(x, residual, dropout_p, zero_centered_weight, residual_in_fp32):
        y, new_residual = _AddNormTriton.apply(x, residual, weight, bias, eps, is_rms_norm,
                                               _residual_dtype(x, residual, residual_in_fp32), out_dtype or in_dtype)
        return (y, new_residual) if prenorm else y
    if dropout_p > 0.0:
        x = F.dropout(x, p=dropout_p)
    new_residual = _add_residual(x, residual, residual_in_fp32)
    y = _normalize(new_residual, weight, bias, eps, is_rms_norm, zero_centered_weight)
    y = y.to(out_dtype if out_dtype is not None else in_dtype)
    if not residual_in_fp32 and residual is None:
        new_residual = new_residual.to(in_dtype)
    return (y, new_residual) if prenorm else y


def rms_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6,
                dropout_p=0.0, rowscale=None, prenorm=False, residual_in_fp32=False,
                zero_centered_weight=False, return_dropout_mask=False, out_dtype=None,
                norm_dtype=None, out=None, residual_out=None):
    return layer_norm_fn(x, weight, bias, residual=residual, x1=x1, weight1=weight1, bias1=bias1, eps=eps,
                         dropout_p=dropout_p, rowscale=rowscale, prenorm=prenorm,
                         residual_in_fp32=residual_in_fp32, zero_centered_weight=zero_centered_weight,
                         is_rms_norm=True, return_dropout_mask=return_dropout_mask, out_dtype=out_dtype)


def _ref_inputs(x, weight, bias, residual, upcast):
    """The references' common start: optional fp32 upcast, then the residual add."""
    if upcast:
        x, weight = x.float(), weight.float()
        bias = bias.float() if bias is not None else None
        residual = residual.float() if residual is not None else None
    if residual is not None:
        x = (x + residual).to(x.dtype)
    return x, weight, bias


def layer_norm_ref(x, weight, bias, residual=None, eps=1e-6, prenorm=False, upcast=False):
    dtype = x.dtype
    x, weight, bias = _ref_inputs(x, weight, bias, residual, upcast)
    out = F.layer_norm(x.to(weight.dtype), x.shape[-1:], weight=weight, bias=bias, eps=eps).to(dtype)
    return (out, x) if prenorm else out


def rms_norm_ref(x, weight, bias, residual=None, eps=1e-6, prenorm=False, upcast=False):
    dtype = x.dtype
    x, weight, bias = _ref_inputs(x, weight, bias, residual, upcast)
    rstd = 1 / torch.sqrt(x.square().mean(dim=-1, keepdim=True) + eps)
    out = x * rstd * weight
    if bias is not None:
        out = out + bias
    out = out.to(dtype)
    return (out, x) if prenorm else out


class _AddNormTriton(torch.autograd.Function):
    """(out, new_residual) of layer_norm_fn in one kernel; the backward in one more (plus the sum
    of the weight/bias partials when they need gradients). x, residual: (..., N)."""

    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, is_rms, res_dtype, out_dtype):
        shape, n = x.shape, x.shape[-1]
        x2 = x.reshape(-1, n)
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        r2 = None
        if residual is not None:
            r2 = residual.reshape(-1, n)
            r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
        rows = x2.shape[0]
        y = torch.empty(rows, n, device=x.device, dtype=out_dtype)
        new_res = torch.empty(rows, n, device=x.device, dtype=res_dtype)
        mean = torch.empty(rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
        block, warps = _block_and_warps(n)
        weight = weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        _kernels()[0][(rows,)](
            x2, r2 if r2 is not None else x2, weight, bias if bias is not None else weight, y, new_res, mean, rstd,
            n, x2.stride(0), r2.stride(0) if r2 is not None else 0, eps,
            HAS_RES=r2 is not None, HAS_BIAS=bias is not None, IS_RMS=is_rms, BLOCK=block, num_warps=warps)
        ctx.save_for_backward(new_res, weight, bias, mean, rstd)
        ctx.is_rms, ctx.x_dtype, ctx.shape = is_rms, x.dtype, shape
        ctx.res_dtype = residual.dtype if residual is not None else None
        ctx.set_materialize_grads(False)
        return y.view(shape), new_res.view(shape)

    @staticmethod
    def backward(ctx, dy, dres):
        new_res, weight, bias, mean, rstd = ctx.saved_tensors
        rows, n = new_res.shape
        need_w = ctx.needs_input_grad[2] or (bias is not None and ctx.needs_input_grad[3])
        if dy is None:  # only the new residual was used
            dy = torch.zeros(rows, n, device=new_res.device, dtype=new_res.dtype)
        dy = dy.reshape(rows, n)
        dy = dy if dy.stride(-1) == 1 else dy.contiguous()
        if dres is not None:
            dres = dres.reshape(rows, n)
            dres = dres if dres.stride(-1) == 1 else dres.contiguous()
        dx = torch.empty(rows, n, device=dy.device, dtype=ctx.x_dtype)
        two_out = ctx.res_dtype is not None and ctx.needs_input_grad[1]  # the residual's own gradient
        dr = torch.empty(rows, n, device=dy.device, dtype=ctx.res_dtype) if two_out else dx
        # the weight/bias partials: one row per program, each program taking a run of rows
        progs = min(rows, 4 * _sm_count(dy.device)) if need_w else rows
        per_prog = -(-rows // progs)
        progs = -(-rows // per_prog)
        dw = torch.empty(progs if need_w else 1, n, device=dy.device, dtype=torch.float32)
        db = torch.empty(progs if need_w and bias is not None else 1, n, device=dy.device, dtype=torch.float32)
        block, warps = _block_and_warps(n)
        _kernels()[1][(progs,)](
            new_res, weight, mean, rstd, dy, dres if dres is not None else dy, dx, dr, dw, db,
            rows, n, per_prog, new_res.stride(0), dy.stride(0), dres.stride(0) if dres is not None else 0,
            HAS_DRES=dres is not None, TWO_OUT=two_out, HAS_BIAS=bias is not None,
            IS_RMS=ctx.is_rms, NEED_W=need_w, BLOCK=block, num_warps=warps)
        gw = dw.sum(0).to(weight.dtype) if ctx.needs_input_grad[2] else None
        gb = db.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[3] else None
        dres_in = dr.view(ctx.shape) if two_out else None
        return dx.view(ctx.shape), dres_in, gw, gb, None, None, None, None


def _block_and_warps(n):
    import triton

    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 1), 16)


_SM_COUNT = {}


def _sm_count(device):
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


@functools.lru_cache(maxsize=None)
def _kernels():
    """Compile on first use, so importing this module never needs Triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(X, R, W, Bias, Y, RO, Mean, Rstd, N, s_x, s_r, eps,
            HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        s = tl.load(X + row * s_x + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            s += tl.load(R + row * s_r + cols, mask=m, other=0.0).to(tl.float32)
        s_out = s.to(RO.dtype.element_ty)
        tl.store(RO + row * N + cols, s_out, mask=m)
        s = s_out.to(tl.float32)  # normalise the residual as stored (rounded when it is 16-bit)
        if IS_RMS:
            xc = s
        else:
            mean = tl.sum(s, axis=0) / N
            tl.store(Mean + row, mean)
            xc = tl.where(m, s - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        tl.store(Rstd + row, rstd)
        y = xc * rstd * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(Bias + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=m)

    @triton.jit
    def bwd(RO, W, Mean, Rstd, DY, DRES, DX, DR, DW, DB, M, N, per_prog, s_ro, s_dy, s_dres,
            HAS_DRES: tl.constexpr, TWO_OUT: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
            NEED_W: tl.constexpr, BLOCK: tl.constexpr):
        # with xhat = (s - mean) * rstd and wdy = weight * dy:
        #   ds = rstd * (wdy - xhat * mean(xhat * wdy) - mean(wdy))   (no mean(wdy) term for RMSNorm)
        #   ds += d(new residual);  dweight = sum over rows of dy * xhat,  dbias = sum of dy
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < N
        w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
        dw = tl.zeros((BLOCK,), dtype=tl.float32)
        db = tl.zeros((BLOCK,), dtype=tl.float32)
        row_lo = pid * per_prog
        row_hi = tl.minimum(row_lo + per_prog, M)
        first = row_lo.to(tl.int64)
        p_ro, p_dy, p_dres, p_out = RO + first * s_ro, DY + first * s_dy, DRES + first * s_dres, first * N
        for row in range(row_lo, row_hi):
            s = tl.load(p_ro + cols, mask=m, other=0.0).to(tl.float32)
            rstd = tl.load(Rstd + row)
            if IS_RMS:
                xhat = s * rstd
            else:
                xhat = tl.where(m, (s - tl.load(Mean + row)) * rstd, 0.0)
            dy = tl.load(p_dy + cols, mask=m, other=0.0).to(tl.float32)
            wdy = w * dy
            if NEED_W:
                dw += dy * xhat
                if HAS_BIAS:
                    db += dy
            c1 = tl.sum(xhat * wdy, axis=0) / N
            if IS_RMS:
                ds = (wdy - xhat * c1) * rstd
            else:
                ds = (wdy - xhat * c1 - tl.sum(wdy, axis=0) / N) * rstd
            if HAS_DRES:
                ds += tl.load(p_dres + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DX + p_out + cols, ds.to(DX.dtype.element_ty), mask=m)
            if TWO_OUT:
                tl.store(DR + p_out + cols, ds.to(DR.dtype.element_ty), mask=m)
            p_ro += s_ro
            p_dy += s_dy
            p_dres += s_dres
            p_out += N
        if NEED_W:
            tl.store(DW + pid * N + cols, dw, mask=m)
            if HAS_BIAS:
                tl.store(DB + pid * N + cols, db, mask=m)

    return fwd, bwd


class RMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, dropout_p=0.0, zero_centered_weight=False, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.drop = nn.Dropout(dropout_p) if dropout_p > 0.0 else None
        self.zero_centered_weight = zero_centered_weight
        self.weight = nn.Parameter(torch.empty(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.zero_centered_weight:
            nn.init.zeros_(self.weight)
        else:
            nn.init.ones_(self.weight)

    def forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
        return rms_norm_fn(x, self.weight, self.bias, residual=residual, eps=self.eps,
                           dropout_p=self.drop.p if self.drop is not None and self.training else 0.0,
                           prenorm=prenorm, residual_in_fp32=residual_in_fp32,
                           zero_centered_weight=self.zero_centered_weight)
