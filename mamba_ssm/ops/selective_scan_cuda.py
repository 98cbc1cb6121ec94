"""CUDA backend of the selective scan: our kernels from ``csrc/selective_scan``.

The compiled module is ``mamba_ssm._selective_scan_cuda`` (named so that it cannot collide
with upstream's top-level ``selective_scan_cuda``). ``is_available()`` is False, and never
raises, when the extension was not built or no CUDA device is present.

Memory saved for the backward: the inputs plus the state at the start of every segment of
``16 * R`` time steps, (batch, dim, ceil(seqlen / (16 R)), dstate) fp32. R defaults to 1
(a state every 16 steps: for dstate 16 that is 4 bytes per (batch, dim, step), twice a bf16
input); the environment variable ``MAMBA_SSM_SCAN_SEGMENT`` sets the steps per saved state
(rounded up to a multiple of 16, at most 1024): a longer segment saves memory and makes the
backward recompute the states inside each segment once more (on an H200 at (8, 4096, 2048,
16) bf16, forward+backward took 4.80 ms with 16 and 5.26 ms with 64). With z, the output before
the gate, y = C h + D u, is saved too (one more tensor of u's size and dtype, as upstream's
kernel saves): the backward takes dz from it instead of recomputing y. ``MAMBA_SSM_SCAN_SAVE_Y=0``
recomputes it instead and saves that memory.
"""
from __future__ import annotations

import os

import torch

try:  # the compiled extension is optional
    from mamba_ssm import _selective_scan_cuda as _ext
except Exception:  # ImportError, or a broken/mismatched build
    _ext = None


def is_available() -> bool:
    try:
        return _ext is not None and torch.cuda.is_available()
    except Exception:
        return False


def _save_y() -> bool:
    return os.environ.get("MAMBA_SSM_SCAN_SAVE_Y", "1") != "0"


def _segment_subchunks() -> int:
    try:
        steps = int(os.environ.get("MAMBA_SSM_SCAN_SEGMENT", "16"))
    except ValueError:
        steps = 16
    return max(1, min(64, (steps + 15) // 16))


class SelectiveScanCudaFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        R = _segment_subchunks()
        save = any(ctx.needs_input_grad)
        out, last_state, ckpt, y = _ext.fwd(
            u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), R, save, save and _save_y()
        )
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt, y)
            ctx.delta_softplus = bool(delta_softplus)
            ctx.R = R
        return out, last_state

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, ckpt, y = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(u)
        du, ddelta, dA, dB, dC, dD, dz, dbias = _ext.bwd(
            u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, ctx.R, ckpt, dout, dlast, y
        )
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None


def forward_plan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False) -> dict:
    """What the CUDA forward would launch for these inputs under the present environment, without
    launching it: ``kernel`` ("fwd2", or "fwd_tp": the time-parallel layout),
    ``full`` (its instantiation without bounds checks), ``d16`` (fwd2's dstate-16 one),
    ``channels_per_block`` and ``nsplit`` (sequence groups). For performance questions: a shape
    that misses ``full`` pays for bounds checks (misaligned rows, seqlen not a multiple of 16 or
    32, no z, ...)."""
    if _ext is None:
        raise RuntimeError("mamba_ssm._selective_scan_cuda is not built; forward_plan needs it")
    return dict(_ext.fwd_plan(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), _segment_subchunks()))


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False):
    """Selective scan on our CUDA kernels; same contract as ``selective_scan_ref``."""
    if _ext is None:
        raise RuntimeError("mamba_ssm._selective_scan_cuda is not built; use the torch backend")
    out, last_state = SelectiveScanCudaFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last_state) if return_last_state else out
