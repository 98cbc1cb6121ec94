"""The CPU decoding step compiled with torch.compile (generate(..., cg=True) on a CPU) against the eager step."""
import copy
import gc
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch.utils.weak import WeakTensorKeyDictionary

from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mamba_ssm.utils import compiled_step
from mamba_ssm.utils.inference_params import InferenceParams

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # the first compile of a shape takes tens of seconds on 2 cores


def tiny_model(seed=0, **cfg):
    torch.manual_seed(seed)
    config = MambaConfig(d_model=32, n_layer=3, vocab_size=101, ssm_cfg={"d_state": 8}, **cfg)
    return MambaLMHeadModel(config).eval()


def tiny_mamba2(seed=0, **ssm_cfg):
    """A Mamba-2 LM, loudly initialised (greedy tokens that differ from row to row), with D and the gated
    norm's weight off their constant init, so that a mix-up of heads, groups or channels would show."""
    torch.manual_seed(seed)
    config = MambaConfig(d_model=32, n_layer=2, vocab_size=101, tie_embeddings=False,
                         ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 4, **ssm_cfg})
    model = MambaLMHeadModel(config, initializer_cfg={"initializer_range": 0.5}).eval()
    with torch.no_grad():
        for block in model.backbone.layers:
            m = block.mixer
            m.out_proj.weight.mul_(3.0)
            m.D.uniform_(-1.0, 2.0)
            if m.rmsnorm:
                m.norm.weight.uniform_(0.5, 1.5)
    return model


def generate_both(model, prompt, new_tokens=10):
    kwargs = dict(max_length=prompt.shape[1] + new_tokens, output_scores=True, return_dict_in_generate=True)
    eager = model.generate(prompt, cg=False, **kwargs)
    compiled = model.generate(prompt, cg=True, **kwargs)
    return eager, compiled


@pytest.mark.parametrize("cfg,batch", [({}, 2), ({"rms_norm": False, "residual_in_fp32": False}, 2), ({}, 3)])
def test_compiled_step_gives_the_eager_tokens_and_logits(cfg, batch):
    # batch 2: products as multiply + sum (GEMV_MAX_ROWS); 3: as matrix products
    model = tiny_model(seed=11, **cfg)
    prompt = torch.randint(0, 101, (batch, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would pass unnoticed
        step = compiled_step.CompiledStep.build(model, batch)
    assert step is not None
    eager, compiled = generate_both(model, prompt)
    assert torch.equal(eager.sequences, compiled.sequences)
    torch.testing.assert_close(torch.stack(compiled.scores), torch.stack(eager.scores), rtol=1e-5, atol=1e-5)


# Three compiles in all. The first: 6 heads in 2 groups (3 heads a group), D per channel, the norm before the
# gate, dt clamped on both sides (most of softplus(dt) falls outside (0.005, 0.04) here), d_ssm 48 of
# d_inner 64 (d_mlp 16); the second: upstream's defaults (1 group); the third: no gated norm (y silu(z)).
MAMBA2_CASES = [({"ngroups": 2, "D_has_hdim": True, "norm_before_gate": True, "dt_limit": (0.005, 0.04), "d_ssm": 48}, 2),
                ({"ngroups": 1}, 3),
                ({"ngroups": 4, "rmsnorm": False}, 1)]


@pytest.mark.parametrize("ssm_cfg,batch", MAMBA2_CASES)
def test_mamba2_compiled_step_gives_the_eager_tokens_and_logits(ssm_cfg, batch):
    # batch 1, 2: products as multiply + sum (GEMV_MAX_ROWS); 3: as matrix products
    model = tiny_mamba2(seed=21, **ssm_cfg)
    if "d_ssm" in ssm_cfg:
        assert all(b.mixer.d_mlp == 16 for b in model.backbone.layers)
    assert compiled_step.unsupported_reason(model) is None
    prompt = torch.randint(0, 101, (batch, 5))
    # dynamo's own recompile limit at 1: every compile of step_logits in this process after its first is
    # past it, and compiles all the same (compiled_step.MAX_SIGNATURES)
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=1):
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would pass unnoticed
        step = compiled_step.CompiledStep.build(model, batch)
        assert step is not None
        eager, compiled = generate_both(model, prompt, new_tokens=12)
    assert len(set(map(tuple, eager.sequences[:, 5:].tolist()))) == batch or batch == 1  # rows differ
    assert torch.equal(eager.sequences, compiled.sequences)
    torch.testing.assert_close(torch.stack(compiled.scores), torch.stack(eager.scores), rtol=1e-5, atol=1e-5)


def test_unsupported_mamba2_models_fall_back_with_the_reason(monkeypatch):
    prompt = torch.randint(0, 101, (1, 4))
    torch.manual_seed(22)
    hybrid = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=101, attn_layer_idx=[1],
                                          attn_cfg={"num_heads": 4, "causal": True},
                                          ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8})).eval()
    models = [(hybrid, "layer 1 is an attention layer \\(MHA\\)")]
    mixed = tiny_mamba2(seed=23)
    mixed.backbone.layers[1] = tiny_model(seed=23).backbone.layers[1]  # a Mamba-1 block
    models.append((mixed, "mix Mamba and Mamba2 mixers"))
    try:
        import peft
    except ImportError:
        peft = None
    if peft is not None:  # LoRA on in_proj: the adapter must run as a module
        lora = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["in_proj"], lora_dropout=0.0),
                                            tiny_mamba2(seed=24))
        models.append((lora, "a projection or norm is wrapped"))
    for model, reason in models:
        assert re.search(reason, compiled_step.unsupported_reason(model))
        monkeypatch.setattr(compiled_step, "_warned", False)
        with pytest.warns(RuntimeWarning, match=reason):
            seq = model.generate(prompt, max_length=9, cg=True)
        assert torch.equal(seq, model.generate(prompt, max_length=9))


