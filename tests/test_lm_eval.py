"""lm-eval integration: the `mamba` model, the local GSM8K tasks, the CLI wrapper and the report.

A tiny random MambaLMHeadModel (d_model 64, 2 layers) with the real GPT-NeoX tokenizer (the test
fixture), saved in both checkpoint layouts; the local GSM8K tasks read the fixture's sample. Everything runs offline on the CPU.
"""
from __future__ import annotations

import glob
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch = pytest.importorskip("torch")
pytest.importorskip("lm_eval")

from conftest import GSM8K_DIR, TOKENIZER_DIR  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "evals" / "tasks"

LL_PAIRS = [
    ("Question: Janet has 3 apples and buys 4 more. How many apples does she have?\nAnswer:", " 7"),
    ("The capital of France is", " Paris."),
    ("A", " b c d e f g"),
    ("Question: Janet has 3 apples and buys 4 more. How many apples does she have?\nAnswer:", " 12"),
    ("", "An empty context is scored after the prefix token."),
    ("Numbers: 1, 2, 3,", " 4"),
]
PROMPTS = [
    "Question: Tom reads 12 pages a day for 5 days. How many pages does he read?\nAnswer:",
    "Hi",
    "The quick brown fox jumps over the lazy dog. Then",
    "x",  # one token
    "y",  # one token: same length as the previous one, prefilled together
    "Once upon a time there was a very small state-space model that",
]


