"""Checkpoints: upstream's and transformers' layouts, both directions, and the errors on bad input.

Everything is local: HF_HUB_OFFLINE is set, and the hub-id tests forbid sockets outright.
"""
import importlib.util
import json
import os
import socket
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from mamba_ssm import MambaLMHeadModel
from mamba_ssm.models import checkpoint as ckpt
from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.utils.hf import load_config_hf, load_state_dict_hf

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# (transformers config kwargs): d_state != 16, tied and untied, vocabularies not multiples of 8,
# biases, a non-default time_step_rank, eps and residual_in_fp32.
HF_SHAPES = {
    "tied-v101-d32-n8": dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                             tie_word_embeddings=True),
    "untied-v64-d48-n16-bias": dict(vocab_size=64, hidden_size=48, num_hidden_layers=2, state_size=16, expand=2,
                                    conv_kernel=3, time_step_rank=5, use_bias=True, use_conv_bias=False,
                                    tie_word_embeddings=False),
    "tied-v50-d64-n4-eps": dict(vocab_size=50, hidden_size=64, num_hidden_layers=2, state_size=4, expand=1,
                                layer_norm_epsilon=1e-6, residual_in_fp32=False, tie_word_embeddings=True),
}


def rel_err(ref, out):
    return ((ref - out).abs().max() / ref.abs().max()).item()


def _transformers_torch_path():
    """transformers' Mamba modeling module, running its own PyTorch code.

    On import, transformers' modeling_mamba binds selective_scan_fn, mamba_inner_fn and selective_state_update
    from whatever `mamba_ssm` is installed, which here is this package: its "reference" would be us. So a
    private copy of the module is imported while `mamba_ssm` is hidden, and the comparisons use that copy.
    """
    import transformers.models.mamba as package

    name = "transformers.models.mamba._modeling_mamba_torch_path"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(package.__file__),
                                                                     "modeling_mamba.py"))
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("mamba_ssm")
    sys.modules["mamba_ssm"] = None           # import mamba_ssm -> ImportError while the copy is built
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.modules["mamba_ssm"] = saved
    return module


HF = _transformers_torch_path()
_OUR_DIR = os.path.dirname(os.path.dirname(os.path.abspath(ckpt.__file__)))


