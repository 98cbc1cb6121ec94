"""Mamba-2 (the SSD layer of upstream mamba_ssm 2.x) is not implemented by this package.

The module exists so that code written for upstream 2.x, whose package imports
``from mamba_ssm.modules.mamba2 import Mamba2`` and re-exports it, still imports; building a
`Mamba2` layer raises a NotImplementedError that says so. Mamba-1 (`Mamba`) is fully supported.
"""
from __future__ import annotations

import torch.nn as nn


class Mamba2(nn.Module):
    """Placeholder for upstream's Mamba-2 layer: constructing it raises NotImplementedError."""

    def __init__(self, d_model, *args, **kwargs):
        super().__init__()
        raise NotImplementedError(
            f"Mamba2(d_model={d_model!r}): Mamba-2 layers are not implemented by this package "
            "(mamba_ssm here implements Mamba-1: use mamba_ssm.Mamba, or a checkpoint whose "
            "config has no ssm_cfg layer 'Mamba2')")