def _instances(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Directories: `ours` (mamba_ssm layout), `hf` (transformers layout), both with the tokenizer."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mambakit.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=50277))
    with torch.no_grad():
        # With the default init a tiny random model repeats its last token whatever came before,
        # which would hide a wrong state. A wider embedding and louder mixers make the next token
        # depend on the context, with greedy choices well clear of ties (top-2 gaps > 1e-2 here).
        model.backbone.embedding.weight.normal_(0.0, 0.1)
        for layer in model.backbone.layers:
            layer.mixer.out_proj.weight.mul_(10.0)
    root = tmp_path_factory.mktemp("tiny_mamba")
    tok = load_tokenizer(TOKENIZER_DIR)
    for name, layout in (("ours", "mamba_ssm"), ("hf", "transformers")):
        model.save_pretrained(root / name, layout=layout)
        tok.save_pretrained(root / name)
    model.eval()
    return {"root": root, "ours": root / "ours", "hf": root / "hf", "model": model, "tok": tok}


@pytest.fixture(scope="module")
def lm(tiny):
    from mambakit.evaluation.lm_eval_model import MambaEvalLM

    return MambaEvalLM(pretrained=str(tiny["ours"]), device="cpu", dtype="float32", batch_size=1)


def _direct_loglikelihood(model, tok, context, continuation):
    """log p(continuation | context) and is_greedy straight from the model's logits."""
    if context:
        whole = tok.encode(context + continuation, add_special_tokens=False)
        n_ctx = len(tok.encode(context, add_special_tokens=False))
        ctx, cont = whole[:n_ctx], whole[n_ctx:]
    else:
        ctx, cont = [tok.bos_token_id], tok.encode(continuation, add_special_tokens=False)
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    pos = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
    tgt = torch.tensor(cont)
    return float(logp[pos, tgt].sum()), bool((logp[pos].argmax(-1) == tgt).all())


# --- registration and arguments ---------------------------------------------------------------

def test_registered_with_lm_eval():
    from lm_eval.api.registry import get_model

    from mambakit.evaluation.lm_eval_model import MambaEvalLM

    assert get_model("mamba") is MambaEvalLM
    # Registering ours must not hide lm-eval's own models.
    assert get_model("hf").__name__ == "HFLM"


def test_argument_errors(tiny):
    from mambakit.evaluation.lm_eval_model import MambaEvalLM, parse_batch_size

    assert parse_batch_size("auto:4") == (None, True)
    assert parse_batch_size("8") == (8, False)
    with pytest.raises(ValueError, match="batch_size"):
        parse_batch_size("big")
    with pytest.raises(ValueError, match="dtype"):
        MambaEvalLM(pretrained=str(tiny["ours"]), device="cpu", dtype="float8")
    with pytest.raises(FileNotFoundError, match="adapter"):
        MambaEvalLM(pretrained=str(tiny["ours"]), device="cpu", peft=str(tiny["root"] / "no_adapter"))
    with pytest.raises(Exception, match="does_not_exist"):
        MambaEvalLM(pretrained=str(tiny["root"] / "does_not_exist"), device="cpu")


# --- loglikelihood ----------------------------------------------------------------------------------

def test_loglikelihood_equals_direct_computation_for_any_batching(tiny, lm):
    from mambakit.evaluation.lm_eval_model import MambaEvalLM

    expected = [_direct_loglikelihood(tiny["model"], tiny["tok"], c, x) for c, x in LL_PAIRS]
    reqs = _instances("loglikelihood", LL_PAIRS)
    runs = {"bs1": lm.loglikelihood(reqs, disable_tqdm=True)}
    for bs in (3, "auto"):
        other = MambaEvalLM(pretrained=tiny["model"], tokenizer=str(tiny["ours"]), device="cpu", dtype="float32",
                            batch_size=bs)
        runs[f"bs{bs}"] = other.loglikelihood(reqs, disable_tqdm=True)
    for name, got in runs.items():
        for (lp, greedy), (want_lp, want_greedy), pair in zip(got, expected, LL_PAIRS):
            assert lp == pytest.approx(want_lp, abs=1e-4), (name, pair)
            assert greedy == want_greedy, (name, pair)
    # The two requests sharing a context are scored from one forward pass.
    assert runs["bs1"][0][0] != runs["bs1"][3][0]


def test_loglikelihood_rolling_equals_direct_computation(tiny):
    from mambakit.evaluation.lm_eval_model import MambaEvalLM

    text = "Mamba is a selective state-space model. " * 6
    toks = tiny["tok"].encode(text, add_special_tokens=False)
    ids = torch.tensor([[tiny["tok"].bos_token_id] + toks])
    with torch.no_grad():
        logp = torch.log_softmax(tiny["model"](ids).logits[0, :-1].double(), -1)
    want = float(logp[torch.arange(len(toks)), torch.tensor(toks)].sum())
    whole = MambaEvalLM(pretrained=tiny["model"], tokenizer=str(tiny["ours"]), device="cpu", dtype="float32",
                        max_length=512)
    (got,) = whole.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-3)
    # With windows shorter than the text: the sum over lm-eval's disjoint windows, each scored on its
    # own context (less context than the whole text had, so another number).
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    short = MambaEvalLM(pretrained=tiny["model"], tokenizer=str(tiny["ours"]), device="cpu", dtype="float32",
                        max_length=16, batch_size=4)
    (windowed,) = short.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    want_windows = 0.0
    for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
            token_list=toks, prefix_token=tiny["tok"].bos_token_id, max_seq_len=16, context_len=1)):
        ids = torch.tensor([(ctx + cont)[:-1]])
        with torch.no_grad():
            lp = torch.log_softmax(tiny["model"](ids).logits[0, -len(cont):].double(), -1)
        want_windows += float(lp[torch.arange(len(cont)), torch.tensor(cont)].sum())
    assert windowed == pytest.approx(want_windows, abs=1e-3)
    assert windowed != pytest.approx(want, abs=1e-3)


def test_same_numbers_as_lm_eval_hf_model_on_transformers_layout(tiny):
    """Our weights saved in transformers' layout, through lm-eval's `hf` model (MambaForCausalLM)."""
    pytest.importorskip("accelerate")
    from lm_eval.models.huggingface import HFLM

    from mambakit.evaluation.lm_eval_model import MambaEvalLM

    hf = HFLM(pretrained=str(tiny["hf"]), tokenizer=str(tiny["hf"]), device="cpu", dtype="float32", batch_size=1,
              max_length=32)
    ours = MambaEvalLM(pretrained=str(tiny["hf"]), device="cpu", dtype="float32", batch_size=4, max_length=32)
    reqs = _instances("loglikelihood", LL_PAIRS)
    for (a, ga), (b, gb), pair in zip(ours.loglikelihood(reqs, disable_tqdm=True),
                                      hf.loglikelihood(reqs, disable_tqdm=True), LL_PAIRS):
        assert a == pytest.approx(b, abs=1e-4), pair
        assert ga == gb, pair
    text = [("Grade-school math needs several steps of reasoning. " * 4,)]
    a = ours.loglikelihood_rolling(_instances("loglikelihood_rolling", text), disable_tqdm=True)
    b = hf.loglikelihood_rolling(_instances("loglikelihood_rolling", text), disable_tqdm=True)
    assert a[0] == pytest.approx(b[0], abs=1e-3)


