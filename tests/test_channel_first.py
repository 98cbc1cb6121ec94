"""Channel-first projections (mamba_ssm/ops/channel_first.py) against nn.Linear on transposed views:
outputs, every gradient, memory layouts, PEFT LoRA modules, autocast."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mamba_ssm.ops.channel_first as cf
import mambakit  # noqa: F401  (registers PEFT's LoRA with mamba_ssm.ops.adapters)
from mamba_ssm.ops.adapters import AdaptedLinear, LowRankUpdate, register_adapter_resolver, unregister_adapter_resolver
from mamba_ssm.ops.channel_first import channel_first_linear, project
from mambakit.peft_lora import describe_peft_lora


def _inputs(batch, d_in, seqlen, d_out, layout, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    if layout == "cf":
        x = torch.randn(batch, d_in, seqlen, generator=g, dtype=dtype)
    else:  # stored (batch, seqlen, d_in), seen through a transposed view
        x = torch.randn(batch, seqlen, d_in, generator=g, dtype=dtype).transpose(1, 2)
    w = torch.randn(d_out, d_in, generator=g, dtype=dtype)
    b = torch.randn(d_out, generator=g, dtype=dtype)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_()


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("channels_last_out", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("grad_by_rows", [False, True])
def test_matches_linear_on_transposed_view(layout, channels_last_out, with_bias, grad_by_rows, monkeypatch):
    if grad_by_rows:  # the per-row weight gradient used for large (batch, out, in) products
        monkeypatch.setattr(cf, "_BMM_GRAD_LIMIT_BYTES", 0)
    x, w, b = _inputs(3, 5, 7, 4, layout)
    bias = b if with_bias else None
    out = channel_first_linear(x, w, bias, channels_last_out)
    ref = F.linear(x.transpose(1, 2), w, bias).transpose(1, 2)
    assert out.shape == ref.shape == (3, 4, 7)
    torch.testing.assert_close(out, ref)
    stored = out.transpose(1, 2) if channels_last_out else out
    assert stored.is_contiguous(), "the output is not stored in the order asked for"
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [x, w] + ([b] if with_bias else []), g)
    grads_ref = torch.autograd.grad(ref, [x, w] + ([b] if with_bias else []), g)
    for a, r in zip(grads, grads_ref):
        torch.testing.assert_close(a, r)
    # the input's gradient comes back in the input's memory order (no copy for the consumer)
    assert grads[0].stride(1 if layout == "cl" else 2) == 1


def test_empty_batch_and_sequence():
    for shape in ((0, 5, 7), (2, 5, 0)):
        x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        w = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
        out = channel_first_linear(x, w)
        assert out.shape == (shape[0], 4, shape[2])
        gx, gw = torch.autograd.grad(out.sum(), [x, w])
        assert gx.shape == x.shape and torch.count_nonzero(gw) == 0


def test_bad_shapes_and_dtypes_are_named():
    with pytest.raises(ValueError, match=r"x must be \(batch, 5, seqlen\).*\(2, 6, 3\)"):
        channel_first_linear(torch.randn(2, 6, 3), torch.randn(4, 5))
    with pytest.raises(TypeError, match="x is torch.float64 but weight is torch.float32"):
        channel_first_linear(torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(4, 5))


def test_autocast_computes_in_the_autocast_dtype():
    x, w, b = _inputs(2, 8, 6, 4, "cf", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = channel_first_linear(x, w, b)
        ref = F.linear(x.transpose(1, 2), w, b).transpose(1, 2)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


def _lora_module(dropout=0.0, **kw):
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(6, 5, bias=True, dtype=torch.float64)

    torch.manual_seed(0)
    net = peft.get_peft_model(Net(), peft.LoraConfig(r=3, lora_alpha=6, lora_dropout=dropout, target_modules=["proj"],
                                                      **kw))
    for n, p in net.named_parameters():  # B starts at zero in PEFT: make the update visible
        if "lora_B" in n:
            nn.init.normal_(p)
    return net.base_model.model.proj


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last_out", [False, True])
def test_lora_module_matches_peft_forward_and_gradients(bias, channels_last_out):
    m = _lora_module()
    x = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    out = project(m, x, channels_last_out=channels_last_out, bias=bias)
    ref = m(x.transpose(1, 2))
    if not bias:
        ref = ref - m.base_layer.bias
    ref = ref.transpose(1, 2)
    torch.testing.assert_close(out, ref)
    params = [p for p in m.parameters() if p.requires_grad]
    assert len(params) == 2, "expected the two LoRA matrices to be the trainable parameters"
    g = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, [x] + params, g), torch.autograd.grad(ref, [x] + params, g)):
        torch.testing.assert_close(a, r)


def test_lora_merged_or_disabled_is_the_base_layer():
    m = _lora_module()
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    with_adapter = project(m, x)
    m.merge()
    torch.testing.assert_close(project(m, x), with_adapter)
    m.unmerge()
    m.enable_adapters(False)
    torch.testing.assert_close(project(m, x), F.linear(x.transpose(1, 2), m.base_layer.weight,
                                                       m.base_layer.bias).transpose(1, 2))


def test_other_modules_are_called_as_themselves():
    m = _lora_module(use_dora=True)  # a LoRA variant: PEFT's own forward
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    torch.testing.assert_close(project(m, x), m(x.transpose(1, 2)).transpose(1, 2))
    seq = nn.Sequential(nn.Linear(6, 5, dtype=torch.float64), nn.Tanh())
    torch.testing.assert_close(project(seq, x), seq(x.transpose(1, 2)).transpose(1, 2))


def test_lora_dropout_in_training_is_applied():
    m = _lora_module(dropout=0.5)
    m.train()
    x = torch.randn(2, 6, 50, dtype=torch.float64)
    torch.manual_seed(1)
    a = project(m, x)
    torch.manual_seed(2)
    b = project(m, x)
    assert not torch.allclose(a, b), "dropout on the adapter's input had no effect in training"
    m.eval()
    torch.testing.assert_close(project(m, x), m(x.transpose(1, 2)).transpose(1, 2))


def test_autocast_detection_on_torch_before_2_4():
    """torch < 2.4 has is_autocast_enabled() without a device argument and per-device getters."""
    real = torch.is_autocast_enabled

    def old_is_autocast_enabled(*args):
        if args:
            raise TypeError("is_autocast_enabled() takes 0 positional arguments")
        return real("cuda")

    def patched(mp):  # torch.autocast itself calls the new API: patch only around our calls
        mp.setattr(torch, "is_autocast_enabled", old_is_autocast_enabled)
        mp.setattr(torch, "is_autocast_cpu_enabled", lambda: real("cpu"), raising=False)
        mp.setattr(torch, "get_autocast_cpu_dtype", lambda: torch.get_autocast_dtype("cpu"), raising=False)

    with pytest.MonkeyPatch.context() as mp:
        patched(mp)
        assert cf.autocast_dtype("cpu") is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.MonkeyPatch.context() as mp:
            patched(mp)
            assert cf.autocast_dtype("cpu") == torch.bfloat16
            assert cf.autocast_dtype("meta") is None


def test_float64_is_not_cast_by_autocast():
    x, w, b = _inputs(2, 8, 6, 4, "cf", dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = channel_first_linear(x, w, b)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, F.linear(x.transpose(1, 2), w, b).transpose(1, 2))


@pytest.mark.parametrize("lora", [False, True])
def test_hooks_on_projections_still_run(lora):
    """Forward hooks (activation capture, patching) on a projection see its input and can change its
    output, as with a module call: project() then calls the module itself."""
    from mamba_ssm.modules.mamba_simple import Mamba

    torch.manual_seed(0)
    m = Mamba(d_model=16, layer_idx=0, dtype=torch.float64)
    if lora:
        peft = pytest.importorskip("peft")
        m = peft.get_peft_model(m, peft.LoraConfig(r=2, target_modules=["in_proj", "out_proj"])).base_model.model
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    y0 = m(x)
    seen = []
    h1 = m.in_proj.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    h2 = m.out_proj.register_forward_hook(lambda mod, inp, out: out * 0)
    y1 = m(x)
    h1.remove()
    h2.remove()
    assert seen == [(2, 7, 16)], "the in_proj hook did not see the (batch, seqlen, d_model) input"
    assert torch.count_nonzero(y1) == 0 and torch.count_nonzero(y0) > 0
    torch.testing.assert_close(m(x), y0)  # hooks removed: the channel-first path again


@pytest.mark.parametrize("x_channels_last", [False, True])
@pytest.mark.parametrize("channels_last_out", [False, True])
@pytest.mark.parametrize("base_trainable", [False, True])
def test_fused_lora_matches_peft_in_every_layout(x_channels_last, channels_last_out, base_trainable):
    """One adapter without dropout runs as one fused Function (two GEMMs into one output, and the
    input gradient summed the same way): output and every gradient against PEFT's own forward."""
    m = _lora_module()
    m.base_layer.weight.requires_grad_(base_trainable)
    m.base_layer.bias.requires_grad_(base_trainable)
    if x_channels_last:  # stored (batch, seqlen, in), as out_proj's input can be
        x = torch.randn(2, 9, 6, dtype=torch.float64).transpose(1, 2).requires_grad_()
    else:
        x = torch.randn(2, 6, 9, dtype=torch.float64, requires_grad=True)
    out = project(m, x, channels_last_out=channels_last_out)
    assert "ChannelFirstLoRA" in type(out.grad_fn).__name__
    assert (out.stride(1) == 1) == channels_last_out
    ref = m(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    params = [p for p in m.parameters() if p.requires_grad]
    assert len(params) == (4 if base_trainable else 2)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, [x] + params, g)
    assert grads[0].stride() == x.stride(), "the input gradient should keep the input's memory order"
    for a, r in zip(grads, torch.autograd.grad(ref, [x] + params, g)):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("x_channels_last", [False, True])
