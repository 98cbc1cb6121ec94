"""The Mamba mixer, the LM, generation with the cache, and their errors."""
import math

import pytest
import torch
import torch.nn as nn

import mamba_ssm
from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.utils.generation import InferenceParams
from tiny_models import loud_model


def tiny_model(seed=0, vocab=101, d_model=32, n_layer=2, d_state=8, **cfg):
    torch.manual_seed(seed)
    config = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab, ssm_cfg={"d_state": d_state}, **cfg)
    return MambaLMHeadModel(config).eval()


def test_public_imports():
    from mamba_ssm import Mamba, MambaLMHeadModel, mamba_inner_fn, selective_scan_fn  # noqa: F401
    from mamba_ssm.ops.selective_scan_interface import mamba_inner_ref, selective_scan_ref  # noqa: F401
    from mamba_ssm.ops.triton.layer_norm import RMSNorm, layer_norm_fn, rms_norm_fn  # noqa: F401
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update  # noqa: F401
    from mamba_ssm.modules.mamba_simple import Block  # noqa: F401
    from mamba_ssm.models.mixer_seq_simple import MixerModel  # noqa: F401
    from mamba_ssm.utils.generation import GenerationMixin, decode  # noqa: F401
    from mamba_ssm.utils.hf import load_config_hf, load_state_dict_hf  # noqa: F401
    assert isinstance(mamba_ssm.__version__, str)


def test_upstream_1x_layernorm_module_name():
    from mamba_ssm.ops.triton import layer_norm, layernorm

    assert layernorm.RMSNorm is layer_norm.RMSNorm and layernorm.rms_norm_fn is layer_norm.rms_norm_fn
    assert layernorm.layer_norm_fn is layer_norm.layer_norm_fn


def test_mamba2_imports_as_in_upstream_2x_and_builds_blocks():
    # upstream 2.x's package re-exports Mamba2
    from mamba_ssm import Mamba2
    from mamba_ssm.modules.mamba2 import Mamba2 as Mamba2Module

    assert Mamba2 is Mamba2Module
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=11,
                                         ssm_cfg={"layer": "Mamba2", "headdim": 16, "d_state": 8}))
    assert all(type(layer.mixer) is Mamba2 for layer in model.backbone.layers)
    assert [layer.mixer.layer_idx for layer in model.backbone.layers] == [0, 1]
    with pytest.raises(ValueError, match="ssm_cfg layer must be 'Mamba1' or 'Mamba2', got 'Mamba3'"):
        MambaLMHeadModel(MambaConfig(d_model=32, n_layer=1, vocab_size=11, ssm_cfg={"layer": "Mamba3"}))


def test_mamba_initialisation_follows_the_paper():
    torch.manual_seed(0)
    m = Mamba(d_model=64, d_state=16, dt_min=0.001, dt_max=0.1)
    assert m.d_inner == 128 and m.dt_rank == math.ceil(64 / 16)
    assert m.A_log.dtype == torch.float32
    torch.testing.assert_close(torch.exp(m.A_log), torch.arange(1, 17, dtype=torch.float32).repeat(128, 1))
    torch.testing.assert_close(m.D, torch.ones(128))
    dt = torch.nn.functional.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert m.A_log._no_weight_decay and m.D._no_weight_decay
    lm = tiny_model()
    assert lm.lm_head.weight is lm.backbone.embedding.weight
    assert lm.lm_head.weight.shape[0] == 104  # 101 padded to a multiple of 8