def test_peft_adapter_is_applied(tiny, tmp_path):
    peft = pytest.importorskip("peft")
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    from mambakit.evaluation.lm_eval_model import MambaEvalLM

    torch.manual_seed(1)
    base = MambaLMHeadModel.from_pretrained(str(tiny["ours"]))
    wrapped = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["in_proj", "out_proj"],
                                                        init_lora_weights=False))
    wrapped.save_pretrained(tmp_path / "adapter")
    wrapped.eval()
    want = [_direct_loglikelihood(wrapped, tiny["tok"], c, x) for c, x in LL_PAIRS[:3]]
    plain = [_direct_loglikelihood(tiny["model"], tiny["tok"], c, x) for c, x in LL_PAIRS[:3]]
    reqs = _instances("loglikelihood", LL_PAIRS[:3])
    for merge in (True, False):
        lm = MambaEvalLM(pretrained=str(tiny["ours"]), device="cpu", dtype="float32", peft=str(tmp_path / "adapter"),
                         peft_merge=merge)
        got = lm.loglikelihood(reqs, disable_tqdm=True)
        for (lp, _), (w, _), (p, _) in zip(got, want, plain):
            assert lp == pytest.approx(w, abs=1e-3)
            assert abs(lp - p) > 1e-3  # the adapter changed something
    # pretrained=ADAPTER_DIR alone: the base comes from adapter_config.json (as finetune/ writes it).
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        MambaEvalLM(pretrained=str(tmp_path / "adapter"), device="cpu", dtype="float32")
    cfg["base_model_name_or_path"] = str(tiny["ours"])
    cfg_path.write_text(json.dumps(cfg))
    lm = MambaEvalLM(pretrained=str(tmp_path / "adapter"), device="cpu", dtype="float32")
    assert [lp for lp, _ in lm.loglikelihood(reqs, disable_tqdm=True)] == pytest.approx([w for w, _ in want], abs=1e-3)


# --- generation ---------------------------------------------------------------------------------------

def _with_fixed_batch_steps(lm):
    """Make `lm` decode as it does with a CUDA graph: a fixed batch, finished rows keep stepping."""
    lm._compact = False
    return lm


def _gen(lm, prompts, **kwargs):
    return lm.generate_until(_instances("generate_until", [(p, dict(kwargs)) for p in prompts]), disable_tqdm=True)


def test_prompts_of_different_lengths_batched_equal_alone(tiny, lm):
    from mambakit.evaluation.lm_eval_model import MambaEvalLM

    alone = [_gen(lm, [p], until=["\n\n"], max_gen_toks=12)[0] for p in PROMPTS]
    batched_lm = MambaEvalLM(pretrained=tiny["model"], tokenizer=str(tiny["ours"]), device="cpu", dtype="float32",
                             batch_size=8)
    batched = _gen(batched_lm, PROMPTS, until=["\n\n"], max_gen_toks=12)
    assert batched == alone
    assert any(len(t) > 0 for t in alone)
    # The fixed batch used with CUDA graphs (finished rows keep stepping), here with eager steps,
    # gives the same text.
    assert _gen(_with_fixed_batch_steps(batched_lm), PROMPTS, until=["\n\n"], max_gen_toks=12) == alone
    # Greedy decoding from the recurrent cache agrees with mamba_ssm's own generate.
    ids = tiny["tok"].encode(PROMPTS[0], add_special_tokens=False)
    seq = tiny["model"].generate(torch.tensor([ids]), max_length=len(ids) + 12, top_k=1, vocab_size=len(tiny["tok"]))
    assert alone[0] == tiny["tok"].decode(seq[0, len(ids):].tolist(), skip_special_tokens=True).split("\n\n")[0]


