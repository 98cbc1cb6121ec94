"""CUDA backend of the selective scan: our kernels from ``csrc/selective_scan``.

The compiled module is ``mamba_ssm._selective_scan_cuda`` (named so that it cannot collide
with upstream's top-level ``selective_scan_cuda``). ``is_available()`` is False, and never
raises, when the extension was not built or no CUDA device is present; ``import_error()`` says
why the extension did not load.

Memory saved for the backward: the inputs plus the state at the start of every segment of
``segment`` time steps, (batch, dim, ceil(seqlen / segment), dstate) fp32. ``segment`` defaults to
16 (for dstate 16 that is 4 bytes per (batch, dim, step), twice a bf16 input); longer segments
(up to 1024, rounded up to a multiple of 16) save memory and make the backward recompute the
states inside each segment once more (on an H200 at (8, 4096, 2048, 16) bf16, forward+backward
took 4.80 ms with 16 and 5.26 ms with 64). With z, the output before the gate, y = C h + D u, is
saved too (one more tensor of u's size and dtype, as upstream's kernel saves): the backward takes
dz from it instead of recomputing y; ``save_y=False`` recomputes it and saves that memory. Both
are keyword arguments of ``selective_scan_cuda`` and settings (``MAMBA_SSM_SCAN_SEGMENT``,
``MAMBA_SSM_SCAN_SAVE_Y``; selective_scan_settings.py lists every setting).

Packed sequences (``seq_idx`` / ``cu_seqlens``, mamba_ssm/ops/packing.py) run in the kernels
themselves: where a sequence starts, the decay of the carried state is 0 (forward, checkpoints,
sequence splits and backward alike; docs/selective_scan.md). With ``cu_seqlens`` and
``return_last_state`` the forward also writes each sequence's final state where the next one
starts, (num_seqs, dim, dstate), and the backward takes their gradients there. Without packing the
kernels are those of before (the same PTX).

Per call: the settings in force (read once at import; ``override_settings`` changes them), a
launch plan from selective_scan_plan.py (cached per shape), then the binding.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from mamba_ssm.ops import packing
from mamba_ssm.ops.selective_scan_plan import BackwardPlan, ForwardPlan, plan_backward, plan_forward
from mamba_ssm.ops.selective_scan_settings import ScanSettings, current_settings, override_settings

__all__ = ["BackwardPlan", "ForwardPlan", "ScanSettings", "backward_plan", "current_settings", "forward_plan",
           "import_error", "is_available", "override_settings", "selective_scan_cuda"]

_ext_error = None
try:  # the compiled extension is optional
    from mamba_ssm import _selective_scan_cuda as _ext
except Exception as exc:  # ImportError, or a broken/mismatched build
    _ext = None
    _ext_error = f"{type(exc).__name__}: {exc}"


def is_available() -> bool:
    try:
        return _ext is not None and torch.cuda.is_available()
    except Exception:
        return False


def import_error() -> str | None:
    """Why ``mamba_ssm._selective_scan_cuda`` failed to import (None when it loaded)."""
    return _ext_error if _ext is None else None


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _groups(B, C) -> int:
    return B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)


def _shape_args(u, A, B, C) -> tuple:
    """(batch, dim, seqlen, dstate, groups, sm_count) for the plan functions."""
    if not u.is_cuda:
        raise ValueError(f"selective_scan_cuda: inputs must be CUDA tensors, got u on {u.device}")
    batch, dim, seqlen = u.shape
    index = u.device.index if u.device.index is not None else torch.cuda.current_device()
    return batch, dim, seqlen, A.shape[1], _groups(B, C), _sm_count(index)


def _plan_args(plan: ForwardPlan) -> dict:
    return dict(fwd_tp=plan.fwd_tp, cpb=plan.cpb, tp_cpb=plan.tp_cpb, nsplit=plan.nsplit, gseg=plan.gseg)


def _settings(segment, save_y) -> ScanSettings:
    s = current_settings()
    if segment is not None:
        s = dataclasses.replace(s, segment=segment)
    if save_y is not None:
        s = dataclasses.replace(s, save_y=save_y)
    return s


class SelectiveScanCudaFn(torch.autograd.Function):
    """seq_idx: checked (batch, seqlen) int32 or None; nseq > 0: last_state is each of the nseq
    sequences' final state, seq_idx numbering them 0..nseq-1 (batch 1)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, settings, seq_idx, nseq):
        plan = plan_forward(*_shape_args(u, A, B, C), settings)
        save = any(ctx.needs_input_grad)
        out, last_state, ckpt, y = _ext.fwd(
            u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), plan.R, save, save and settings.save_y,
            exact_softplus=settings.exact_softplus, poison=settings.poison, seq_idx=seq_idx, nseq=nseq,
            **_plan_args(plan)
        )
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, ckpt, y, seq_idx)
            ctx.delta_softplus = bool(delta_softplus)
            ctx.settings = settings  # the backward plans with the forward's settings (R above all)
            ctx.nseq = nseq
        return out, last_state

    @staticmethod
    def backward(ctx, dout, dlast):
        u, delta, A, B, C, D, z, delta_bias, ckpt, y, seq_idx = ctx.saved_tensors
        s = ctx.settings
        if dout is None:
            dout = torch.zeros_like(u)
        dseq_last = None
        if ctx.nseq and dlast is not None:
            # every sequence's final-state gradient; the last sequence's is the row's
            dseq_last, dlast = dlast, dlast[ctx.nseq - 1:]
        plan = plan_backward(*_shape_args(u, A, B, C), s)
        du, ddelta, dA, dB, dC, dD, dz, dbias = _ext.bwd(
            u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, plan.R, ckpt, dout, dlast, y,
            cpb=plan.cpb, nsplit=plan.nsplit, gseg=plan.gseg, exact_softplus=s.exact_softplus, poison=s.poison,
            seq_idx=seq_idx, dseq_last=dseq_last
        )
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None, None, None