def test_fused_path_equals_module_path_outputs_and_grads():
    torch.manual_seed(1)
    m = Mamba(d_model=32, d_state=8, layer_idx=0)
    x = torch.randn(2, 13, 32, requires_grad=True)
    outs, grads = [], []
    for fast in (True, False):
        m.use_fast_path = fast
        m.zero_grad()
        x.grad = None
        y = m(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_loss_is_shifted_cross_entropy_ignoring_minus_100():
    model = tiny_model()
    ids = torch.randint(0, 101, (2, 10))
    labels = ids.clone()
    labels[:, :4] = -100
    out = model(ids, labels=labels)
    logits = out.logits
    expected = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    assert out["loss"] is out.loss and out[0] is out.logits
    assert model(ids).logits.shape == (2, 10, 104)


@pytest.mark.parametrize("prompt_len", [1, 5])
def test_cached_decoding_with_teacher_forcing_equals_full_forward(prompt_len):
    model = tiny_model(seed=3)
    seq = torch.randint(0, 101, (3, 12))
    out = model.generate(seq[:, :prompt_len], max_length=12, teacher_outputs=seq, output_scores=True,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, seq)
    full = model(seq).logits
    cached = torch.stack(out.scores, dim=1)
    torch.testing.assert_close(cached, full[:, prompt_len - 1:-1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prompt_len,batch", [(1, 1), (1, 3), (6, 2)])
def test_greedy_generate_equals_argmax_of_full_forward(prompt_len, batch):
    model = tiny_model(seed=4)
    prompt = torch.randint(0, 101, (batch, prompt_len))
    seq = model.generate(prompt, max_length=prompt_len + 8)
    assert seq.shape == (batch, prompt_len + 8)
    assert torch.equal(seq[:, :prompt_len], prompt)
    logits = model(seq).logits
    assert torch.equal(logits[:, prompt_len - 1:-1].argmax(-1), seq[:, prompt_len:])


def test_generate_stops_at_eos_and_pads_finished_rows():
    model = loud_model(seed=5)
    prompt = torch.randint(0, 101, (5, 3), generator=torch.Generator().manual_seed(0))
    free = model.generate(prompt, max_length=15)[:, 3:]
    # eos: a token that ends rows at different steps and that some row never emits
    candidates = {}
    for tok in free.unique().tolist():
        steps = [int((row == tok).nonzero()[0]) if (row == tok).any() else None for row in free]
        if len({s for s in steps if s is not None}) >= 2 and None in steps:
            candidates[tok] = steps
    assert candidates, free
    eos, steps = max(candidates.items(), key=lambda kv: (len({s for s in kv[1] if s is not None}), -kv[0]))
    seq = model.generate(prompt, max_length=15, eos_token_id=eos)
    assert torch.equal(seq[:, :3], prompt)
    new = seq[:, 3:]
    assert new.shape == free.shape  # a row never finishes, so all 12 steps run
    for row, end in enumerate(steps):
        if end is None:  # unfinished: its own tokens
            assert torch.equal(new[row], free[row]), row
        else:  # its tokens up to its eos, then eos
            assert torch.equal(new[row, :end + 1], free[row, :end + 1]), row
            assert (new[row, end:] == eos).all(), row
    # when every row finishes, the sequences end at the last row's eos
    ending = [r for r, s in enumerate(steps) if s is not None]
    done = model.generate(prompt[ending], max_length=15, eos_token_id=eos)
    assert torch.equal(done, seq[ending, :3 + max(steps[r] for r in ending) + 1])


def test_sampling_takes_only_tokens_the_filters_allow():
    from mamba_ssm.utils.generation import filter_logits, modify_logit_for_repetition_penalty

    model = loud_model(seed=6)
    prompt = torch.randint(0, 101, (2, 4))
    torch.manual_seed(0)
    kw = dict(top_k=3, top_p=0.9, min_p=0.05, temperature=0.8)
    out = model.generate(prompt, max_length=14, repetition_penalty=1.3, output_scores=True,
                         return_dict_in_generate=True, **kw)
    assert out.sequences.shape == (2, 14) and len(out.scores) == 10
    for step, scores in enumerate(out.scores):
        penalised = modify_logit_for_repetition_penalty(scores, out.sequences[:, :4 + step], 1.3)
        ok = torch.isfinite(filter_logits(penalised, **kw))
        for row, token in enumerate(out.sequences[:, 4 + step].tolist()):
            assert ok[row, token], (step, row, token)


def test_step_equals_forward_for_the_mixer():
    torch.manual_seed(7)
    m = Mamba(d_model=16, d_state=4, layer_idx=0).eval()
    x = torch.randn(2, 9, 16)
    full = m(x)
    params = InferenceParams(max_seqlen=9, max_batch_size=2)
    outs = [m(x[:, :1], inference_params=params)]
    params.seqlen_offset = 1
    for t in range(1, 9):
        outs.append(m(x[:, t:t + 1], inference_params=params))
        params.seqlen_offset += 1
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-5)


def test_model_runs_in_bfloat16():
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fp32 = loud_model(seed=8)(ids).logits
        model = loud_model(seed=8).to(torch.bfloat16)
        logits = model(ids).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), fp32, rtol=0, atol=0.05)  # |logits| ~ 2, bf16 steps ~ 1e-2
    seq = model.generate(ids, max_length=17)
    assert torch.equal(seq[:, :7], ids)
    with torch.no_grad():
        full = model(seq).logits[:, 6:-1].float()
    top2 = full.topk(2, dim=-1).values
    clear = top2[..., 0] - top2[..., 1] > 0.05  # where bf16 rounding cannot swap the first two
    assert clear.sum() >= 8
    assert torch.equal(full.argmax(-1)[clear], seq[:, 7:][clear])


