"""Math word-problem data for supervised fine-tuning: load, format, tokenise, pack, split.

Sources (read through `datasets`): a hub id (e.g. ``openai/gsm8k`` with config ``main``), a local
file (.json, .jsonl, .csv, .parquet) or a local directory holding ``{split}.{ext}`` files
(e.g. a ``gsm8k/`` directory with train.jsonl and test.jsonl).

Field presets name the two columns of each example:

    gsm8k         question    -> answer   (worked solution ending in "#### N")
    orca-math     question    -> answer
    mathinstruct  instruction -> output

or give ``prompt_field`` / ``response_field`` yourself (they override the preset).

Prompt template (``PROMPT_TEMPLATE``)::

    Question: {prompt}
    Answer:

The response follows after one space, then the tokenizer's end-of-sequence token. Prompt and
response are tokenised separately and concatenated, so the boundary is exact and the evaluation
prompt (the template alone) is token-for-token the training prefix. Labels are -100 on the prompt
tokens: the loss is taken on the response and its EOS only.

Examples longer than ``max_length`` are cut on the right (the count is reported); an example whose
prompt alone fills ``max_length`` has nothing to learn from and is dropped (also reported).

Packing places whole examples one after another in rows of at most ``max_length`` tokens, never
splitting one, and records each row's example lengths (``seq_lengths``); the collator turns them
into ``seq_idx`` (mamba_ssm/ops/packing.py), with which the model restarts its state at every
example, so each example is computed as if alone. Labels stay response-only, and no example's last
token is trained to predict the next example's first. ``packing=None`` (the default) packs when
the model takes ``seq_idx`` (``model_supports_packing``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

PROMPT_TEMPLATE = "Question: {prompt}\nAnswer:"
RESPONSE_PREFIX = " "
IGNORE_INDEX = -100

PRESETS: dict[str, tuple[str, str]] = {
    "gsm8k": ("question", "answer"),
    "orca-math": ("question", "answer"),
    "mathinstruct": ("instruction", "output"),
}

_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class DataConfig:
    """Where the examples come from and how they become training rows.

    dataset: hub id, local file or local directory. hub_config: the hub data set's configuration
    (``main`` for openai/gsm8k). split: the training split. eval_split: a split to hold out for
    evaluation (e.g. ``test``); when None, ``eval_size`` examples are carved out of the training
    split (seeded) and never trained on. max_examples / eval_max_examples cap the sizes (None: all).
    """

    dataset: str = "openai/gsm8k"
    preset: str | None = "gsm8k"
    prompt_field: str | None = None
    response_field: str | None = None
    hub_config: str | None = None
    split: str = "train"
    eval_split: str | None = None
    eval_size: int = 200
    max_examples: int | None = None
    eval_max_examples: int | None = None
    max_length: int = 512
    packing: bool | None = None
    template: str = PROMPT_TEMPLATE
    response_prefix: str = RESPONSE_PREFIX
    seed: int = 0

    def fields(self) -> tuple[str, str]:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"data preset {self.preset!r} is unknown; expected one of {sorted(PRESETS)} "
                             f"or None with prompt_field/response_field")
        p, r = PRESETS[self.preset] if self.preset is not None else (None, None)
        p = self.prompt_field or p
        r = self.response_field or r
        if p is None or r is None:
            raise ValueError("data fields: with preset=None give both prompt_field and response_field "
                             f"(got prompt_field={self.prompt_field!r}, response_field={self.response_field!r})")
        return p, r


@dataclass
class MathData:
    """train: a `datasets.Dataset` with input_ids and labels; eval_examples: dicts with ``prompt``
    (the formatted template), ``response`` and ``question``; stats: counts for the log;
    eval_dataset: the held-out examples tokenised like train (for a held-out loss), when asked."""

    train: Any
    eval_examples: list[dict]
    stats: dict = field(default_factory=dict)
    eval_dataset: Any = None


# ---------------------------------------------------------------------------------------------
# Loading


def _is_local(name: str) -> bool:
    return os.path.exists(name) or name.startswith((".", "/", "~")) or Path(name).suffix.lower() in _BUILDERS


def _split_file(directory: Path, split: str) -> Path | None:
    for ext in _BUILDERS:
        p = directory / f"{split}{ext}"
        if p.is_file():
            return p
    return None


def _load_file(path: Path):
    from datasets import load_dataset

    ext = path.suffix.lower()
    if ext not in _BUILDERS:
        raise ValueError(f"data file {path}: extension {ext!r} is not supported; expected one of {sorted(_BUILDERS)}")
    if path.stat().st_size == 0:
        raise ValueError(f"data file {path} is empty (0 bytes); expected {ext} records")
    try:
        ds = load_dataset(_BUILDERS[ext], data_files=str(path), split="train")
    except Exception as e:  # datasets raises several types on unreadable files; name the file
        raise ValueError(f"data file {path} could not be read as {_BUILDERS[ext]}: {e}") from e
    if len(ds) == 0:
        raise ValueError(f"data file {path} holds no examples")
    return ds


def load_split(cfg: DataConfig, split: str):
    """Return the `datasets.Dataset` of one split of ``cfg.dataset``."""
    name = os.path.expanduser(cfg.dataset)
    if _is_local(name):
        p = Path(name)
        if not p.exists():
            raise FileNotFoundError(f"dataset path {p} does not exist (expected a json/jsonl/csv/parquet file, "
                                    f"a directory of {{split}}.<ext> files, or a hub id)")
        if p.is_file():
            if split != cfg.split:
                raise ValueError(f"dataset {p} is a single file: it has no split {split!r}; leave eval_split "
                                 f"unset to carve eval_size examples out of it")
            return _load_file(p)
        f = _split_file(p, split)
        if f is None:
            present = sorted(x.name for x in p.iterdir() if x.suffix.lower() in _BUILDERS)
            raise FileNotFoundError(f"dataset directory {p} has no file for split {split!r} "
                                    f"(looked for {split}{{{','.join(_BUILDERS)}}}; found {present})")
        return _load_file(f)
    from datasets import load_dataset

    hub_config = cfg.hub_config
    if hub_config is None and name in ("openai/gsm8k", "gsm8k"):
        hub_config = "main"  # GSM8K's hub data set has configs "main" and "socratic"
    ds = load_dataset(name, hub_config, split=split)
    if len(ds) == 0:
        raise ValueError(f"dataset {name} split {split!r} holds no examples")
    return ds


def _check_fields(ds, fields: tuple[str, str], source: str):
    for f in fields:
        if f not in ds.column_names:
            raise KeyError(f"dataset {source}: field {f!r} not found; fields present: {ds.column_names} "
                           f"(choose a preset or set prompt_field/response_field)")


def format_prompt(question: str, template: str = PROMPT_TEMPLATE) -> str:
    return template.format(prompt=str(question).strip())


# ---------------------------------------------------------------------------------------------
# Tokenisation


def tokenize_examples(prompts: list[str], responses: list[str], tokenizer, max_length: int,
                      response_prefix: str = RESPONSE_PREFIX) -> tuple[list[list[int]], list[list[int]], dict]:
    """Tokenise formatted prompts and responses: ids = prompt + response + EOS, labels -100 on the prompt.

    Returns (input_ids, labels, stats) with stats {"examples", "truncated", "dropped"}.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("tokenizer has no eos_token_id: the response needs an end-of-sequence token")
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    r_ids = tokenizer([response_prefix + str(r).strip() for r in responses], add_special_tokens=False)["input_ids"]
    all_ids, all_labels = [], []
    truncated = dropped = 0
    for p, r in zip(p_ids, r_ids):
        if len(p) >= max_length:
            dropped += 1
            continue
        ids = p + r + [eos]
        labels = [IGNORE_INDEX] * len(p) + r + [eos]
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        all_ids.append(ids)
        all_labels.append(labels)
    return all_ids, all_labels, {"examples": len(p_ids), "truncated": truncated, "dropped": dropped}