def hf_logits(model, ids):
    """transformers' logits, checking that no code of this package ran to compute them."""
    ours_called = []

    def profiler(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(_OUR_DIR):
            ours_called.append(frame.f_code.co_name)

    sys.setprofile(profiler)
    try:
        with torch.no_grad():
            out = model(ids).logits.float()
    finally:
        sys.setprofile(None)
    assert not ours_called, f"transformers' reference ran mamba_ssm code: {sorted(set(ours_called))}"
    return out


def hf_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = HF.MambaForCausalLM(transformers.MambaConfig(**kwargs)).eval()
    with torch.no_grad():   # move norms and D off their constant init so that a mix-up would show
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")) or name.endswith("conv1d.bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def tiny_config(**kwargs):
    base = dict(d_model=32, n_layer=2, vocab_size=101, ssm_cfg={"d_state": 8}, rms_norm=True,
                residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True)
    base.update(kwargs)
    return MambaConfig(**base)


def ours(seed=0, dtype=None, **kwargs):
    torch.manual_seed(seed)
    model = MambaLMHeadModel(tiny_config(**kwargs), dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------------------------------
# (a), (b) transformers' layout
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", list(HF_SHAPES))
def test_transformers_checkpoint_loads_with_same_logits(tmp_path, shape):
    kwargs = HF_SHAPES[shape]
    ref = hf_model(**kwargs)
    ref.save_pretrained(tmp_path / "hf")
    model = MambaLMHeadModel.from_pretrained(str(tmp_path / "hf"))
    vocab = kwargs["vocab_size"]
    assert model.config.vocab_size == vocab
    assert model.backbone.embedding.weight.shape[0] == -(-vocab // 8) * 8
    assert (model.lm_head.weight is model.backbone.embedding.weight) == kwargs["tie_word_embeddings"]
    # rows beyond the checkpoint's vocabulary are zero-padded
    assert torch.count_nonzero(model.backbone.embedding.weight[vocab:]) == 0
    ids = torch.randint(0, vocab, (2, 23))
    expected, got = hf_logits(ref, ids), logits(model, ids)
    assert got.shape[-1] >= vocab
    assert rel_err(expected, got[..., :vocab]) < 1e-4


@pytest.mark.parametrize("shape", list(HF_SHAPES))
def test_our_transformers_layout_save_loads_in_transformers(tmp_path, shape):
    kwargs = HF_SHAPES[shape]
    ref = hf_model(seed=1, **kwargs)
    ref.save_pretrained(tmp_path / "hf")
    model = MambaLMHeadModel.from_pretrained(str(tmp_path / "hf"))
    model.save_pretrained(str(tmp_path / "out"), layout="transformers")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "mamba" and cfg["architectures"] == ["MambaForCausalLM"]
    reloaded = HF.MambaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    assert reloaded.config.vocab_size == model.backbone.embedding.weight.shape[0]
    for name in ("state_size", "expand", "conv_kernel", "time_step_rank", "use_bias", "use_conv_bias",
                 "layer_norm_epsilon", "residual_in_fp32", "tie_word_embeddings"):
        assert getattr(reloaded.config, name) == getattr(ref.config, name), name
    ids = torch.randint(0, kwargs["vocab_size"], (2, 19))
    ours_logits, theirs = logits(model, ids), hf_logits(reloaded, ids)
    assert ours_logits.shape == theirs.shape
    assert rel_err(ours_logits, theirs) < 1e-4
    assert rel_err(hf_logits(ref, ids), theirs[..., :kwargs["vocab_size"]]) < 1e-4


def test_bare_backbone_layout_loads_as_the_same_model(tmp_path):
    """transformers' MambaModel (no LM head) saves its keys without the `backbone.` prefix:
    embeddings.weight, layers.{i}.*, norm_f.weight. Its checkpoint is the full model's, head tied."""
    kwargs = HF_SHAPES["tied-v101-d32-n8"]
    ref = hf_model(seed=4, **kwargs)
    ref.save_pretrained(tmp_path / "full")
    ref.backbone.save_pretrained(tmp_path / "bare")
    bare = safetensors_torch.load_file(str(tmp_path / "bare" / "model.safetensors"))
    assert "norm_f.weight" in bare and "embeddings.weight" in bare and "layers.1.mixer.D" in bare
    assert not any(k.startswith(("backbone.", "lm_head.")) for k in bare)
    # the key conversion: every bare key gets the prefix, embeddings -> embedding
    converted = ckpt.state_dict_from_transformers(bare)
    full = ours(vocab_size=kwargs["vocab_size"], d_model=32, ssm_cfg={"d_state": 8}).state_dict()
    assert set(converted) == set(full) - {"lm_head.weight"}
    assert converted["backbone.norm_f.weight"] is bare["norm_f.weight"]
    assert converted["backbone.embedding.weight"] is bare["embeddings.weight"]
    # the files: the same model as from the full checkpoint, norm_f included
    want = MambaLMHeadModel.from_pretrained(str(tmp_path / "full"))
    model = MambaLMHeadModel.from_pretrained(str(tmp_path / "bare"))
    assert_same_state(want, model)
    assert torch.equal(model.backbone.norm_f.weight, ref.backbone.norm_f.weight)
    ids = torch.randint(0, kwargs["vocab_size"], (2, 11))
    assert torch.equal(logits(model, ids), logits(want, ids))
    assert rel_err(hf_logits(ref, ids), logits(model, ids)[..., :kwargs["vocab_size"]]) < 1e-4


def test_fresh_model_saved_in_transformers_layout(tmp_path):
    model = ours(seed=3, vocab_size=96, ssm_cfg={"d_state": 12, "d_conv": 3, "dt_rank": 3})
    model.save_pretrained(tmp_path / "out", layout="transformers", safe_serialization=False)
    assert (tmp_path / "out" / "pytorch_model.bin").exists()
    reloaded = HF.MambaForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = torch.randint(0, 96, (1, 9))
    assert rel_err(logits(model, ids), hf_logits(reloaded, ids)) < 1e-4
    # and back into ours: same tensors
    back = MambaLMHeadModel.from_pretrained(tmp_path / "out")
    assert_same_state(model, back)


def test_transformers_layout_rejects_what_it_cannot_hold(tmp_path):
    model = ours(rms_norm=False)
    with pytest.raises(ckpt.CheckpointError, match="RMSNorm"):
        model.save_pretrained(tmp_path / "x", layout="transformers")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="layout"):
        ours().save_pretrained(tmp_path / "y", layout="keras")


# ---------------------------------------------------------------------------------------------------
# (c) our layout round trip
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("safe", [True, False])
@pytest.mark.parametrize("tie", [True, False])
def test_own_layout_round_trip_bit_exact(tmp_path, safe, tie):
    model = ours(seed=4, tie_embeddings=tie)
    model.save_pretrained(str(tmp_path / "ck"), safe_serialization=safe)
    (tmp_path / "plain").mkdir()
    assert (tmp_path / "ck").stat().st_mode == (tmp_path / "plain").stat().st_mode   # usual permissions
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == sorted(["config.json", "model.safetensors" if safe else "pytorch_model.bin"])
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert set(cfg) == {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                        "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                        "tie_embeddings"}
    back = MambaLMHeadModel.from_pretrained(str(tmp_path / "ck"))
    assert back.config == model.config
    assert_same_state(model, back)
    assert (back.lm_head.weight is back.backbone.embedding.weight) == tie
    assert back.backbone.layers[0].mixer.A_log._no_weight_decay        # parameter tags survive loading
    ids = torch.randint(0, 101, (2, 11))
    assert torch.equal(logits(model, ids), logits(back, ids))
    if safe:
        with safetensors_torch.safe_open(str(tmp_path / "ck" / "model.safetensors"), "pt") as f:
            assert ("lm_head.weight" in f.keys()) == (not tie)     # a tied head is stored once


def test_large_model_route_skips_random_init(tmp_path, monkeypatch):
    """Big models are built on the meta device and filled from the checkpoint: same result, ties and tags kept."""
    model = ours(seed=17)
    model.save_pretrained(tmp_path / "ck")
    monkeypatch.setattr(ckpt, "META_INIT_MIN_PARAMS", 0)
    back = MambaLMHeadModel.from_pretrained(tmp_path / "ck")
    assert all(p.device.type == "cpu" for p in back.parameters())
    assert back.lm_head.weight is back.backbone.embedding.weight
    assert back.backbone.layers[1].mixer.D._no_weight_decay
    assert_same_state(model, back)
    ids = torch.randint(0, 101, (1, 5))
    assert torch.equal(logits(model, ids), logits(back, ids))


def test_bin_save_is_readable_by_upstreams_loader(tmp_path):
    """Upstream 2.x: MambaConfig(**json.load(config)); cls(config).load_state_dict(torch.load(bin))."""
    model = ours(seed=5)
    model.save_pretrained(tmp_path / "ck", safe_serialization=False)
    config = MambaConfig(**json.loads((tmp_path / "ck" / "config.json").read_text()))
    state = torch.load(tmp_path / "ck" / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" in state and "backbone.embedding.weight" in state
    upstream_style = MambaLMHeadModel(config)
    upstream_style.load_state_dict(state)            # strict
    assert_same_state(model, upstream_style)


def test_bf16_round_trip_bit_exact(tmp_path):
    model = ours(seed=6, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "ck")
    back = MambaLMHeadModel.from_pretrained(tmp_path / "ck", dtype=torch.bfloat16)
    assert_same_state(model, back)


def test_save_into_existing_directory_replaces_weights_and_keeps_other_files(tmp_path):
    target = tmp_path / "ck"
    ours(seed=7).save_pretrained(target, safe_serialization=False)
    (target / "tokenizer.json").write_text("{}")
    model = ours(seed=8)
    model.save_pretrained(target)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert_same_state(model, MambaLMHeadModel.from_pretrained(target))
    assert os.listdir(tmp_path) == ["ck"]                 # no temporary directory left behind


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch as st

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ours().save_pretrained(tmp_path / "ck")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# (d) upstream-style directory, vocabulary padding
# ---------------------------------------------------------------------------------------------------

def test_upstream_directory_with_bin_holding_both_keys(tmp_path):
    src = ours(seed=9, vocab_size=100)          # padded to 104 rows
    d = tmp_path / "upstream"
    d.mkdir()
    # An older upstream config.json: no d_intermediate / attn fields / tie_embeddings.
    (d / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 2, "vocab_size": 100,
                                               "ssm_cfg": {"d_state": 8}, "rms_norm": True,
                                               "residual_in_fp32": True, "fused_add_norm": True,
                                               "pad_vocab_size_multiple": 8}))
    state = src.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["backbone.embedding.weight"].data_ptr()
    torch.save(state, d / "pytorch_model.bin")
    model = MambaLMHeadModel.from_pretrained(str(d))
    assert model.config.vocab_size == 100 and model.config.tie_embeddings
    assert model.lm_head.weight is model.backbone.embedding.weight
    assert_same_state(src, model)
    ids = torch.randint(0, 100, (1, 13))
    assert torch.equal(logits(src, ids), logits(model, ids))
    assert load_config_hf(str(d)) == json.loads((d / "config.json").read_text())
    sd = load_state_dict_hf(str(d), dtype=torch.bfloat16)
    assert sd.keys() == state.keys() and sd["backbone.norm_f.weight"].dtype == torch.bfloat16


def test_upstream_checkpoint_with_unpadded_embedding_is_zero_padded(tmp_path):
    src = ours(seed=10, vocab_size=101)
    state = {k: v.clone() for k, v in src.state_dict().items()}
    state["backbone.embedding.weight"] = state["backbone.embedding.weight"][:101].clone()
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    d = tmp_path / "ck"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(ckpt.config_to_mamba_ssm_dict(src.config)))
    torch.save(state, d / "pytorch_model.bin")
    model = MambaLMHeadModel.from_pretrained(d)
    emb = model.backbone.embedding.weight
    assert emb.shape[0] == 104
    assert torch.equal(emb[:101], state["backbone.embedding.weight"]) and torch.count_nonzero(emb[101:]) == 0


def test_safetensors_preferred_over_bin(tmp_path):
    a, b = ours(seed=11), ours(seed=12)
    a.save_pretrained(tmp_path / "ck")
    torch.save(b.state_dict(), tmp_path / "ck" / "pytorch_model.bin")
    assert_same_state(a, MambaLMHeadModel.from_pretrained(tmp_path / "ck"))


# ---------------------------------------------------------------------------------------------------
# (e) sharded checkpoints
# ---------------------------------------------------------------------------------------------------

def test_sharded_safetensors_from_transformers(tmp_path):
    kwargs = HF_SHAPES["untied-v64-d48-n16-bias"]
    ref = hf_model(seed=13, **kwargs)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    names = os.listdir(tmp_path / "hf")
    assert "model.safetensors.index.json" in names and sum(n.endswith(".safetensors") for n in names) > 1
    model = MambaLMHeadModel.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, 64, (2, 9))
    assert rel_err(hf_logits(ref, ids), logits(model, ids)[..., :64]) < 1e-4


