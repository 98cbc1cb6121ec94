"""Mamba-3 (upstream mamba_ssm 2.3's newest layer) is not implemented by this package.

Upstream's package imports ``from mamba_ssm.modules.mamba3 import Mamba3`` and re-exports it, so code
written for it does too; here the import works and building a `Mamba3` layer raises a
NotImplementedError that says so (upstream's layer runs on TileLang and CuTe kernels that this
package does not have). Mamba-1 (`Mamba`) is fully supported, alone or with attention layers.
"""
from __future__ import annotations

import torch.nn as nn


class Mamba3(nn.Module):
    """Placeholder for upstream's Mamba-3 layer: constructing it raises NotImplementedError."""

    def __init__(self, d_model, *args, **kwargs):
        super().__init__()
        raise NotImplementedError(
            f"Mamba3(d_model={d_model!r}): Mamba-3 layers are not implemented by this package (upstream's "
            "runs on TileLang and CuTe kernels); use mamba_ssm.Mamba (Mamba-1), alone or with attention layers "
            "(MambaConfig.attn_layer_idx)")
