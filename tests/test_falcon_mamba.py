"""Falcon-Mamba: mamba_inner_fn / mamba_inner_ref with RMS norms of B, C and dt (against a float64
composition written here, values and every gradient), the mixer's paths with them, and transformers'
FalconMambaForCausalLM checkpoints (random, saved by transformers) loaded, decoded, saved back and
LoRA-trained."""
import json

import pytest
import torch
import torch.nn.functional as F

from mamba_ssm.backend import use_backend
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mamba_ssm.modules import fused_step
from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, mamba_inner_ref
from mamba_ssm.utils import compiled_step
from test_mamba_inner import PARAMS, close, make_params

transformers = pytest.importorskip("transformers")

EPS = 1e-3   # large enough that a wrong eps would show


def _rms64(t, w, dim):
    return t * torch.rsqrt(t.pow(2).mean(dim, keepdim=True) + EPS) * w


def composed64(p, rms, dt_where):
    """The inner block in float64, one op at a time, with the norms: rms = dict of b / c / dt weights."""
    q = {k: (v.double() if v is not None else None) for k, v in p.items()}
    w64 = {k: v.double() for k, v in rms.items()}
    xz = q["xz"]
    batch, two_dim, seqlen = xz.shape
    dim = two_dim // 2
    x, z = xz[:, :dim], xz[:, dim:]
    cw = q["conv1d_weight"].reshape(dim, -1)
    width = cw.shape[1]
    xpad = F.pad(x, (width - 1, 0))
    conv = sum(cw[None, :, k, None] * xpad[:, :, k:k + seqlen] for k in range(width)) + q["conv1d_bias"][None, :, None]
    x = conv * torch.sigmoid(conv)
    dt_rank, dstate = q["delta_proj_weight"].shape[1], q["A"].shape[1]
    x_dbl = torch.einsum("bdl,rd->blr", x, q["x_proj_weight"])                  # (b, l, r + 2n)
    dt, B, C = x_dbl[..., :dt_rank], x_dbl[..., dt_rank:dt_rank + dstate], x_dbl[..., -dstate:]
    if dt_where == "before":
        dt = _rms64(dt, w64["dt"], -1)
    delta = torch.einsum("blr,dr->bld", dt, q["delta_proj_weight"])
    if dt_where == "after":
        delta = _rms64(delta, w64["dt"], -1)
    delta = F.softplus(delta + q["delta_bias"]).transpose(1, 2)                # (b, d, l)
    B, C = _rms64(B, w64["b"], -1).transpose(1, 2), _rms64(C, w64["c"], -1).transpose(1, 2)
    h = torch.zeros(batch, dim, dstate, dtype=torch.float64)
    ys = []
    for t in range(seqlen):
        h = torch.exp(delta[:, :, t, None] * q["A"]) * h + (delta[:, :, t] * x[:, :, t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    y = (torch.stack(ys, -1) + q["D"][:, None] * x) * (z * torch.sigmoid(z))
    return torch.einsum("bdl,md->blm", y, q["out_proj_weight"]) + q["out_proj_bias"]


@pytest.mark.parametrize("dt_where", ["before", "after"])
@pytest.mark.parametrize("fn", [mamba_inner_fn, mamba_inner_ref], ids=["fn", "ref"])
def test_inner_fn_with_norms_equals_the_float64_composition(fn, dt_where):
    p = make_params(seqlen=17, dt_rank=3, dstate=6, seed=5)
    g = torch.Generator().manual_seed(2)
    dim, dt_rank = p["delta_proj_weight"].shape
    rms = {"b": 1 + 0.3 * torch.randn(6, generator=g), "c": 1 + 0.3 * torch.randn(6, generator=g),
           "dt": 1 + 0.3 * torch.randn(dt_rank if dt_where == "before" else dim, generator=g)}
    rms = {k: v.requires_grad_() for k, v in rms.items()}
    with use_backend("torch"):
        out = fn(*[p[k] for k in PARAMS], b_rms_weight=rms["b"], c_rms_weight=rms["c"], dt_rms_weight=rms["dt"],
                 b_c_dt_rms_eps=EPS)
    want = composed64(p, rms, dt_where)
    close(out, want, 2e-5, "out")
    w = torch.randn(out.shape, dtype=torch.float64, generator=g)
    leaves = [p[k] for k in PARAMS if p[k] is not None] + list(rms.values())
    got = torch.autograd.grad((out.double() * w).sum(), leaves)
    exp = torch.autograd.grad((want * w).sum(), leaves)
    for i, (a, e) in enumerate(zip(got, exp)):
        close(a, e, 5e-5, f"grad {i}")
    without = make_params(seqlen=17, dt_rank=3, dstate=6, seed=5)
    assert (fn(*[without[k] for k in PARAMS]) - out).abs().max() > 1e-2   # the norms matter


def test_bad_norm_weights_are_named():
    p = make_params()
    args = [p[k] for k in PARAMS]
    with pytest.raises(ValueError, match=r"b_rms_weight must be \(dstate,\) = \(4,\), got \(5,\)"):
        mamba_inner_fn(*args, b_rms_weight=torch.ones(5))
    with pytest.raises(ValueError, match=r"dt_rms_weight must be \(dt_rank,\) = \(2,\) .* or \(dim,\) = \(8,\)"):
        mamba_inner_ref(*args, dt_rms_weight=torch.ones(3))
    q = make_params(given_BC=True)
    with pytest.raises(ValueError, match="c_rms_weight normalises the projected C; it cannot be given with C"):
        mamba_inner_fn(*[q[k] for k in PARAMS], c_rms_weight=torch.ones(4))
    with pytest.raises(ValueError, match="b_c_dt_rms_eps must be None .* or a positive number, got 0"):
        Mamba(16, b_c_dt_rms_eps=0)


def test_mixer_paths_agree_and_the_step_equals_the_forward():
    torch.manual_seed(3)
    m = Mamba(d_model=32, d_state=8, layer_idx=0, b_c_dt_rms_eps=EPS)
    x = torch.randn(2, 9, 32, requires_grad=True)
    outs, grads = [], []
    for fast in (True, False):
        m.use_fast_path = fast
        y = m(x)
        outs.append(y)
        grads.append(torch.autograd.grad(y.pow(2).sum(), [x] + list(m.parameters())))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        from mamba_ssm.utils.generation import InferenceParams
        params = InferenceParams(max_seqlen=9, max_batch_size=2)
        steps = [m(x[:, :4], inference_params=params)]
        params.seqlen_offset = 4
        for t in range(4, 9):
            steps.append(m(x[:, t:t + 1], inference_params=params))
        torch.testing.assert_close(torch.cat(steps, 1), outs[0], rtol=1e-5, atol=1e-5)


def test_fused_step_and_compiled_step_leave_falcon_mamba_to_the_eager_step(monkeypatch):
    # where the fused Triton step would run (CUDA, or the interpreter on a CPU), a mixer with the norms
    # takes the eager step: the kernels have no norms of dt, B and C
    monkeypatch.setattr(fused_step, "INTERPRET_ON_CPU", True)
    monkeypatch.setattr(fused_step, "triton_installed", lambda: True)
    monkeypatch.setattr(fused_step, "MODE", "1")
    hidden = torch.randn(1, 1, 32)
    with torch.no_grad():
        assert fused_step.step_path(Mamba(32, d_state=8), hidden) == "partials"
        assert fused_step.step_path(Mamba(32, d_state=8, b_c_dt_rms_eps=1e-6), hidden) is None
    model = hf_falcon(d_model=32, n_layer=1)
    ours = MambaLMHeadModel(_config_of(model))
    assert compiled_step.unsupported_reason(ours) == "Falcon-Mamba's norms of dt, B and C are not compiled"


def hf_falcon(seed=0, d_model=32, n_layer=2, vocab=97, **kw):
    torch.manual_seed(seed)
    cfg = transformers.FalconMambaConfig(hidden_size=d_model, num_hidden_layers=n_layer, vocab_size=vocab, **kw)
    model = transformers.FalconMambaForCausalLM(cfg).eval()
    with torch.no_grad():   # norms, D and conv bias off their constant init, so that a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D", "conv1d.bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _config_of(hf):
    from mamba_ssm.models.checkpoint import config_from_transformers_dict

    return config_from_transformers_dict(hf.config.to_dict())[0]


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def rel_err(ref, out):
    return ((ref - out).abs().max() / ref.abs().max()).item()


SHAPES = {
    "tied": dict(),
    "untied-eps": dict(tie_word_embeddings=False, mixer_rms_eps=1e-3, state_size=4, expand=3, conv_kernel=3),
    "rank-bias": dict(time_step_rank=5, use_bias=True, use_conv_bias=False, layer_norm_epsilon=1e-4, vocab=100),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_transformers_falcon_mamba_loads_decodes_and_saves_back(tmp_path, shape):
    kw = dict(SHAPES[shape])
    vocab = kw.pop("vocab", 97)
    ref = hf_falcon(vocab=vocab, **kw)
    ref.save_pretrained(tmp_path / "hf")
    model = MambaLMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert model.config.ssm_cfg["b_c_dt_rms_eps"] == kw.get("mixer_rms_eps", 1e-6)
    assert (model.lm_head.weight is model.backbone.embedding.weight) == kw.get("tie_word_embeddings", True)
    ids = torch.randint(0, vocab, (2, 21))
    want = hf_logits(ref, ids)
    with torch.no_grad():
        got = model(ids).logits.float()[..., :vocab]
    assert rel_err(want, got) < 1e-4
    # cached decoding equals the full forward
    out = model.generate(ids[:, :5], max_length=21, teacher_outputs=ids, output_scores=True,
                         return_dict_in_generate=True)
    torch.testing.assert_close(torch.stack(out.scores, 1)[..., :vocab].float(), got[:, 4:20], rtol=1e-4, atol=1e-4)
    # and back into transformers' layout: FalconMambaForCausalLM reads it with the same logits
    model.save_pretrained(tmp_path / "out", layout="transformers")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "falcon_mamba" and cfg["architectures"] == ["FalconMambaForCausalLM"]
    assert cfg["mixer_rms_eps"] == kw.get("mixer_rms_eps", 1e-6)
    back = transformers.FalconMambaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert rel_err(want, hf_logits(back, ids)[..., :vocab]) < 1e-4
    # and in our own layout (ssm_cfg keeps b_c_dt_rms_eps; upstream's config cannot hold another norm eps)
    if "layer_norm_epsilon" in kw:
        with pytest.warns(UserWarning, match="eps"):
            model.save_pretrained(tmp_path / "own")
        return
    model.save_pretrained(tmp_path / "own")
    own = MambaLMHeadModel.from_pretrained(tmp_path / "own").eval()
    assert own.config.ssm_cfg == model.config.ssm_cfg
    with torch.no_grad():
        assert torch.equal(own(ids).logits, model(ids).logits)


def test_lora_step_on_falcon_mamba(tmp_path):
    peft = pytest.importorskip("peft")
    import mambakit  # noqa: F401  (registers PEFT's LoRA with the channel-first projections)

    hf_falcon(seed=1).save_pretrained(tmp_path / "hf")
    model = MambaLMHeadModel.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        base_loss = model(ids, labels=ids).loss
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "x_proj", "dt_proj", "out_proj"])
    lora = peft.get_peft_model(model, cfg)
    lora.train()
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is not None for n, p in lora.named_parameters() if "lora_" in n)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    torch.testing.assert_close(torch.tensor(losses[0]), base_loss, rtol=1e-5, atol=1e-5)  # lora_B starts at zero
    assert losses[-1] < losses[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fused_path_on_the_gpu_agrees_with_the_reference(tmp_path):
    p = make_params(batch=2, d_model=32, dstate=16, dt_rank=4, seqlen=300, seed=7)
    p = {k: (v.detach().cuda().requires_grad_() if v is not None else None) for k, v in p.items()}
    ones = {"b_rms_weight": torch.ones(16, device="cuda"), "c_rms_weight": torch.ones(16, device="cuda"),
            "dt_rms_weight": torch.ones(4, device="cuda"), "b_c_dt_rms_eps": 1e-6}
    args = [p[k] for k in PARAMS]
    out = mamba_inner_fn(*args, **ones)
    ref = mamba_inner_ref(*args, **ones)
    close(out, ref, 1e-4, "out")
    w = torch.randn_like(out)
    leaves = [t for t in args if t is not None]
    for a, b in zip(torch.autograd.grad((out * w).sum(), leaves), torch.autograd.grad((ref * w).sum(), leaves)):
        close(a, b, 1e-3, "grad")
    # the whole model: fused forward against the PyTorch backend, and cached (fused step: eager) decoding
    hf_falcon(seed=2, d_model=64).save_pretrained(tmp_path / "hf")
    model = MambaLMHeadModel.from_pretrained(tmp_path / "hf", device="cuda").eval()
    ids = torch.randint(0, 97, (2, 40), device="cuda")
    with torch.no_grad():
        fused = model(ids).logits
        with use_backend("torch"):
            plain = model(ids).logits
    assert rel_err(plain, fused) < 1e-4
    out = model.generate(ids[:, :8], max_length=40, teacher_outputs=ids, output_scores=True,
                         return_dict_in_generate=True, cg=True)
    assert rel_err(fused[:, 7:39], torch.stack(out.scores, 1)) < 1e-3