def pack_examples(input_ids: list[list[int]], labels: list[list[int]], max_length: int):
    """Greedy packing in order: whole examples appended to a row while they fit in max_length.

    Returns (rows_ids, rows_labels, rows_lengths), rows_lengths[i] the lengths of row i's examples."""
    rows_ids, rows_labels, rows_lengths = [], [], []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_lengths: list[int] = []
    for ids, lab in zip(input_ids, labels):
        if cur_ids and len(cur_ids) + len(ids) > max_length:
            rows_ids.append(cur_ids)
            rows_labels.append(cur_labels)
            rows_lengths.append(cur_lengths)
            cur_ids, cur_labels, cur_lengths = [], [], []
        cur_ids = cur_ids + ids
        cur_labels = cur_labels + lab
        cur_lengths = cur_lengths + [len(ids)]
    if cur_ids:
        rows_ids.append(cur_ids)
        rows_labels.append(cur_labels)
        rows_lengths.append(cur_lengths)
    return rows_ids, rows_labels, rows_lengths


def model_supports_packing(model) -> bool:
    """True when every mixer of the model (PEFT-wrapped or not) takes seq_idx: this package's Mamba."""
    from mamba_ssm.ops.packing import model_takes_packed_sequences

    return model_takes_packed_sequences(model)


