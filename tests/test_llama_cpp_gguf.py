"""mambakit/bench/llama_cpp.py: our GGUF writer (llama.cpp's `mamba` architecture) read back with the
`gguf` package: names, shapes, dtypes and values; the baseline's skip message."""
import importlib.util

import numpy as np
import pytest
import torch

from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mambakit.bench import llama_cpp

gguf = pytest.importorskip("gguf")


def _model(tie=True):
    torch.manual_seed(0)
    return MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=64, tie_embeddings=tie)).eval()


def _read(path):
    r = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in r.tensors}
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
    return r, tensors, arch


@pytest.mark.parametrize("weights", ["f32", "f16"])
def test_gguf_holds_the_models_tensors(tmp_path, weights):
    model = _model()
    path = tmp_path / "m.gguf"
    llama_cpp.write_gguf(model, path, weights)
    r, t, arch = _read(path)
    assert arch == "mamba"
    m = model.backbone.layers[1].mixer
    assert "output.weight" not in t  # tied: llama.cpp reads the embedding
    expect = {"token_embd.weight": model.backbone.embedding.weight, "blk.1.ssm_in.weight": m.in_proj.weight,
              "blk.1.ssm_out.weight": m.out_proj.weight, "blk.1.ssm_x.weight": m.x_proj.weight,
              "blk.1.ssm_dt.weight": m.dt_proj.weight, "blk.1.ssm_dt.bias": m.dt_proj.bias,
              "blk.1.ssm_a": -torch.exp(m.A_log), "blk.1.ssm_d": m.D, "blk.1.ssm_conv1d.weight": m.conv1d.weight[:, 0],
              "blk.1.ssm_conv1d.bias": m.conv1d.bias, "blk.1.attn_norm.weight": model.backbone.layers[1].norm.weight,
              "output_norm.weight": model.backbone.norm_f.weight}
    for name, want in expect.items():
        data = np.asarray(t[name].data)
        matrix = name.endswith(("ssm_in.weight", "ssm_out.weight", "ssm_x.weight", "ssm_dt.weight", "token_embd.weight"))
        assert data.dtype == (np.float16 if matrix and weights == "f16" else np.float32), name
        want = want.detach().float().numpy()
        np.testing.assert_allclose(data.reshape(want.shape).astype(np.float32), want,
                                   rtol=1e-3 if data.dtype == np.float16 else 0, atol=1e-3 if data.dtype == np.float16 else 0,
                                   err_msg=name)
    assert sum(1 for n in t if n.startswith("blk.")) == 2 * 10


def test_untied_head_and_bad_arguments(tmp_path):
    llama_cpp.write_gguf(_model(tie=False), tmp_path / "u.gguf")
    assert "output.weight" in _read(tmp_path / "u.gguf")[1]
    with pytest.raises(ValueError, match="weights must be 'f32' or 'f16', got 'q4'"):
        llama_cpp.write_gguf(_model(), tmp_path / "x.gguf", "q4")


def test_skip_message_without_llama_cpp(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name, *a))
    assert "pip install llama-cpp-python gguf" in llama_cpp.available()
