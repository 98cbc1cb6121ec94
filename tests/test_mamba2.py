"""The Mamba-2 mixer: upstream's parameters, the forward against a float64 oracle written from its
parameters here, packed sequences, cached decoding, and the constructor's errors."""

import pytest
import torch
import torch.nn.functional as F

from mamba_ssm.modules.mamba2 import Mamba2
from mamba_ssm.utils.generation import InferenceParams
from test_mamba_split_conv1d_scan import conv64, gated_rms64
from test_ssd import recurrence64


def small(**kw):
    torch.manual_seed(0)
    args = dict(d_model=16, d_state=8, headdim=4, ngroups=2, chunk_size=8, layer_idx=0, dtype=torch.float64)
    args.update(kw)
    m = Mamba2(**args)
    with torch.no_grad():   # an untrained layer has D = 1, zero conv bias...: give every parameter a shape of its own
        for name, p in m.named_parameters():
            if name in ("D", "norm.weight", "conv1d.bias", "in_proj.bias", "out_proj.bias"):
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if name == "norm.weight" else 0.0))
    return m


def oracle(m, u, seq_idx=None):
    """The mixer written out in float64 with the per-step conv and scan of the op tests."""
    b, l, _ = u.shape
    zxbcdt = u.double() @ m.in_proj.weight.double().T
    if m.in_proj.bias is not None:
        zxbcdt = zxbcdt + m.in_proj.bias.double()
    d_mlp = m.d_inner - m.d_ssm
    h, p, g, n = m.nheads, m.headdim, m.ngroups, m.d_state
    z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, m.d_ssm, m.d_ssm + 2 * g * n, h], dim=-1)
    bias = m.conv1d.bias if m.conv1d.bias is not None else torch.zeros(xBC.shape[-1])
    xBC = F.silu(conv64(xBC, m.conv1d.weight[:, 0], bias, seq_idx))
    x, B, C = torch.split(xBC, [m.d_ssm, g * n, g * n], dim=-1)
    D = m.D.double().view(h, p) if m.D_has_hdim else m.D.double()
    y, final, _ = recurrence64(x.reshape(b, l, h, p), dt, -torch.exp(m.A_log.double()), B.reshape(b, l, g, n),
                               C.reshape(b, l, g, n), D=D, z=None if m.rmsnorm else z.reshape(b, l, h, p),
                               dt_bias=m.dt_bias, seq_idx=seq_idx, dt_softplus=True, dt_limit=m.dt_limit)
    y = y.reshape(b, l, m.d_ssm)
    if m.rmsnorm:
        y = gated_rms64(y, m.norm.weight, z, m.norm.eps, g, m.norm_before_gate)
    if d_mlp:
        y = torch.cat([F.silu(z0) * x0, y], -1)
    out = y @ m.out_proj.weight.double().T
    if m.out_proj.bias is not None:
        out = out + m.out_proj.bias.double()
    return out, final


def test_parameters_as_upstream():
    m = Mamba2(d_model=64, d_state=16, headdim=16, ngroups=2, expand=2, d_ssm=96, D_has_hdim=True)
    shapes = {k: tuple(v.shape) for k, v in m.named_parameters()}
    d_inner, nheads, conv_dim = 128, 6, 96 + 2 * 2 * 16
    assert shapes == {"in_proj.weight": (2 * d_inner + 2 * 2 * 16 + nheads, 64), "conv1d.weight": (conv_dim, 1, 4),
                      "conv1d.bias": (conv_dim,), "dt_bias": (nheads,), "A_log": (nheads,), "D": (96,),
                      "norm.weight": (96,), "out_proj.weight": (64, d_inner)}
    assert m.norm.group_size == 48 and m.norm.norm_before_gate is False
    A = torch.exp(m.A_log)
    assert ((A >= 1) & (A <= 16)).all()
    dt = F.softplus(m.dt_bias)
    assert ((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001)).all()
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_bias._no_weight_decay
    assert not hasattr(Mamba2(d_model=32, rmsnorm=False, headdim=16), "norm")


@pytest.mark.parametrize("kw", [
    dict(), dict(D_has_hdim=True, norm_before_gate=True), dict(rmsnorm=False, ngroups=1), dict(d_ssm=24),
    dict(dt_limit=(0.01, 0.05), bias=True), dict(use_mem_eff_path=False), dict(conv_bias=False, chunk_size=3)])
def test_forward_against_oracle(kw):
    m = small(**kw)
    u = torch.randn(2, 13, 16, dtype=torch.float64)
    torch.testing.assert_close(m(u), oracle(m, u)[0])
    # (batch * seqlen, d_model) with seqlen given
    torch.testing.assert_close(m(u.reshape(26, 16), seqlen=13), oracle(m, u)[0].reshape(26, 16))