def test_sharded_bin_with_index(tmp_path):
    src = ours(seed=14)
    state = src.state_dict()
    keys = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    d = tmp_path / "ck"
    d.mkdir()
    for name, ks in shards.items():
        torch.save({k: state[k].clone() for k in ks}, d / name)
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, ks in shards.items() for k in ks}}))
    (d / "config.json").write_text(json.dumps(ckpt.config_to_mamba_ssm_dict(src.config)))
    assert_same_state(src, MambaLMHeadModel.from_pretrained(d))


# ---------------------------------------------------------------------------------------------------
# (f) dtype and device
# ---------------------------------------------------------------------------------------------------

def test_dtype_bf16_honoured(tmp_path):
    kwargs = HF_SHAPES["tied-v101-d32-n8"]
    ref = hf_model(seed=15, **kwargs)
    ref.save_pretrained(tmp_path / "hf")
    model = MambaLMHeadModel.from_pretrained(tmp_path / "hf", device="cpu", dtype=torch.bfloat16)
    hf_sd = ref.state_dict()
    for name, p in model.named_parameters():
        assert p.device.type == "cpu"
        if name.endswith(("A_log", ".D")):
            # the mixer keeps A_log and D in fp32 whatever the dtype: loaded without rounding
            assert p.dtype == torch.float32
            assert torch.equal(p, hf_sd[name])
        else:
            assert p.dtype == torch.bfloat16, name
    emb = model.backbone.embedding.weight
    assert torch.equal(emb[:101], hf_sd["backbone.embeddings.weight"].to(torch.bfloat16))
    ids = torch.randint(0, 101, (1, 7))
    out = logits(model, ids)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert rel_err(hf_logits(ref, ids), out[..., :101]) < 5e-2