def test_out_of_memory_in_prefill_is_retried_with_fewer_rows(tiny, lm, monkeypatch):
    from mambakit.evaluation.lm_eval_model import MambaEvalLM

    alone = [_gen(lm, [p], until=["\n\n"], max_gen_toks=8)[0] for p in PROMPTS]
    small = MambaEvalLM(pretrained=tiny["model"], tokenizer=str(tiny["ours"]), device="cpu", dtype="float32",
                        batch_size=4, packed=False)
    forward = small._core.forward
    prefills = []

    def forward_short_of_memory(input_ids, *args, **kwargs):
        if kwargs["inference_params"].seqlen_offset == 0:  # a prefill: more than one row "runs out of memory"
            prefills.append(input_ids.shape[0])
            if input_ids.shape[0] > 1:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(small._core, "forward", forward_short_of_memory)
    assert _gen(small, PROMPTS, until=["\n\n"], max_gen_toks=8) == alone
    assert prefills.count(2) == 1 and prefills.count(1) == len(PROMPTS)  # "x" and "y" together, then alone
    assert small.stats["forward_rows"] == len(PROMPTS)


def test_packed_equals_padded_and_alone(tiny, lm):
    """packed=true (one packed row per batch, the default) gives the numbers and texts of packed=false
    and of each request alone; the packed forwards really run (cu_seqlens reach the backbone)."""
    from mambakit.evaluation.lm_eval_model import MambaEvalLM

    kw = dict(pretrained=tiny["model"], tokenizer=str(tiny["ours"]), device="cpu", dtype="float32", batch_size=8)
    packed, padded = MambaEvalLM(**kw), MambaEvalLM(**kw, packed=False)
    assert packed._packed and not padded._packed
    calls = []
    backbone_forward = packed._core.backbone.forward

    def spy(input_ids, *args, **kwargs):
        calls.append(kwargs.get("cu_seqlens") is not None)
        return backbone_forward(input_ids, *args, **kwargs)

    reqs = _instances("loglikelihood", LL_PAIRS)
    packed._core.backbone.forward = spy
    try:
        got = packed.loglikelihood(reqs, disable_tqdm=True)
        assert calls and calls[0], calls  # the first batch of loglikelihood inputs ran as one packed row
        calls.clear()
        texts = _gen(packed, PROMPTS, until=["\n\n"], max_gen_toks=12)
        assert calls[0], calls  # so did the generation's prefill
    finally:
        del packed._core.backbone.forward
    for (a, ga), (b, gb), (c, gc) in zip(got, padded.loglikelihood(reqs, disable_tqdm=True),
                                        lm.loglikelihood(reqs, disable_tqdm=True)):
        assert a == pytest.approx(b, abs=1e-4) and a == pytest.approx(c, abs=1e-4) and ga == gb == gc
    assert texts == _gen(padded, PROMPTS, until=["\n\n"], max_gen_toks=12) == \
        [_gen(lm, [p], until=["\n\n"], max_gen_toks=12)[0] for p in PROMPTS]


def test_out_of_memory_in_packed_prefill_is_retried_with_fewer_tokens(tiny, lm, monkeypatch):
    from mambakit.evaluation.lm_eval_model import MambaEvalLM

    alone = [_gen(lm, [p], until=["\n\n"], max_gen_toks=8)[0] for p in PROMPTS]
    small = MambaEvalLM(pretrained=tiny["model"], tokenizer=str(tiny["ours"]), device="cpu", dtype="float32",
                        batch_size=4)
    backbone_forward = small._core.backbone.forward
    packs = []

    def short_of_memory(input_ids, *args, **kwargs):
        cu = kwargs.get("cu_seqlens")
        if cu is not None:  # a packed prefill of more than two prompts "runs out of memory"
            packs.append(len(cu) - 1)
            if len(cu) > 3:
                raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return backbone_forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(small._core.backbone, "forward", short_of_memory)
    assert _gen(small, PROMPTS, until=["\n\n"], max_gen_toks=8) == alone
    assert packs[0] > 2 and 2 in packs


def test_context_matters_in_the_tiny_model(tiny, lm):
    """Guard for the tests above: the same last token after different contexts gives different text."""
    a, b = _gen(lm, ["x", "Hello there, x"], until=[], max_gen_toks=6)
    assert a != b


