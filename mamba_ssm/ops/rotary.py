"""Rotary position embeddings (RoPE, Su et al. 2021) as flash-attn's `RotaryEmbedding` applies them.

x: (batch, seqlen, nheads, head_dim); positions: (batch, seqlen) integer positions of each token.
The first `rotary_dim` features of every head turn by angle position * base ** (-2i / rotary_dim)
for pair i; the others pass through. Pairs are (i, i + rotary_dim / 2) (GPT-NeoX, the default) or,
with interleaved=True, (2i, 2i + 1) (GPT-J). The rotation is computed in float32.
"""
from __future__ import annotations

import torch


def rotary_angles(positions, rotary_dim, base=10000.0):
    """positions (batch, seqlen) -> angles (batch, seqlen, rotary_dim // 2), float32."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
                               / rotary_dim))
    return positions.to(torch.float32).unsqueeze(-1) * inv_freq


def apply_rotary_emb(x, positions, rotary_dim, base=10000.0, interleaved=False):
    """x (batch, seqlen, nheads, head_dim) -> x with its first rotary_dim features rotated, x's dtype."""
    if rotary_dim % 2 or not 0 < rotary_dim <= x.shape[-1]:
        raise ValueError(f"apply_rotary_emb: rotary_dim must be even and in [2, head_dim={x.shape[-1]}], "
                         f"got {rotary_dim}")
    if positions.shape != x.shape[:2]:
        raise ValueError(f"apply_rotary_emb: positions must be (batch, seqlen) = {tuple(x.shape[:2])}, "
                         f"got {tuple(positions.shape)}")
    angles = rotary_angles(positions, rotary_dim, base).unsqueeze(2)   # (batch, seqlen, 1, rotary_dim / 2)
    cos, sin = angles.cos(), angles.sin()
    rot = x[..., :rotary_dim].float()
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return torch.cat([out.to(x.dtype), x[..., rotary_dim:]], dim=-1)
