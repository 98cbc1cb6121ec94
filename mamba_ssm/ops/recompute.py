"""Activations of the Mamba mixer recomputed in the backward instead of saved: upstream's
``checkpoint_lvl=1``, taken further.

Between in_proj and out_proj a mixer makes five activations of the inner width (batch, d_inner,
seqlen): the conv output, delta, the scan's saved states and y, and the gated output. Saving them
all for the backward put our training peak 59% above upstream's (1.4b, batch 4 x 2048, H100).
With recomputation the mixer saves only its input xz (which the backward needs anyway) and the
gated output that out_proj reads; the backward runs the conv, x_proj, dt_proj and the scan's
forward again, one layer at a time (torch.utils.checkpoint, non-reentrant: adapters' parameters
inside get their gradients, autocast and dropout's random state are replayed). That brought the
peak to upstream's (25.1 against 25.4 GiB) for a 22% slower step (25.6k against 32.8k tokens/s);
benchmarks/results/training_1.4b_h100.json.

    MAMBA_SSM_RECOMPUTE   1   0: save everything (the faster backward, the larger peak);
                              mamba_inner_fn(checkpoint_lvl=0) does the same for one call
"""
from __future__ import annotations

import os

import torch
from torch.utils.checkpoint import checkpoint

from mamba_ssm.utils.switch import parse_switch

ENV_VAR = "MAMBA_SSM_RECOMPUTE"


def parse_setting(value) -> bool:
    """MAMBA_SSM_RECOMPUTE as a bool (`switch.parse_switch`)."""
    return parse_switch(ENV_VAR, value, "recompute in the backward", "save for the backward")


ENABLED = parse_setting(os.environ.get(ENV_VAR))  # read once; tests set this attribute


def recompute_in_backward(fn, *args):
    """fn(*args), its activations recomputed in the backward (when enabled and autograd records);
    otherwise fn(*args) with everything saved."""
    if not ENABLED or not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)
