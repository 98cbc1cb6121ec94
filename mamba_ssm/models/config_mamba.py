"""MambaConfig: the model's hyper-parameters, with upstream's fields and defaults."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class MambaConfig:
    d_model: int = 2560
    d_intermediate: int = 0          # > 0 adds a gated MLP after each mixer (0 for Mamba-1 checkpoints)
    n_layer: int = 64
    vocab_size: int = 50277
    ssm_cfg: dict = field(default_factory=dict)   # kwargs of the Mamba mixer (d_state, d_conv, expand, ...)
    attn_layer_idx: list = field(default_factory=list)
    attn_cfg: dict = field(default_factory=dict)
    rms_norm: bool = True
    residual_in_fp32: bool = True
    fused_add_norm: bool = True
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True

    # transformers' callbacks and PEFT call these on `model.config`.
    def to_dict(self) -> dict:
        return asdict(self)

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def get(self, key, default=None):
        return getattr(self, key, default)