# ---------------------------------------------------------------------------------------------------
# (g) bad input
# ---------------------------------------------------------------------------------------------------

def saved(tmp_path, **kwargs):
    model = ours(**kwargs)
    model.save_pretrained(tmp_path / "ck")
    return tmp_path / "ck"


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        MambaLMHeadModel.from_pretrained(str(missing))
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        MambaLMHeadModel.from_pretrained("./does-not-exist")


def test_directory_without_weights_or_config(tmp_path):
    d = saved(tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights found"):
        MambaLMHeadModel.from_pretrained(d)
    os.remove(d / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        MambaLMHeadModel.from_pretrained(d)


@pytest.mark.parametrize("keep", [0.5, 0.999, 4])
def test_truncated_safetensors_names_the_file(tmp_path, keep):
    d = saved(tmp_path)
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt") as info:
        MambaLMHeadModel.from_pretrained(d)
    assert str(path) in str(info.value)


def test_corrupt_bin_names_the_file(tmp_path):
    d = tmp_path / "ck"
    ours().save_pretrained(d, safe_serialization=False)
    path = d / "pytorch_model.bin"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt") as info:
        MambaLMHeadModel.from_pretrained(d)
    assert str(path) in str(info.value)


class NotATensor:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    d = saved(tmp_path)
    os.remove(d / "model.safetensors")
    state = ours().state_dict()
    state["backbone.norm_f.weight"] = NotATensor()
    torch.save(state, d / "pytorch_model.bin")
    with pytest.raises(ckpt.CheckpointError, match="refusing"):
        MambaLMHeadModel.from_pretrained(d)
    assert "this must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("field", ["d_model", "n_layer", "vocab_size"])
def test_config_missing_field_named(tmp_path, field):
    d = saved(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    del cfg[field]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match=f"missing required field.*'{field}'"):
        MambaLMHeadModel.from_pretrained(d)


def test_transformers_config_missing_field_named(tmp_path):
    ref = hf_model(**HF_SHAPES["tied-v101-d32-n8"])
    ref.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match="'num_hidden_layers'"):
        MambaLMHeadModel.from_pretrained(tmp_path / "hf")


@pytest.mark.parametrize("config, match", [
    ({"model_type": "mamba3", "hidden_size": 32}, "model_type 'mamba3' is not supported"),
    ({"hello": 1}, "cannot tell the checkpoint layout"),
    ({"model_type": "mamba", "num_hidden_layers": 2, "vocab_size": 10}, "missing required field.*hidden_size"),
    ({"d_model": "32", "n_layer": 2, "vocab_size": 10}, "'d_model' must be a positive integer"),
])
def test_unusable_configs(tmp_path, config, match):
    d = saved(tmp_path)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(ckpt.CheckpointError, match=match):
        MambaLMHeadModel.from_pretrained(d)


def test_misshaped_tensor_names_key_and_both_shapes(tmp_path):
    d = saved(tmp_path)
    state = safetensors_torch.load_file(str(d / "model.safetensors"))
    state["backbone.layers.1.mixer.x_proj.weight"] = torch.zeros(5, 64)
    safetensors_torch.save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError) as info:
        MambaLMHeadModel.from_pretrained(d)
    msg = str(info.value)
    assert "backbone.layers.1.mixer.x_proj.weight" in msg and "(5, 64)" in msg and "(18, 64)" in msg


