"""Decoding (mamba_ssm.utils.generation): sample()'s filters, token by token; batches of prompts of
different lengths against each prompt alone; eos on every row; cached decoding with LoRA adapters
against the full forward; and that generation.py and cuda_graph.py do not import each other."""
import ast
from pathlib import Path

import pytest
import torch

from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mamba_ssm.utils import compiled_step
from mamba_ssm.utils.generation import (DecodingSession, filter_logits, generate_ragged,
                                        modify_logit_for_repetition_penalty, sample)
from tiny_models import loud_model

REPO = Path(__file__).resolve().parents[1]
VOCAB = 101


def ragged_prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in (5, 1, 3, 5, 1, 8)]


def alone(model, prompt, new_tokens, eos=None):
    """Greedy continuation of one prompt by model.generate, cut after its first eos."""
    seq = model.generate(torch.tensor([prompt]), max_length=len(prompt) + new_tokens)[0, len(prompt):].tolist()
    return seq[:seq.index(eos) + 1] if eos in seq else seq


# ---------------------------------------------------------------------------------------------------
# sample(), one option at a time
# ---------------------------------------------------------------------------------------------------

# Row 0: probabilities 0.5, 0.3, 0.12, 0.08; row 1 the same, in reverse token order.
PROBS = torch.tensor([[0.5, 0.3, 0.12, 0.08], [0.08, 0.12, 0.3, 0.5]])
LOGITS = PROBS.log()


def drawn(logits, n=4000, **kw):
    """The set of tokens each row produced in n draws (seeded)."""
    g = torch.Generator().manual_seed(0)
    rows = logits.repeat_interleave(n, dim=0)
    tokens = sample(rows, generator=g, **kw).view(logits.shape[0], n)
    return [set(t.tolist()) for t in tokens]


def allowed(filtered):
    return [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in filtered]


@pytest.mark.parametrize("kw,want", [
    (dict(top_k=0), [{0, 1, 2, 3}, {0, 1, 2, 3}]),
    (dict(top_k=2), [{0, 1}, {2, 3}]),
    (dict(top_k=3), [{0, 1, 2}, {1, 2, 3}]),
    (dict(top_k=0, top_p=0.3), [{0}, {3}]),          # the most likely token stays though it holds > top_p
    (dict(top_k=0, top_p=0.6), [{0, 1}, {2, 3}]),
    (dict(top_k=0, top_p=0.85), [{0, 1, 2}, {1, 2, 3}]),
    (dict(top_k=0, top_p=0.95), [{0, 1, 2, 3}, {0, 1, 2, 3}]),
    (dict(top_k=0, min_p=0.2), [{0, 1, 2}, {1, 2, 3}]),  # kept: p >= 0.2 * 0.5
    (dict(top_k=0, min_p=0.5), [{0, 1}, {2, 3}]),
    (dict(top_k=0, min_p=0.9), [{0}, {3}]),
])
def test_sampling_filters_keep_exactly_these_tokens(kw, want):
    filtered = filter_logits(LOGITS, **kw)
    assert allowed(filtered) == want
    finite = torch.isfinite(filtered)
    assert torch.equal(filtered[finite], LOGITS[finite])  # kept logits unchanged (temperature 1)
    assert drawn(LOGITS, **kw) == want


def test_temperature_divides_the_logits_and_shapes_the_draws():
    for t in (0.5, 2.0):
        assert torch.equal(filter_logits(LOGITS, temperature=t), LOGITS / t)
    g = torch.Generator().manual_seed(0)
    n = 40000
    for t in (0.5, 2.0):
        tokens = sample(LOGITS[:1].expand(n, -1), top_k=0, temperature=t, generator=g)
        freq = torch.bincount(tokens, minlength=4).float() / n
        torch.testing.assert_close(freq, torch.softmax(LOGITS[0] / t, -1), atol=0.01, rtol=0)
    # greedy ignores the temperature
    assert sample(LOGITS, top_k=1, temperature=0.01).tolist() == [0, 3]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0], [2.0, -1.0, 0.5, -3.0]])
    prev = torch.tensor([[0, 1, 1], [2, 3, 3]])  # repeats are penalised once
    got = modify_logit_for_repetition_penalty(logits, prev, 2.0)
    assert torch.equal(got, torch.tensor([[1.0, -2.0, 0.5, -3.0], [2.0, -1.0, 0.25, -6.0]]))
    assert modify_logit_for_repetition_penalty(logits, prev, 1.0) is logits


