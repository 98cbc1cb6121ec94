"""The decoding cache handed to every layer (upstream's `InferenceParams`, importable from
`mamba_ssm.utils.generation` as upstream has it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor


@dataclass
class InferenceParams:
    """Decoding state: key_value_memory_dict[layer_idx] = (conv_state (batch, d_inner, d_conv),
    ssm_state (batch, d_inner, d_state)) for a Mamba layer; for a Mamba-2 layer (conv_state (batch,
    conv_dim, d_conv), ssm_state (batch, nheads, headdim, d_state)); an attention layer's is (kv_cache
    (batch, max_seqlen, 2, heads_kv, head_dim), lengths (batch,)[, conv_state]) (modules/mha.py), each
    row's length kept there (lengths_per_sample is not read).

    seqlen_offset: tokens already processed; 0 makes a layer run the full prompt forward (and fill its
    states), > 0 makes it take one recurrent step per call.
    """

    max_seqlen: int
    max_batch_size: int
    seqlen_offset: int = 0
    batch_size_offset: int = 0
    key_value_memory_dict: dict = field(default_factory=dict)
    lengths_per_sample: Optional[Tensor] = None

    def reset(self, max_seqlen, max_batch_size):
        self.max_seqlen = max_seqlen
        self.max_batch_size = max_batch_size
        self.seqlen_offset = 0
        if self.lengths_per_sample is not None:
            self.lengths_per_sample.zero_()


def layer_cache(layer, inference_params, batch_size: int, input_name: str = "hidden_states") -> tuple:
    """`layer`'s states in inference_params (allocated by its `allocate_inference_cache` on first use),
    checked against the batch size of its input `input_name`."""
    who = type(layer).__name__
    if layer.layer_idx is None:
        raise ValueError(f"{who}: layer_idx must be set to use inference_params (cached decoding)")
    cache = inference_params.key_value_memory_dict
    if layer.layer_idx not in cache:
        cache[layer.layer_idx] = layer.allocate_inference_cache(batch_size, inference_params.max_seqlen)
    states = cache[layer.layer_idx]
    if states[0].shape[0] != batch_size:
        raise ValueError(f"{who} layer {layer.layer_idx}: the cache in inference_params holds batch "
                         f"{states[0].shape[0]}, got {input_name} of batch {batch_size}; use a new InferenceParams "
                         "for another batch size")
    return states
