"""Block: pre-norm residual wrapper around a mixer (and an optional MLP).

Unlike a textbook pre-norm block (x + mixer(norm(x))), it passes the residual stream along
separately, so the add and the norm can be fused: returns (hidden_states, residual).
"""
from __future__ import annotations

import torch.nn as nn

from mamba_ssm.modules import fused_step
from mamba_ssm.ops.triton.layer_norm import RMSNorm, layer_norm_fn


class Block(nn.Module):
    def __init__(self, dim, mixer_cls, mlp_cls, norm_cls=nn.LayerNorm, fused_add_norm=False, residual_in_fp32=False):
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.norm = norm_cls(dim)
        self.mixer = mixer_cls(dim)
        if mlp_cls is not nn.Identity:
            self.norm2 = norm_cls(dim)
            self.mlp = mlp_cls(dim)
        else:
            self.mlp = None

    def _add_norm(self, norm, hidden_states, residual):
        return layer_norm_fn(hidden_states, norm.weight, norm.bias, residual=residual, prenorm=True,
                             residual_in_fp32=self.residual_in_fp32, eps=norm.eps,
                             is_rms_norm=isinstance(norm, RMSNorm))

    def forward(self, hidden_states, residual=None, inference_params=None, **mixer_kwargs):
        """hidden_states: (batch, seqlen, dim); residual: None for the first block."""
        if (inference_params is not None and inference_params.seqlen_offset > 0 and not mixer_kwargs
                and fused_step.block_path(self, hidden_states, residual)):
            out = self._fused_step(hidden_states, residual, inference_params)
            if out is not None:
                return out
        hidden_states, residual = self._add_norm(self.norm, hidden_states, residual)
        hidden_states = self.mixer(hidden_states, inference_params=inference_params, **mixer_kwargs)
        if self.mlp is not None:
            hidden_states, residual = self._add_norm(self.norm2, hidden_states, residual)
            hidden_states = self.mlp(hidden_states)
        return hidden_states, residual

    def _fused_step(self, hidden_states, residual, inference_params):
        # batch 1: the add+norm, in_proj, conv and x_proj in one kernel (modules/fused_step.py, gemv path)
        conv_state, ssm_state = self.mixer._get_states_from_cache(inference_params, hidden_states.shape[0])
        out = fused_step.block_step(self, hidden_states[:, 0], None if residual is None else residual[:, 0],
                                     conv_state, ssm_state)
        return None if out is None else (out[0].unsqueeze(1), out[1].unsqueeze(1))

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.mixer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
