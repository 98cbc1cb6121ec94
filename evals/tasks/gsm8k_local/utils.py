"""Data plumbing for the GSM8K tasks (gsm8k_local, gsm8k_local_mc).

Where the problems come from, first match wins:
  1. `--metadata gsm8k_dir=/path` (lm-eval hands task metadata to `load_gsm8k`),
  2. the environment variable MAMBAKIT_GSM8K_DIR,
  3. neither given: the hub data set openai/gsm8k, config main, through `datasets` (needs a
     network or a filled cache; offline, the error says how to point at local files).
A directory must hold train.jsonl and test.jsonl, one {"question", "answer"} object a line,
the format of openai/grade-school-math (and of the hub data set).
"""
from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

ENV_VAR = "MAMBAKIT_GSM8K_DIR"
HUB_DATASET, HUB_CONFIG = "openai/gsm8k", "main"
SPLITS = ("train", "test")
N_CHOICES = 4


def resolve_gsm8k_dir(gsm8k_dir: str | os.PathLike | None = None) -> Path | None:
    """The local directory to read, by the order above; None when neither source names one (the
    hub is used then). A named directory without both files is an error naming where it looked:
    an explicit choice that is wrong is not a reason to fall back silently."""
    for source, cand in (("metadata gsm8k_dir", gsm8k_dir), (f"${ENV_VAR}", os.environ.get(ENV_VAR))):
        if not cand:
            continue
        p = Path(cand).expanduser()
        if all((p / f"{s}.jsonl").is_file() for s in SPLITS):
            return p.resolve()
        raise FileNotFoundError(
            f"GSM8K files (train.jsonl, test.jsonl) not found; looked at {source}: {p}. "
            f"Pass --metadata gsm8k_dir=DIR or set {ENV_VAR}=DIR to a directory holding both.")
    return None


def _load_from_hub():
    import datasets

    try:
        dd = datasets.load_dataset(HUB_DATASET, HUB_CONFIG)
    except Exception as e:  # offline, no cache, hub unreachable, ...
        raise RuntimeError(
            f"GSM8K: no local directory given and the hub data set {HUB_DATASET} (config {HUB_CONFIG}) "
            f"could not be loaded ({type(e).__name__}: {e}). Offline, pass --metadata gsm8k_dir=DIR or set "
            f"{ENV_VAR}=DIR to a directory with train.jsonl and test.jsonl.") from e
    return datasets.DatasetDict({s: dd[s].select_columns(["question", "answer"]) for s in SPLITS})


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(row, dict) or "question" not in row or "answer" not in row:
                raise ValueError(f"{path}:{n}: expected an object with 'question' and 'answer'")
            rows.append({"question": row["question"], "answer": row["answer"]})
    return rows


def final_answer(answer: str) -> str:
    """The number after the last '####' of a worked solution, thousands separators removed."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '#### N' line: {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "")


def load_gsm8k(gsm8k_dir=None, **_metadata):
    """custom_dataset hook: a datasets.DatasetDict with the train and test splits.

    lm-eval passes the task's metadata (model_args and --metadata merged) as keyword arguments;
    only `gsm8k_dir` is read here.
    """
    import datasets

    root = resolve_gsm8k_dir(gsm8k_dir)
    if root is None:
        return _load_from_hub()
    return datasets.DatasetDict({s: datasets.Dataset.from_list(_read_jsonl(root / f"{s}.jsonl")) for s in SPLITS})


def _process_doc(doc: dict) -> dict:
    return {**doc, "target": final_answer(doc["answer"])}


def process_docs(dataset):
    """Adds `target`, the gold number as a plain string (no commas)."""
    return dataset.map(_process_doc)


# --- multiple choice over the gold number and distractors --------------------------------------

def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.2f}".rstrip("0").rstrip(".")


def _as_number(s: str):
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


def distractors(doc: dict, k: int = N_CHOICES - 1) -> list[str]:
    """k wrong numbers, deterministic: first the intermediate results of the worked solution
    (the `<<a*b=c>>` notes: plausible slips), then numbers of the question, then off-by-one,
    double, half and +10 variants of the gold number."""
    gold = final_answer(doc["answer"])
    gold_v = _as_number(gold)
    pool = re.findall(r"=\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)>>", doc["answer"])
    pool += re.findall(r"-?[0-9][0-9,]*(?:\.[0-9]+)?", doc["question"])
    if gold_v is not None:
        pool += [_fmt(gold_v + 1), _fmt(gold_v - 1), _fmt(gold_v * 2), _fmt(gold_v / 2), _fmt(gold_v + 10),
                 _fmt(gold_v + 100)]
    out, seen = [], {gold}
    if gold_v is not None:
        seen.add(_fmt(gold_v))
    for cand in pool:
        v = _as_number(cand)
        if v is None:
            continue
        c = _fmt(v)
        if c in seen:
            continue
        seen.add(c)
        out.append(c)
        if len(out) == k:
            return out
    extra = 2
    while len(out) < k:  # only reached for odd answers; keep the list full and distinct
        c = f"{gold}{extra}"
        if c not in seen:
            seen.add(c)
            out.append(c)
        extra += 1
    return out


def _process_doc_mc(doc: dict) -> dict:
    gold = final_answer(doc["answer"])
    gold_v = _as_number(gold)
    gold = _fmt(gold_v) if gold_v is not None else gold
    wrong = distractors(doc)
    # The gold's position comes from a checksum of the question: fixed across runs and machines.
    pos = zlib.crc32(doc["question"].encode("utf-8")) % N_CHOICES
    choices = wrong[:pos] + [gold] + wrong[pos:]
    return {**doc, "target": gold, "choices": choices, "gold": pos}


def process_docs_mc(dataset):
    """Adds `choices` (gold number and three distractors) and `gold` (the gold's index)."""
    return dataset.map(_process_doc_mc)