def test_lm_eval_builtin_mamba_ssm_model_runs_on_our_package(tiny, lm):
    """lm-eval's own `--model mamba_ssm` imports mamba_ssm upstream-style; on our package it gives
    our numbers (batch size 1: its batched generation left-pads, which a recurrent model feels)."""
    from lm_eval.models.mamba_lm import MambaLMWrapper

    builtin = MambaLMWrapper(pretrained=str(tiny["ours"]), tokenizer=str(tiny["ours"]), dtype="float32",
                             device="cpu", batch_size=1)
    reqs = _instances("loglikelihood", LL_PAIRS[:4])
    for (a, ga), (b, gb) in zip(builtin.loglikelihood(reqs, disable_tqdm=True), lm.loglikelihood(reqs, disable_tqdm=True)):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    prompts = PROMPTS[:3]
    assert _gen(builtin, prompts, until=["\n\n"], max_gen_toks=8) == _gen(lm, prompts, until=["\n\n"], max_gen_toks=8)


def test_generate_until_stops_at_stop_sequences(tiny):
    from mambakit.evaluation.lm_eval_model import MambaEvalLM

    lm = MambaEvalLM(pretrained=tiny["model"], tokenizer=str(tiny["ours"]), device="cpu", dtype="float32",
                     batch_size=4)
    prompts = PROMPTS[:3]
    max_gen = 24
    full = _gen(lm, prompts, until=[], max_gen_toks=max_gen)
    # A stop string taken from each free-running generation, past its first characters.
    stops = []
    for text in full:
        ascii_spans = [text[i:i + 2] for i in range(3, len(text) - 2) if text[i:i + 2].isascii()
                       and text[i:i + 2].strip()]
        assert ascii_spans, f"generation too short for the test: {text!r}"
        stops.append(ascii_spans[0])
    for prompt, text, stop in zip(prompts, full, stops):
        (got,) = _gen(lm, [prompt], until=[stop], max_gen_toks=max_gen)
        assert got == text.split(stop)[0]
        assert stop not in got
    # All rows in one batch, each with every stop: the loop ends once every row has hit one.
    lm.stats["decode_steps"] = 0
    got = _gen(lm, prompts, until=stops, max_gen_toks=max_gen)
    expected = []
    for text in full:
        for s in stops:
            text = text.split(s)[0]
        expected.append(text)
    assert got == expected
    assert lm.stats["decode_steps"] < max_gen - 1
    # The generation budget is honoured.
    tok = tiny["tok"]
    (short,) = _gen(lm, prompts[:1], until=[], max_gen_toks=3)
    assert len(tok.encode(short, add_special_tokens=False)) <= 3


def test_sampled_generation(tiny, lm):
    torch.manual_seed(123)
    a = _gen(lm, PROMPTS[:2], until=["\n\n"], max_gen_toks=8, do_sample=True, temperature=1.0, top_p=0.9)
    torch.manual_seed(123)
    b = _gen(lm, PROMPTS[:2], until=["\n\n"], max_gen_toks=8, do_sample=True, temperature=1.0, top_p=0.9)
    assert a == b and all(isinstance(t, str) for t in a)
    greedy = _gen(lm, PROMPTS[:2], until=["\n\n"], max_gen_toks=8)
    # do_sample with temperature 0 is greedy, as in lm-eval's HF model; so is sampling from the top 1
    assert _gen(lm, PROMPTS[:2], until=["\n\n"], max_gen_toks=8, do_sample=True, temperature=0.0) == greedy
    assert _gen(lm, PROMPTS[:2], until=["\n\n"], max_gen_toks=8, do_sample=True, top_k=1) == greedy
    # sampling with a near-zero top_p keeps only the most likely token: greedy again
    assert _gen(lm, PROMPTS[:2], until=["\n\n"], max_gen_toks=8, do_sample=True, top_p=1e-6) == greedy


