"""The fused decoding-step kernels (mamba_ssm/ops/triton/decode_step.py) against their PyTorch
references and an independent float64 computation, and the model's step on the fused paths.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (conftest.py turns it on); the
same checks on CUDA are marked `cuda`. Everything skips without Triton.
"""
import importlib.util
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mamba_ssm.modules import fused_step as fs
from mamba_ssm.ops.triton import decode_step as ds

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the cuda variant covers it")),
    pytest.param("cuda", marks=pytest.mark.cuda),
]


@pytest.fixture
def kernels(monkeypatch):
    """Triton present; outputs and scratch buffers poisoned with NaN, so an element left unwritten shows."""
    pytest.importorskip("triton")

    def poisoned(*shape, **kw):
        t = torch.empty(*shape, **kw)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(ds, "_empty", poisoned)


def _tol(dtype):
    """(rtol, atol) kernel vs reference (same rounding points; 1 ulp of a 16-bit output: the interpreter
    also truncates where a GPU rounds to nearest), and the relative norm error allowed against float64."""
    return {torch.float32: (1e-5, 1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-2, 1.5e-2),
            torch.float16: (2e-3, 2e-3, 2e-3)}[dtype]


def _close(out, ref, dtype, what):
    rtol, atol, _ = _tol(dtype)
    scale = ref.float().abs().max().item() + 1e-6
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol * scale, msg=what)


def _close64(out, ref64, dtype, what):
    _, _, rel = _tol(dtype)
    assert torch.isfinite(out).all(), what
    err = (out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30)
    assert err < rel, f"{what}: ||out - float64|| / ||float64|| = {err:.2e} >= {rel:.0e}"


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731


# --------------------------------------------------------------------------- float64 computations
def conv64(x, conv_state, w, bias):
    window = torch.cat([conv_state.double()[:, :, 1:], x.double().unsqueeze(-1)], -1)
    pre = (window * w.double().reshape(window.shape[1], -1)).sum(-1)
    if bias is not None:
        pre = pre + bias.double()
    return F.silu(pre), window


def state64(state, x, z, dt_raw, B, C, dt_bias, A_log, D):
    dt = F.softplus(dt_raw.double() + dt_bias.double())
    A = -torch.exp(A_log.double())
    x = x.double()
    h = state.double() * torch.exp(dt[..., None] * A) + (dt * x)[..., None] * B.double()[:, None]
    y = (h * C.double()[:, None]).sum(-1)
    if D is not None:
        y = y + D.double() * x
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


# --------------------------------------------------------------------------------- shapes, inputs
def layer_inputs(device, dtype, batch, d_inner, d_state, dt_rank, d_conv=4, seed=0, conv_bias=True):
    """Weights and states at Mamba's scales (dt near softplus^-1 of [1e-3, 1e-1], A = -(1..N))."""
    r = _gen(seed)
    e = dt_rank + 2 * d_state
    t = dict(
        conv_state=r(batch, d_inner, d_conv),
        conv_weight=r(d_inner, 1, d_conv, scale=0.5), conv_bias=r(d_inner, scale=0.2) if conv_bias else None,
        x_proj_weight=r(e, d_inner, scale=d_inner ** -0.5), dt_proj_weight=r(d_inner, dt_rank, scale=dt_rank ** -0.5),
        dt_proj_bias=torch.log(torch.expm1(torch.exp(torch.rand(d_inner) * 4.6 - 6.9))),
        ssm_state=r(batch, d_inner, d_state),
        xz=r(batch, 2 * d_inner),
    )
    t = {k: (v.to(device, dtype) if v is not None else None) for k, v in t.items()}
    t["ssm_state"] = t["ssm_state"].float()
    t["A_log"] = torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1).to(device)
    t["D"] = (1 + r(d_inner, scale=0.1)).to(device)
    return t


CONV_CASES = [  # batch, d_inner, d_state, dt_rank, d_conv, conv bias, dtype
    (1, 100, 16, 8, 4, True, torch.float32),
    (3, 100, 8, 5, 4, False, torch.float32),
    (16, 70, 16, 8, 3, True, torch.float32),
    (1, 130, 16, 8, 4, True, torch.bfloat16),
    (3, 100, 8, 5, 2, True, torch.bfloat16),
]