class DataCollator:
    """Right-pads a list of {input_ids, labels} to the longest row (pad id, label -100, mask 0).

    Right padding is safe for Mamba: a recurrent model reads left to right, so trailing pads cannot
    change the outputs at earlier positions, and their labels are ignored. Packed rows (with
    ``seq_lengths``) also get ``seq_idx`` (batch, n) int32: 0, 1, ... per example along the row, the
    padding a sequence of its own; the label of each example's first token is -100 (nothing
    predicts it from the example before).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        n = max(len(r["input_ids"]) for r in rows)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            n = (n + m - 1) // m * m
        ids = torch.full((len(rows), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        packed = "seq_lengths" in rows[0]
        seq_idx = torch.zeros((len(rows), n), dtype=torch.int32) if packed else None
        for i, r in enumerate(rows):
            k = len(r["input_ids"])
            ids[i, :k] = torch.as_tensor(r["input_ids"], dtype=torch.long)
            labels[i, :k] = torch.as_tensor(r["labels"], dtype=torch.long)
            mask[i, :k] = 1
            if packed:
                lengths = list(r["seq_lengths"])
                if sum(lengths) != k:
                    raise ValueError(f"DataCollator: row {i} has {k} tokens but its seq_lengths {lengths} sum to "
                                     f"{sum(lengths)}")
                starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
                labels[i, starts] = IGNORE_INDEX
                seq_idx[i, :k] = torch.repeat_interleave(torch.arange(len(lengths), dtype=torch.int32),
                                                         torch.tensor(lengths))
                seq_idx[i, k:] = len(lengths)
        out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
        if packed:
            out["seq_idx"] = seq_idx
        return out


# ---------------------------------------------------------------------------------------------
# The whole step


def load_math_data(cfg: DataConfig, tokenizer) -> MathData:
    """Load, split, format and tokenise; log how many examples were truncated or dropped."""
    from datasets import Dataset

    fields = cfg.fields()
    train = load_split(cfg, cfg.split)
    _check_fields(train, fields, f"{cfg.dataset} [{cfg.split}]")
    if cfg.eval_split is not None:
        held = load_split(cfg, cfg.eval_split)
        _check_fields(held, fields, f"{cfg.dataset} [{cfg.eval_split}]")
    elif cfg.eval_size > 0:
        if cfg.eval_size >= len(train):
            raise ValueError(f"eval_size={cfg.eval_size} leaves no training examples: split {cfg.split!r} of "
                             f"{cfg.dataset} holds {len(train)}")
        parts = train.train_test_split(test_size=cfg.eval_size, seed=cfg.seed, shuffle=True)
        train, held = parts["train"], parts["test"]
    else:
        held = None
    if cfg.max_examples is not None:
        train = train.select(range(min(cfg.max_examples, len(train))))
    if held is not None and cfg.eval_max_examples is not None:
        held = held.select(range(min(cfg.eval_max_examples, len(held))))

    pf, rf = fields
    prompts = [format_prompt(q, cfg.template) for q in train[pf]]
    ids, labels, stats = tokenize_examples(prompts, train[rf], tokenizer, cfg.max_length, cfg.response_prefix)
    if not ids:
        raise ValueError(f"no training example fits max_length={cfg.max_length}: all {stats['examples']} prompts "
                         f"alone are at least that long")
    columns = {}
    if cfg.packing:
        ids, labels, columns["seq_lengths"] = pack_examples(ids, labels, cfg.max_length)
    stats["rows"] = len(ids)
    stats["response_tokens"] = sum(sum(1 for x in lab if x != IGNORE_INDEX) for lab in labels)
    stats["tokens"] = sum(len(x) for x in ids)
    msg = (f"data: {stats['examples']} training examples -> {stats['rows']} rows ({'packed' if cfg.packing else 'one per row'}); "
           f"{stats['truncated']} truncated to max_length={cfg.max_length}, {stats['dropped']} dropped (prompt alone too long)")
    logger.info(msg)
    print(msg, flush=True)

    eval_examples = []
    if held is not None:
        for q, r in zip(held[pf], held[rf]):
            eval_examples.append({"question": q, "prompt": format_prompt(q, cfg.template), "response": str(r)})
    stats["eval_examples"] = len(eval_examples)
    return MathData(train=Dataset.from_dict({"input_ids": ids, "labels": labels, **columns}),
                    eval_examples=eval_examples, stats=stats)
