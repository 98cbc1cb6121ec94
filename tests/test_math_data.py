"""Math data (template, response-only labels, truncation, packing, presets, file types, errors)
and GSM8K answer extraction / exact match / length-grouped greedy generation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from mambakit.evaluation.math_answers import answers_match, exact_match_accuracy, extract_answer, normalize_number
from mambakit.data.math_data import (IGNORE_INDEX, DataCollator, DataConfig, format_prompt, load_math_data,
                                pack_examples, tokenize_examples)

from conftest import GSM8K_DIR as GSM8K, TOKENIZER_DIR as TOKENIZER

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tok():
    from mambakit.tokenizer import load_tokenizer

    return load_tokenizer(str(TOKENIZER))


@pytest.mark.parametrize("text,want", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("so the total is 1,080 dollars\n#### 1,080", "1080"),
    ("#### $18.00", "18"),
    ("The answer is 3.0", "3"),
    ("He had 5 apples and bought 12 more, so 17.", "17"),
    ("it costs -4.50 dollars", "-4.5"),
    ("#### 0.50", "0.5"),
    ("no digits here", None),
    ("#### 72\nQuestion: then 5 more", "72"),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_normalize_and_match():
    assert normalize_number("3.0") == normalize_number("3") == "3"
    assert normalize_number("1,000,000") == "1000000"
    assert normalize_number("abc") is None
    assert answers_match("3.0", "3") and not answers_match("3.1", "3") and not answers_match(None, None)
    assert exact_match_accuracy(["#### 3.0", "x 5", "nothing"], ["#### 3", "#### 6", "#### 1"]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 generations for 1 references"):
        exact_match_accuracy(["a", "b"], ["c"])


def test_tokenize_masks_prompt_and_appends_eos(tok):
    prompt = format_prompt("What is 2+3?")
    assert prompt == "Question: What is 2+3?\nAnswer:"
    ids, labels, stats = tokenize_examples([prompt], ["2+3=5\n#### 5"], tok, max_length=64)
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0][:len(p)] == p and ids[0][-1] == tok.eos_token_id
    assert labels[0][:len(p)] == [IGNORE_INDEX] * len(p)
    assert labels[0][len(p):] == ids[0][len(p):]
    assert tok.decode(ids[0][len(p):-1]) == " 2+3=5\n#### 5"
    assert stats == {"examples": 1, "truncated": 0, "dropped": 0}
    ids, labels, stats = tokenize_examples([prompt, prompt * 20], ["a long answer " * 10, "x"], tok, max_length=16)
    assert stats == {"examples": 2, "truncated": 1, "dropped": 1} and len(ids[0]) == 16


def test_packing_keeps_examples_whole():
    ids = [[1] * 5, [2] * 4, [3] * 6, [4] * 2]
    labs = [[-100] * 5, [2] * 4, [3] * 6, [4] * 2]
    rows, rlabs, lengths = pack_examples(ids, labs, max_length=10)
    assert rows == [[1] * 5 + [2] * 4, [3] * 6 + [4] * 2]
    assert rlabs[0][:5] == [-100] * 5
    assert lengths == [[5, 4], [6, 2]]


def test_collator_packed_rows_get_seq_idx():
    """seq_idx numbers the examples of each row (padding a sequence of its own); each example's first
    label is -100, so no example's last token is trained to predict the next one's first."""
    batch = DataCollator(pad_token_id=0)([
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9], "seq_lengths": [2, 3]},
        {"input_ids": [1, 2], "labels": [1, 2], "seq_lengths": [1, 1]}])
    assert batch["seq_idx"].dtype == torch.int32
    assert batch["seq_idx"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 2, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9], [-100, -100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match=r"row 0 has 2 tokens but its seq_lengths \[1\] sum to 1"):
        DataCollator(pad_token_id=0)([{"input_ids": [1, 2], "labels": [1, 2], "seq_lengths": [1]}])


def test_collator_right_pads():
    batch = DataCollator(pad_token_id=0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
                                          {"input_ids": [8], "labels": [8]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def _write(path: Path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pandas as pd

        df = pd.DataFrame(rows)
        df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_file_types_and_mathinstruct_preset(tok, tmp_path, fmt):
    rows = [{"instruction": f"What is {i}+1?", "output": f"{i}+1={i + 1}\nThe answer is {i + 1}"} for i in range(12)]
    f = tmp_path / f"mi.{fmt}"
    _write(f, rows, fmt)
    d = load_math_data(DataConfig(dataset=str(f), preset="mathinstruct", eval_size=2, max_length=64), tok)
    assert len(d.train) == 10 and len(d.eval_examples) == 2
    assert d.eval_examples[0]["prompt"].startswith("Question: What is ")


def test_custom_fields_and_errors(tok, tmp_path):
    f = tmp_path / "c.jsonl"
    _write(f, [{"problem": "1+1?", "solution": "#### 2"}] * 5, "jsonl")
    d = load_math_data(DataConfig(dataset=str(f), preset=None, prompt_field="problem", response_field="solution",
                                  eval_size=1), tok)
    assert len(d.train) == 4
    with pytest.raises(KeyError, match=r"field 'question' not found; fields present: \['problem', 'solution'\]"):
        load_math_data(DataConfig(dataset=str(f), preset="gsm8k", eval_size=1), tok)
    with pytest.raises(ValueError, match="preset 'gsm8"):
        load_math_data(DataConfig(dataset=str(f), preset="gsm8", eval_size=1), tok)
    with pytest.raises(ValueError, match="leaves no training examples"):
        load_math_data(DataConfig(dataset=str(f), preset=None, prompt_field="problem", response_field="solution",
                                  eval_size=5), tok)
    empty = tmp_path / "e.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="e.csv is empty"):
        load_math_data(DataConfig(dataset=str(empty)), tok)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_math_data(DataConfig(dataset=str(tmp_path / "missing.jsonl")), tok)
    with pytest.raises(ValueError, match="extension '.txt'"):
        (tmp_path / "x.txt").write_text("hi")
        load_math_data(DataConfig(dataset=str(tmp_path / "x.txt")), tok)


def test_gsm8k_directory_with_test_split(tok):
    d = load_math_data(DataConfig(dataset=str(GSM8K), eval_split="test", max_examples=16, eval_max_examples=4,
                                  max_length=512), tok)
    assert len(d.train) == 16 and len(d.eval_examples) == 4
    assert extract_answer(d.eval_examples[0]["response"]) is not None
    with pytest.raises(FileNotFoundError, match="no file for split 'validation'"):
        load_math_data(DataConfig(dataset=str(GSM8K), eval_split="validation"), tok)


def test_batched_generation_equals_generate_one_by_one(tok):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mambakit.evaluation.math_answers import evaluate_exact_match, generate_greedy

    torch.manual_seed(0)
    # untied head and large init: continuations that differ from prompt to prompt (a tied tiny model
    # repeats one token whatever the prompt, which would hide rows being mixed up)
    model = MambaLMHeadModel(MambaConfig(d_model=32, n_layer=2, vocab_size=50277, pad_vocab_size_multiple=8,
                                         tie_embeddings=False), initializer_cfg={"initializer_range": 0.5})
    # different endings (a tiny random model's next tokens depend mostly on the last few)
    prompts = ["1+1?", "What is two plus two", "3+3=", "five plus five is", "9", "A train leaves at 3 pm and travels",
               "x", format_prompt("How far?")]
    # prompts of different lengths decoded together == each prompt through model.generate alone
    together = generate_greedy(model, tok, prompts, max_new_tokens=6, batch_size=5)
    assert len(set(together)) >= 4, together
    for p, got in zip(prompts, together):
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        seq = model.generate(ids, max_length=ids.shape[1] + 6, top_k=1, eos_token_id=tok.eos_token_id,
                             vocab_size=len(tok))
        new = (seq.sequences if hasattr(seq, "sequences") else seq)[0, ids.shape[1]:].tolist()
        new = new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        assert got == tok.decode(new, skip_special_tokens=True).split("\nQuestion:")[0], p
    # the scores are those of generate_greedy's texts
    short = generate_greedy(model, tok, prompts, max_new_tokens=3)
    res = evaluate_exact_match(model, tok, [{"prompt": p, "response": "#### 4"} for p in prompts], max_new_tokens=3)
    want = sum(answers_match(extract_answer(g), "4") for g in short)
    assert res["n"] == 8 and res["correct"] == want and res["accuracy"] == want / 8
    assert [(x["generation"], x["predicted"]) for x in res["samples"]] == [(g, extract_answer(g)) for g in short[:5]]
