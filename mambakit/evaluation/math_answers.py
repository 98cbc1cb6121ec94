"""GSM8K-style answers: extraction, normalisation, exact match, and batched greedy evaluation.

The final answer of a text is the number after its last ``####``; without one, the last number
in the text. Thousands separators are removed ("1,080" -> "1080"), a leading "$" or trailing "%"
ignored, and numbers compared by value ("3.0" == "3", "0.50" == ".5").

Evaluation generates greedily with the model's recurrent cache. Mamba reads left to right with no
attention mask, so left padding would run the pad tokens through the state and change the answer;
instead, prompts of equal length are prefilled together without padding, each into its row of the
batch's cache, and all rows are then decoded together (`generate_greedy`, on mamba_ssm's
`generate_ragged`).
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalize_number(text: str | None) -> str | None:
    """'1,080' -> '1080', '3.0' -> '3', '-0.50' -> '-0.5'; None when `text` is not a number."""
    if text is None:
        return None
    s = str(text).strip().replace(",", "").replace("$", "").rstrip("%").rstrip(".")
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def extract_answer(text: str) -> str | None:
    """The normalised final answer of a solution or a generation, or None when it holds no number."""
    if text is None:
        return None
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        m = _NUMBER.search(tail)
        if m:
            return normalize_number(m.group(0))
    nums = _NUMBER.findall(text)
    return normalize_number(nums[-1]) if nums else None


def answers_match(prediction: str | None, reference: str | None) -> bool:
    """Exact match of two extracted answers by numeric value."""
    a, b = normalize_number(prediction), normalize_number(reference)
    return a is not None and a == b


def exact_match_accuracy(generations: list[str], references: list[str]) -> float:
    """Share of generations whose extracted answer equals the reference solution's."""
    if len(generations) != len(references):
        raise ValueError(f"exact_match_accuracy: {len(generations)} generations for {len(references)} references")
    if not references:
        return 0.0
    hits = sum(answers_match(extract_answer(g), extract_answer(r)) for g, r in zip(generations, references))
    return hits / len(references)


def _stop(text: str, stop_strings) -> str:
    for s in stop_strings:
        i = text.find(s)
        if i >= 0:
            text = text[:i]
    return text


def _inner_model(model):
    """The module with `.generate`: a PeftModel's base model (adapters still active), else `model`."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 16,
                    stop_strings=("\nQuestion:",), progress: bool = False) -> list[str]:
    """Greedy continuations of `prompts` (texts, EOS and anything after a stop string cut off).

    Prompts are taken ``batch_size`` at a time (sorted by length, so a batch's rows tend to stop
    together); within a batch, equal-length prompts are prefilled together without padding and
    then all rows are decoded together (mamba_ssm's `generate_ragged`). Results come back in the
    order of `prompts`.
    """
    import torch

    from mamba_ssm.utils.generation import generate_ragged

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    gen_model = _inner_model(model)
    eos = tokenizer.eos_token_id
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompt {i} tokenises to nothing: {prompts[i]!r}")
    vocab = min(len(tokenizer), gen_model.lm_head.weight.shape[0])
    by_len = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    chunks = [by_len[j:j + batch_size] for j in range(0, len(by_len), batch_size)]
    it = chunks
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(chunks, desc="generate", leave=False)
    out: list[str | None] = [None] * len(prompts)
    was_training = gen_model.training
    gen_model.eval()
    try:
        with torch.no_grad():
            for idx in it:
                # a fixed batch: finished rows keep stepping, so every step has the shapes it always had
                gens = generate_ragged(gen_model, [ids[i] for i in idx], max_new_tokens, eos_token_id=eos,
                                       vocab_size=vocab, drop_finished=False)
                for i, new in zip(idx, gens):
                    if eos is not None and eos in new:
                        new = new[:new.index(eos)]
                    out[i] = _stop(tokenizer.decode(new, skip_special_tokens=True), stop_strings)
    finally:
        gen_model.train(was_training)
    return out  # type: ignore[return-value]


def evaluate_exact_match(model, tokenizer, examples: list[dict], max_new_tokens: int = 256, batch_size: int = 16,
                         n_samples: int = 5, progress: bool = False) -> dict:
    """Exact-match accuracy of greedy generations on examples with ``prompt`` and ``response``.

    Returns {"accuracy", "correct", "n", "samples": [first n_samples {question, prediction, reference, ...}]}.
    """
    if not examples:
        return {"accuracy": None, "correct": 0, "n": 0, "samples": []}
    gens = generate_greedy(model, tokenizer, [e["prompt"] for e in examples], max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress)
    correct = 0
    samples = []
    for e, g in zip(examples, gens):
        pred, ref = extract_answer(g), extract_answer(e["response"])
        ok = answers_match(pred, ref)
        correct += ok
        if len(samples) < n_samples:
            samples.append({"prompt": e["prompt"], "generation": g, "predicted": pred, "reference": ref, "correct": ok})
    return {"accuracy": correct / len(examples), "correct": correct, "n": len(examples), "samples": samples}