def test_bad_inputs_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(2, 5, dtype=torch.long), labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_states"):
        Mamba(d_model=16)(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="max_length"):
        model.generate(torch.zeros(1, 5, dtype=torch.long), max_length=5)
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(d_model=16, dt_init="bogus")
    with pytest.raises(ValueError, match="headdim"):
        MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=10, ssm_cfg={"layer": "Mamba2"}))


def test_trainer_keyword_arguments_are_accepted_and_config_serialises():
    model = tiny_model()
    ids = torch.randint(0, 101, (1, 6))
    out = model(ids, labels=ids, num_items_in_batch=torch.tensor(5), return_dict=True, use_cache=False)
    torch.testing.assert_close(out.loss, model(ids, labels=ids).loss)
    assert MambaLMHeadModel.accepts_loss_kwargs is False
    import json
    assert json.loads(model.config.to_json_string())["d_model"] == 32
    assert model.config.get("n_layer") == 2 and model.config.get("missing", 7) == 7


def test_empty_sequence_gives_empty_outputs():
    # a zero-length sequence flows through (conv and scan used to reject it with internal errors)
    torch.manual_seed(0)
    m = Mamba(d_model=16)
    x = torch.zeros(2, 0, 16, requires_grad=True)
    y = m(x)
    assert y.shape == (2, 0, 16)
    y.sum().backward()
    assert x.grad.shape == (2, 0, 16)
    logits = tiny_model()(torch.zeros(3, 0, dtype=torch.long)).logits
    assert logits.shape[:2] == (3, 0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_k=-3), "top_k must be >= 0"),
    (dict(top_k=0, top_p=1.5), "top_p must be in"),
    (dict(top_k=0, min_p=2.0), "min_p must be in"),
    (dict(top_k=5, temperature=0.0), "temperature must be > 0"),
])
def test_bad_sampling_arguments_are_named(kwargs, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model.generate(torch.randint(0, 100, (2, 4)), max_length=8, **kwargs)


def test_cache_of_another_batch_size_is_a_clear_error():
    model = tiny_model()
    params = InferenceParams(max_seqlen=10, max_batch_size=2)
    model(torch.randint(0, 100, (2, 3)), inference_params=params)
    params.seqlen_offset = 3
    with pytest.raises(ValueError, match="cache in inference_params holds batch 2, got hidden_states of batch 3"):
        model(torch.randint(0, 100, (3, 1)), inference_params=params)
