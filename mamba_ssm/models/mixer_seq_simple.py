"""Mamba language model: embedding -> n_layer x Block(Mamba) -> final norm -> LM head.

`MambaLMHeadModel` keeps upstream's constructor, forward, from_pretrained and save_pretrained,
and also returns `.loss` when given `labels`, so transformers' Trainer and PEFT can drive it.
"""
from __future__ import annotations

import math
from collections import namedtuple
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.modules.block import Block
from mamba_ssm.modules.mamba2 import Mamba2
from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.modules.mha import MHA
from mamba_ssm.modules.mlp import GatedMLP
from mamba_ssm.ops import packing
from mamba_ssm.ops.triton.layer_norm import RMSNorm, layer_norm_fn
from mamba_ssm.utils.generation import GenerationMixin

CausalLMOutput = namedtuple("CausalLMOutput", ["logits"])


class CausalLMOutputWithLoss(CausalLMOutput):
    """(logits,) as upstream returns, plus `.loss` (also reachable as output["loss"] for Trainer)."""

    def __new__(cls, logits, loss=None):
        self = super().__new__(cls, logits)
        self.loss = loss
        return self

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return super().__getitem__(key)


def create_block(d_model, d_intermediate, ssm_cfg=None, attn_layer_idx=None, attn_cfg=None, norm_epsilon=1e-5,
                 rms_norm=False, residual_in_fp32=False, fused_add_norm=False, layer_idx=None, device=None,
                 dtype=None):
    factory_kwargs = {"device": device, "dtype": dtype}
    ssm_cfg = dict(ssm_cfg or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer not in ("Mamba1", "Mamba2"):
        raise ValueError(f"ssm_cfg layer must be 'Mamba1' or 'Mamba2', got {layer!r}")
    mixer_cls = partial(Mamba2 if layer == "Mamba2" else Mamba, layer_idx=layer_idx, **ssm_cfg, **factory_kwargs)
    if attn_layer_idx and layer_idx in attn_layer_idx:
        mixer_cls = partial(MHA, layer_idx=layer_idx, **(attn_cfg or {}), **factory_kwargs)
    norm_cls = partial(nn.LayerNorm if not rms_norm else RMSNorm, eps=norm_epsilon, **factory_kwargs)
    if d_intermediate == 0:
        mlp_cls = nn.Identity
    else:
        mlp_cls = partial(GatedMLP, hidden_features=d_intermediate, out_features=d_model, **factory_kwargs)
    block = Block(d_model, mixer_cls, mlp_cls, norm_cls=norm_cls, fused_add_norm=fused_add_norm,
                  residual_in_fp32=residual_in_fp32)
    block.layer_idx = layer_idx
    return block


def _init_weights(module, n_layer, initializer_range=0.02, rescale_prenorm_residual=True, n_residuals_per_layer=1):
    if isinstance(module, nn.Linear):
        if module.bias is not None and not getattr(module.bias, "_no_reinit", False):
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=initializer_range)
    if rescale_prenorm_residual:
        # GPT-2 scheme: scale the projections that write into the residual stream by 1/sqrt(n_layer),
        # so the stream's variance does not grow with depth.
        for name, p in module.named_parameters():
            if name in ("out_proj.weight", "fc2.weight"):
                nn.init.kaiming_uniform_(p, a=math.sqrt(5))
                with torch.no_grad():
                    p /= math.sqrt(n_residuals_per_layer * n_layer)


