"""Multi-head self-attention for hybrid models (upstream's `mamba_ssm.modules.mha.MHA`), on PyTorch's SDPA.

x (B, L, embed_dim) -> in_proj -> [q (num_heads), k, v (num_heads_kv each)] x head_dim  [+ mlp_dim]
  -> optional causal depthwise conv over q, k, v (width d_conv, no activation)
  -> rotary embedding of the first rotary_emb_dim features of q and k
  -> softmax(q k^T * softmax_scale) v, each kv head serving num_heads / num_heads_kv query heads
  -> [context; up * silu(gate) of the mlp_dim part] -> out_proj -> (B, L, embed_dim)

Decoding cache (`allocate_inference_cache`, held in InferenceParams.key_value_memory_dict[layer_idx]):
(kv_cache (B, max_seqlen, 2, num_heads_kv, head_dim), lengths (B,) int64 tokens cached per row) and,
with d_conv > 0, conv_state (B, qkv_dim, d_conv). Unlike upstream's (kv_cache, conv_state), each row keeps
its own length, so rows prefilled with prompts of different lengths decode together, and a step has no
data-dependent shapes (it writes at `lengths` and attends over the whole buffer under a mask), so it can
be captured in a CUDA graph. The cache starts zeroed: masked slots hold finite values.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_ssm.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from mamba_ssm.ops.rotary import apply_rotary_emb
from mamba_ssm.utils.inference_params import layer_cache


class MHA(nn.Module):
    # The cache grows with the sequence: a CUDA graph of the step needs a cache of the decoding's length.
    cache_holds_sequence = True

    def __init__(self, embed_dim, num_heads, num_heads_kv=None, head_dim=None, mlp_dim=0, qkv_proj_bias=True,
                 out_proj_bias=True, softmax_scale=None, causal=False, layer_idx=None, d_conv=0, rotary_emb_dim=0,
                 rotary_emb_base=10000.0, rotary_emb_interleaved=False, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_heads_kv = num_heads_kv if num_heads_kv is not None else num_heads
        if num_heads < 1 or self.num_heads_kv < 1 or num_heads % self.num_heads_kv:
            raise ValueError(f"MHA: num_heads ({num_heads}) must be a positive multiple of num_heads_kv "
                             f"({self.num_heads_kv})")
        if head_dim is None and embed_dim % num_heads:
            raise ValueError(f"MHA: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}) "
                             "when head_dim is not given")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim if head_dim is not None else embed_dim // num_heads
        if rotary_emb_dim < 0 or rotary_emb_dim % 2 or rotary_emb_dim > self.head_dim:
            raise ValueError(f"MHA: rotary_emb_dim must be 0 or even and <= head_dim ({self.head_dim}), "
                             f"got {rotary_emb_dim}")
        if d_conv < 0:
            raise ValueError(f"MHA: d_conv must be >= 0, got {d_conv}")
        self.layer_idx = layer_idx
        self.d_conv = d_conv
        self.rotary_emb_dim = rotary_emb_dim
        self.rotary_emb_base = rotary_emb_base
        self.rotary_emb_interleaved = rotary_emb_interleaved
        self.softmax_scale = softmax_scale
        self.causal = causal
        self.mlp_dim = math.ceil(mlp_dim / 256) * 256
        self.qkv_dim = self.head_dim * (self.num_heads + 2 * self.num_heads_kv)
        out_dim = self.head_dim * self.num_heads
        self.in_proj = nn.Linear(embed_dim, self.qkv_dim + self.mlp_dim, bias=qkv_proj_bias, **factory_kwargs)
        if d_conv > 0:
            self.conv1d = nn.Conv1d(self.qkv_dim, self.qkv_dim, kernel_size=d_conv, padding=d_conv - 1,
                                    groups=self.qkv_dim, **factory_kwargs)
        self.out_proj = nn.Linear(out_dim + self.mlp_dim // 2, embed_dim, bias=out_proj_bias, **factory_kwargs)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """(kv_cache (batch, max_seqlen, 2, num_heads_kv, head_dim), lengths (batch,)[, conv_state])."""
        dtype = self.out_proj.weight.dtype if dtype is None else dtype
        device = self.out_proj.weight.device
        kv_cache = torch.zeros(batch_size, max_seqlen, 2, self.num_heads_kv, self.head_dim, dtype=dtype,
                               device=device)
        lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        if self.d_conv == 0:
            return kv_cache, lengths
        return kv_cache, lengths, torch.zeros(batch_size, self.qkv_dim, self.d_conv, dtype=dtype, device=device)

    def _get_cache(self, inference_params, batch_size):
        return layer_cache(self, inference_params, batch_size, "x")

    def _conv(self, qkv, conv_state, step):
        """qkv (B, L, qkv_dim) -> the causal depthwise conv of it; conv_state keeps the last d_conv inputs."""
        weight = self.conv1d.weight.squeeze(1)
        if step:
            if qkv.shape[1] != 1:
                raise ValueError(f"MHA layer {self.layer_idx}: with d_conv > 0 a cached step takes one token, "
                                 f"got {qkv.shape[1]}")
            return causal_conv1d_update(qkv[:, 0], conv_state, weight, self.conv1d.bias).unsqueeze(1)
        x = qkv.transpose(1, 2)
        if conv_state is not None:
            conv_state.copy_(F.pad(x, (self.d_conv - x.shape[-1], 0))[..., -self.d_conv:])
        return causal_conv1d_fn(x, weight, self.conv1d.bias).transpose(1, 2)

    def _attend(self, q, k, v, mask=None):
        """q (B, Lq, H, D), k and v (B, Lk, Hkv, D) -> (B, Lq, H, D); causal over equal lengths if no mask."""
        groups = self.num_heads // self.num_heads_kv
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=self.causal and mask is None,
                                             scale=self.softmax_scale)
        return out.transpose(1, 2)

    def forward(self, x, inference_params=None):
        """x: (batch, seqlen, embed_dim) -> (batch, seqlen, embed_dim).

        With inference_params: seqlen_offset == 0 runs the prompt and caches its keys and values (each
        row's length := seqlen); > 0 appends seqlen tokens to each row after its own cached ones.
        """
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"MHA: x must be (batch, seqlen, {self.embed_dim}), got {tuple(x.shape)}")
        batch, seqlen, _ = x.shape
        states = None if inference_params is None else self._get_cache(inference_params, batch)
        step = states is not None and inference_params.seqlen_offset > 0
        qkv = self.in_proj(x)
        if self.mlp_dim > 0:
            qkv, x_mlp = qkv.split([self.qkv_dim, self.mlp_dim], dim=-1)
            up, gate = x_mlp.chunk(2, dim=-1)
            x_mlp = up * F.silu(gate)
        if self.d_conv > 0:
            qkv = self._conv(qkv, None if states is None else states[2], step)
        q, k, v = qkv.split([self.num_heads * self.head_dim] + [self.num_heads_kv * self.head_dim] * 2, dim=-1)
        q = q.unflatten(-1, (self.num_heads, self.head_dim))
        k = k.unflatten(-1, (self.num_heads_kv, self.head_dim))
        v = v.unflatten(-1, (self.num_heads_kv, self.head_dim))
        start = states[1] if step else torch.zeros(batch, dtype=torch.long, device=x.device)
        positions = start.unsqueeze(1) + torch.arange(seqlen, device=x.device)          # (B, L)
        if self.rotary_emb_dim > 0:
            q, k = (apply_rotary_emb(t, positions, self.rotary_emb_dim, self.rotary_emb_base,
                                     self.rotary_emb_interleaved) for t in (q, k))
        if states is None:
            context = self._attend(q, k, v)
        elif not step:
            kv_cache, lengths = states[0], states[1]
            if seqlen > kv_cache.shape[1]:
                raise ValueError(f"MHA layer {self.layer_idx}: a prompt of {seqlen} tokens does not fit the cache "
                                 f"of max_seqlen {kv_cache.shape[1]}")
            kv_cache[:, :seqlen] = torch.stack([k, v], dim=2).to(kv_cache.dtype)
            lengths.fill_(seqlen)
            context = self._attend(q, k, v)
        else:
            context = self._step_attend(q, k, v, positions, states)
        context = context.flatten(-2)
        if self.mlp_dim > 0:
            context = torch.cat([context, x_mlp], dim=-1)
        return self.out_proj(context)

    def _step_attend(self, q, k, v, positions, states):
        """Write k, v at each row's positions (B, L) and attend over the whole cache under a mask."""
        kv_cache, lengths = states[0], states[1]
        new = torch.stack([k, v], dim=2).to(kv_cache.dtype)                         # (B, L, 2, Hkv, D)
        index = positions.view(*positions.shape, 1, 1, 1).expand_as(new)
        kv_cache.scatter_(1, index, new)
        slots = torch.arange(kv_cache.shape[1], device=q.device)
        last = positions if self.causal else positions[:, -1:].expand_as(positions)
        mask = (slots.view(1, 1, -1) <= last.unsqueeze(-1)).unsqueeze(1)                # (B, 1, L, max_seqlen)
        lengths.add_(positions.shape[1])
        cache = kv_cache.to(q.dtype)
        return self._attend(q, cache[:, :, 0], cache[:, :, 1], mask=mask)
