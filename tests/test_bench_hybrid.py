"""The generation benchmark's hybrid shape (--attn-every): attention at every N-th layer, named in the result."""
import pytest
import torch

from mambakit.bench.generation import BenchConfig, default_stem, hybrid_layout, run_benchmark
from mamba_ssm.modules.mha import MHA


def test_hybrid_layout_puts_attention_at_every_nth_layer():
    layout = hybrid_layout(2048, 48, 8)
    assert layout["attn_layer_idx"] == [7, 15, 23, 31, 39, 47]
    assert layout["attn_cfg"]["num_heads"] * layout["attn_cfg"]["head_dim"] == 2048


def test_a_tiny_hybrid_run_on_the_cpu():
    cfg = BenchConfig(model_name="tiny", promptlen=6, genlen=3, batch=[2], repeats=1, device="cpu", threads=1,
                      attn_every=2, baseline=False)
    res = run_benchmark(cfg, log=lambda *a: None)
    assert res["models"]["mamba"]["attn_layer_idx"] == [1]
    assert [r["tokens_per_s"] > 0 for r in res["runs"]] == [True]
    assert default_stem(cfg, res) == "generation_tiny-attn2_cpu"
    with pytest.raises(ValueError, match="--attn-every builds a random hybrid model of a known size"):
        run_benchmark(BenchConfig(model_name="some/dir", attn_every=2, device="cpu", baseline=False))


def test_the_random_hybrid_model_has_mha_layers():
    from mambakit.bench.generation import random_mamba

    model = random_mamba("tiny", "cpu", torch.float32, vocab_size=64, attn_every=2)
    assert [type(layer.mixer).__name__ for layer in model.backbone.layers] == ["Mamba", "MHA"]
    assert isinstance(model.backbone.layers[1].mixer, MHA)
