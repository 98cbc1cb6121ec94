"""Mamba-2 checkpoints: transformers' Mamba2ForCausalLM layout both ways (random transformers models as the
oracle, run on transformers' own PyTorch path), upstream's layout bit-exact, and contradicting configs."""
import json

import pytest
import torch

from mamba_ssm import MambaLMHeadModel
from mamba_ssm.models import checkpoint as ckpt
from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.modules.mamba2 import Mamba2
from test_checkpoint import assert_same_state, hf_logits, rel_err

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# transformers Mamba2Config kwargs: groups 1, 2, 4; untied and tied; biases; a dt limit; eps; chunks shorter
# than the test sequences
HF2_SHAPES = {
    "untied-v101-d32-h8x8-g2": dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_heads=8, head_dim=8,
                                    n_groups=2, state_size=8, expand=2, chunk_size=8, tie_word_embeddings=False),
    "tied-v64-d48-h4x24-g4-bias-limit": dict(vocab_size=64, hidden_size=48, num_hidden_layers=2, num_heads=4,
                                             head_dim=24, n_groups=4, state_size=16, expand=2, conv_kernel=3,
                                             use_bias=True, use_conv_bias=False, time_step_limit=(0.01, 0.08),
                                             layer_norm_epsilon=1e-6, residual_in_fp32=False, chunk_size=16,
                                             tie_word_embeddings=True),
    "untied-v50-d64-h16x4-g1": dict(vocab_size=50, hidden_size=64, num_hidden_layers=3, num_heads=16, head_dim=4,
                                    n_groups=1, state_size=4, expand=1, chunk_size=256, tie_word_embeddings=False),
}


def hf2_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**kwargs)).eval()
    with torch.no_grad():   # move norms, D and biases off their constant init so that a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D", "conv1d.bias", "dt_bias")):
                p.add_(0.3 * torch.randn_like(p))
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand_like(p) * 3 + 0.2))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("shape", list(HF2_SHAPES))
def test_transformers_mamba2_checkpoint_loads_with_same_logits(tmp_path, shape):
    kwargs = HF2_SHAPES[shape]
    ref = hf2_model(**kwargs)
    ref.save_pretrained(tmp_path / "hf")
    model = MambaLMHeadModel.from_pretrained(str(tmp_path / "hf"))
    mixer = model.backbone.layers[0].mixer
    assert type(mixer) is Mamba2 and mixer.ngroups == kwargs["n_groups"] and mixer.nheads == kwargs["num_heads"]
    assert mixer.norm.eps == kwargs.get("layer_norm_epsilon", 1e-5)
    assert (model.lm_head.weight is model.backbone.embedding.weight) == kwargs["tie_word_embeddings"]
    vocab = kwargs["vocab_size"]
    ids = torch.randint(0, vocab, (2, 37))
    expected, got = hf_logits(ref, ids), logits(model, ids)
    assert rel_err(expected, got[..., :vocab]) < 1e-4


@pytest.mark.parametrize("shape", list(HF2_SHAPES))
def test_our_transformers_mamba2_layout_loads_in_transformers(tmp_path, shape):
    kwargs = HF2_SHAPES[shape]
    ref = hf2_model(seed=1, **kwargs)
    ref.save_pretrained(tmp_path / "hf")
    model = MambaLMHeadModel.from_pretrained(str(tmp_path / "hf"))
    model.save_pretrained(str(tmp_path / "out"), layout="transformers")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "mamba2" and cfg["architectures"] == ["Mamba2ForCausalLM"]
    reloaded = transformers.Mamba2ForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    for name in ("num_heads", "head_dim", "n_groups", "state_size", "expand", "conv_kernel", "chunk_size",
                 "use_bias", "use_conv_bias", "layer_norm_epsilon", "residual_in_fp32", "tie_word_embeddings"):
        assert getattr(reloaded.config, name) == getattr(ref.config, name), name
    assert tuple(reloaded.config.time_step_limit) == tuple(ref.config.time_step_limit)
    ids = torch.randint(0, kwargs["vocab_size"], (2, 29))
    theirs = hf_logits(reloaded, ids)
    assert rel_err(logits(model, ids), theirs) < 1e-4
    assert rel_err(hf_logits(ref, ids), theirs[..., :kwargs["vocab_size"]]) < 1e-4


def mamba2_config(**ssm):
    cfg = {"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8}
    cfg.update(ssm)
    return MambaConfig(d_model=32, n_layer=2, vocab_size=101, ssm_cfg=cfg, pad_vocab_size_multiple=16)


@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("ssm", [{}, {"D_has_hdim": True, "d_ssm": 32, "norm_before_gate": True}])
def test_upstream_layout_round_trips_bit_exactly(tmp_path, safe, ssm):
    torch.manual_seed(0)
    model = MambaLMHeadModel(mamba2_config(**ssm))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "m", safe_serialization=safe)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["ssm_cfg"]["layer"] == "Mamba2" and "model_type" not in cfg
    if not safe:   # upstream's own loader: torch.load + load_state_dict, keys as upstream's
        state = torch.load(tmp_path / "m" / "pytorch_model.bin", weights_only=True)
        for k in ("in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                  "out_proj.weight"):
            assert f"backbone.layers.1.mixer.{k}" in state
    loaded = MambaLMHeadModel.from_pretrained(tmp_path / "m")
    assert_same_state(model, loaded)
    ids = torch.randint(0, 101, (1, 9))
    assert torch.equal(logits(model, ids), logits(loaded, ids))


def test_in_proj_contradicting_the_config_is_named(tmp_path):
    torch.manual_seed(0)
    MambaLMHeadModel(mamba2_config()).save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["ssm_cfg"]["ngroups"] = 1             # the weights were made with 2 groups
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError) as info:
        MambaLMHeadModel.from_pretrained(tmp_path / "m")
    msg = str(info.value)
    assert "backbone.layers.0.mixer.in_proj.weight: checkpoint shape (168, 32) != model shape (152, 32)" in msg
    assert "2*d_inner + 2*ngroups*d_state + nheads = 2*64 + 2*1*8 + 8" in msg


def test_transformers_mamba2_config_errors(tmp_path):
    ref = hf2_model(**HF2_SHAPES["untied-v101-d32-h8x8-g2"])
    ref.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["num_heads"] = 6
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match=r"num_heads \* head_dim = 6 \* 8 must equal expand \* hidden_size"):
        MambaLMHeadModel.from_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("ssm,match", [
    ({"D_has_hdim": True}, "cannot hold ssm_cfg D_has_hdim=True"),
    ({"d_ssm": 32}, "cannot hold ssm_cfg d_ssm=32"),
    ({"norm_before_gate": True}, "cannot hold ssm_cfg norm_before_gate=True"),
])
def test_transformers_layout_rejects_what_mamba2_for_causal_lm_cannot_hold(tmp_path, ssm, match):
    model = MambaLMHeadModel(mamba2_config(**ssm))
    with pytest.raises(ckpt.CheckpointError, match=match):
        model.save_pretrained(tmp_path / "x", layout="transformers")
