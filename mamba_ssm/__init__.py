"""Mamba (selective state-space) language models: an upstream-compatible `mamba_ssm` that runs
on any device, with compiled kernels on GPUs where they were built."""
__version__ = "2.3.2"

from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn  # noqa: E402
from mamba_ssm.modules.mamba_simple import Mamba  # noqa: E402
from mamba_ssm.modules.mamba2 import Mamba2  # noqa: E402
from mamba_ssm.modules.mamba3 import Mamba3  # noqa: E402  (importable as upstream 2.3; raises when built)
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: E402

__all__ = ["Mamba", "Mamba2", "Mamba3", "MambaLMHeadModel", "selective_scan_fn", "mamba_inner_fn", "__version__"]
