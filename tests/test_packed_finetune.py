"""Fine-tuning on packed rows trains the same model as on padded rows: 50 AdamW steps on GSM8K
problems (the fixture's real train examples, the recipe's template, response-only labels), each step
the same two examples either right-padded into two rows or packed into one row with seq_idx (the
recipe's collator and loss). The loss per response token agrees within 1e-3 at every step (fp32,
CPU, a tiny model; token ids folded into its small vocabulary, which changes nothing packing does)."""
import json

import pytest
import torch

from conftest import GSM8K_DIR as GSM8K, TOKENIZER_DIR as TOKENIZER
from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from mambakit.data.math_data import IGNORE_INDEX, DataCollator, format_prompt, model_supports_packing, tokenize_examples
from mambakit.finetune.trainer import response_loss

VOCAB, STEPS, BATCH = 499, 50, 2


def _examples():
    from mambakit.tokenizer import load_tokenizer

    tok = load_tokenizer(str(TOKENIZER))
    rows = [json.loads(line) for line in (GSM8K / "train.jsonl").read_text().splitlines()][:STEPS * BATCH]
    ids, labels, _ = tokenize_examples([format_prompt(r["question"]) for r in rows], [r["answer"] for r in rows],
                                       tok, max_length=512)
    fold = [[t % VOCAB for t in x] for x in ids]
    return fold, [[t if t == IGNORE_INDEX else t % VOCAB for t in x] for x in labels]


@pytest.mark.slow  # about 8 s on 2 shared cores
def test_packed_and_padded_training_agree_for_50_steps():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on a shared 2-core machine: one intra-op thread is fastest
    try:
        _train_both()
    finally:
        torch.set_num_threads(threads)


def _train_both():
    ids, labels = _examples()
    assert len(ids) == STEPS * BATCH
    torch.manual_seed(0)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=VOCAB, pad_vocab_size_multiple=1, ssm_cfg={"d_state": 8})
    padded_model = MambaLMHeadModel(cfg)
    packed_model = MambaLMHeadModel(cfg)
    packed_model.load_state_dict(padded_model.state_dict())
    assert model_supports_packing(packed_model)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (padded_model, packed_model)]
    collate = DataCollator(pad_token_id=0)
    pad_tokens = real_tokens = 0
    for step in range(STEPS):
        part = range(step * BATCH, (step + 1) * BATCH)
        padded = collate([{"input_ids": ids[i], "labels": labels[i]} for i in part])
        packed = collate([{"input_ids": sum((ids[i] for i in part), []), "labels": sum((labels[i] for i in part), []),
                           "seq_lengths": [len(ids[i]) for i in part]}])
        assert packed["seq_idx"].shape == (1, sum(len(ids[i]) for i in part))
        pad_tokens += padded["input_ids"].numel()
        real_tokens += int(packed["attention_mask"].sum())
        losses = []
        for model, opt, batch in ((padded_model, opts[0], padded), (packed_model, opts[1], packed)):
            lab = batch.pop("labels")
            loss = response_loss(model(**batch), lab)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) <= 1e-3, f"step {step}: padded {losses[0]} packed {losses[1]}"
        first = losses[0] if step == 0 else first
    assert losses[0] < first - 0.5  # it learned something
    assert real_tokens < pad_tokens


def test_packing_default_and_unsupported_model(tmp_path):
    """packing None packs for this package's Mamba and pads for a model without seq_idx; packing
    asked for such a model is an error naming the model."""
    from mambakit.finetune import FinetuneConfig
    from mambakit.finetune.inputs import load_data
    from mambakit.tokenizer import load_tokenizer

    tok = load_tokenizer(str(TOKENIZER))
    cfg = FinetuneConfig(model="tiny", dataset=str(GSM8K), max_examples=6, eval_size=2, max_length=512)
    mamba = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=VOCAB, pad_vocab_size_multiple=1))
    data = load_data(cfg, tok, mamba)
    assert data.stats["packed"] is True and "seq_lengths" in data.train.column_names
    assert sum(sum(r) for r in data.train["seq_lengths"]) == data.stats["tokens"]
    other = torch.nn.Linear(2, 2)
    assert not model_supports_packing(other)
    assert load_data(cfg, tok, other).stats["packed"] is False
    import dataclasses

    with pytest.raises(ValueError, match="packing=True: the model tiny does not take packed sequences"):
        load_data(dataclasses.replace(cfg, packing=True), tok, other)
