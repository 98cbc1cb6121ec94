"""Gated RMSNorm / LayerNorm of Mamba-2 (upstream's module `layernorm_gated`), in PyTorch.

x (..., d); z like x or None; weight, bias (d,); group_size divides d (None: d). Per group of
group_size channels:
    norm_before_gate=True:   out = norm(x) * weight (+ bias), then * silu(z)
    norm_before_gate=False:  out = norm(x * silu(z)) * weight (+ bias)
norm is x / sqrt(mean(x^2) + eps) (RMS) or (x - mean) / sqrt(var + eps) (LayerNorm). Computed in
float32 (float64 for float64 x), returned in x's dtype.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _check(x, weight, bias, z, group_size, name):
    d = x.shape[-1]
    if tuple(weight.shape) != (d,):
        raise ValueError(f"{name}: weight must be (hidden,) = ({d},) for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (d,):
        raise ValueError(f"{name}: bias must be (hidden,) = ({d},), got {tuple(bias.shape)}")
    if z is not None and z.shape != x.shape:
        raise ValueError(f"{name}: z must have x's shape {tuple(x.shape)}, got {tuple(z.shape)}")
    if group_size is not None and (group_size <= 0 or d % group_size != 0):
        raise ValueError(f"{name}: group_size must divide the hidden size {d}, got {group_size!r}")


def layernorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, is_rms_norm=False):
    """The gated norm (module docstring)."""
    _check(x, weight, bias, z, group_size, "rmsnorm_fn" if is_rms_norm else "layernorm_fn")
    f = torch.float64 if x.dtype == torch.float64 else torch.float32
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    h = x.to(f)
    if z is not None and not norm_before_gate:
        h = h * F.silu(z.to(f))
    h = h.reshape(*h.shape[:-1], d // gs, gs)
    if not is_rms_norm:
        h = h - h.mean(-1, keepdim=True)
    h = (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)).reshape(*x.shape)
    h = h * weight.to(f)
    if bias is not None:
        h = h + bias.to(f)
    if z is not None and norm_before_gate:
        h = h * F.silu(z.to(f))
    return h.to(x.dtype)


def rmsnorm_fn(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True):
    return layernorm_fn(x, weight, bias, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate,
                        is_rms_norm=True)


def rms_norm_ref(x, weight, bias, z=None, eps=1e-6, group_size=None, norm_before_gate=True, upcast=True):
    """Reference of rmsnorm_fn (upstream's name); `upcast` is accepted, the math is always in float32+."""
    return rmsnorm_fn(x, weight, bias, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)


class LayerNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        factory_kwargs = {"device": device, "dtype": dtype}
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, **factory_kwargs))
        self.bias = nn.Parameter(torch.zeros(hidden_size, **factory_kwargs))
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def forward(self, x, z=None):
        return layernorm_fn(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                            norm_before_gate=self.norm_before_gate)


class RMSNorm(nn.Module):
    """Gated RMSNorm (upstream's RMSNormGated): weight (hidden_size,), no bias."""

    def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def forward(self, x, z=None):
        return rmsnorm_fn(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                          norm_before_gate=self.norm_before_gate)
