"""A tiny Mamba-2 model through the study's tools: PEFT LoRA on in_proj / out_proj (gradients, cached
decoding), the fine-tuning recipe with its default targets, merge, and the lm-eval model (CPU)."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import GSM8K_DIR as GSM8K, TOKENIZER_DIR as TOKENIZER
from tiny_models import loud_mamba2_model

peft = pytest.importorskip("peft")


def lora(model, targets=("in_proj", "out_proj")):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), lora_dropout=0.0))
    with torch.no_grad():   # B starts at zero: make the adapters change the output
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    return wrapped


def test_lora_on_in_proj_and_out_proj_gets_gradients_and_changes_the_output():
    model = loud_mamba2_model()
    ids = torch.randint(0, 101, (2, 13))
    with torch.no_grad():
        before = model(ids).logits
    wrapped = lora(model)
    out = wrapped(input_ids=ids, labels=ids)
    assert not torch.allclose(out.logits, before)
    out.loss.backward()
    adapters = [(n, p) for n, p in wrapped.named_parameters() if p.requires_grad]
    assert len(adapters) == 2 * 2 * 2      # 2 layers x (in_proj, out_proj) x (A, B)
    for name, p in adapters:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in wrapped.named_parameters() if not p.requires_grad)


def test_cached_decoding_with_lora_equals_the_full_forward():
    from mamba_ssm.utils.generation import DecodingSession

    wrapped = lora(loud_mamba2_model(seed=1)).eval()
    base = wrapped.base_model.model
    seq = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        full = base(seq).logits
    session = DecodingSession(base, batch_size=2, max_seqlen=9)
    torch.testing.assert_close(session.prefill(seq[:, :4]), full[:, 3], rtol=0, atol=1e-4)
    for t in range(4, 9):
        torch.testing.assert_close(session.step(seq[:, t]), full[:, t], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def tiny2(tmp_path_factory):
    """A tiny Mamba-2 checkpoint (GPT-NeoX vocabulary) with the tokenizer, and 24 short GSM8K problems."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mambakit.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("tiny_mamba2")
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=64, n_layer=2, vocab_size=50277,
                      ssm_cfg={"layer": "Mamba2", "d_state": 16, "headdim": 16, "ngroups": 2, "chunk_size": 32})
    model = MambaLMHeadModel(cfg, initializer_cfg={"initializer_range": 0.1})
    model.save_pretrained(root / "model")
    load_tokenizer(TOKENIZER).save_pretrained(root / "model")
    rows = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()]
    rows.sort(key=lambda r: len(r["question"]) + len(r["answer"]))
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    return {"root": root, "model": root / "model", "data": root / "data.jsonl"}


def test_finetune_then_merge_a_mamba2_checkpoint(tiny2, tmp_path):
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mambakit.finetune import FinetuneConfig, run
    from mambakit.finetune.merge import MergeConfig, merge
    from peft import PeftModel

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = FinetuneConfig(model=str(tiny2["model"]), tokenizer=str(TOKENIZER), output_dir=str(tmp_path / "ft"),
                             dataset=str(tiny2["data"]), eval_size=4, max_length=48, batch_size=4, max_steps=4,
                             learning_rate=1e-2, warmup_steps=1, lora_r=4, lora_alpha=8, save_steps=4,
                             logging_steps=1, eval_max_new_tokens=2, eval_batch_size=4, progress=False, seed=1)
        res = run(cfg)   # the default targets: Mamba-2 has in_proj and out_proj of them
        assert res.status == "completed"
        adapter_cfg = json.loads((tmp_path / "ft" / "adapter" / "adapter_config.json").read_text())
        assert sorted(adapter_cfg["target_modules"]) == ["in_proj", "out_proj"]
        out = merge(MergeConfig(adapter=str(tmp_path / "ft" / "adapter"), out=str(tmp_path / "merged")))
        assert out["max_abs_diff"] <= 1e-4
        merged = MambaLMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
        adapted = PeftModel.from_pretrained(MambaLMHeadModel.from_pretrained(str(tiny2["model"])),
                                            str(tmp_path / "ft" / "adapter")).eval()
        x = torch.randint(0, 50000, (1, 12))
        with torch.no_grad():
            torch.testing.assert_close(merged(x).logits, adapted(input_ids=x).logits, rtol=0, atol=1e-4)
    finally:
        torch.set_num_threads(n)


def test_lm_eval_model_on_a_mamba2_checkpoint(tiny2):
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mambakit.evaluation.lm_eval_model import MambaEvalLM
    from mambakit.tokenizer import load_tokenizer

    lm = MambaEvalLM(pretrained=str(tiny2["model"]), device="cpu", dtype="float32", batch_size=2)
    tok = load_tokenizer(tiny2["model"])
    model = MambaLMHeadModel.from_pretrained(str(tiny2["model"])).eval()
    ctx = tok.encode("Natalia sold 48 clips", add_special_tokens=False)
    cont = tok.encode(" in April.", add_special_tokens=False)
    [(ll, _)] = lm._loglikelihood_tokens([(("", ""), ctx, cont)])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].double(), -1)
    want = float(logp[torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1), torch.tensor(cont)].sum())
    assert ll == pytest.approx(want, abs=1e-3)