class MixerModel(nn.Module):
    def __init__(self, d_model, n_layer, d_intermediate, vocab_size, ssm_cfg=None, attn_layer_idx=None,
                 attn_cfg=None, norm_epsilon=1e-5, rms_norm=False, initializer_cfg=None, fused_add_norm=False,
                 residual_in_fp32=False, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.residual_in_fp32 = residual_in_fp32
        self.fused_add_norm = fused_add_norm
        self.embedding = nn.Embedding(vocab_size, d_model, **factory_kwargs)
        self.layers = nn.ModuleList([
            create_block(d_model, d_intermediate, ssm_cfg=ssm_cfg, attn_layer_idx=attn_layer_idx, attn_cfg=attn_cfg,
                         norm_epsilon=norm_epsilon, rms_norm=rms_norm, residual_in_fp32=residual_in_fp32,
                         fused_add_norm=fused_add_norm, layer_idx=i, **factory_kwargs)
            for i in range(n_layer)
        ])
        self.norm_f = (nn.LayerNorm if not rms_norm else RMSNorm)(d_model, eps=norm_epsilon, **factory_kwargs)
        self.apply(partial(_init_weights, n_layer=n_layer, **(initializer_cfg or {}),
                           n_residuals_per_layer=1 if d_intermediate == 0 else 2))

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return {i: layer.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)
                for i, layer in enumerate(self.layers)}

    def forward(self, input_ids, inference_params=None, **mixer_kwargs):
        """input_ids: (batch, seqlen) -> hidden states (batch, seqlen, d_model). mixer_kwargs go to every
        mixer: seq_idx / cu_seqlens for packed sequences (checked and converted to seq_idx once here)."""
        if inference_params is None and mixer_kwargs.get("cu_seqlens") is not None:
            mixer_kwargs["seq_idx"], _ = packing.resolve(mixer_kwargs.get("seq_idx"), mixer_kwargs.pop("cu_seqlens"),
                                                         *input_ids.shape, input_ids.device, "MixerModel")
        hidden_states = self.embedding(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(hidden_states, residual, inference_params=inference_params, **mixer_kwargs)
        return layer_norm_fn(hidden_states, self.norm_f.weight, self.norm_f.bias, eps=self.norm_f.eps,
                             residual=residual, prenorm=False, residual_in_fp32=self.residual_in_fp32,
                             is_rms_norm=isinstance(self.norm_f, RMSNorm))


# Keyword arguments that transformers' Trainer and generation utilities pass to any model; they mean
# nothing to a recurrent model (the loss is computed here from `labels`) and are dropped.
_HF_CALL_KWARGS = ("num_items_in_batch", "return_dict", "output_attentions", "output_hidden_states",
                   "use_cache", "token_type_ids", "cache_position", "return_loss")


class MambaLMHeadModel(nn.Module, GenerationMixin):
    # Tells transformers' Trainer that forward() does not normalise its loss by num_items_in_batch.
    accepts_loss_kwargs = False

    def __init__(self, config: MambaConfig, initializer_cfg=None, device=None, dtype=None):
        super().__init__()
        self.config = config
        vocab_size = config.vocab_size
        if vocab_size % config.pad_vocab_size_multiple != 0:
            vocab_size += config.pad_vocab_size_multiple - (vocab_size % config.pad_vocab_size_multiple)
        factory_kwargs = {"device": device, "dtype": dtype}
        self.backbone = MixerModel(
            d_model=config.d_model, n_layer=config.n_layer, d_intermediate=config.d_intermediate,
            vocab_size=vocab_size, ssm_cfg=config.ssm_cfg, attn_layer_idx=config.attn_layer_idx,
            attn_cfg=config.attn_cfg, rms_norm=config.rms_norm, initializer_cfg=initializer_cfg,
            fused_add_norm=config.fused_add_norm, residual_in_fp32=config.residual_in_fp32, **factory_kwargs)
        self.lm_head = nn.Linear(config.d_model, vocab_size, bias=False, **factory_kwargs)
        self.apply(partial(_init_weights, n_layer=config.n_layer, **(initializer_cfg or {})))
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        return self.backbone.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, **kwargs)

    def forward(self, input_ids, position_ids=None, inference_params=None, num_last_tokens=0, labels=None,
                attention_mask=None, **mixer_kwargs):
        """input_ids: (batch, seqlen). Returns `.logits` (batch, seqlen or num_last_tokens, vocab) and,
        with labels (batch, seqlen), `.loss`: next-token cross-entropy, label -100 ignored.

        attention_mask is accepted for Trainer/PEFT compatibility and must be all ones or right
        padding (a recurrent model reads left to right; right padding cannot change earlier tokens).
        """
        for name in _HF_CALL_KWARGS:
            mixer_kwargs.pop(name, None)
        if input_ids.dim() != 2:
            raise ValueError(f"MambaLMHeadModel: input_ids must be (batch, seqlen), got {tuple(input_ids.shape)}")
        hidden_states = self.backbone(input_ids, inference_params=inference_params, **mixer_kwargs)
        if num_last_tokens > 0:
            hidden_states = hidden_states[:, -num_last_tokens:]
        logits = self.lm_head(hidden_states)
        if labels is None:
            return CausalLMOutput(logits=logits)
        if labels.shape != input_ids.shape:
            raise ValueError(f"MambaLMHeadModel: labels must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        targets = labels[:, 1:].to(logits.device)
        if mixer_kwargs.get("seq_idx") is not None or mixer_kwargs.get("cu_seqlens") is not None:
            # packed: a sequence's last token does not predict the next sequence's first
            seq_idx = mixer_kwargs.get("seq_idx")
            if seq_idx is None:
                seq_idx = packing.seq_idx_from_cu_seqlens(mixer_kwargs["cu_seqlens"], input_ids.shape[1])
            targets = targets.masked_fill(packing.starts(seq_idx.to(logits.device))[:, 1:], -100)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                               ignore_index=-100)
        return CausalLMOutputWithLoss(logits=logits, loss=loss)

    @classmethod
    def from_pretrained(cls, pretrained_model_name, device=None, dtype=None, **kwargs):
        """Load a local directory or a hub id, in upstream's or transformers' checkpoint layout."""
        from mamba_ssm.models.checkpoint import load_pretrained

        return load_pretrained(cls, pretrained_model_name, device=device, dtype=dtype, **kwargs)

    def save_pretrained(self, save_directory, layout="mamba_ssm", safe_serialization=True, **kwargs):
        """Write config.json and weights (model.safetensors; pytorch_model.bin with
        safe_serialization=False). layout="transformers" writes MambaForCausalLM's layout instead."""
        from mamba_ssm.models.checkpoint import save_pretrained

        return save_pretrained(self, save_directory, layout=layout, safe_serialization=safe_serialization, **kwargs)
