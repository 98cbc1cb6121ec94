"""One recurrent step of the selective scan, for decoding (upstream's name; PyTorch body).

state: (batch, dim, dstate) or (batch, nheads, headdim, dstate), updated in place.
x, dt, z: (batch, dim); A: (dim, dstate); B, C: (batch, dstate) or (batch, groups, dstate);
D, dt_bias: (dim,). Returns out (batch, dim) in x's dtype.
"""
from __future__ import annotations

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


def selective_state_update(state, x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False,
                           state_batch_indices=None):
    if state_batch_indices is not None:
        sub = state[state_batch_indices]
        out = selective_state_update_ref(sub, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
        state[state_batch_indices] = sub
        return out
    return selective_state_update_ref(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