def test_compiled_step_teacher_forced_logits_equal_the_full_forward():
    model = tiny_model(seed=12)
    seq = torch.randint(0, 101, (1, 14))
    out = model.generate(seq[:, :4], max_length=14, teacher_outputs=seq, cg=True, output_scores=True,
                         return_dict_in_generate=True)
    full = model(seq).logits
    torch.testing.assert_close(torch.stack(out.scores, dim=1), full[:, 3:-1], rtol=1e-4, atol=1e-4)


def test_a_failing_compile_warns_once_and_decodes_eagerly(monkeypatch):
    model = tiny_model(seed=13)
    prompt = torch.randint(0, 101, (1, 4))

    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    # a fresh process's state, with a compile that fails (as it does without a C++ compiler)
    monkeypatch.setattr(compiled_step, "_warned", False)
    monkeypatch.setattr(compiled_step, "_failed", None)
    monkeypatch.setattr(compiled_step, "_proven", set())
    monkeypatch.setattr(compiled_step, "_compiled", no_compiler)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        fallback = model.generate(prompt, max_length=12, cg=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is not repeated
        again = model.generate(prompt, max_length=12, cg=True)
    eager = model.generate(prompt, max_length=12, cg=False)
    assert torch.equal(fallback, eager) and torch.equal(again, eager)


def test_setting_off_and_unsupported_models_keep_the_eager_step(monkeypatch):
    model = tiny_model(seed=14)
    prompt = torch.randint(0, 101, (1, 4))
    monkeypatch.setattr(compiled_step, "ENABLED", False)  # as MAMBA_SSM_COMPILED_STEP=0 at import
    monkeypatch.setattr(compiled_step, "_compiled", None)
    monkeypatch.setattr(compiled_step.CompiledStep, "build", None)  # would raise if called
    assert torch.equal(model.generate(prompt, max_length=9, cg=True), model.generate(prompt, max_length=9))
    monkeypatch.undo()
    mlp = tiny_model(seed=15, d_intermediate=16)
    assert "MLP" in compiled_step.unsupported_reason(mlp)
    monkeypatch.setattr(compiled_step, "_warned", False)
    with pytest.warns(RuntimeWarning, match="MLP"):
        seq = mlp.generate(prompt, max_length=9, cg=True)
    assert torch.equal(seq, mlp.generate(prompt, max_length=9))


def test_no_working_cxx_compiler_falls_back_to_eager(monkeypatch):
    import torch._inductor.config as inductor_config

    torch.manual_seed(16)  # a shape no other test compiles, so nothing comes from a cache
    model = MambaLMHeadModel(MambaConfig(d_model=40, n_layer=2, vocab_size=77, ssm_cfg={"d_state": 4})).eval()
    prompt = torch.randint(0, 77, (1, 3))
    monkeypatch.setattr(compiled_step, "_warned", False)
    monkeypatch.setattr(compiled_step, "_failed", None)
    # inductor's own patch (monkeypatch's undo deletes a config entry, and later compiles then fail)
    with inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",), "fx_graph_cache": False}), \
            pytest.warns(RuntimeWarning, match="compiled CPU decoding step unavailable"):
        seq = model.generate(prompt, max_length=9, cg=True)
    assert torch.equal(seq, model.generate(prompt, max_length=9))


@pytest.mark.parametrize("value,want", [(None, True), ("", True), ("1", True), (" On ", True), ("yes", True),
                                        ("TRUE", True), ("0", False), ("off", False), ("No", False),
                                        ("false", False)])
def test_setting_values(value, want):
    assert compiled_step.parse_setting(value) is want


def _read_at_import(var, attr, value, later, bad):
    """In fresh processes with var=value: (attr at import, attr after var is set to `later`), then the
    failed import with var=bad (its CompletedProcess)."""
    import subprocess
    import sys

    code = (f"import os; from mamba_ssm.utils import compiled_step as c; a = c.{attr}; "
            f"os.environ['{var}'] = '{later}'; print(a, c.{attr})")
    env = dict(os.environ, **{var: value})
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stderr
    env[var] = bad
    failed = subprocess.run([sys.executable, "-c", "import mamba_ssm.utils.compiled_step"], env=env,
                            capture_output=True, text=True, cwd=REPO)
    return run.stdout.split(), failed


def test_setting_is_read_once_at_import_and_a_bad_value_is_named(monkeypatch):
    seen, run = _read_at_import("MAMBA_SSM_COMPILED_STEP", "ENABLED", "off", "1", "maybe")
    assert seen == ["False", "False"]  # changing the variable later changes nothing
    assert run.returncode != 0
    assert "MAMBA_SSM_COMPILED_STEP='maybe': expected one of 1, true, yes, on" in run.stderr
    with pytest.raises(ValueError, match="MAMBA_SSM_COMPILED_STEP='2'"):
        compiled_step.parse_setting("2")
    monkeypatch.setattr(compiled_step, "ENABLED", compiled_step.ENABLED)  # restored after the test
    compiled_step.set_enabled(False)
    assert compiled_step.ENABLED is False
    with pytest.raises(TypeError, match="enabled must be True or False, got 'no'"):
        compiled_step.set_enabled("no")


def rounded(model, dtype):
    """A copy of `model` with the matrices the 16-bit setting copies rounded to dtype and kept fp32: what the
    step on 16-bit copies computes, to fp32 rounding."""
    r = copy.deepcopy(model)
    with torch.no_grad():
        for w in compiled_step._matrices(r):
            w.copy_(w.to(dtype).float())
    return r


# Two compiles, batch 1 (the 16-bit copies are used at batch <= GEMV_MAX_ROWS).
@pytest.mark.parametrize("make", [lambda: tiny_model(seed=17), lambda: tiny_mamba2(seed=26)], ids=["mamba1", "mamba2"])
def test_f16_weights_give_the_fp32_tokens_and_logits_close_to_fp32(make, monkeypatch):
    model = make()
    monkeypatch.setattr(compiled_step, "_copies", WeakTensorKeyDictionary())
    monkeypatch.setattr(compiled_step, "WEIGHTS", "model")
    compiled_step.set_weights("f16")
    prompt = torch.randint(0, 101, (1, 5))
    kwargs = dict(max_length=5 + 12, output_scores=True, return_dict_in_generate=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would pass unnoticed
        step = compiled_step.CompiledStep.build(model, 1)
        assert step is not None and step.weights == "f16"
        f16 = model.generate(prompt, cg=True, **kwargs)
    fp32 = model.generate(prompt, cg=False, **kwargs)
    # the matrices are f16 copies; the rest is the model's own
    m = model.backbone.layers[0].mixer
    mats = [m.in_proj.weight, m.out_proj.weight] + ([m.x_proj.weight, m.dt_proj.weight] if "x_proj" in dir(m) else [])
    copies = [a for a in step.layers[0] if a is not None and a.dtype == torch.float16]
    assert sorted(c.shape for c in copies) == sorted(w.shape for w in mats)
    assert step.fixed[0].dtype == step.fixed[3].dtype == torch.float16
    assert torch.equal(step.fixed[3], model.lm_head.weight.detach().half())
    assert all(a.dtype == torch.float32 for a in step.layers[0] + step.fixed[1:3] if a is not None and a.dim() < 2
               or a is not None and a.shape not in [w.shape for w in mats] + [model.lm_head.weight.shape])
    # step by step from the same random states: the eager fp32 step of the model with its matrices rounded
    # to f16 (to fp32 rounding); generate's own prefill (eager, the model's fp32 weights) is not the step's
    ref = rounded(model, torch.float16)
    torch.manual_seed(27)
    params = {}
    for name in ("compiled", "ref"):
        params[name] = InferenceParams(max_seqlen=32, max_batch_size=1, seqlen_offset=1)
        params[name].key_value_memory_dict = model.allocate_inference_cache(1, 32)
    for i, (conv, ssm) in params["compiled"].key_value_memory_dict.items():
        conv.normal_(), ssm.normal_()
        params["ref"].key_value_memory_dict[i][0].copy_(conv), params["ref"].key_value_memory_dict[i][1].copy_(ssm)
    with torch.no_grad():
        for token in torch.randint(0, 101, (6, 1, 1)):
            got = step(token, params["compiled"])
            want = ref(token, inference_params=params["ref"], num_last_tokens=1).logits[:, -1]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # against fp32 itself: the same greedy tokens (the smallest top-2 gap of the fp32 logits here: 1.2e-3 for
    # Mamba-1, 3.3e-2 for Mamba-2), logits within f16's rounding of the weights (2^-11 relative, over the
    # layers; measured: 3.8e-4 and 5.6e-4 of the largest logit, 2.0e-4 and 1.2e-3 absolute)
    assert torch.equal(f16.sequences, fp32.sequences)
    scores, want = torch.stack(f16.scores), torch.stack(fp32.scores)
    assert (scores - want).abs().max() <= 2e-3 * want.abs().max()


def test_f16_copies_are_kept_per_weight_and_renewed_when_it_changes(monkeypatch):
    # no compile: CompiledStep(model, batch) only gathers the step's weights
    monkeypatch.setattr(compiled_step, "_copies", WeakTensorKeyDictionary())
    monkeypatch.setattr(compiled_step, "WEIGHTS", "f16")
    model = tiny_model(seed=18)
    a, b = compiled_step.CompiledStep(model, 1), compiled_step.CompiledStep(model, 2)
    assert a.weights == b.weights == "f16" and a.static["hidden_dtype"] == torch.float32
    assert a.layers[0][2].dtype == torch.float16 and a.layers[0][2] is b.layers[0][2]  # one copy per weight
    assert a.fixed[0] is a.fixed[3]  # the tied embedding and LM head: one copy
    n = len(compiled_step._copies)
    assert n == len({id(w) for w in compiled_step._matrices(model)}) == 1 + 3 * 4
    w = model.backbone.layers[0].mixer.in_proj.weight
    with torch.no_grad():
        w.mul_(2)  # an in-place change (as an optimizer step or load_state_dict makes)
    c = compiled_step.CompiledStep(model, 1)
    assert c.layers[0][2] is not a.layers[0][2] and torch.equal(c.layers[0][2], w.detach().half())
    assert c.layers[1][2] is a.layers[1][2] and len(compiled_step._copies) == n  # the stale copy is gone
    x_w = model.backbone.layers[1].mixer.x_proj
    x_w.weight.data = x_w.weight.data * 3  # a new tensor under the Parameter
    assert torch.equal(compiled_step.CompiledStep(model, 1).layers[1][6], x_w.weight.detach().half())
    compiled_step.set_weights("bf16")  # another dtype replaces the f16 copies
    d = compiled_step.CompiledStep(model, 1)
    assert d.weights == "bf16" and d.layers[2][11].dtype == torch.bfloat16 and len(compiled_step._copies) == n
    # the model's own weights: batch > GEMV_MAX_ROWS (F.linear on fp32, no conversion per step), a 16-bit
    # model, the setting "model" (the step of today: no copies, no hidden_dtype)
    e = compiled_step.CompiledStep(model, compiled_step.GEMV_MAX_ROWS + 1)
    assert e.weights == "model" and e.layers[0][2].data_ptr() == w.data_ptr() and "hidden_dtype" not in e.static
    assert compiled_step.CompiledStep(tiny_model(seed=18).to(torch.bfloat16), 1).weights == "model"
    compiled_step.set_weights("model")
    f = compiled_step.CompiledStep(model, 1)
    assert f.weights == "model" and "hidden_dtype" not in f.static
    m = model.backbone.layers[0].mixer
    assert [t.data_ptr() for t in (f.layers[0][2], f.layers[0][6], f.layers[0][7], f.layers[0][11], f.fixed[3])] == \
        [t.data_ptr() for t in (m.in_proj.weight, m.x_proj.weight, m.dt_proj.weight, m.out_proj.weight, model.lm_head.weight)]
    # the copies go with the model
    del model, a, b, c, d, e, f, w, x_w, m
    gc.collect()
    assert len(compiled_step._copies) == 0


@pytest.mark.parametrize("value,want", [(None, "model"), ("", "model"), ("model", "model"), (" F16 ", "f16"),
                                        ("bf16", "bf16"), ("BF16", "bf16")])
def test_weights_setting_values(value, want):
    assert compiled_step.parse_weights(value) == want


def test_weights_setting_is_read_at_import_and_a_bad_value_is_named(monkeypatch):
    seen, run = _read_at_import("MAMBA_SSM_COMPILED_STEP_WEIGHTS", "WEIGHTS", "BF16", "f16", "fp8")
    assert seen == ["bf16", "bf16"]
    assert run.returncode != 0
    assert ("MAMBA_SSM_COMPILED_STEP_WEIGHTS='fp8': expected one of model (the model's own weights), f16 or bf16"
            in run.stderr)
    with pytest.raises(ValueError, match="MAMBA_SSM_COMPILED_STEP_WEIGHTS='half'"):
        compiled_step.parse_weights("half")
    monkeypatch.setattr(compiled_step, "WEIGHTS", compiled_step.WEIGHTS)  # restored after the test
    compiled_step.set_weights(" F16")
    assert compiled_step.WEIGHTS == "f16"
    with pytest.raises(ValueError, match="weights must be one of model, f16, bf16, got 'fp16'"):
        compiled_step.set_weights("fp16")
    with pytest.raises(TypeError, match="got torch.float16"):
        compiled_step.set_weights(torch.float16)
