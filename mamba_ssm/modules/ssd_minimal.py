"""Upstream's module of the minimal SSD reference, by name: `ssd_minimal_discrete` and `segsum`
(both in mamba_ssm/ops/ssd_chunked.py)."""
from mamba_ssm.ops.ssd_chunked import segment_sums as segsum  # noqa: F401
from mamba_ssm.ops.ssd_chunked import ssd_minimal_discrete  # noqa: F401