def test_missing_tensor_named(tmp_path):
    d = saved(tmp_path)
    state = safetensors_torch.load_file(str(d / "model.safetensors"))
    del state["backbone.layers.0.mixer.D"]
    safetensors_torch.save_file(state, str(d / "model.safetensors"))
    match = r"missing tensor backbone\.layers\.0\.mixer\.D \(model shape \(64,\)\)"
    with pytest.raises(ckpt.CheckpointError, match=match):
        MambaLMHeadModel.from_pretrained(d)


def test_untied_model_needs_lm_head(tmp_path):
    d = saved(tmp_path, tie_embeddings=True)
    cfg = json.loads((d / "config.json").read_text())
    cfg["tie_embeddings"] = False
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match="missing tensor lm_head.weight"):
        MambaLMHeadModel.from_pretrained(d)


def test_unexpected_tensor_named(tmp_path):
    d = saved(tmp_path)
    state = safetensors_torch.load_file(str(d / "model.safetensors"))
    state["backbone.layers.2.mixer.D"] = torch.ones(64)
    safetensors_torch.save_file(state, str(d / "model.safetensors"))
    with pytest.raises(ckpt.CheckpointError, match=r"unexpected.*backbone\.layers\.2\.mixer\.D"):
        MambaLMHeadModel.from_pretrained(d)


