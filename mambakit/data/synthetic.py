"""Procedurally generated data for the embedded study: arithmetic and math word problems.

Two kinds of text, both from one seeded generator:

* the **pretraining corpus** (`pretraining_corpus`): equations such as ``23 + 41 = 64`` and
  ``57 - 19 = 38`` (the arithmetic skill; half of them followed by a result line ``#### 64``, as
  on a worksheet) mixed with short narrative sentences over the word problems' vocabulary
  (``Mia has 12 apples. She buys 30 more apples.``, some followed by a restatement ``So Mia
  had 12 and then 30 apples.`` that exercises recall) so the model knows the words. It never
  contains a question or an answer to one: nothing in it turns a story into its equation;
* **word problems** in GSM8K's format (`word_problems`): ``question`` and ``answer``, the
  answer holding one line of reasoning and ending in ``#### N``::

      question: Mia has 12 apples. She buys 30 more apples. How many apples does Mia have now?
      answer:   Mia has 12 + 30 = 42 apples now.
                #### 42

A tiny Mamba pretrained on the corpus can add and subtract but has never seen the question and
answer format, so it scores close to zero on held-out problems; a short LoRA fine-tune on the
train split teaches it to turn a question into its equation, and its exact-match accuracy rises.
Train and test questions never coincide (the test split is drawn from number pairs the train
split does not use).

`write_dataset(out_dir, seed=...)` writes ``train.jsonl`` and ``test.jsonl``;
`write_lm_eval_task(task_dir, data_dir)` writes an lm-eval task reading them.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

NAMES = [("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Ben", "He"), ("Lea", "She"), ("Sam", "He"),
         ("Zoe", "She"), ("Max", "He"), ("Ivy", "She"), ("Leo", "He"), ("Eva", "She"), ("Noah", "He")]
ITEMS = ["apples", "books", "coins", "pens", "cards", "stamps", "shells", "marbles", "cookies", "stickers",
         "eggs", "flowers"]
# (sentence fragment after the pronoun, operation). {b} is the second number, {item} the noun.
ADD_VERBS = ["buys {b} more {item}", "finds {b} more {item}", "gets {b} more {item}",
             "receives {b} more {item}", "makes {b} more {item}", "wins {b} more {item}"]
SUB_VERBS = ["gives away {b} {item}", "loses {b} {item}", "sells {b} {item}", "eats {b} {item}",
             "uses {b} {item}", "gives {b} {item} to a friend"]
ANSWER_RE = re.compile(r"####\s*(-?[\d,]+)")

# The prompt the study evaluates with (lm-eval's GSM8K format, zero-shot) and the stop strings.
PROMPT_TEMPLATE = "Question: {question}\nAnswer:"
STOP_SEQUENCES = ["\n\n", "Question:"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Ranges of the generated numbers. Word-problem operands lie in [min_operand, max_operand];
    the arithmetic corpus covers every pair in [0, max_corpus_operand] (and so every sum and
    difference the word problems need)."""

    min_operand: int = 2
    max_operand: int = 20
    max_corpus_operand: int = 20
    stories_per_equation: float = 1.5  # narrative sentences in the corpus per distinct equation
    equation_repeats: int = 1          # copies of each equation in the corpus (more arithmetic practice)


def _check_config(cfg: SyntheticConfig):
    if not 0 <= cfg.min_operand < cfg.max_operand:
        raise ValueError(f"need 0 <= min_operand < max_operand, got {cfg.min_operand}, {cfg.max_operand}")
    if cfg.max_corpus_operand < cfg.max_operand:
        raise ValueError("max_corpus_operand must be >= max_operand so the corpus covers the problems' arithmetic")


def equation(a: int, b: int, op: str) -> str:
    if op == "+":
        return f"{a} + {b} = {a + b}"
    if op == "-":
        if b > a:
            raise ValueError(f"negative result for {a} - {b}")
        return f"{a} - {b} = {a - b}"
    raise ValueError(f"unknown operation {op!r}")


def make_problem(a: int, b: int, op: str, rng: random.Random) -> dict:
    """One word problem for `a op b`, in GSM8K's fields (plus the numbers, for checking)."""
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    verb = rng.choice(ADD_VERBS if op == "+" else SUB_VERBS).format(b=b, item=item)
    result = a + b if op == "+" else a - b
    question = f"{name} has {a} {item}. {pronoun} {verb}. How many {item} does {name} have now?"
    answer = f"{name} has {equation(a, b, op)} {item} now.\n#### {result}"
    return {"question": question, "answer": answer, "a": a, "b": b, "op": op, "result": result}


def _problem_pairs(cfg: SyntheticConfig):
    lo, hi = cfg.min_operand, cfg.max_operand
    pairs = [(a, b, "+") for a in range(lo, hi + 1) for b in range(lo, hi + 1)]
    pairs += [(a, b, "-") for a in range(lo, hi + 1) for b in range(lo, a)]
    return pairs


