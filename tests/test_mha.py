"""MHA (hybrid models' attention layer): against a float64 softmax attention written here (rotary,
grouped kv heads, conv, MLP part), its cache against its full forward, its errors."""
import math

import pytest
import torch

from mamba_ssm.modules.mha import MHA
from mamba_ssm.ops.rotary import apply_rotary_emb
from mamba_ssm.utils.generation import InferenceParams


def _rotate(x, rotary_dim, base, interleaved):
    """x (L, D) float64 at positions 0..L-1: feature pairs as complex numbers times exp(i * angle)."""
    L = x.shape[0]
    half = rotary_dim // 2
    freq = torch.tensor([base ** (-2 * i / rotary_dim) for i in range(half)], dtype=torch.float64)
    turn = torch.polar(torch.ones(L, half, dtype=torch.float64), torch.arange(L, dtype=torch.float64)[:, None] * freq)
    out = x.clone()
    if interleaved:
        z = torch.complex(x[:, 0:rotary_dim:2], x[:, 1:rotary_dim:2]) * turn
        out[:, 0:rotary_dim:2], out[:, 1:rotary_dim:2] = z.real, z.imag
    else:
        z = torch.complex(x[:, :half], x[:, half:rotary_dim]) * turn
        out[:, :half], out[:, half:rotary_dim] = z.real, z.imag
    return out


def reference(m, x):
    """The layer in float64, one row and one head at a time: x (B, L, E) -> (B, L, E)."""
    W = {k: v.detach().double() for k, v in m.state_dict().items()}
    x = x.double()
    B, L, _ = x.shape
    H, Hkv, D = m.num_heads, m.num_heads_kv, m.head_dim
    scale = m.softmax_scale if m.softmax_scale is not None else 1 / math.sqrt(D)
    outs = []
    for b in range(B):
        proj = x[b] @ W["in_proj.weight"].T + W.get("in_proj.bias", 0)
        qkv, mlp = proj[:, :m.qkv_dim], proj[:, m.qkv_dim:]
        if m.d_conv:
            w = W["conv1d.weight"][:, 0]                                   # (qkv_dim, d_conv)
            padded = torch.cat([torch.zeros(m.d_conv - 1, m.qkv_dim, dtype=torch.float64), qkv])
            qkv = torch.stack([(padded[t:t + m.d_conv] * w.T).sum(0) for t in range(L)]) + W["conv1d.bias"]
        heads = []
        for h in range(H):
            g = h // (H // Hkv)
            q = qkv[:, h * D:(h + 1) * D]
            k = qkv[:, H * D + g * D:H * D + (g + 1) * D]
            v = qkv[:, (H + Hkv) * D + g * D:(H + Hkv) * D + (g + 1) * D]
            if m.rotary_emb_dim:
                q, k = (_rotate(t, m.rotary_emb_dim, m.rotary_emb_base, m.rotary_emb_interleaved) for t in (q, k))
            scores = q @ k.T * scale
            if m.causal:
                scores = scores.masked_fill(torch.ones(L, L).triu(1).bool(), float("-inf"))
            heads.append(torch.softmax(scores, -1) @ v)
        context = torch.cat(heads, -1)
        if m.mlp_dim:
            up, gate = mlp.chunk(2, -1)
            context = torch.cat([context, up * torch.nn.functional.silu(gate)], -1)
        outs.append(context @ W["out_proj.weight"].T + W.get("out_proj.bias", 0))
    return torch.stack(outs)


CASES = [
    dict(embed_dim=32, num_heads=4, causal=True),
    dict(embed_dim=32, num_heads=4, num_heads_kv=2, causal=True, rotary_emb_dim=8),
    dict(embed_dim=32, num_heads=4, num_heads_kv=1, causal=True, rotary_emb_dim=4, rotary_emb_interleaved=True,
         rotary_emb_base=500.0, qkv_proj_bias=False, out_proj_bias=False),
    dict(embed_dim=24, num_heads=3, head_dim=16, causal=True, rotary_emb_dim=16, d_conv=4, mlp_dim=40,
         softmax_scale=0.3),
    dict(embed_dim=32, num_heads=2, num_heads_kv=1, causal=False, rotary_emb_dim=8),
]


