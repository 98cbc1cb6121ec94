"""Mamba-2 language models (MambaConfig ssm_cfg layer "Mamba2"): the forward, cached decoding, greedy
generation and batches of prompts of different lengths, on the CPU."""
import torch

from mamba_ssm.modules.mamba2 import Mamba2
from mamba_ssm.utils.generation import DecodingSession, generate_ragged
from tiny_models import loud_mamba2_model

VOCAB = 101


def test_blocks_are_mamba2_and_the_loss_trains():
    model = loud_mamba2_model()
    assert all(type(b.mixer) is Mamba2 for b in model.backbone.layers)
    ids = torch.randint(0, VOCAB, (2, 11))
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 11, 104) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_session_steps_equal_the_full_forward():
    model = loud_mamba2_model(seed=2)
    seq = torch.randint(0, VOCAB, (3, 10))
    full = model(seq).logits
    session = DecodingSession(model, batch_size=3, max_seqlen=10)
    torch.testing.assert_close(session.prefill(seq[:, :5]), full[:, 4], rtol=0, atol=1e-4)
    for t in range(5, 10):
        torch.testing.assert_close(session.step(seq[:, t]), full[:, t], rtol=0, atol=1e-4)


def test_teacher_forced_generation_scores_equal_the_full_forward():
    model = loud_mamba2_model(seed=3)
    seq = torch.randint(0, VOCAB, (2, 12))
    out = model.generate(seq[:, :1], max_length=12, teacher_outputs=seq, output_scores=True,
                         return_dict_in_generate=True)
    full = model(seq).logits
    for i, score in enumerate(out.scores):
        torch.testing.assert_close(score, full[:, i], rtol=0, atol=1e-4)


def test_greedy_generate_is_the_argmax_of_the_full_forward():
    model = loud_mamba2_model(seed=4)
    prompt = torch.randint(0, VOCAB, (2, 6))
    seq = model.generate(prompt, max_length=16)
    assert seq.shape == (2, 16)
    logits = model(seq).logits
    torch.testing.assert_close(logits[:, 5:-1].argmax(-1), seq[:, 6:])


def test_ragged_batch_gives_each_prompt_its_own_tokens():
    model = loud_mamba2_model(seed=5)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 1, 3, 9, 1)]
    want = [model.generate(torch.tensor([p]), max_length=len(p) + 8)[0, len(p):].tolist() for p in prompts]
    assert len({tuple(w) for w in want}) == len(want)
    assert generate_ragged(model, prompts, 8) == want


def test_cg_on_cpu_takes_the_compiled_step():
    # the compiled CPU step covers Mamba-2 layers (tests/test_compiled_step.py compares it with the eager step)
    from mamba_ssm.utils import compiled_step

    assert compiled_step.unsupported_reason(loud_mamba2_model(seed=6)) is None


def test_prompts_of_different_lengths_are_prefilled_packed_into_any_rows(monkeypatch):
    model = loud_mamba2_model(seed=7)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (6, 1, 4)]
    want = [model.generate(torch.tensor([p]), max_length=len(p) + 6)[0, len(p):].tolist() for p in prompts]
    calls = []
    forward = Mamba2.forward

    def spy(self, u, *args, **kwargs):
        calls.append((tuple(u.shape), kwargs.get("cu_seqlens")))
        return forward(self, u, *args, **kwargs)

    session = DecodingSession(model, batch_size=4, max_seqlen=16)  # (sees Mamba2.forward's signature: packs)
    monkeypatch.setattr(Mamba2, "forward", spy)
    session.prefill([prompts[0], prompts[2]], rows=[3, 1])      # not contiguous, not in order
    session.prefill([prompts[1], [5, 6]], rows=[0, 2])
    prefill_calls = [c for c in calls if c[1] is not None]
    assert [c[0] for c in prefill_calls] == [(1, 10, 32)] * 2 + [(1, 3, 32)] * 2   # 2 layers, one call each
    assert prefill_calls[0][1].tolist() == [0, 6, 10]
    out = session.generate(6).to_lists()
    assert [out[3], out[0], out[1]] == want


def test_generation_benchmark_knows_the_mamba2_sizes():
    from mambakit.bench.generation import PYTHIA_SIZES, random_mamba, size_of

    assert size_of("state-spaces/mamba2-1.3b") == "mamba2-1.3b" and size_of("mamba2-130m") == "mamba2-130m"
    assert size_of("state-spaces/mamba-130m") == "130m"
    model = random_mamba("mamba2-130m", "meta", torch.float32)
    assert type(model.backbone.layers[0].mixer) is Mamba2 and len(model.backbone.layers) == 24
    assert model.backbone.layers[0].mixer.nheads == 24 and PYTHIA_SIZES["mamba2-1.3b"][3] == "pythia-1.4b"
