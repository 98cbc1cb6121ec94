"""Hybrid models (MambaConfig.attn_layer_idx / attn_cfg): Mamba and attention blocks with MLPs and tied
embeddings. Cached decoding against the full forward, greedy generation against the argmax, ragged
batches against each prompt alone, and checkpoints of that layout."""
import json
import warnings

import pytest
import torch

from mamba_ssm.models import checkpoint as ckpt
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.modules.mha import MHA
from mamba_ssm.utils.generation import DecodingSession, generate_ragged
from tiny_models import hybrid_model

VOCAB = 101


def ragged_prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 1, 3, 5, 1, 8)]


def alone(model, prompt, new_tokens, eos=None):
    device = next(model.parameters()).device
    seq = model.generate(torch.tensor([prompt], device=device), max_length=len(prompt) + new_tokens)
    seq = seq[0, len(prompt):].tolist()
    return seq[:seq.index(eos) + 1] if eos in seq else seq


def test_config_builds_the_mix_with_upstreams_names():
    model = hybrid_model(mlp_dim=64, qkv_proj_bias=False)
    kinds = [type(layer.mixer) for layer in model.backbone.layers]
    assert kinds == [Mamba, MHA, Mamba, MHA]
    assert model.lm_head.weight is model.backbone.embedding.weight
    attn = model.backbone.layers[1].mixer
    assert attn.layer_idx == 1 and attn.num_heads_kv == 2 and attn.in_proj.bias is None and attn.mlp_dim == 256
    keys = set(model.state_dict())
    assert {"backbone.layers.1.mixer.in_proj.weight", "backbone.layers.1.mixer.conv1d.weight",
            "backbone.layers.1.mixer.out_proj.weight", "backbone.layers.1.norm2.weight",
            "backbone.layers.1.mlp.fc1.weight", "backbone.layers.0.mixer.A_log"} <= keys


@pytest.mark.parametrize("prompt_len", [1, 4])
def test_cached_decoding_with_teacher_outputs_equals_full_forward(prompt_len):
    model = hybrid_model(seed=1)
    ids = torch.randint(0, VOCAB, (3, 10))
    out = model.generate(ids[:, :prompt_len], max_length=10, teacher_outputs=ids, output_scores=True,
                         return_dict_in_generate=True)
    assert torch.equal(out.sequences, ids)
    full = model(ids).logits
    torch.testing.assert_close(torch.stack(out.scores, 1), full[:, prompt_len - 1:9], rtol=1e-4, atol=1e-3)


def test_greedy_generate_equals_argmax_of_full_forward():
    model = hybrid_model(seed=2)
    seq = torch.randint(0, VOCAB, (2, 4))
    out = model.generate(seq, max_length=14)
    for t in range(4, 14):
        assert torch.equal(out[:, t], model(out[:, :t]).logits[:, -1].argmax(-1)), t


@pytest.mark.parametrize("cg", [False, True])
def test_ragged_batch_gives_each_prompt_its_own_tokens(cg):
    # cg=True on a CPU: the compiled step does not cover attention, it warns and steps eagerly
    model = hybrid_model()
    prompts = ragged_prompts()
    want = [alone(model, p, 10) for p in prompts]
    assert len({tuple(w) for w in want}) == len(want)  # the rows differ, so a mix-up would show
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert generate_ragged(model, prompts, 10, cg=cg) == want
    eos = want[0][3]
    want_eos = [alone(model, p, 10, eos=eos) for p in prompts]
    for drop in (True, False):
        assert generate_ragged(model, prompts, 10, eos_token_id=eos, drop_finished=drop) == want_eos


def test_session_prefills_rows_in_any_order_and_drops_finished_ones():
    model = hybrid_model(seed=3)
    prompts = ragged_prompts()
    want = [alone(model, p, 8) for p in prompts]
    session = DecodingSession(model, batch_size=6, max_seqlen=16)
    for rows in ([5, 0], [2], [4, 1, 3]):   # rows not contiguous, not in order
        session.prefill([prompts[r] for r in rows], rows=rows)
    eos = want[2][2]
    assert session.generate(8, eos_token_id=eos).to_lists() == [alone(model, p, 8, eos=eos) for p in prompts]


@pytest.mark.parametrize("safe", [True, False])
def test_checkpoint_round_trip_in_both_files(tmp_path, safe):
    model = hybrid_model(seed=4, mlp_dim=32)
    model.save_pretrained(tmp_path / "ck", safe_serialization=safe)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["attn_layer_idx"] == [1, 3] and cfg["attn_cfg"]["num_heads_kv"] == 2 and cfg["d_intermediate"] == 48
    back = MambaLMHeadModel.from_pretrained(tmp_path / "ck")
    assert back.config == model.config and back.lm_head.weight is back.backbone.embedding.weight
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    ids = torch.randint(0, VOCAB, (2, 7))
    assert torch.equal(model(ids).logits, back.eval()(ids).logits)
    with pytest.raises(ckpt.CheckpointError, match="cannot write d_intermediate 48 in the transformers layout"):
        model.save_pretrained(tmp_path / "hf", layout="transformers")
    with pytest.raises(ckpt.CheckpointError, match=r"attn_layer_idx \[1, 3\] in the transformers layout"):
        hybrid_model(d_intermediate=0).save_pretrained(tmp_path / "hf", layout="transformers")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_generation_of_a_hybrid_model():
    model = hybrid_model(seed=5).cuda()
    ids = torch.randint(0, VOCAB, (3, 12), device="cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed capture would fall back to eager unseen
        out = model.generate(ids[:, :4], max_length=12, teacher_outputs=ids, output_scores=True,
                             return_dict_in_generate=True, cg=True)
        full = model(ids).logits
        torch.testing.assert_close(torch.stack(out.scores, 1), full[:, 3:11], rtol=1e-3, atol=1e-3)
        greedy = model.generate(ids[:, :4], max_length=14, cg=True)
        assert torch.equal(greedy, model.generate(ids[:, :4], max_length=14))
        # another max_length: a graph with a cache of that length
        assert torch.equal(model.generate(ids[:, :5], max_length=9, cg=True), model.generate(ids[:, :5], max_length=9))
        prompts = ragged_prompts()
        want = [alone(model, p, 10) for p in prompts]
        assert generate_ragged(model, prompts, 10, cg=True) == want