def test_fused_lora_with_dropout_matches_the_masked_computation(x_channels_last, device):
    """In training, dropout on the adapter's input: the output and every gradient equal PEFT's
    arithmetic, base(x) + scaling * B(A(x * keep / (1 - p))), with the mask the fused path drew
    (read back from what it saved for the backward: a bool mask on CUDA, a scaled one on a CPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    m = _lora_module(dropout=0.3)
    m.to(device)
    m.train()
    if x_channels_last:
        x = torch.randn(2, 40, 6, dtype=torch.float64, device=device).transpose(1, 2).requires_grad_()
    else:
        x = torch.randn(2, 6, 40, dtype=torch.float64, device=device, requires_grad=True)
    out = project(m, x)
    assert "ChannelFirstLoRA" in type(out.grad_fn).__name__
    mask = out.grad_fn.saved_tensors[-1]
    scaled = mask.double() / 0.7 if mask.dtype == torch.bool else mask
    kept = scaled != 0
    assert 0 < kept.sum() < kept.numel(), "the mask should drop some inputs and keep others"
    torch.testing.assert_close(scaled[kept], torch.full_like(scaled[kept], 1 / 0.7))
    xt = x.transpose(1, 2)
    a, b = m.lora_A["default"], m.lora_B["default"]
    ref = m.base_layer(xt) + m.scaling["default"] * b(a(xt * scaled.transpose(1, 2)))
    ref = ref.transpose(1, 2)
    torch.testing.assert_close(out, ref)
    params = [p for p in m.parameters() if p.requires_grad]
    g = torch.randn_like(ref)
    for got, want in zip(torch.autograd.grad(out, [x] + params, g), torch.autograd.grad(ref, [x] + params, g)):
        torch.testing.assert_close(got, want)


def test_lora_adapter_in_another_dtype_keeps_peft_semantics():
    """Outside autocast an adapter in another dtype than the base computes in its own dtype, as in
    PEFT: the general path, not the fused one."""
    m = _lora_module()
    m.base_layer.to(torch.float32)
    x32 = torch.randn(2, 6, 9)
    out = project(m, x32)  # adapter in float64, as PEFT computes it, then cast back
    assert "ChannelFirstLoRA" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, m(x32.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapters_on_a_16bit_base_take_the_fused_path(base_dtype):
    """PEFT's default setup without autocast (a bf16 model, adapters upcast to fp32): fused, as
    under autocast, within 16-bit rounding of PEFT's fp32 adapter computation."""
    m = _lora_module()
    m.base_layer.to(base_dtype)
    m.lora_A.to(torch.float32)
    m.lora_B.to(torch.float32)
    x = torch.randn(2, 6, 40, dtype=base_dtype, requires_grad=True)
    out = project(m, x)
    ref = m(x.transpose(1, 2)).transpose(1, 2)
    assert out.dtype == ref.dtype == base_dtype
    assert "ChannelFirstLoRA" in type(out.grad_fn).__name__
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    params = [p for p in m.parameters() if p.requires_grad]
    g = torch.randn(ref.shape, dtype=base_dtype)
    for a, r in zip(torch.autograd.grad(out, [x] + params, g), torch.autograd.grad(ref, [x] + params, g)):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a.float(), r.float(), rtol=3e-2, atol=3e-2 * (r.abs().max().item() + 1))


