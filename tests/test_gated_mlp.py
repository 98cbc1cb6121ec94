"""GatedMLP (upstream's fc1 / fc2) and blocks with norm2 + MLP when d_intermediate > 0."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel, create_block
from mamba_ssm.modules.mlp import GatedMLP
from mamba_ssm.ops.triton.layer_norm import RMSNorm


@pytest.mark.parametrize("hidden, multiple_of, want", [(None, 128, 128), (100, 16, 112), (64, 64, 64), (1, 8, 8)])
def test_gated_mlp_shapes_follow_upstream(hidden, multiple_of, want):
    # hidden defaults to int(8 * in / 3), rounded up to a multiple of multiple_of; fc1 holds [value; gate]
    mlp = GatedMLP(48, hidden_features=hidden, multiple_of=multiple_of)
    assert mlp.fc1.weight.shape == (2 * want, 48) and mlp.fc2.weight.shape == (48, want)
    assert mlp.fc1.bias is None and mlp.fc2.bias is None
    assert [n for n, _ in mlp.named_parameters()] == ["fc1.weight", "fc2.weight"]
    biased = GatedMLP(48, hidden_features=64, out_features=20, bias=True, multiple_of=64, dtype=torch.float64)
    assert biased.fc2.weight.shape == (20, 64) and biased.fc1.bias.dtype == torch.float64


def test_gated_mlp_is_value_times_activation_of_gate_in_float64():
    torch.manual_seed(0)
    mlp = GatedMLP(16, hidden_features=24, out_features=8, bias=True, multiple_of=8, activation=F.gelu,
                   dtype=torch.float64)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    h = x @ mlp.fc1.weight.T + mlp.fc1.bias
    want = (h[..., :24] * F.gelu(h[..., 24:])) @ mlp.fc2.weight.T + mlp.fc2.bias
    torch.testing.assert_close(mlp(x), want, rtol=1e-12, atol=1e-12)


def _upstream_block(block, hidden, residual, mixer_out):
    """Upstream's unfused Block.forward, written out: add, norm, mixer, add, norm2, mlp."""
    residual = hidden + residual if residual is not None else hidden
    h = mixer_out(block.norm(residual))
    residual = h + residual
    return block.mlp(block.norm2(residual)), residual


@pytest.mark.parametrize("rms", [False, True])
def test_block_with_mlp_has_norm2_and_upstreams_residual_stream(rms):
    torch.manual_seed(1)
    block = create_block(16, 40, ssm_cfg={"d_state": 4}, rms_norm=rms, fused_add_norm=True, layer_idx=0)
    assert isinstance(block.norm2, RMSNorm if rms else nn.LayerNorm) and isinstance(block.mlp, GatedMLP)
    assert block.mlp.fc1.weight.shape == (2 * 128, 16)  # d_intermediate 40 rounded up to 128
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, r = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    for residual in (None, r):
        out, res = block(x, residual)
        want_out, want_res = _upstream_block(block, x, residual, block.mixer)
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(res, want_res, rtol=1e-5, atol=1e-5)
    assert create_block(16, 0, ssm_cfg={"d_state": 4}, layer_idx=0).mlp is None


def test_model_with_mlps_keys_init_and_cached_decoding():
    torch.manual_seed(2)
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, d_intermediate=48, vocab_size=50,
                                         ssm_cfg={"d_state": 4})).eval()
    keys = set(model.state_dict())
    assert {"backbone.layers.1.norm2.weight", "backbone.layers.1.mlp.fc1.weight",
            "backbone.layers.1.mlp.fc2.weight"} <= keys
    ids = torch.randint(0, 50, (2, 9))
    out = model.generate(ids[:, :4], max_length=9, teacher_outputs=ids, output_scores=True,
                         return_dict_in_generate=True)
    full = model(ids).logits
    torch.testing.assert_close(torch.stack(out.scores, 1), full[:, 3:8], rtol=1e-4, atol=1e-4)