def test_packed_sequences_equal_each_alone_and_fill_one_cache_row_each():
    m = small(use_mem_eff_path=True)
    lengths = [5, 1, 9]
    seqs = [torch.randn(1, n, 16, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0, 5, 6, 15], dtype=torch.int32)
    packed = torch.cat(seqs, 1)
    out = m(packed, cu_seqlens=cu)
    out_seq_idx = m(packed, seq_idx=torch.tensor([[0] * 5 + [1] + [2] * 9], dtype=torch.int32))
    params = InferenceParams(max_seqlen=32, max_batch_size=3)
    out_cached = m(packed, cu_seqlens=cu, inference_params=params)
    for i, s in enumerate(seqs):
        alone = m(s)
        sl = slice(int(cu[i]), int(cu[i + 1]))
        torch.testing.assert_close(out[:, sl], alone)
        torch.testing.assert_close(out_seq_idx[:, sl], alone)
        torch.testing.assert_close(out_cached[:, sl], alone)
        p1 = InferenceParams(max_seqlen=32, max_batch_size=1)
        m(s, inference_params=p1)
        for a, b in zip(params.key_value_memory_dict[0], p1.key_value_memory_dict[0]):
            torch.testing.assert_close(a[i], b[0])


@pytest.mark.parametrize("kw", [dict(), dict(D_has_hdim=True, rmsnorm=False, dt_limit=(0.02, 0.08)), dict(d_ssm=24)])
def test_cached_steps_equal_the_full_forward(kw):
    m = small(**kw)
    u = torch.randn(3, 11, 16, dtype=torch.float64)
    full = m(u)
    params = InferenceParams(max_seqlen=16, max_batch_size=3)
    outs = [m(u[:, :4], inference_params=params)]
    params.seqlen_offset = 4
    for t in range(4, 11):
        outs.append(m(u[:, t:t + 1], inference_params=params))
        params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(outs, 1), full)
    conv_state, ssm_state = params.key_value_memory_dict[0]
    assert conv_state.shape == (3, m.d_ssm + 2 * 2 * 8, 4) and ssm_state.shape == (3, m.nheads, 4, 8)
    torch.testing.assert_close(ssm_state, oracle(m, u)[1])


def test_one_token_prompt_then_steps():
    m = small()
    u = torch.randn(2, 3, 16, dtype=torch.float64)
    params = InferenceParams(max_seqlen=8, max_batch_size=2)
    outs = [m(u[:, :1], inference_params=params)]
    for t in (1, 2):
        params.seqlen_offset = t
        outs.append(m(u[:, t:t + 1], inference_params=params))
    torch.testing.assert_close(torch.cat(outs, 1), m(u))


def test_cache_dtypes_bf16():
    m = Mamba2(d_model=32, headdim=16, d_state=8, layer_idx=0, dtype=torch.bfloat16)
    conv_state, ssm_state = m.allocate_inference_cache(2, 10)
    assert conv_state.dtype == torch.bfloat16 and ssm_state.dtype == torch.float32
    u = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    params = InferenceParams(max_seqlen=8, max_batch_size=2)
    m(u, inference_params=params)
    params.seqlen_offset = 5
    out = m(u[:, :1], inference_params=params)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 1, 32)


def test_gradients_reach_every_parameter():
    m = small()
    u = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    m(u).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert u.grad.abs().sum() > 0


@pytest.mark.parametrize("kw,exc,match", [
    (dict(d_model=30, headdim=16), ValueError, r"d_ssm .* = 60 must be divisible by headdim = 16"),
    (dict(d_model=32, headdim=16, ngroups=3), ValueError, r"number of heads d_ssm / headdim = 4 must be divisible by ngroups = 3"),
    (dict(d_model=32, headdim=16, process_group=object()), NotImplementedError, r"process_group=.* is not supported"),
    (dict(d_model=32, headdim=16, A_init_range=(0, 4)), ValueError, r"A_init_range must be \(lo, hi\)"),
])
def test_constructor_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        Mamba2(**kw)


def test_forward_errors():
    m = small()
    with pytest.raises(ValueError, match=r"u must be \(batch, seqlen, 16\), got \(2, 5, 8\)"):
        m(torch.randn(2, 5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"seq_idx must be \(batch, seqlen\) = \(1, 5\), got \(1, 4\)"):
        m(torch.randn(1, 5, 16, dtype=torch.float64), seq_idx=torch.zeros(1, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens must be .* ending at seqlen = 5"):
        m(torch.randn(1, 5, 16, dtype=torch.float64), cu_seqlens=torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match=r"layer_idx must be set"):
        Mamba2(d_model=32, headdim=16)(torch.randn(1, 2, 32), inference_params=InferenceParams(4, 1))