@pytest.mark.cuda
def test_cuda_graph_generation_equals_eager_and_cpu(tiny, lm):
    from mambakit.evaluation.lm_eval_model import MambaEvalLM

    cpu = _gen(lm, PROMPTS, until=["\n\n"], max_gen_toks=12)
    runs = {}
    for graph in (True, False):
        gpu = MambaEvalLM(pretrained=str(tiny["ours"]), device="cuda", dtype="float32", batch_size=8,
                          cuda_graph=graph)
        runs[graph] = _gen(gpu, PROMPTS, until=["\n\n"], max_gen_toks=12)
        assert gpu._cuda_graph is graph  # no capture failure
    assert runs[True] == runs[False] == cpu


# --- local tasks ---------------------------------------------------------------------------------------

def test_gsm8k_task_helpers(monkeypatch, tmp_path):
    sys.path.insert(0, str(TASKS_DIR / "gsm8k_local"))
    try:
        import utils as gsm8k_utils
    finally:
        sys.path.pop(0)
    doc = {"question": "Tom has 3 boxes of 12 eggs and breaks 6. How many eggs are left?",
           "answer": "3 * 12 = <<3*12=36>>36 eggs.\n36 - 6 = <<36-6=30>>30\n#### 1,030"}
    assert gsm8k_utils.final_answer(doc["answer"]) == "1030"
    mc = gsm8k_utils._process_doc_mc(doc)
    assert mc["choices"][mc["gold"]] == "1030" and len(set(mc["choices"])) == 4
    assert mc["choices"][:mc["gold"]] + mc["choices"][mc["gold"] + 1:] == ["36", "30", "3"]
    with pytest.raises(FileNotFoundError, match="gsm8k_dir"):
        gsm8k_utils.resolve_gsm8k_dir(tmp_path)
    monkeypatch.setenv(gsm8k_utils.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=gsm8k_utils.ENV_VAR):
        gsm8k_utils.resolve_gsm8k_dir()
    monkeypatch.setenv(gsm8k_utils.ENV_VAR, str(GSM8K_DIR))
    assert gsm8k_utils.resolve_gsm8k_dir() == GSM8K_DIR.resolve()
    dd = gsm8k_utils.load_gsm8k()
    assert (dd["train"].num_rows, dd["test"].num_rows) == (200, 60)  # the fixture's sample
    assert gsm8k_utils.load_gsm8k(gsm8k_dir=str(GSM8K_DIR))["test"][0] == dd["test"][0]


def test_gsm8k_hub_fallback(monkeypatch):
    """Neither metadata nor the environment variable: openai/gsm8k (main) through `datasets`, with
    an error naming the local alternatives when that fails (offline)."""
    import datasets

    sys.path.insert(0, str(TASKS_DIR / "gsm8k_local"))
    try:
        import utils as gsm8k_utils
    finally:
        sys.path.pop(0)
    monkeypatch.delenv(gsm8k_utils.ENV_VAR, raising=False)
    assert gsm8k_utils.resolve_gsm8k_dir() is None
    calls = []

    def fake_load(name, config):
        calls.append((name, config))
        rows = [{"question": "1+1?", "answer": "1+1=2\n#### 2", "extra": 0}]
        return datasets.DatasetDict({s: datasets.Dataset.from_list(rows) for s in ("train", "test")})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    dd = gsm8k_utils.load_gsm8k()
    assert calls == [("openai/gsm8k", "main")]
    assert dd["test"].column_names == ["question", "answer"] and dd["test"][0]["question"] == "1+1?"

    def offline(name, config):
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match=f"openai/gsm8k.*offline.*{gsm8k_utils.ENV_VAR}"):
        gsm8k_utils.load_gsm8k()


def test_gsm8k_answer_extraction_filters():
    """The task's strict and flexible regexes with lm-eval's own filter and metric."""
    import yaml
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_constructor("!function", lambda loader, node: None)
    cfg = yaml.load((TASKS_DIR / "gsm8k_local" / "gsm8k_local.yaml").read_text(), Loader=_Loader)
    filters = {f["name"]: f["filter"][0] for f in cfg["filter_list"]}
    ignore = cfg["metric_list"][0]["regexes_to_ignore"]

    def score(name, response, gold="1200"):
        f = filters[name]
        (picked,) = RegexFilter(regex_pattern=f["regex_pattern"], group_select=f["group_select"]).apply(
            [[response]], [{}])
        return exact_match_hf_evaluate([gold], [picked[0]], regexes_to_ignore=ignore, ignore_case=True)["exact_match"]

    assert score("strict-match", "5 * 240 = 1200 dollars.\n#### 1,200") == 1.0
    assert score("strict-match", "The answer is 1200.") == 0.0
    assert score("flexible-extract", "So he pays 3 * 400 = $1,200.") == 1.0
    assert score("flexible-extract", "It costs 1200 dollars, not 1300.") == 0.0


