"""One recurrent step of the selective scan, for decoding (upstream's name): one Triton kernel on CUDA
(`heads_update`: states with heads as they are, (batch, dim, dstate) states as heads of dim / groups
channels), the PyTorch reference elsewhere and for state_batch_indices.

state: (batch, dim, dstate), updated in place; x, dt, z: (batch, dim); A: (dim, dstate);
B, C: (batch, dstate) or (batch, groups, dstate); D, dt_bias: (dim,). Returns out (batch, dim) in x's dtype.
Heads (Mamba-2): state (batch, nheads, headdim, dstate); x, dt, z (batch, nheads, headdim); A
(nheads, headdim, dstate); D, dt_bias (nheads, headdim); B, C (batch, ngroups, dstate).
state_batch_indices (batch,): the state slot of each row (state may hold more slots than rows);
a negative index marks a padding row.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check(state, x, dt, A, B, C):
    if state.dim() != 3:
        raise ValueError(f"selective_state_update: state must be (batch, dim, dstate), got {tuple(state.shape)}")
    batch, dim, dstate = state.shape
    if x.shape != (batch, dim):
        raise ValueError(f"selective_state_update: x must be (batch, dim) = {(batch, dim)}, got {tuple(x.shape)}")
    if dt.shape != (batch, dim):
        raise ValueError(f"selective_state_update: dt must be (batch, dim) = {(batch, dim)}, got {tuple(dt.shape)}")
    if A.shape != (dim, dstate):
        raise ValueError(f"selective_state_update: A must be (dim, dstate) = {(dim, dstate)}, got {tuple(A.shape)}")
    for name, t in (("B", B), ("C", C)):
        ok = t.shape == (batch, dstate) or (t.dim() == 3 and t.shape[0] == batch and t.shape[2] == dstate
                                             and dim % t.shape[1] == 0)
        if not ok:
            raise ValueError(f"selective_state_update: {name} must be (batch, dstate) = {(batch, dstate)} "
                             f"or (batch, groups, dstate), got {tuple(t.shape)}")


def selective_state_update_ref(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """Same contract as selective_state_update; written as the plain equations."""
    has_heads = state.dim() == 4
    if has_heads:  # (batch, nheads, headdim, dstate): flatten heads into channels
        b, h, p, n = state.shape
        flat = state.view(b, h * p, n)
        out = selective_state_update_ref(flat, x.reshape(b, h * p), dt.reshape(b, h * p), A.reshape(h * p, n),
                                         B, C, None if D is None else D.reshape(h * p),
                                         None if z is None else z.reshape(b, h * p),
                                         None if dt_bias is None else dt_bias.reshape(h * p), dt_softplus)
        return out.view(b, h, p)
    _check(state, x, dt, A, B, C)
    dim = state.shape[1]
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    B = B.float()
    C = C.float()
    if B.dim() == 3:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)   # (batch, dim, dstate)
    else:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    else:
        C = C.unsqueeze(1)
    dA = torch.exp(dt.unsqueeze(-1) * A.float())
    dBx = (dt * x.float()).unsqueeze(-1) * B
    new_state = state.float() * dA + dBx
    state.copy_(new_state)
    out = (new_state * C).sum(-1)
    if D is not None:
        out = out + x.float() * D.float()
    if z is not None:
        out = out * F.silu(z.float())
    return out.to(x.dtype)


def is_available():
    """The Triton kernel runs: Triton imports and a CUDA device is present."""
    from mamba_ssm.ops.triton import triton_on_cuda

    return triton_on_cuda()


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    from mamba_ssm.backend import choose_backend

    if (state.dim() in (3, 4) and state_batch_indices is None
            and choose_backend("selective_state_update", state.is_cuda) == "triton"):
        if state.dim() == 4:
            _check_heads(state, x, dt, A, B, C, D, z, dt_bias)
            return selective_state_update_heads_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        _check(state, x, dt, A, B, C)
        return selective_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
    if state_batch_indices is not None:
        return _update_slots(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices)
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def _update_slots(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, state_batch_indices):
    """Row i of x steps state[state_batch_indices[i]]; a negative index marks a padding row: no state
    is touched and its output is zero."""
    idx = state_batch_indices
    if not isinstance(idx, torch.Tensor) or tuple(idx.shape) != (x.shape[0],) or idx.dtype.is_floating_point:
        got = tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"selective_state_update: state_batch_indices must be an integer tensor (batch,) = "
                         f"({x.shape[0]},), got {got}")
    idx = idx.long()
    if idx.numel() and int(idx.max()) >= state.shape[0]:
        raise ValueError(f"selective_state_update: state_batch_indices must be < the state's {state.shape[0]} "
                         f"slots (negative: padding), got {idx.tolist()}")
    rows = (idx >= 0).nonzero().squeeze(1)
    out = torch.zeros_like(x)
    if rows.numel():
        slots = idx[rows]
        sub = state[slots]
        pick = (lambda t: None if t is None else t[rows])  # noqa: E731
        out[rows] = selective_state_update_ref(sub, x[rows], dt[rows], A, B[rows], C[rows], D, pick(z), dt_bias,
                                               dt_softplus)
        state[slots] = sub
    return out


def selective_state_update_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """The same step as one Triton kernel (a PyTorch body launches ~15 kernels per step): the heads
    kernel, with the channels seen as `groups` heads of dim / groups channels, each head its own group
    of B and C. Every tensor is a view, so the state is updated in place."""
    batch, dim, dstate = state.shape
    B3 = B if B.dim() == 3 else B.unsqueeze(1)
    C3 = C if C.dim() == 3 else C.unsqueeze(1)
    g = math.lcm(B3.shape[1], C3.shape[1])  # both divide dim (checked), so their lcm does
    p = dim // g

    def heads(t):
        return None if t is None else t.view(*t.shape[:-1], g, p)

    out = heads_update(state.view(batch, g, p, dstate), heads(x), heads(dt), A.view(g, p, dstate), B3, C3,
                       heads(D), heads(z), heads(dt_bias), dt_softplus, a_is_log=False)
    return out.view(batch, dim)


def _check_heads(state, x, dt, A, B, C, D, z, dt_bias):
    batch, nheads, headdim, dstate = state.shape
    for name, t in (("x", x), ("dt", dt), ("z", z)):
        if t is not None and tuple(t.shape) != (batch, nheads, headdim):
            raise ValueError(f"selective_state_update: {name} must be (batch, nheads, headdim) = "
                             f"{(batch, nheads, headdim)}, got {tuple(t.shape)}")
    if tuple(A.shape) != (nheads, headdim, dstate):
        raise ValueError(f"selective_state_update: A must be (nheads, headdim, dstate) = {(nheads, headdim, dstate)}, "
                         f"got {tuple(A.shape)}")
    for name, t in (("D", D), ("dt_bias", dt_bias)):
        if t is not None and tuple(t.shape) != (nheads, headdim):
            raise ValueError(f"selective_state_update: {name} must be (nheads, headdim) = {(nheads, headdim)}, "
                             f"got {tuple(t.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 3 or t.shape[0] != batch or t.shape[2] != dstate or nheads % t.shape[1] != 0:
            raise ValueError(f"selective_state_update: {name} must be (batch, ngroups, dstate) with ngroups "
                             f"dividing nheads = {nheads}, got {tuple(t.shape)}")


def selective_state_update_heads_triton(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """The step with heads (Mamba-2) as one Triton kernel. state (batch, nheads, headdim, dstate), updated in
    place; x, dt, z (batch, nheads, headdim); A (nheads, headdim, dstate); D, dt_bias (nheads, headdim);
    B, C (batch, ngroups, dstate). Any strides: dt, A, D and dt_bias may be expanded views of per-head
    values (stride 0), as upstream's Mamba2.step passes them. Returns out (batch, nheads, headdim) in x's
    dtype. Grid (cdiv(headdim, BLOCK_P), nheads, batch)."""
    return heads_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, a_is_log=False)


def heads_update(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus, a_is_log):
    """selective_state_update_heads_triton; with a_is_log, A holds A_log and the kernel takes -exp of it
    (Mamba-2's step: two kernels a layer fewer)."""
    import triton

    batch, nheads, headdim, dstate = state.shape
    out = torch.empty(batch, nheads, headdim, device=x.device, dtype=x.dtype)
    block_n = triton.next_power_of_2(dstate)
    block_p = max(1, min(triton.next_power_of_2(headdim), 64, 4096 // block_n))
    grid = (triton.cdiv(headdim, block_p), nheads, batch)
    zero = (0, 0, 0)
    _heads_kernel()[grid](
        state, x, dt, dt_bias if dt_bias is not None else dt, A, B, C, D if D is not None else x,
        z if z is not None else x, out,
        headdim, dstate, nheads // B.shape[1], nheads // C.shape[1],
        *state.stride(), *x.stride(), *dt.stride(), *(dt_bias.stride() if dt_bias is not None else (0, 0)),
        *A.stride(), *B.stride(), *C.stride(), *(D.stride() if D is not None else (0, 0)),
        *(z.stride() if z is not None else zero), *out.stride(),
        HAS_DT_BIAS=dt_bias is not None, HAS_D=D is not None, HAS_Z=z is not None, DT_SOFTPLUS=dt_softplus,
        A_IS_LOG=a_is_log, BLOCK_P=block_p, BLOCK_N=block_n,
    )
    return out


_HEADS_KERNEL = None


def _heads_kernel():
    """selective_state_update_heads_triton's kernel, compiled on first use."""
    global _HEADS_KERNEL
    if _HEADS_KERNEL is not None:
        return _HEADS_KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def heads_state_update(state_ptr, x_ptr, dt_ptr, dt_bias_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, out_ptr,
               headdim, dstate, heads_per_group_b, heads_per_group_c,
               s_sb, s_sh, s_sp, s_sn, s_xb, s_xh, s_xp, s_dtb, s_dth, s_dtp, s_dbh, s_dbp,
               s_Ah, s_Ap, s_An, s_Bb, s_Bg, s_Bn, s_Cb, s_Cg, s_Cn, s_Dh, s_Dp, s_zb, s_zh, s_zp,
               s_ob, s_oh, s_op,
               HAS_DT_BIAS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
               A_IS_LOG: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_p = tl.program_id(0)
        hd = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_n = tl.arange(0, BLOCK_N)
        mask_p = offs_p < headdim
        mask_n = offs_n < dstate
        mask = mask_p[:, None] & mask_n[None, :]
        s_ptrs = state_ptr + b * s_sb + hd * s_sh + offs_p[:, None] * s_sp + offs_n[None, :] * s_sn
        h = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * s_xb + hd * s_xh + offs_p * s_xp, mask=mask_p, other=0.0).to(tl.float32)
        dt = tl.load(dt_ptr + b * s_dtb + hd * s_dth + offs_p * s_dtp, mask=mask_p, other=0.0).to(tl.float32)
        if HAS_DT_BIAS:
            dt += tl.load(dt_bias_ptr + hd * s_dbh + offs_p * s_dbp, mask=mask_p, other=0.0).to(tl.float32)
        if DT_SOFTPLUS:
            dt = tl.where(dt <= 20.0, tl.log(1.0 + tl.exp(dt)), dt)
        A = tl.load(A_ptr + hd * s_Ah + offs_p[:, None] * s_Ap + offs_n[None, :] * s_An, mask=mask,
                    other=0.0).to(tl.float32)
        if A_IS_LOG:
            A = -tl.exp(A)
        Bv = tl.load(B_ptr + b * s_Bb + (hd // heads_per_group_b) * s_Bg + offs_n * s_Bn, mask=mask_n,
                     other=0.0).to(tl.float32)
        Cv = tl.load(C_ptr + b * s_Cb + (hd // heads_per_group_c) * s_Cg + offs_n * s_Cn, mask=mask_n,
                     other=0.0).to(tl.float32)
        h = h * tl.exp(A * dt[:, None]) + Bv[None, :] * (dt * x)[:, None]
        tl.debug_barrier()  # every copy of the old state read before it is overwritten
        tl.store(s_ptrs, h.to(state_ptr.dtype.element_ty), mask=mask)
        y = tl.sum(h * Cv[None, :], axis=1)
        if HAS_D:
            y += x * tl.load(D_ptr + hd * s_Dh + offs_p * s_Dp, mask=mask_p, other=0.0).to(tl.float32)
        if HAS_Z:
            zv = tl.load(z_ptr + b * s_zb + hd * s_zh + offs_p * s_zp, mask=mask_p, other=0.0).to(tl.float32)
            y *= zv * tl.sigmoid(zv)
        tl.store(out_ptr + b * s_ob + hd * s_oh + offs_p * s_op, y.to(out_ptr.dtype.element_ty), mask=mask_p)

    _HEADS_KERNEL = heads_state_update
    return _HEADS_KERNEL
