"""Depthwise causal 1-D convolution, as in the `causal_conv1d` package, in PyTorch.

x: (batch, dim, seqlen); weight: (dim, width); bias: (dim,) or None.
out[b, d, t] = bias[d] + sum_k weight[d, k] * x[b, d, t - (width - 1) + k]   (x = 0 before t = 0)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mamba_ssm.backend import choose_backend
from mamba_ssm.ops.channel_first import autocast_dtype, cast_for_autocast
from mamba_ssm.ops.triton import causal_conv1d as triton_conv


def _triton_conv_chosen(x) -> bool:
    # float64 stays in PyTorch (the kernel computes in float32); MAMBA_SSM_TRITON_CONV=0 opts out
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    if not triton_conv.ENABLED:  # turned off on purpose: no fall-back warning from the backend switch
        return False
    return choose_backend("causal_conv1d", True) == "triton"


def causal_conv1d_fn(x, weight, bias=None, activation=None, seq_idx=None):
    """x: (batch, dim, seqlen) -> (batch, dim, seqlen); activation None, "silu" or "swish".

    seq_idx (batch, seqlen) integers: packed sequences; a tap never reads across a change of seq_idx.
    """
    if activation not in (None, "silu", "swish"):
        raise ValueError(f"causal_conv1d_fn: activation must be None, 'silu' or 'swish', got {activation!r}")
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    dim, width = weight.shape
    if x.dim() != 3 or x.shape[1] != dim:
        raise ValueError(f"causal_conv1d_fn: x must be (batch, {dim}, seqlen), got {tuple(x.shape)}")
    seqlen = x.shape[-1]
    if seqlen == 0:  # F.conv1d rejects an empty length; the output is empty too
        return x.clone()
    if seq_idx is not None:
        out = _packed_conv(x, weight, bias, seq_idx)
        return F.silu(out) if activation is not None else out
    if x.is_cuda and _triton_conv_chosen(x):
        dt = autocast_dtype("cuda")  # compute where F.conv1d would under autocast
        if dt is not None:
            x, weight, bias = cast_for_autocast(dt, x, weight, bias)
        return triton_conv.causal_conv1d_triton(x, weight, bias, activation)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and not needs_grad:
        out = _shifted_sum(x, weight, bias)
        return F.silu(out, inplace=True) if activation is not None else out
    # causal: pad the left only, so the output is exactly seqlen long and contiguous (padding both
    # sides and slicing costs a strided copy in the forward and a padded one in the backward)
    out = F.conv1d(F.pad(x, (width - 1, 0)), weight.unsqueeze(1), bias, groups=dim)
    return F.silu(out) if activation is not None else out


def _shifted_sum(x, weight, bias):
    """The convolution as `width` multiply-adds of shifted x (inference on a CPU).

    oneDNN's depthwise conv1d is slow here (measured 7 ms for (1, 1536, 1024), width 4, on 2
    cores; this: 2.7 ms). Not used under autograd: conv1d's backward is kept for training.
    """
    dim, width = weight.shape
    seqlen = x.shape[-1]
    w = weight.unsqueeze(-1)                                       # (dim, width, 1)
    # the last tap (no shift) first, starting from the bias
    if bias is not None:
        out = torch.addcmul(bias.view(dim, 1), x, w[:, width - 1])
    else:
        out = x * w[:, width - 1]
    for k in range(width - 1):
        shift = width - 1 - k
        if shift < seqlen:
            out[..., shift:].addcmul_(x[..., : seqlen - shift], w[:, k])
    return out


def _packed_conv(x, weight, bias, seq_idx):
    """The convolution of packed sequences: each shifted tap masked where it crosses into another one."""
    batch, dim, seqlen = x.shape
    if not isinstance(seq_idx, torch.Tensor) or tuple(seq_idx.shape) != (batch, seqlen) \
            or seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool:
        got = f"{tuple(seq_idx.shape)} {seq_idx.dtype}" if isinstance(seq_idx, torch.Tensor) else repr(seq_idx)
        raise ValueError(f"causal_conv1d_fn: seq_idx must be an integer tensor (batch, seqlen) = "
                         f"{(batch, seqlen)}, got {got}")
    width = weight.shape[1]
    out = x * weight[:, width - 1, None]
    if bias is not None:
        out = out + bias[:, None]
    for k in range(width - 1):
        shift = width - 1 - k
        if shift >= seqlen:
            continue
        same = (seq_idx[:, shift:] == seq_idx[:, :-shift]).unsqueeze(1).to(x.dtype)   # (batch, 1, seqlen - shift)
        tap = x[..., :-shift] * weight[:, k, None] * same
        out = out + F.pad(tap, (shift, 0))
    return out


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """One decoding step. x: (batch, dim); conv_state: (batch, dim, width), updated in place.

    Returns (batch, dim).
    """
    if weight.dim() == 3:
        weight = weight.squeeze(1)
    conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
    conv_state[:, :, -1] = x
    out = torch.sum(conv_state * weight, dim=-1)
    if bias is not None:
        out = out + bias
    return F.silu(out) if activation in ("silu", "swish") else out