# ---------------------------------------------------------------------------------------------------
# (h) hub ids, offline
# ---------------------------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    return cache


def test_hub_id_offline_clear_error(no_network):
    for call in (lambda: MambaLMHeadModel.from_pretrained("state-spaces/mamba-130m", cache_dir=str(no_network)),
                 lambda: load_config_hf("state-spaces/mamba-130m", cache_dir=str(no_network)),
                 lambda: load_state_dict_hf("state-spaces/mamba-130m", cache_dir=str(no_network))):
        with pytest.raises(FileNotFoundError) as info:
            call()
        msg = str(info.value)
        assert "state-spaces/mamba-130m" in msg and "HF_HUB_OFFLINE" in msg and "config.json" in msg


def test_hub_id_offline_from_local_cache(no_network, tmp_path):
    """A model already in the Hugging Face cache loads offline through the hub-id path."""
    model = ours(seed=16)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = no_network / "models--someone--tiny-mamba"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    model.save_pretrained(repo / "snapshots" / commit)
    back = MambaLMHeadModel.from_pretrained("someone/tiny-mamba", cache_dir=str(no_network))
    assert_same_state(model, back)
    assert load_config_hf("someone/tiny-mamba", cache_dir=str(no_network))["d_model"] == 32
    # weights not in the cache: a clear error, still without any connection
    os.remove(repo / "snapshots" / commit / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no weights found"):
        MambaLMHeadModel.from_pretrained("someone/tiny-mamba", cache_dir=str(no_network))


def test_load_hf_helpers_on_transformers_layout(tmp_path):
    ref = hf_model(**HF_SHAPES["tied-v101-d32-n8"])
    ref.save_pretrained(tmp_path / "hf")
    cfg = load_config_hf(str(tmp_path / "hf"))
    config = MambaConfig(**cfg)
    assert config.d_model == 32 and config.n_layer == 2 and config.vocab_size == 101
    assert config.ssm_cfg == {"d_state": 8}
    state = load_state_dict_hf(str(tmp_path / "hf"))
    assert state["lm_head.weight"] is state["backbone.embedding.weight"]
    assert "backbone.embeddings.weight" not in state


def test_hub_id_online_path_with_a_stub_hub(tmp_path, monkeypatch):
    """The hub route (online): files fetched one by one, absent ones skipped, shards followed, options passed."""
    import huggingface_hub
    import huggingface_hub.constants as hub_constants
    from huggingface_hub.errors import EntryNotFoundError

    ref = hf_model(seed=18, **HF_SHAPES["untied-v64-d48-n16-bias"])
    repo = tmp_path / "repo"
    ref.save_pretrained(repo, max_shard_size="40KB")
    fetched = []

    def fake_download(repo_id, filename, **options):
        assert repo_id == "someone/sharded" and options.get("revision") == "v1"
        fetched.append(filename)
        if not (repo / filename).exists():
            raise EntryNotFoundError(f"404: {filename}")
        return str(repo / filename)

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model = MambaLMHeadModel.from_pretrained("someone/sharded", revision="v1")
    assert fetched[:3] == ["config.json", "model.safetensors", "model.safetensors.index.json"]
    assert all(f.startswith("model-") for f in fetched[3:]) and len(fetched) > 4
    ids = torch.randint(0, 64, (1, 6))
    assert rel_err(hf_logits(ref, ids), logits(model, ids)) < 1e-4
    with pytest.raises(TypeError, match="unexpected argument"):
        load_config_hf("someone/sharded", revison="v1")