def word_problems(n_train: int = 400, n_test: int = 100, seed: int = 0, cfg: SyntheticConfig = SyntheticConfig()):
    """(train, test): lists of problem dicts. The (a, b, op) triples of the two splits are disjoint."""
    _check_config(cfg)
    rng = random.Random(seed)
    pairs = _problem_pairs(cfg)
    if n_train + n_test > len(pairs):
        raise ValueError(f"asked for {n_train + n_test} problems but the ranges give only {len(pairs)} distinct ones")
    rng.shuffle(pairs)
    test_pairs, train_pairs = pairs[:n_test], pairs[n_test:n_test + n_train]
    train = [make_problem(a, b, op, rng) for a, b, op in train_pairs]
    test = [make_problem(a, b, op, rng) for a, b, op in test_pairs]
    return train, test


def _story(rng: random.Random, cfg: SyntheticConfig) -> str:
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    a = rng.randint(cfg.min_operand, cfg.max_operand)
    b = rng.randint(cfg.min_operand, cfg.max_operand)
    r = rng.random()
    if r < 0.2:
        return f"{name} has {a} {item} now."
    verb = rng.choice(ADD_VERBS + SUB_VERBS).format(b=b, item=item)
    if r < 0.6:
        return f"{name} has {a} {item}. {pronoun} {verb}."
    # a restatement: practice in recalling the story's name, numbers and noun (no arithmetic)
    return f"{name} has {a} {item}. {pronoun} {verb}. So {name} had {a} and then {b} {item}."


def pretraining_corpus(seed: int = 0, cfg: SyntheticConfig = SyntheticConfig()) -> list:
    """Documents (strings) for pretraining: every + and - equation over [0, max_corpus_operand]
    (non-negative results; half of them with a ``#### result`` line) and narrative sentences,
    shuffled."""
    _check_config(cfg)
    rng = random.Random(seed + 1)
    n = cfg.max_corpus_operand
    eqs = [(a, b, "+") for a in range(n + 1) for b in range(n + 1)]
    eqs += [(a, b, "-") for a in range(n + 1) for b in range(a + 1)]
    docs = []
    for a, b, op in eqs * cfg.equation_repeats:
        text = equation(a, b, op)
        if rng.random() < 0.5:
            text += f"\n#### {a + b if op == '+' else a - b}"
        docs.append(text)
    docs += [_story(rng, cfg) for _ in range(int(len(eqs) * cfg.stories_per_equation))]
    rng.shuffle(docs)
    return docs


def extract_answer(text: str):
    """The number after '####' (thousands separators removed), else None."""
    m = ANSWER_RE.search(text)
    if m is None:
        return None
    return m.group(1).replace(",", "")


def check_problem(p: dict) -> bool:
    """True when the problem's answer line and reasoning agree with its numbers."""
    result = p["a"] + p["b"] if p["op"] == "+" else p["a"] - p["b"]
    return (extract_answer(p["answer"]) == str(result) and equation(p["a"], p["b"], p["op"]) in p["answer"]
            and str(p["a"]) in p["question"] and str(p["b"]) in p["question"])


def write_jsonl(path, rows, fields=("question", "answer")):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps({k: r[k] for k in fields}) + "\n")
    tmp.replace(path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_dataset(out_dir, n_train: int = 400, n_test: int = 100, seed: int = 0,
                  cfg: SyntheticConfig = SyntheticConfig()):
    """Write train.jsonl and test.jsonl (fields question, answer) into out_dir; return their paths."""
    train, test = word_problems(n_train, n_test, seed, cfg)
    out = Path(out_dir)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    return out / "train.jsonl", out / "test.jsonl"


# lm-eval task: zero-shot, generative, GSM8K's prompt and extraction. Written with absolute data
# paths so it runs from any directory, offline.
_TASK_YAML = """\
task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    train: {train}
    test: {test}
output_type: generate_until
training_split: train
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
target_delimiter: " "
num_fewshot: 0
generation_kwargs:
  until: ["\\n\\n", "Question:"]
  do_sample: false
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: take_first
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: false
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
metadata:
  version: 1.0
"""


def write_lm_eval_task(task_dir, data_dir, task: str = "synthetic_math", max_gen_toks: int = 48) -> Path:
    """Write `<task_dir>/<task>.yaml`, an lm-eval task over data_dir's train/test jsonl; pass
    task_dir to lm-eval's --include_path and `task` to --tasks."""
    data_dir = Path(data_dir).resolve()
    for split in ("train", "test"):
        if not (data_dir / f"{split}.jsonl").is_file():
            raise FileNotFoundError(f"{data_dir / (split + '.jsonl')} does not exist (make it with write_dataset)")
    task_dir = Path(task_dir)
    task_dir.mkdir(parents=True, exist_ok=True)
    path = task_dir / f"{task}.yaml"
    path.write_text(_TASK_YAML.format(task=task, train=json.dumps(str(data_dir / "train.jsonl")),
                                      test=json.dumps(str(data_dir / "test.jsonl")), max_gen_toks=max_gen_toks))
    return path


def train_tokenizer(texts, vocab_size: int = 384, eos_token: str = "<|endoftext|>"):
    """A byte-level BPE tokenizer (digits split one by one, so numbers are spelled digit by
    digit) trained on `texts`; returns a `tokenizers.Tokenizer` with `eos_token` at id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
