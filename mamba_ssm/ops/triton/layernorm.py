"""Upstream mamba_ssm 1.x's name for `mamba_ssm.ops.triton.layer_norm` (renamed in 2.x): the same
functions, so that scripts written against 1.x import unchanged."""
from mamba_ssm.ops.triton.layer_norm import (  # noqa: F401
    RMSNorm,
    layer_norm_fn,
    layer_norm_ref,
    rms_norm_fn,
    rms_norm_ref,
)