def _require_ext(what: str):
    if _ext is None:
        why = f" ({_ext_error})" if _ext_error else ""
        raise RuntimeError(f"mamba_ssm._selective_scan_cuda is not built{why}; {what}")


def forward_plan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, segment=None) -> dict:
    """What the CUDA forward would launch for these inputs under the settings in force, without
    launching it: ``kernel`` ("fwd2", or "fwd_tp": the time-parallel layout), ``full`` (its
    instantiation without bounds checks), ``d16`` (fwd2's dstate-16 one), ``channels_per_block``
    and ``nsplit`` (sequence groups). For performance questions: a shape that misses ``full`` pays
    for bounds checks (misaligned rows, seqlen not a multiple of 16 or 32, no z, ...)."""
    _require_ext("forward_plan needs it")
    settings = _settings(segment, None)
    plan = plan_forward(*_shape_args(u, A, B, C), settings)
    inst = _ext.fwd_instantiation(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), plan.R,
                                  exact_softplus=settings.exact_softplus, **_plan_args(plan))
    return {"kernel": plan.kernel, "full": bool(inst["full"]), "d16": bool(inst["d16"]),
            "channels_per_block": plan.channels_per_block, "nsplit": plan.nsplit}


def backward_plan(u, A, B, C, segment=None) -> BackwardPlan:
    """The backward's launch plan for these shapes under the settings in force."""
    return plan_backward(*_shape_args(u, A, B, C), _settings(segment, None))


def selective_scan_cuda(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                        return_last_state=False, seq_idx=None, cu_seqlens=None, *, segment=None, save_y=None):
    """Selective scan on our CUDA kernels; same contract as ``selective_scan_ref``, packed
    sequences (seq_idx / cu_seqlens) included.

    segment: time steps between the states saved for the backward (1..1024, rounded up to a
    multiple of 16; default: the settings', 16). save_y: with z, save the output before the gate
    for the backward (default: the settings', True). Other settings: ``override_settings``."""
    _require_ext("use the torch backend")
    settings = _settings(segment, save_y)
    if seq_idx is not None or cu_seqlens is not None:
        if not isinstance(u, torch.Tensor) or u.dim() != 3:
            raise ValueError("selective_scan_cuda: u must be a (batch, dim, seqlen) tensor, got "
                             f"{tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__}")
        seq_idx, cu_seqlens = packing.resolve(seq_idx, cu_seqlens, u.shape[0], u.shape[2], u.device,
                                              "selective_scan_cuda")
    return _selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, seq_idx,
                                cu_seqlens, settings)


def _selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, seq_idx,
                         cu_seqlens, settings=None):
    """selective_scan_cuda with seq_idx / cu_seqlens already through ``packing.resolve``
    (selective_scan_fn's route: no second check, which would sync with the device)."""
    nseq = 0
    if cu_seqlens is not None and return_last_state:
        # the kernels write sequence i's final state at seq_last[i]: seq_idx must number them 0, 1, ...
        nseq = cu_seqlens.shape[0] - 1
        seq_idx = packing.seq_idx_from_cu_seqlens(cu_seqlens, u.shape[2], u.device)
    out, last_state = SelectiveScanCudaFn.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                                settings or current_settings(), seq_idx, nseq)
    return (out, last_state) if return_last_state else out
