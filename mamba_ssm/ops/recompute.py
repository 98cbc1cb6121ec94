"""Activations of the Mamba mixer recomputed in the backward instead of saved: upstream's
``checkpoint_lvl=1``, taken further.

Between in_proj and out_proj a mixer makes five activations of the inner width (batch, d_inner,
seqlen): the conv output, delta, the scan's saved states and y, and the gated output. Saving them
for the backward is what made our training peak a third above upstream's. With recomputation the
mixer saves only its input xz (which the backward needs anyway) and the gated output that out_proj
reads; in the backward the conv, x_proj, dt_proj and the scan's forward run again, one layer at a
time (torch.utils.checkpoint, non-reentrant: adapters' parameters inside get their gradients,
autocast and the RNG state of dropout are replayed).

    scope   MAMBA_SSM_RECOMPUTE   scan   scan: recompute up to the gated scan output (out_proj saves it);
                                         mixer: also out_proj (saves only xz; one more GEMM);
                                         0: save everything (checkpoint_lvl=0 everywhere)
"""
from __future__ import annotations

import os

import torch
from torch.utils.checkpoint import checkpoint

SCOPES = ("0", "scan", "mixer")


def _read_scope() -> str:
    v = os.environ.get("MAMBA_SSM_RECOMPUTE", "").strip().lower() or "scan"
    if v not in SCOPES:
        raise ValueError(f"MAMBA_SSM_RECOMPUTE must be one of {SCOPES}, got {v!r}")
    return v


SCOPE = _read_scope()


def recompute_in_backward(fn, *args, scope="scan"):
    """fn(*args), its activations recomputed in the backward when `scope` is the one in force (and
    autograd records); otherwise fn(*args) with everything saved."""
    if SCOPE != scope or not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)
