"""LayerNorm / RMSNorm with an optional residual add, upstream's `layer_norm_fn` semantics.

Given x and an optional residual: x = x + residual; the new residual is that sum (kept in
fp32 when residual_in_fp32); out = norm(x) * weight + bias. With prenorm=True the function
returns (out, new_residual) so the next block can add to it, else out alone.
This module holds PyTorch implementations (the name follows upstream, which uses Triton here).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _add_residual(x, residual, residual_in_fp32):
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"layer_norm_fn: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        x = x.float() + residual.float() if residual_in_fp32 or residual.dtype != x.dtype else x + residual
    return x.float() if residual_in_fp32 else x


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


def layer_norm_fn(x, weight, bias, residual=None, x1=None, weight1=None, bias1=None, eps=1e-6,
                  dropout_p=0.0, rowscale=None, prenorm=False, residual_in_fp32=False,
                  zero_centered_weight=False, is_rms_norm=False, return_dropout_mask=False,
                  out_dtype=None, norm_dtype=None, out=None, residual_out=None):
    """x: (..., hidden); weight, bias: (hidden,). Returns out, or (out, residual) if prenorm."""
    if x1 is not None or weight1 is not None or rowscale is not None or return_dropout_mask:
        raise NotImplementedError("layer_norm_fn: x1, weight1, rowscale and return_dropout_mask are not supported")
    if weight.shape[-1] != x.shape[-1]:
        raise ValueError(f"layer_norm_fn: weight must be ({x.shape[-1]},), got {tuple(weight.shape)}")
    in_dtype = x.dtype
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
