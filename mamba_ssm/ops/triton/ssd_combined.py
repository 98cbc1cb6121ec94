"""Mamba-2's SSD scan under upstream's module path and signatures.

`mamba_chunk_scan_combined` is the scan of `mamba_ssm.ops.ssd_chunked` (shapes and the recurrence
there); `mamba_split_conv1d_scan_combined` is the whole Mamba-2 mixer after in_proj (split, causal
conv, scan, gated RMSNorm, out_proj), the path `Mamba2.forward` takes with `use_mem_eff_path`.
On CUDA tensors the scan runs on the Triton kernels of `ssd_triton.py` when the backend switch
(mamba_ssm/backend.py, op "ssd") picks Triton, else the PyTorch chunked scan, which stays the reference
(`mamba_chunk_scan_combined_ref`). The PyTorch scan also takes float64, headdim > 128, dstate > 256 (or 128 with
256), and return_varlen_states with gradients, which the kernels do not; importing this module never needs Triton.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba_ssm.backend import choose_backend, use_backend
from mamba_ssm.ops.causal_conv1d import causal_conv1d_fn
from mamba_ssm.ops.ssd_chunked import check_ssd_inputs, conv_seq_idx, ssd_chunked, ssd_minimal_discrete  # noqa: F401
from mamba_ssm.ops.triton import ssd_triton as _ssd_triton
from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

__all__ = ["mamba_chunk_scan_combined", "mamba_chunk_scan_combined_ref", "mamba_split_conv1d_scan_combined",
           "mamba_split_conv1d_scan_ref"]

_INF = float("inf")


def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                              seq_idx=None, cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, _INF),
                              return_final_states=False, return_varlen_states=False):
    """x (b, l, h, p), dt (b, l, h), A (h,), B, C (b, l, g, n) -> out (b, l, h, p)
    [, final_states (b, h, p, n)] [, varlen_states (num_seqs, h, p, n)].

    Differentiable in every tensor input, initial_states included. With cu_seqlens and no seq_idx,
    the sequence numbers come from cu_seqlens (each packed sequence starts from a zero state).
    """
    if isinstance(x, torch.Tensor) and x.is_cuda and _triton_ssd_chosen(
            x, B, return_varlen_states, (x, dt, A, B, C, D, z, dt_bias, initial_states)):
        return _ssd_triton.ssd_triton(
            x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx,
            cu_seqlens=cu_seqlens, dt_softplus=dt_softplus, dt_limit=dt_limit,
            return_final_states=return_final_states, return_varlen_states=return_varlen_states)
    return ssd_chunked(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=initial_states,
                       seq_idx=seq_idx, cu_seqlens=cu_seqlens, dt_softplus=dt_softplus, dt_limit=dt_limit,
                       return_final_states=return_final_states, return_varlen_states=return_varlen_states)


def _triton_ssd_chosen(x, B, return_varlen_states, tensors) -> bool:
    # what the kernels cannot take stays in PyTorch: float64, large heads or states, and varlen states
    # that need a gradient (the kernels return them without one)
    if not isinstance(B, torch.Tensor) or x.dim() != 4 or B.dim() != 4 or not _ssd_triton.supports(x, B):
        return False
    if return_varlen_states and torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        return False
    return choose_backend("ssd", True) == "triton"


# the reference of the fast path: the PyTorch chunked scan itself
mamba_chunk_scan_combined_ref = ssd_chunked


def _split_sizes(zxbcdt, A, D, headdim, ngroups, name):
    """(dim = nheads * headdim, dstate) from zxbcdt's width = 2 dim + 2 ngroups dstate + nheads."""
    if zxbcdt.dim() != 3:
        raise ValueError(f"{name}: zxbcdt must be (batch, seqlen, 2*dim + 2*ngroups*dstate + nheads), "
                         f"got {tuple(zxbcdt.shape)}")
    if A.dim() != 1:
        raise ValueError(f"{name}: A must be (nheads,), got {tuple(A.shape)}")
    nheads = A.shape[0]
    if D.dim() == 2:
        if D.shape[0] != nheads:
            raise ValueError(f"{name}: D must be (nheads,) or (nheads, headdim) with nheads = {nheads}, "
                             f"got {tuple(D.shape)}")
        headdim = D.shape[1]
    elif headdim is None:
        raise ValueError(f"{name}: headdim must be given when D is 1-D (nheads,)")
    dim = nheads * headdim
    rest = zxbcdt.shape[-1] - 2 * dim - nheads
    if ngroups <= 0 or rest <= 0 or rest % (2 * ngroups) != 0:
        raise ValueError(f"{name}: zxbcdt's last dim {zxbcdt.shape[-1]} is not 2*dim + 2*ngroups*dstate + nheads "
                         f"with dim = {dim}, nheads = {nheads}, ngroups = {ngroups}")
    return dim, headdim, rest // (2 * ngroups)