def test_local_gsm8k_tasks_through_the_cli(tiny, tmp_path, monkeypatch):
    """evals/lm_harness_eval.py with --limit 8: generative and loglikelihood tasks, results written."""
    monkeypatch.setenv("MAMBAKIT_GSM8K_DIR", str(GSM8K_DIR))
    sys.path.insert(0, str(REPO / "evals"))
    try:
        import lm_harness_eval
    finally:
        sys.path.pop(0)
    out = tmp_path / "results"
    monkeypatch.setattr(sys, "argv", ["lm_harness_eval.py"])
    lm_harness_eval.main([
        "--model", "mamba", "--model_args", f"pretrained={tiny['ours']},dtype=float32",
        "--tasks", "gsm8k_local,gsm8k_local_mc", "--device", "cpu", "--batch_size", "auto",
        "--limit", "8", "--num_fewshot", "2", "--gen_kwargs", "max_gen_toks=24",
        "--output_path", str(out), "--log_samples"])
    (results_file,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    results = json.loads(Path(results_file).read_text())["results"]
    assert set(results) == {"gsm8k_local", "gsm8k_local_mc"}
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(results["gsm8k_local"])
    assert {"acc,none", "acc_norm,none"} <= set(results["gsm8k_local_mc"])
    (samples_file,) = glob.glob(str(out / "**" / "samples_gsm8k_local_2*.jsonl"), recursive=True)
    samples = [json.loads(line) for line in Path(samples_file).read_text().splitlines()]
    assert len({s["doc_id"] for s in samples}) == 8  # (one entry a filter)
    for s in samples:  # the task's stop sequences never survive in a response
        for resp in s["resps"][0]:
            assert "Question:" not in resp and "\n\n" not in resp

    from mambakit.evaluation.results_table import load_metrics, results_table

    metrics = load_metrics(out)
    assert set(metrics["gsm8k_local"]) == {"exact_match (strict-match)", "exact_match (flexible-extract)"}
    table = results_table({"tiny": out, "again": results_file})
    assert "| gsm8k_local_mc | acc |" in table and table.count("\n") == 2 + 4


def _harness_run(tiny, out, nproc):
    """evals/lm_harness_eval.py on the local GSM8K tasks, in 1 process or under torchrun (gloo)."""
    import subprocess

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(29700 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "MAMBAKIT_GSM8K_DIR": str(GSM8K_DIR), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run([*launcher, str(REPO / "evals" / "lm_harness_eval.py"), "--model", "mamba",
                           "--model_args", f"pretrained={tiny['ours']},dtype=float32",
                           "--tasks", "gsm8k_local,gsm8k_local_mc", "--device", "cpu", "--batch_size", "4",
                           "--limit", "5", "--num_fewshot", "1", "--gen_kwargs", "max_gen_toks=16",
                           "--output_path", str(out), "--log_samples", "--seed", "0"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (results_file,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    samples = {}
    for f in glob.glob(str(out / "**" / "samples_*.jsonl"), recursive=True):
        for line in Path(f).read_text().splitlines():
            s = json.loads(line)
            samples[(Path(f).name.split("_20")[0], s["doc_id"], s["filter"])] = s["resps"]
    return json.loads(Path(results_file).read_text())["results"], samples


def test_data_parallel_evaluation_equals_one_process(tiny, tmp_path):
    """lm-eval's data-parallel mode (torchrun, 2 CPU processes, gloo): each rank evaluates its share
    of the documents (5: uneven, so lm-eval pads one rank) and rank 0 reports the same metrics and
    the same responses as one process."""
    one, one_samples = _harness_run(tiny, tmp_path / "one", 1)
    two, two_samples = _harness_run(tiny, tmp_path / "two", 2)
    assert set(one) == set(two) == {"gsm8k_local", "gsm8k_local_mc"}
    for task in one:
        for metric, value in one[task].items():
            if isinstance(value, float):
                assert two[task][metric] == pytest.approx(value, rel=1e-9, abs=1e-12), (task, metric)
    assert len(one_samples) == len(two_samples) > 0
    assert {k[1] for k in two_samples} == set(range(5))
    for key, resps in one_samples.items():  # (lm-eval repeats a padded rank's last request: one more response)
        got, want = [r[0] for r in two_samples[key]], [r[0] for r in resps]
        if key[0].endswith("_mc"):  # (loglikelihood, is_greedy): batched with other requests, so fp32 sums differ
            assert [g[1] for g in got] == [w[1] for w in want], key
            assert [float(g[0]) for g in got] == pytest.approx([float(w[0]) for w in want], rel=1e-3), key
        else:
            assert got == want, key


def test_data_parallel_ranks_from_the_launcher_environment():
    from mambakit.evaluation import data_parallel as dp

    assert dp.launched_ranks({}) == (0, 1, 0)
    assert dp.launched_ranks({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}) == (1, 2, 1)
    with pytest.raises(ValueError, match=r"RANK=2 is not in \[0, WORLD_SIZE=2\)"):
        dp.launched_ranks({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="must be integers"):
        dp.launched_ranks({"RANK": "x", "WORLD_SIZE": "2"})
    assert dp.rank_device(torch.device("cpu"), 3) == torch.device("cpu")


# --- report ------------------------------------------------------------------------------------------

def test_results_table_compares_models(tmp_path):
    from mambakit.evaluation.results_table import compare_metrics, main, results_table

    def write(name, results):
        p = tmp_path / name / "results_2026-01-01.json"
        p.parent.mkdir()
        p.write_text(json.dumps({"results": results}))
        return p

    a = write("a", {"arc_easy": {"alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.01,
                                 "acc_norm,none": 0.45, "acc_norm_stderr,none": "N/A"},
                    "gsm8k": {"exact_match,strict-match": 0.02, "exact_match_stderr,strict-match": 0.004}})
    b = write("b", {"arc_easy": {"acc,none": 0.6, "acc_stderr,none": 0.02, "sample_len": 100}})
    table = results_table({"base": a, "lora": tmp_path / "b"})
    lines = table.strip().splitlines()
    assert lines[0] == "| task | metric | base | lora |"
    assert "| arc_easy | acc | 0.5000 ± 0.0100 | 0.6000 ± 0.0200 |" in lines
    assert "| arc_easy | acc_norm | 0.4500 | – |" in lines
    assert "| gsm8k | exact_match (strict-match) | 0.0200 ± 0.0040 | – |" in lines
    assert compare_metrics({"base": a})["base"]["arc_easy"] == {"acc": 0.5, "acc_norm": 0.45}
    main([f"base={a}", f"lora={b}", "--out", str(tmp_path / "t.md"), "--json", str(tmp_path / "m.json")])
    assert (tmp_path / "t.md").read_text() == table
    assert json.loads((tmp_path / "m.json").read_text())["lora"] == {"arc_easy": {"acc": 0.6}}
    with pytest.raises(FileNotFoundError, match="results"):
        results_table({"x": tmp_path / "missing"})


def test_cli_results_table_and_include_path(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "evals"))
    try:
        import lm_harness_eval
    finally:
        sys.path.pop(0)
    p = tmp_path / "results.json"
    p.write_text(json.dumps({"results": {"gsm8k_local": {"exact_match,strict-match": 0.25}}}))
    lm_harness_eval.main(["--results_table", f"tiny={p}"])
    assert "| gsm8k_local | exact_match (strict-match) | 0.2500 |" in capsys.readouterr().out
    added = lm_harness_eval._add_local_tasks(["--model", "mamba", "--tasks", "arc_easy,gsm8k_local_mc"])
    assert added[-2:] == ["--include_path", str(TASKS_DIR)]
    assert lm_harness_eval._add_local_tasks(["--tasks", "arc_easy"]) == ["--tasks", "arc_easy"]