# ---------------------------------------------------------------------------------------------------
# ragged batches
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cg", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_ragged_batch_gives_each_prompt_its_own_tokens(cg):
    model = loud_model()
    prompts = ragged_prompts()
    want = [alone(model, p, 12) for p in prompts]
    assert len({tuple(w) for w in want}) == len(want)  # the rows differ, so a mix-up would show
    assert generate_ragged(model, prompts, 12, cg=cg) == want
    # eos: the rows end at different steps (each list ends with its eos), two never emit it
    eos = want[0][3]
    want_eos = [alone(model, p, 12, eos=eos) for p in prompts]
    ends = [len(w) for w in want_eos if w[-1] == eos]
    assert len(set(ends)) >= 3 and sum(eos not in w for w in want) >= 2, want
    for drop in (True, False):
        assert generate_ragged(model, prompts, 12, eos_token_id=eos, cg=cg, drop_finished=drop) == want_eos
    # the repetition penalty sees each row's own prompt and tokens (prompts ending in tokens the model
    # goes on to repeat, so that the penalty on the prompt matters)
    longer = [p + w[:4] for p, w in zip(prompts, want)]
    penalised = [model.generate(torch.tensor([p]), max_length=len(p) + 8, repetition_penalty=2.0)[0, len(p):].tolist()
                 for p in longer]
    assert generate_ragged(model, longer, 8, repetition_penalty=2.0, cg=cg) == penalised


def test_session_drops_finished_rows_and_prefills_rows_in_any_order():
    model = loud_model()
    prompts = ragged_prompts()
    want = [alone(model, p, 10) for p in prompts]
    eos = want[0][3]
    session = DecodingSession(model, batch_size=6, max_seqlen=20)
    # in chunks, as lm-eval's budgeted prefill does: rows not contiguous, not in order
    for rows in ([5, 0], [2], [4, 1, 3]):
        logits = session.prefill([prompts[r] for r in rows], rows=rows)
        assert logits.shape == (len(rows), 104)
        assert logits.argmax(-1).tolist() == [want[r][0] for r in rows]
    out = session.generate(10, eos_token_id=eos)
    assert out.to_lists() == [alone(model, p, 10, eos=eos) for p in prompts]
    unfinished = [r for r, w in enumerate(want) if eos not in w]
    assert session.rows == unfinished  # the finished rows left the batch
    assert out.lengths.tolist() == [len(w) for w in out.to_lists()]
    assert (out.tokens[0, 4:] == eos).all()  # padding after a row's end
    # a stop callback ends a row after the token it returns True for
    seen = []

    def stop(row, tokens):
        seen.append((row, list(tokens)))
        return row == 1 and len(tokens) == 2

    got = generate_ragged(model, prompts, 6, stop=stop)
    assert got[1] == want[1][:2] and [g for r, g in enumerate(got) if r != 1] == [w[:6] for w in want if w != want[1]]
    assert (1, want[1][:3]) not in seen and (0, want[0][:6]) in seen


def test_packed_prefill_equals_one_forward_per_length():
    """Prompts of different lengths prefilled as one packed row leave the logits and the cache that a
    forward per length leaves, also into rows out of order; the decoded tokens are the same."""
    model = loud_model()
    prompts = ragged_prompts()
    sessions = [DecodingSession(model, batch_size=6, max_seqlen=24, packed_prefill=p) for p in (True, False)]
    for rows in ([5, 0, 2], [4, 1, 3]):
        a, b = (s.prefill([prompts[r] for r in rows], rows=rows) for s in sessions)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for layer, states in sessions[1].inference_params.key_value_memory_dict.items():
        for x, y in zip(sessions[0].inference_params.key_value_memory_dict[layer], states):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert sessions[0].generate(8).to_lists() == sessions[1].generate(8).to_lists() == \
        [alone(model, p, 8) for p in prompts]
    assert generate_ragged(model, prompts, 8, packed_prefill=False) == generate_ragged(model, prompts, 8)