def _check_conv_xproj(device, batch, d_inner, d_state, dt_rank, d_conv, bias, dtype, xproj=True):
    t = layer_inputs(device, dtype, batch, d_inner, d_state, dt_rank, d_conv, seed=batch + d_inner, conv_bias=bias)
    x = t["xz"][:, :d_inner]  # a strided view, as in_proj's output is split
    xw = t["x_proj_weight"] if xproj else None
    cs_k, cs_r, cs0 = t["conv_state"].clone(), t["conv_state"].clone(), t["conv_state"].clone()
    xc, part = ds.conv_xproj(x, cs_k, t["conv_weight"], t["conv_bias"], xw)
    xc_r, part_r = ds.conv_xproj_ref(x, cs_r, t["conv_weight"], t["conv_bias"], xw)
    assert xc.dtype == dtype and xc.shape == (batch, d_inner) and torch.isfinite(xc).all()
    assert torch.equal(cs_k, cs_r), "conv_state updated in place as the reference does"
    _close(xc, xc_r, dtype, "x_conv vs reference")
    xc64, window64 = conv64(x, cs0, t["conv_weight"], t["conv_bias"])
    torch.testing.assert_close(cs_k.double(), window64.to(dtype).double(), rtol=0, atol=0)
    _close64(xc, xc64, dtype, "x_conv vs float64")
    if not xproj:
        assert part is None and part_r is None
        return
    n_blocks = -(-d_inner // ds.PARTIAL_CHANNELS)
    assert part.shape == (batch, n_blocks, dt_rank + 2 * d_state) and part.dtype == torch.float32
    assert torch.isfinite(part).all(), "every partial written"
    # from x_conv as rounded to the dtype: one ulp of x_conv moves a partial by ~ulp * its scale
    _close(part, part_r, dtype, "partials vs reference")
    # their sum is x_proj of x_conv as stored
    _close64(part.sum(1), xc.double() @ t["x_proj_weight"].double().t(), torch.float32, "partials' sum")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,d_inner,d_state,dt_rank,d_conv,bias,dtype", CONV_CASES)
def test_conv_xproj(kernels, device, batch, d_inner, d_state, dt_rank, d_conv, bias, dtype):
    _check_conv_xproj(device, batch, d_inner, d_state, dt_rank, d_conv, bias, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_without_xproj(kernels, device, dtype):
    _check_conv_xproj(device, 3, 100, 16, 8, 4, True, dtype, xproj=False)


STATE_CASES = [  # batch, d_inner, d_state, dt_rank, D, z, dtype
    (1, 100, 16, 8, True, True, torch.float32),
    (3, 100, 8, 5, False, True, torch.float32),
    (16, 70, 16, 8, True, False, torch.float32),
    (1, 130, 16, 8, True, True, torch.bfloat16),
    (3, 100, 8, 5, False, False, torch.bfloat16),
]


def _state_inputs(device, batch, d_inner, d_state, dt_rank, dtype, use_D, use_z):
    t = layer_inputs(device, dtype, batch, d_inner, d_state, dt_rank, seed=7 * batch + d_inner)
    r = _gen(batch + d_state)
    x_conv = r(batch, d_inner).to(device, dtype)
    z = r(batch, d_inner).to(device, dtype) if use_z else None
    D = t["D"] if use_D else None
    return t, x_conv, z, D


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,d_inner,d_state,dt_rank,use_D,use_z,dtype", STATE_CASES)
def test_state_from_partials(kernels, device, batch, d_inner, d_state, dt_rank, use_D, use_z, dtype):
    t, x_conv, z, D = _state_inputs(device, batch, d_inner, d_state, dt_rank, dtype, use_D, use_z)
    r = _gen(3)
    n_parts = 5
    partials = r(batch, n_parts, dt_rank + 2 * d_state, scale=0.3).to(device)
    s_k, s_r, s0 = t["ssm_state"].clone(), t["ssm_state"].clone(), t["ssm_state"].clone()
    y = ds.state_from_partials(s_k, partials, x_conv, z, t["dt_proj_weight"], t["dt_proj_bias"], t["A_log"], D)
    y_r = ds.state_from_partials_ref(s_r, partials, x_conv, z, t["dt_proj_weight"], t["dt_proj_bias"], t["A_log"], D)
    assert y.dtype == dtype and y.shape == (batch, d_inner) and torch.isfinite(y).all()
    torch.testing.assert_close(s_k, s_r, rtol=1e-5, atol=1e-5 * s_r.abs().max().item())
    _close(y, y_r, dtype, "y vs reference")
    total = partials.double().sum(1)
    dt_raw = total[:, :dt_rank] @ t["dt_proj_weight"].double().t()
    y64, h64 = state64(s0, x_conv, z, dt_raw, total[:, dt_rank:dt_rank + d_state], total[:, dt_rank + d_state:],
                       t["dt_proj_bias"], t["A_log"], D)
    _close64(s_k, h64, torch.float32, "state vs float64")
    _close64(y, y64, dtype, "y vs float64")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,d_inner,d_state,dt_rank,use_D,use_z,dtype", STATE_CASES)
def test_state_update(kernels, device, batch, d_inner, d_state, dt_rank, use_D, use_z, dtype):
    t, x_conv, z, D = _state_inputs(device, batch, d_inner, d_state, dt_rank, dtype, use_D, use_z)
    r = _gen(4)
    dt = r(batch, d_inner, scale=0.5).to(device, dtype)
    x_db = r(batch, dt_rank + 2 * d_state).to(device, dtype)  # B and C as strided views of x_proj's output
    B, C = x_db[:, dt_rank:dt_rank + d_state], x_db[:, dt_rank + d_state:]
    s_k, s_r, s0 = t["ssm_state"].clone(), t["ssm_state"].clone(), t["ssm_state"].clone()
    y = ds.state_update(s_k, x_conv, z, dt, B, C, t["dt_proj_bias"], t["A_log"], D)
    y_r = ds.state_update_ref(s_r, x_conv, z, dt, B, C, t["dt_proj_bias"], t["A_log"], D)
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(s_k, s_r, rtol=1e-5, atol=1e-5 * s_r.abs().max().item())
    _close(y, y_r, dtype, "y vs reference")
    y64, h64 = state64(s0, x_conv, z, dt, B, C, t["dt_proj_bias"], t["A_log"], D)
    _close64(s_k, h64, torch.float32, "state vs float64")
    _close64(y, y64, dtype, "y vs float64")


@pytest.mark.parametrize("device", DEVICES)
def test_partials_in_several_blocks_and_chunks(kernels, device, monkeypatch):
    # 7 channel blocks of 16, summed by the state kernel in 2 unrolled chunks of 4
    monkeypatch.setattr(ds, "PARTIAL_CHANNELS", 16)
    monkeypatch.setattr(ds, "_PARTIAL_TILE", 32)
    batch, d_inner, d_state, dt_rank = 2, 100, 8, 7
    t = layer_inputs(device, torch.float32, batch, d_inner, d_state, dt_rank, seed=11)
    x = t["xz"][:, :d_inner]
    cs_k, cs_r = t["conv_state"].clone(), t["conv_state"].clone()
    xc, part = ds.conv_xproj(x, cs_k, t["conv_weight"], t["conv_bias"], t["x_proj_weight"])
    xc_r, part_r = ds.conv_xproj_ref(x, cs_r, t["conv_weight"], t["conv_bias"], t["x_proj_weight"])
    assert part.shape[1] == 7
    torch.testing.assert_close(part, part_r, rtol=1e-5, atol=1e-6)
    s_k, s_r = t["ssm_state"].clone(), t["ssm_state"].clone()
    args = (xc, t["xz"][:, d_inner:], t["dt_proj_weight"], t["dt_proj_bias"], t["A_log"], t["D"])
    y = ds.state_from_partials(s_k, part, *args)
    y_r = ds.state_from_partials_ref(s_r, part_r, *args)
    torch.testing.assert_close(y, y_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s_k, s_r, rtol=1e-5, atol=1e-5)


NORM_CASES = [  # batch, d_model, d_inner, rms, residual, residual_in_fp32, in_proj bias, dtype
    (1, 40, 100, True, True, True, False, torch.float32),
    (3, 40, 100, False, True, False, True, torch.float32),
    (1, 48, 70, True, False, True, False, torch.float32),
    (3, 40, 100, False, False, False, False, torch.float32),
    (1, 40, 100, True, True, True, False, torch.bfloat16),
    (3, 48, 70, False, True, False, True, torch.bfloat16),
    (16, 40, 100, True, True, True, False, torch.float32),
    (20, 48, 70, False, True, False, True, torch.bfloat16),  # two tiles of rows
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch,d_model,d_inner,rms,has_res,res_fp32,in_bias,dtype", NORM_CASES)
def test_norm_in_proj_conv_xproj(kernels, device, monkeypatch, batch, d_model, d_inner, rms, has_res, res_fp32,
                                 in_bias, dtype):
    monkeypatch.setattr(ds, "_GEMV_BLOCK_K", 16)  # several steps of the in_proj loop, the last one masked
    monkeypatch.setattr(ds, "_ROWS_IN_BLOCK_K", 16)
    d_state, dt_rank = 16, 8
    t = layer_inputs(device, dtype, batch, d_inner, d_state, dt_rank, seed=batch * d_model)
    r = _gen(5)
    hidden = r(batch, d_model).to(device, dtype)
    residual = r(batch, d_model).to(device, torch.float32 if res_fp32 else dtype) if has_res else None
    nw = (1 + r(d_model, scale=0.1)).to(device, dtype)
    nb = None if rms else r(d_model, scale=0.1).to(device, dtype)
    inw = r(2 * d_inner, d_model, scale=d_model ** -0.5).to(device, dtype)
    inb = r(2 * d_inner, scale=0.1).to(device, dtype) if in_bias else None
    cs_k, cs_r, cs0 = t["conv_state"].clone(), t["conv_state"].clone(), t["conv_state"].clone()
    common = (1e-5, rms, res_fp32, inw, inb)
    tail = (t["conv_weight"], t["conv_bias"], t["x_proj_weight"])
    xc, z, part, new_res = ds.norm_in_proj_conv_xproj(hidden, residual, nw, nb, *common, cs_k, *tail)
    xc_r, z_r, part_r, res_r = ds.norm_in_proj_conv_xproj_ref(hidden, residual, nw, nb, *common, cs_r, *tail)
    assert new_res.dtype == res_r.dtype
    if new_res.dtype == torch.float32:
        assert torch.equal(new_res, res_r)
    else:
        _close(new_res, res_r, dtype, "new residual vs reference")
    for name, out in (("x_conv", xc), ("z", z), ("partials", part)):
        assert torch.isfinite(out).all(), f"every element of {name} written"
    _close(z, z_r, dtype, "z vs reference")
    _close(xc, xc_r, dtype, "x_conv vs reference")
    _close(cs_k, cs_r, dtype, "conv state vs reference")  # its new column is x, rounded like z
    if dtype == torch.float32:
        torch.testing.assert_close(part, part_r, rtol=1e-4, atol=1e-5)
    # float64: the norm, in_proj, conv, x_proj without intermediate rounding
    s = hidden.double() + (residual.double() if has_res else 0)
    if rms:
        h = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5)
    else:
        h = F.layer_norm(s, (d_model,), eps=1e-5)
    h = h * nw.double() + (nb.double() if nb is not None else 0)
    xz = h @ inw.double().t() + (inb.double() if in_bias else 0)
    _close64(z, xz[:, d_inner:], dtype, "z vs float64")
    xc64, _ = conv64(xz[:, :d_inner], cs0, t["conv_weight"], t["conv_bias"])
    _close64(xc, xc64, dtype, "x_conv vs float64")
    _close64(part.sum(1), xc64 @ t["x_proj_weight"].double().t(), dtype, "partials' sum vs float64")


@pytest.mark.parametrize("name", ["x_conv", "partials"])
def test_arguments_are_checked_by_name(name):
    x = torch.zeros(2, 10)
    cs = torch.zeros(2, 10, 4)
    w = torch.zeros(10, 4)
    if name == "x_conv":
        with pytest.raises(ValueError, match=r"conv_state must be \(batch, d_inner, d_conv\) = \(2, 10, 4\)"):
            ds.conv_xproj(x, torch.zeros(2, 10, 3), w)
        with pytest.raises(ValueError, match=r"x_proj_weight must be"):
            ds.conv_xproj_ref(x, cs, w, None, torch.zeros(5, 9))
    else:
        st = torch.zeros(2, 10, 4)
        with pytest.raises(ValueError, match=r"partials must be float32 \(batch, n_blocks, dt_rank \+ 2 d_state\)"):
            ds.state_from_partials_ref(st, torch.zeros(2, 3, 7), x, None, torch.zeros(10, 3), torch.zeros(10),
                                       torch.zeros(10, 4))
        with pytest.raises(ValueError, match=r"A_log must be \(d_inner, d_state\) = \(10, 4\)"):
            ds.state_update_ref(st, x, None, x, torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(10), torch.zeros(4, 10))


@pytest.mark.parametrize("batch,n,k,bias", [(1, 40, 96, False), (1, 33, 700, True), (3, 17, 130, True),
                                            (20, 40, 96, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_linear_gemv(kernels, device, monkeypatch, batch, n, k, bias, dtype):
    monkeypatch.setattr(ds, "_OUT_ROWS", 16)
    monkeypatch.setattr(ds, "_OUT_BLOCK_K", 64)  # several K tiles, the last one partial
    monkeypatch.setattr(ds, "_ROWS_OUT_BLOCK_K", 64)
    r = _gen(batch * 1000 + n + k)
    x = r(batch, 2 * k)[:, ::2].to(device, dtype)  # strided rows
    w = r(n, k, scale=k ** -0.5).to(device, dtype)
    b = r(n).to(device, dtype) if bias else None
    out = ds.linear_gemv(x, w, b)
    _close(out, ds.linear_gemv_ref(x, w, b), dtype, "linear_gemv vs reference")
    ref64 = x.double() @ w.double().t() + (b.double() if bias else 0)
    _close64(out, ref64, dtype, "linear_gemv vs float64")
    with pytest.raises(ValueError, match=r"weight must be \(out_features, 5\)"):
        ds.linear_gemv(x[:, :5], w)


@pytest.mark.parametrize("batch,hidden,group,before", [(1, 64, 64, False), (3, 96, 32, True), (2, 40, 20, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_gated_rmsnorm(kernels, device, batch, hidden, group, before, dtype):
    r = _gen(batch * 100 + hidden + group)
    x = r(batch, 2 * hidden)[:, :hidden].to(device, dtype)  # strided rows
    z, w = r(batch, hidden).to(device, dtype), r(hidden).to(device, dtype)
    out = ds.gated_rmsnorm(x, z, w, 1e-5, group, before)
    _close(out, ds.gated_rmsnorm_ref(x, z, w, 1e-5, group, before), dtype, "gated_rmsnorm vs reference")
    x64, z64 = x.double(), z.double()
    gate = F.silu(z64)
    h = (x64 if before else x64 * gate).view(batch, hidden // group, group)
    ref64 = (h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-5)).view(batch, hidden) * w.double()
    _close64(out, ref64 * gate if before else ref64, dtype, "gated_rmsnorm vs float64")
    with pytest.raises(ValueError, match=rf"group_size must divide hidden = {hidden}"):
        ds.gated_rmsnorm(x, z, w, 1e-5, 7, before)


# ------------------------------------------------------------------------------------ the switch
def test_switch_values_and_a_bad_value_names_the_variable():
    assert fs.mode_from_environment({}) == "1"
    assert fs.mode_from_environment({fs.ENV_VAR: " 0 "}) == fs.mode_from_environment({fs.ENV_VAR: "Off"}) == "0"
    assert fs.mode_from_environment({fs.ENV_VAR: "yes"}) == "1"
    for value in ("2", "gemm"):  # forced paths are for tests and sweeps, not users
        with pytest.raises(ValueError, match=f"MAMBA_SSM_FUSED_STEP='{value}'"):
            fs.mode_from_environment({fs.ENV_VAR: value})


# ------------------------------------------------------------------------------- the whole model
def tiny_model(seed=0, device="cpu", dtype=torch.float32, **cfg):
    torch.manual_seed(seed)
    config = MambaConfig(d_model=48, n_layer=2, vocab_size=101, ssm_cfg={"d_state": 8}, **cfg)
    model = MambaLMHeadModel(config).eval()
    with torch.no_grad():  # larger weights than the initialisation's, so the logits vary
        for name, p in model.named_parameters():
            if name.endswith(("in_proj.weight", "out_proj.weight", "x_proj.weight")):
                p.mul_(3.0)
            elif name.endswith("embedding.weight"):
                p.mul_(20.0)
    return model.to(device, dtype)


@pytest.fixture
def fused(monkeypatch):
    """Set the mode with fused(mode); the step may take the kernels also on CPU tensors (the interpreter)."""
    pytest.importorskip("triton")
    monkeypatch.setattr(fs, "INTERPRET_ON_CPU", True)
    monkeypatch.setattr(fs, "_proven", set())
    monkeypatch.setattr(fs, "_failed", {})

    def use(mode):
        monkeypatch.setattr(fs, "MODE", mode)
    return use


def _teacher_forced(model, seq, prompt_len, cg=False):
    out = model.generate(seq[:, :prompt_len], max_length=seq.shape[1], teacher_outputs=seq, output_scores=True,
                         return_dict_in_generate=True, cg=cg)
    return torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("mode,batch,gemv_max,expected", [
    ("1", 1, 1, "block"), ("1", 3, 4, "block"), ("1", 20, 32, "block"), ("1", 3, 1, "partials"),
    ("1", 6, 1, "gemm"), ("partials", 1, 1, "partials"), ("partials", 6, 1, "partials"), ("gemm", 1, 1, "gemm"),
])
@pytest.mark.parametrize("cfg", [{}, {"rms_norm": False, "residual_in_fp32": False}])
@pytest.mark.parametrize("device", DEVICES)
def test_teacher_forced_fused_decoding_equals_the_full_forward(fused, monkeypatch, device, mode, batch, gemv_max,
                                                               expected, cfg):
    monkeypatch.setattr(fs, "GEMV_MAX_BATCH", gemv_max)  # batch 20: two tiles of the batched kernels
    model = tiny_model(seed=3, device=device, **cfg)
    seq = torch.randint(0, 101, (batch, 9), generator=torch.Generator().manual_seed(batch)).to(device)
    with torch.no_grad():
        full = model(seq).logits[:, 2:-1]
    fused(mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fall-back to the eager step would pass unnoticed
        cached = _teacher_forced(model, seq, 3)
    ran = fs.report()["ran"]
    assert any(expected in k for k in ran), ran
    scale = full.abs().max().item()
    assert scale > 1.0
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4 * scale)


def _mamba2_model(device, dtype=torch.float32, **ssm):
    torch.manual_seed(7)
    cfg = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 4, **ssm}
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=101, ssm_cfg=cfg, tie_embeddings=False),
                             initializer_cfg={"initializer_range": 0.5})
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.out_proj.weight.mul_(3.0)
    return model.eval().to(device, dtype)


@pytest.mark.parametrize("ssm", [{}, {"rmsnorm": False, "D_has_hdim": True, "ngroups": 1},
                                 {"d_ssm": 32, "d_state": 5, "conv_bias": False},
                                 {"headdim": 16, "ngroups": 4, "norm_before_gate": True}])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_mamba2_fused_decoding_equals_the_eager_step_and_the_full_forward(fused, device, batch, ssm):
    model = _mamba2_model(device, **ssm)
    seq = torch.randint(0, 101, (batch, 9), generator=torch.Generator().manual_seed(batch)).to(device)
    with torch.no_grad():
        full = model(seq).logits[:, 2:-1]
    fused("0")
    eager = _teacher_forced(model, seq, 3)
    fused("1")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fall-back to the eager step would pass unnoticed
        cached = _teacher_forced(model, seq, 3)
    assert any("mamba2" in k for k in fs.report()["ran"]), fs.report()
    scale = full.abs().max().item()
    assert scale > 1.0
    torch.testing.assert_close(cached, eager, rtol=1e-4, atol=1e-4 * scale)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4 * scale)


def test_mamba2_dispatch_rule(fused):
    model = _mamba2_model("cpu")
    mixer = model.backbone.layers[0].mixer
    h = torch.zeros(2, 1, 32)
    fused("1")
    with torch.no_grad():
        assert fs.mamba2_step_path(mixer, h)
        assert not fs.mamba2_step_path(mixer, h.double())  # float64 stays eager
        assert not fs.mamba2_step_path(mixer, torch.zeros(2, 3, 32))  # not one token
        mixer.dt_limit = (0.0, 0.5)  # the kernel does not clamp dt
        assert not fs.mamba2_step_path(mixer, h)
        mixer.dt_limit = (0.0, float("inf"))
        fused("0")
        assert not fs.mamba2_step_path(mixer, h)
    fused("1")
    assert not fs.mamba2_step_path(mixer, h)  # gradients wanted: the kernels have no backward


def test_dispatch_rule(fused, monkeypatch):
    model = tiny_model(seed=9)
    mixer = model.backbone.layers[0].mixer
    h = lambda batch: torch.zeros(batch, 1, 48)  # noqa: E731
    fused("1")
    with torch.no_grad():
        assert fs.step_path(mixer, h(fs.PARTIALS_MAX_BATCH)) == "partials"
        assert fs.step_path(mixer, h(fs.PARTIALS_MAX_BATCH + 1)) == "gemm"
        assert fs.step_path(mixer, h(1).double()) is None  # float64 stays eager
        assert fs.step_path(mixer, torch.zeros(1, 2, 48)) is None  # not one token
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fs.step_path(mixer, h(1)) is None
        assert fs.block_path(model.backbone.layers[0], h(fs.GEMV_MAX_BATCH), None)
        assert not fs.block_path(model.backbone.layers[0], h(fs.GEMV_MAX_BATCH + 1), None)
    assert fs.step_path(mixer, h(1)) is None  # gradients wanted: the kernels have no backward
    with torch.no_grad():
        fused("partials")
        assert not fs.block_path(model.backbone.layers[0], h(1), None)  # a forced path is that path
        fused("0")
        assert fs.step_path(mixer, h(1)) is None
        fused("gemm")
        assert fs.step_path(mixer, h(1)) == "gemm"
        monkeypatch.setattr(fs, "INTERPRET_ON_CPU", False)
        assert fs.step_path(mixer, h(1)) is None  # CPU tensors: the eager step


@pytest.mark.parametrize("device", DEVICES)
def test_eager_mode_and_wrapped_or_hooked_projections_keep_the_module_step(fused, device):
    model = tiny_model(seed=4, device=device)
    seq = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(4)).to(device)
    fused("0")
    eager = _teacher_forced(model, seq, 3)
    assert fs.report()["ran"] == []
    fused("1")
    mixer = model.backbone.layers[0].mixer

    class Shifted(nn.Module):  # an adapter-like wrapper: dt_proj's output moved by a learned offset
        def __init__(self, base):
            super().__init__()
            self.base, self.weight, self.bias = base, base.weight, base.bias
            self.offset = nn.Parameter(torch.full((base.out_features,), 0.25, device=base.weight.device))

        def forward(self, x):
            return self.base(x) + self.offset

    hidden = torch.zeros(2, 1, 48, device=device)
    mixer.dt_proj = Shifted(mixer.dt_proj)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="runs as a module"):  # the prefill's notice
        assert fs.step_path(mixer, hidden) is None
        wrapped = _teacher_forced(model, seq, 3)
    assert not (wrapped - eager).abs().max() < 1e-3, "the wrapper's offset applies"
    mixer.dt_proj.offset.data.zero_()
    with torch.no_grad():
        torch.testing.assert_close(_teacher_forced(model, seq, 3), eager, rtol=1e-5, atol=1e-5)
    mixer.dt_proj = mixer.dt_proj.base
    handle = mixer.x_proj.register_forward_hook(lambda m, i, o: None)
    with torch.no_grad():
        assert fs.step_path(mixer, hidden) is None
    handle.remove()
    with torch.no_grad():
        assert fs.step_path(mixer, hidden) == "partials"


@pytest.mark.parametrize("device", DEVICES)
def test_a_kernel_failure_warns_once_and_decodes_eagerly(fused, monkeypatch, device):
    model = tiny_model(seed=5, device=device)
    seq = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(5)).to(device)
    fused("0")
    eager = _teacher_forced(model, seq, 2)
    fused("1")

    def broken():
        raise RuntimeError("ptxas fatal: no luck")

    monkeypatch.setattr(ds, "_kernels", broken)
    with pytest.warns(RuntimeWarning, match="ptxas fatal"):
        out = _teacher_forced(model, seq, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per signature
        again = _teacher_forced(model, seq, 2)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
    # batch 1: the gemv path's two signatures (the first block has no residual yet), then the mixer's
    # fused step it falls back to
    assert fs.report()["ran"] == [] and len(fs.report()["failed"]) == 3


@pytest.mark.cuda
@pytest.mark.parametrize("mode,batch", [("1", 1), ("1", 2), ("partials", 1), ("gemm", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_on_the_fused_paths(fused, mode, batch, dtype):
    model = tiny_model(seed=6, device="cuda", dtype=dtype)
    seq = torch.randint(0, 101, (batch, 20), device="cuda")
    fused("0")
    eager = _teacher_forced(model, seq, 4)
    fused(mode)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        graphed = _teacher_forced(model, seq, 4, cg=True)
        plain = _teacher_forced(model, seq, 4)
    assert fs.report()["ran"] and not fs.report()["failed"]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    scale = eager.float().abs().max().item()
    same = 1e-5 if dtype == torch.float32 else 1e-2  # the same kernels; cuBLAS may pick another algorithm
    torch.testing.assert_close(graphed.float(), plain.float(), rtol=0, atol=same * scale)
    torch.testing.assert_close(graphed.float(), eager.float(), rtol=tol, atol=tol * scale)
    if dtype == torch.float32:
        full = model(seq).logits[:, 3:-1]
        torch.testing.assert_close(graphed, full, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_kernels_compile_for_sm90_without_a_gpu(dtype):
    # Triton's bundled ptxas compiles every launch the fused paths make (all constexpr branches) for an
    # H100; in a fresh process, since this one has the interpreter on
    pytest.importorskip("triton")
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this Triton has no NVIDIA backend")
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "tools" / "check_decode_step_compile.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for pdl in ([], ["--pdl"]):  # also as on Hopper: programmatic dependent launch
        proc = subprocess.run([sys.executable, str(script), "--shape", "tiny", "--dtype", dtype, "--batch", "3",
                               "--variants"] + pdl, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [line for line in proc.stdout.splitlines() if " regs " in line]
        assert len(rows) == 18, proc.stdout  # Mamba-1's launches (batch 1 and 3), Mamba-2's state and gated norm
        assert all(" local 0 " in line and " stack 0 " in line for line in rows), proc.stdout  # no spills
        mamba1 = [line for line in rows if not line.startswith(("heads_state_update", "gated_rmsnorm"))]
        assert len(mamba1) == 16 and all((" PDL" in line) == bool(pdl) for line in mamba1), proc.stdout
        assert sum(line.startswith(("norm_in_proj_rows", "gemm_rows")) for line in rows) == 5, proc.stdout
