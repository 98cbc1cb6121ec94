"""The reference selective scan (S6): a plain loop over time steps in fp32, and the input checks
shared by every implementation. The fast paths (`selective_scan_chunked`, the CUDA kernels) are
tested against it; `selective_scan_interface` re-exports it under upstream's name.

Glossary (paper symbol -> code name), shapes for Mamba-1:

    x_t   -> u       (batch, dim, seqlen)      input sequence
    Δ_t   -> delta   (batch, dim, seqlen)      step size (softplus(delta + delta_bias) if delta_softplus)
    A     -> A       (dim, dstate)             real, fp32, negative (A = -exp(A_log))
    B_t   -> B       (batch, dstate, seqlen)   or grouped (batch, groups, dstate, seqlen),
                                               or time-invariant B (dim, dstate)
    C_t   -> C       (batch, dstate, seqlen)   or grouped, or time-invariant (dim, dstate)
    D     -> D       (dim,)                    skip connection
    z     -> z       (batch, dim, seqlen)      gate: out = y * silu(z)
    h_t   -> state   (batch, dim, dstate)

    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t
    y_t = C_t · h_t + D x_t

Complex (S4D-style, upstream's semantics): A complex (dim, dstate); a time-invariant B or C is complex
(dim, dstate); an input-dependent one is real with real and imaginary parts interleaved along time,
(batch, [groups,] dstate, 2 * seqlen). The state is complex and y_t = 2 Re(C_t · h_t) + D x_t
(the state and its conjugate pair). This module's loop is the only implementation of complex scans.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba_ssm.ops import packing

MAX_DSTATE = 256


def _shape(t):
    return tuple(t.shape) if t is not None else None


def check_selective_scan_inputs(u, delta, A, B, C, D=None, z=None, delta_bias=None):
    """Raise a ValueError naming the argument when shapes or dtypes do not fit."""
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, seqlen), got shape {_shape(u)}")
    batch, dim, seqlen = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {_shape(u)}, got {_shape(delta)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim, dstate) = ({dim}, dstate), got {_shape(A)}")
    dstate = A.shape[1]
    if dstate < 1 or dstate > MAX_DSTATE:
        raise ValueError(f"selective_scan: dstate must be in [1, {MAX_DSTATE}], got {dstate}")
    cplx = A.is_complex()
    # an input-dependent B / C of complex A holds real and imaginary parts interleaved along time
    steps, what = (2 * seqlen, "2*seqlen (complex A: real and imaginary parts interleaved)") if cplx \
        else (seqlen, "seqlen")
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 2:
            if tuple(t.shape) != (dim, dstate):
                raise ValueError(f"selective_scan: time-invariant {name} must be (dim, dstate) = ({dim}, {dstate}), "
                                 f"got {_shape(t)}")
            if t.is_complex() != cplx:
                raise ValueError(f"selective_scan: time-invariant {name} must be {'complex' if cplx else 'real'} "
                                 f"like A ({A.dtype}), got {t.dtype}")
            continue
        if t.is_complex():
            raise ValueError(f"selective_scan: an input-dependent {name} must be real (with complex A, real and "
                             f"imaginary parts interleaved along time), got {t.dtype}")
        if t.dim() == 3:
            expected = (batch, dstate, steps)
            if tuple(t.shape) != expected:
                raise ValueError(f"selective_scan: {name} must be (batch, dstate, {what}) = {expected}, "
                                 f"got {_shape(t)}")
        elif t.dim() == 4:
            groups = t.shape[1]
            if groups < 1 or dim % groups != 0 or tuple(t.shape) != (batch, groups, dstate, steps):
                raise ValueError(
                    f"selective_scan: grouped {name} must be (batch, groups, dstate, {what}) = "
                    f"({batch}, groups dividing {dim}, {dstate}, {steps}), got {_shape(t)}"
                )
        else:
            raise ValueError(
                f"selective_scan: {name} must be (batch, dstate, {what}), (batch, groups, dstate, {what}) or "
                f"time-invariant (dim, dstate), got {_shape(t)}"
            )
    if D is not None and tuple(D.shape) != (dim,):
        raise ValueError(f"selective_scan: D must be (dim,) = ({dim},), got {_shape(D)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (dim,):
        raise ValueError(f"selective_scan: delta_bias must be (dim,) = ({dim},), got {_shape(delta_bias)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {_shape(u)}, got {_shape(z)}")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"selective_scan: all inputs must be on one device, got {sorted(map(str, devices))}")


def _expand_groups(X, dim):
    """(batch, groups, dstate, L) -> (batch, dim, dstate, L); (batch, dstate, L) is left as is."""
    if X.dim() == 4 and X.shape[1] != dim:
        X = X.repeat_interleave(dim // X.shape[1], dim=1)
    return X


def _as_complex(X):
    """Real (..., 2L) with (re, im) interleaved along time -> complex (..., L)."""
    return torch.view_as_complex(X.float().unflatten(-1, (-1, 2)).contiguous())


def _per_step(X, batch, dim, dtype):
    """B or C as (batch, dim, dstate, L) or (batch, dstate, L) (shared by every channel), or (dim, dstate)."""
    if X.dim() == 2:
        return X.to(dtype)
    X = _as_complex(X) if dtype.is_complex else X.float()
    return _expand_groups(X, dim)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, seq_idx=None, cu_seqlens=None):
    """Reference selective scan: a plain loop over time steps, computed in fp32.

    u, delta, z: (batch, dim, seqlen); A: (dim, dstate); B, C: (batch, dstate, seqlen),
    (batch, groups, dstate, seqlen) or time-invariant (dim, dstate); D, delta_bias: (dim,).
    Complex A: see the module's docstring.
    Packed sequences (mamba_ssm/ops/packing.py): seq_idx (batch, seqlen) int32 or cu_seqlens
    (num_seqs + 1,); the state is reset where a sequence starts.
    Returns out (batch, dim, seqlen) in u's dtype, and last_state fp32 (complex64 for complex A) if
    asked: (batch, dim, dstate), or with cu_seqlens each sequence's final state (num_seqs, dim, dstate).
    """
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    seq_idx, cu_seqlens = packing.resolve(seq_idx, cu_seqlens, u.shape[0], u.shape[2], u.device)
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, seqlen = u.shape
    A = A.to(torch.complex64) if A.is_complex() else A.float()
    B = _per_step(B, batch, dim, A.dtype)
    C = _per_step(C, batch, dim, A.dtype)
    delta_A = torch.exp(torch.einsum("bdl,dn->bdln", delta.to(A.dtype), A))
    if B.dim() == 2:
        delta_B_u = torch.einsum("bdl,dn->bdln", (delta * u).to(A.dtype), B)
    elif B.dim() == 3:
        delta_B_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u) if not A.is_complex() \
            else torch.einsum("bdl,bnl->bdln", (delta * u).to(A.dtype), B)
    elif not A.is_complex():
        delta_B_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    else:
        delta_B_u = torch.einsum("bdl,bdnl->bdln", (delta * u).to(A.dtype), B)
    # With seqlen 0 the zero state (and below the empty output) are sums over the empty time axis,
    # so that they stay connected to the inputs (whose gradients are then zero).
    x = delta_A.sum(2) if seqlen == 0 else A.new_zeros((batch, dim, A.shape[1]))
    keep = packing.keep_mask(seq_idx)[:, None, :, None] if seq_idx is not None else None  # (batch, 1, L, 1)
    ends = set(packing.sequence_ends(cu_seqlens)) if cu_seqlens is not None else ()
    ys, finals = [], []
    for i in range(seqlen):
        decay = delta_A[:, :, i] if keep is None else delta_A[:, :, i] * keep[:, :, i]
        x = decay * x + delta_B_u[:, :, i]
        if i in ends:
            finals.append(x[0])
        if C.dim() == 2:
            y = torch.einsum("bdn,dn->bd", x, C)
        elif C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, i])
        ys.append(2 * y.real if y.is_complex() else y)
    out = torch.stack(ys, dim=2) if ys else delta_B_u.sum(-1).real
    if D is not None:
        out = out + u * D.float()[:, None]
    if z is not None:
        out = out * F.silu(z.float())
    out = out.to(dtype_in)
    if cu_seqlens is not None:
        x = torch.stack(finals)
    return (out, x) if return_last_state else out