@pytest.mark.parametrize("kw", CASES)
def test_attention_equals_a_float64_softmax_reference(kw):
    torch.manual_seed(0)
    m = MHA(**kw, layer_idx=0)
    if m.mlp_dim:
        assert m.mlp_dim == 256 and m.out_proj.weight.shape[1] == m.num_heads * m.head_dim + 128
    x = torch.randn(2, 11, kw["embed_dim"])
    torch.testing.assert_close(m(x).double(), reference(m, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [c for c in CASES if c["causal"]])
def test_cached_prefill_and_steps_equal_the_full_forward(kw):
    torch.manual_seed(1)
    m = MHA(**kw, layer_idx=3)
    x = torch.randn(2, 10, kw["embed_dim"])
    full = m(x)
    params = InferenceParams(max_seqlen=12, max_batch_size=2)
    outs = [m(x[:, :4], inference_params=params)]
    params.seqlen_offset = 4
    chunks = [1] * 6 if m.d_conv else [1, 3, 1, 1]   # without a conv, a step may take several tokens
    t = 4
    for n in chunks:
        outs.append(m(x[:, t:t + n], inference_params=params))
        params.seqlen_offset += n
        t += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    kv_cache, lengths = params.key_value_memory_dict[3][:2]
    assert kv_cache.shape == (2, 12, 2, m.num_heads_kv, m.head_dim) and lengths.tolist() == [10, 10]


def test_rows_of_different_lengths_step_at_their_own_positions():
    torch.manual_seed(2)
    m = MHA(32, 4, num_heads_kv=2, causal=True, rotary_emb_dim=8, layer_idx=0)
    a, b = torch.randn(1, 7, 32), torch.randn(1, 4, 32)
    params = InferenceParams(max_seqlen=8, max_batch_size=2)
    cache = params.key_value_memory_dict[0] = m.allocate_inference_cache(2, 8)
    for row, prompt in ((0, a), (1, b)):   # each row prefilled alone, through a view of its row
        own = InferenceParams(max_seqlen=8, max_batch_size=1,
                              key_value_memory_dict={0: tuple(s[row:row + 1] for s in cache)})
        m(prompt[:, :-1], inference_params=own)
    params.seqlen_offset = 6
    out = m(torch.cat([a[:, -1:], b[:, -1:]]), inference_params=params)
    torch.testing.assert_close(out[0], m(a)[0, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], m(b)[0, -1:], rtol=1e-5, atol=1e-5)
    assert cache[1].tolist() == [7, 4]


def test_rotary_of_position_zero_is_identity_and_norms_are_kept():
    x = torch.randn(2, 5, 3, 8)
    pos = torch.arange(5).expand(2, 5)
    for inter in (False, True):
        y = apply_rotary_emb(x, pos, 6, interleaved=inter)
        torch.testing.assert_close(y[:, 0], x[:, 0])
        torch.testing.assert_close(y[..., 6:], x[..., 6:])
        torch.testing.assert_close(y[..., :6].norm(dim=-1), x[..., :6].norm(dim=-1))


@pytest.mark.parametrize("kw, match", [
    (dict(embed_dim=32, num_heads=4, num_heads_kv=3), r"num_heads \(4\) must be a positive multiple of num_heads_kv \(3\)"),
    (dict(embed_dim=30, num_heads=4), r"embed_dim \(30\) must be divisible by num_heads \(4\)"),
    (dict(embed_dim=32, num_heads=4, rotary_emb_dim=5), r"rotary_emb_dim must be 0 or even and <= head_dim \(8\), got 5"),
    (dict(embed_dim=32, num_heads=4, rotary_emb_dim=10), "got 10"),
    (dict(embed_dim=32, num_heads=4, d_conv=-1), "d_conv must be >= 0, got -1"),
])
def test_bad_constructor_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        MHA(**kw)


def test_bad_calls_are_named():
    m = MHA(32, 4, causal=True, layer_idx=0, d_conv=3)
    with pytest.raises(ValueError, match=r"x must be \(batch, seqlen, 32\), got \(2, 5, 16\)"):
        m(torch.randn(2, 5, 16))
    params = InferenceParams(max_seqlen=4, max_batch_size=2)
    with pytest.raises(ValueError, match="a prompt of 6 tokens does not fit the cache of max_seqlen 4"):
        m(torch.randn(2, 6, 32), inference_params=params)
    m(torch.randn(2, 2, 32), inference_params=params)
    with pytest.raises(ValueError, match="cache in inference_params holds batch 2, got x of batch 3"):
        m(torch.randn(3, 1, 32), inference_params=params)
    params.seqlen_offset = 2
    with pytest.raises(ValueError, match="with d_conv > 0 a cached step takes one token, got 2"):
        m(torch.randn(2, 2, 32), inference_params=params)
    with pytest.raises(ValueError, match="layer_idx must be set"):
        MHA(32, 4)(torch.randn(1, 2, 32), inference_params=InferenceParams(max_seqlen=4, max_batch_size=1))
    with pytest.raises(ValueError, match=r"positions must be \(batch, seqlen\) = \(2, 5\), got \(5,\)"):
        apply_rotary_emb(torch.randn(2, 5, 1, 4), torch.arange(5), 4)