def test_fused_lora_under_autocast():
    m = _lora_module()
    m.to(torch.float32)
    x = torch.randn(2, 6, 40, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = project(m, x)
        ref = m(x.transpose(1, 2)).transpose(1, 2)
    assert out.dtype == ref.dtype == torch.bfloat16
    assert "ChannelFirstLoRA" in type(out.grad_fn).__name__
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    params = [p for p in m.parameters() if p.requires_grad]
    g = torch.randn(ref.shape)
    for a, r in zip(torch.autograd.grad(out, [x] + params, g.bfloat16()),
                    torch.autograd.grad(ref, [x] + params, g.bfloat16())):
        assert a.dtype == r.dtype
        torch.testing.assert_close(a.float(), r.float(), rtol=3e-2, atol=3e-2 * (r.abs().max().item() + 1))


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last_out", [False, True])
def test_fused_lora_on_gpu(channels_last_out):
    """cuBLAS accumulating into the output (beta=1) on a GPU, bf16 autocast as in training."""
    m = _lora_module()
    m.to("cuda", torch.float32)
    x = torch.randn(3, 6, 300, device="cuda", requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = project(m, x, channels_last_out=channels_last_out)
    assert "ChannelFirstLoRA" in type(out.grad_fn).__name__
    ref = m(x.transpose(1, 2)).transpose(1, 2)  # float32 reference
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    params = [p for p in m.parameters() if p.requires_grad]
    g = torch.randn(ref.shape, device="cuda")
    for a, r in zip(torch.autograd.grad(out, [x] + params, g.bfloat16()), torch.autograd.grad(ref, [x] + params, g)):
        torch.testing.assert_close(a.float(), r, rtol=3e-2, atol=3e-2 * (r.abs().max().item() + 1))


def test_an_undescribed_adapter_runs_as_a_module_and_warns_once(monkeypatch):
    """Without the PEFT resolver, mamba_ssm knows nothing of PEFT: the wrapper runs its own forward
    (same numbers) and the fall-back is named once, not silent."""
    m = _lora_module()
    x = torch.randn(2, 6, 4, dtype=torch.float64)
    fast = project(m, x)
    unregister_adapter_resolver(describe_peft_lora)
    monkeypatch.setattr(cf, "_warned_types", set())
    try:
        with pytest.warns(RuntimeWarning, match="no registered resolver describes it"):
            slow = project(m, x)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            project(m, x)  # once per type
    finally:
        register_adapter_resolver(describe_peft_lora)
    torch.testing.assert_close(slow, fast)
    torch.testing.assert_close(slow, m(x.transpose(1, 2)).transpose(1, 2))


def test_any_library_can_register_its_adapter():
    """A resolver written for another adapter class puts it on the fused channel-first path."""

    class MyLoRA(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(6, 5, dtype=torch.float64)
            self.down = nn.Linear(6, 2, bias=False, dtype=torch.float64)
            self.up = nn.Linear(2, 5, bias=False, dtype=torch.float64)
            nn.init.normal_(self.up.weight)

        def forward(self, x):
            return self.base(x) + 0.5 * self.up(self.down(x))

    def resolver(module):
        if not isinstance(module, MyLoRA):
            return None
        return AdaptedLinear(module.base, (LowRankUpdate(module.down, module.up, 0.5, nn.Identity()),))

    m = MyLoRA()
    x = torch.randn(2, 6, 7, dtype=torch.float64, requires_grad=True)
    register_adapter_resolver(resolver)
    try:
        out = project(m, x)
    finally:
        unregister_adapter_resolver(resolver)
    assert "ChannelFirstLoRA" in type(out.grad_fn).__name__
    ref = m(x.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(ref)
    params = [x, m.down.weight, m.up.weight, m.base.weight]
    for a, r in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, r)


def test_mamba_ssm_reads_no_peft_attribute():
    """The model package is decoupled from PEFT: no PEFT attribute names in its source."""
    import pathlib

    import mamba_ssm

    root = pathlib.Path(mamba_ssm.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        for name in ("lora_A", "lora_B", "lora_dropout", "lora_variant", "active_adapters", "base_layer", "use_dora"):
            assert name not in text, f"{path.relative_to(root)} reads PEFT's {name}"