def test_session_errors_name_the_argument():
    model = loud_model()
    session = DecodingSession(model, batch_size=2, max_seqlen=8)
    with pytest.raises(ValueError, match=r"prompt 1 must be a non-empty token sequence"):
        session.prefill([[1, 2], []])
    with pytest.raises(ValueError, match=r"3 prompts for a batch of 2 rows"):
        session.prefill([[1], [2], [3]])
    with pytest.raises(ValueError, match=r"rows must be 1 distinct row numbers among \[0, 1\], got \[2\]"):
        session.prefill([[1]], rows=[2])
    session.prefill([[1, 2]], rows=[0])
    with pytest.raises(ValueError, match=r"rows \[1\] have not been prefilled"):
        session.step(torch.tensor([1, 2]))
    session.prefill([[3]], rows=[1])
    with pytest.raises(ValueError, match=r"tokens must be \(2,\) or \(2, 1\), got \(3,\)"):
        session.step(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"max_new_tokens must be a positive int, got 0"):
        session.generate(0)
    fixed = DecodingSession(model, batch_size=2, max_seqlen=8, cg=True)
    with pytest.raises(ValueError, match="keep_rows: a cg=True session steps a fixed batch of 2 rows"):
        fixed.keep_rows([0])
    with pytest.raises(ValueError, match=r"batch_size must be a positive int, got 0"):
        DecodingSession(model, batch_size=0, max_seqlen=8)


def test_session_steps_equal_the_full_forward():
    model = loud_model(seed=2)
    seq = torch.randint(0, VOCAB, (3, 9))
    full = model(seq).logits
    session = DecodingSession(model, batch_size=3, max_seqlen=9)
    torch.testing.assert_close(session.prefill(seq[:, :4]), full[:, 3], rtol=0, atol=1e-5)
    for t in range(4, 9):
        torch.testing.assert_close(session.step(seq[:, t]), full[:, t], rtol=0, atol=1e-4)
    assert session.steps == 5 and session.step_kind == "eager"


def test_decode_streams_every_token_and_times_itself(capsys):
    model = loud_model(seed=3)
    prompt = torch.randint(0, VOCAB, (2, 4))

    class Streamer:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, t):
            self.puts.append(t)

        def end(self):
            self.ended = True

    streamer = Streamer()
    seq = model.generate(prompt, max_length=11, streamer=streamer, enable_timing=True)
    assert streamer.ended and torch.equal(streamer.puts[0], prompt)
    assert torch.equal(torch.cat([streamer.puts[0]] + [t[:, None] for t in streamer.puts[1:]], dim=1), seq)
    assert "Prompt processing + decoding time" in capsys.readouterr().out
    assert torch.equal(seq, model.generate(prompt, max_length=11))


# ---------------------------------------------------------------------------------------------------
# LoRA adapters: cached decoding against the full forward
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt_len", [1, 5])
def test_cached_decoding_with_lora_on_every_projection_equals_full_forward(prompt_len):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=VOCAB, ssm_cfg={"d_state": 8}))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["in_proj", "x_proj", "dt_proj", "out_proj"],
                          init_lora_weights=False)  # lora_B random, not zero: the adapters change the outputs
    wrapped = peft.get_peft_model(model, cfg).eval()
    lora = wrapped.get_base_model()
    mixer = lora.backbone.layers[0].mixer
    assert all(hasattr(getattr(mixer, n), "lora_B") for n in ("in_proj", "x_proj", "dt_proj", "out_proj"))
    seq = torch.randint(0, VOCAB, (3, 14))
    out = lora.generate(seq[:, :prompt_len], max_length=14, teacher_outputs=seq, output_scores=True,
                        return_dict_in_generate=True)
    with torch.no_grad():
        full = lora(seq).logits
        with wrapped.disable_adapter():
            plain = lora(seq).logits
    assert (full - plain).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(torch.stack(out.scores, dim=1), full[:, prompt_len - 1:-1], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# module layout
# ---------------------------------------------------------------------------------------------------

def _imported_modules(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_generation_and_cuda_graph_do_not_import_each_other():
    utils = REPO / "mamba_ssm" / "utils"
    assert not any("generation" in m for m in _imported_modules(utils / "cuda_graph.py"))
    assert not any("cuda_graph" in m or m.endswith("utils.generation")
                   for m in _imported_modules(utils / "compiled_step.py"))
    from mamba_ssm.utils import generation, inference_params

    assert generation.InferenceParams is inference_params.InferenceParams  # upstream's import path
    assert compiled_step.ENABLED in (True, False)