def mamba_split_conv1d_scan_combined(zxbcdt, conv1d_weight, conv1d_bias, dt_bias, A, D, chunk_size,
                                     initial_states=None, seq_idx=None, dt_limit=(0.0, _INF),
                                     return_final_states=False, activation="silu", rmsnorm_weight=None,
                                     rmsnorm_eps=1e-6, outproj_weight=None, outproj_bias=None, headdim=None,
                                     ngroups=1, norm_before_gate=True):
    """zxbcdt (b, l, 2*dim + 2*ngroups*dstate + nheads), split as [z, xBC, dt] -> causal conv of xBC
    (conv1d_weight (conv_dim, width) or (conv_dim, 1, width)) -> SSD scan (dt + dt_bias, softplus) ->
    y * silu(z), or the gated RMSNorm rmsnorm_fn(y, rmsnorm_weight, z=z) when rmsnorm_weight is given ->
    out_proj when outproj_weight is given.

    Returns out (b, l, d_model or dim) [, final_states (b, nheads, headdim, dstate)].
    """
    name = "mamba_split_conv1d_scan_combined"
    if activation not in ("silu", "swish", None):
        raise ValueError(f"{name}: activation must be 'silu', 'swish' or None, got {activation!r}")
    dim, headdim, dstate = _split_sizes(zxbcdt, A, D, headdim, ngroups, name)
    b, l, _ = zxbcdt.shape
    nheads = A.shape[0]
    z, xBC, dt = torch.split(zxbcdt, [dim, dim + 2 * ngroups * dstate, nheads], dim=-1)
    xBC = causal_conv1d_fn(xBC.transpose(1, 2), conv1d_weight, conv1d_bias, activation=activation,
                           seq_idx=conv_seq_idx(seq_idx)).transpose(1, 2)
    x, B, C = torch.split(xBC, [dim, ngroups * dstate, ngroups * dstate], dim=-1)
    y = mamba_chunk_scan_combined(
        x.reshape(b, l, nheads, headdim), dt, A, B.reshape(b, l, ngroups, dstate), C.reshape(b, l, ngroups, dstate),
        chunk_size, D=D, z=None if rmsnorm_weight is not None else z.reshape(b, l, nheads, headdim),
        dt_bias=dt_bias, initial_states=initial_states, seq_idx=seq_idx, dt_softplus=True, dt_limit=dt_limit,
        return_final_states=return_final_states)
    if return_final_states:
        y, final_states = y
    y = y.reshape(b, l, dim)
    if rmsnorm_weight is not None:
        y = rmsnorm_fn(y, rmsnorm_weight, None, z=z, eps=rmsnorm_eps, group_size=dim // ngroups,
                       norm_before_gate=norm_before_gate)
    out = y if outproj_weight is None else F.linear(y, outproj_weight, outproj_bias)
    return (out, final_states) if return_final_states else out


def mamba_split_conv1d_scan_ref(*args, **kwargs):
    """mamba_split_conv1d_scan_combined on the PyTorch ops only (the reference of the kernel path)."""
    with use_backend("torch"):
        return mamba_split_conv1d_scan_combined(*args, **kwargs)
