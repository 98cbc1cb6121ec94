"""Pretrain the tiny base model of the embedded study from scratch, on the CPU, in minutes.

Steps (all seeded): generate the arithmetic + narrative corpus and the word problems
(`mambakit.data.synthetic`), train a small byte-level BPE tokenizer on them (EOS ``<|endoftext|>``),
pack whole documents (each followed by EOS) into rows of ``seq_len`` tokens, train a
`MambaLMHeadModel` with AdamW and a cosine schedule, then measure

* arithmetic accuracy: greedy completion of ``a + b =`` / ``a - b =`` on sampled equations;
* word-problem accuracy: greedy answer to held-out questions in the study's prompt format,
  exact match on ``#### N`` (expected near zero: the corpus holds no questions or answers);

and save the model (`save_pretrained`), its tokenizer.json, the data (train/test jsonl) and
``pretrain_summary.json``. The committed asset ``mambakit/assets/tiny-mamba-arith`` was made by
``python finetune/pretrain_tiny.py`` with the defaults (see the asset's README.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mambakit.data import synthetic

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL_DIR = ASSETS / "tiny-mamba-arith"
DEFAULT_DATA_DIR = ASSETS / "math-word-problems"
EOS = "<|endoftext|>"


@dataclass
class PretrainConfig:
    out_dir: str = str(DEFAULT_MODEL_DIR)
    data_dir: str = str(DEFAULT_DATA_DIR)
    seed: int = 0
    d_model: int = 128
    n_layer: int = 2
    d_state: int = 16
    vocab_size: int = 384       # the tokenizer's trained size (the model pads to a multiple of 8)
    seq_len: int = 64
    batch_size: int = 32
    steps: int = 1800
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    n_train: int = 400          # word problems (distinct from the test ones)
    n_test: int = 100
    eval_equations: int = 200
    eval_problems: int = 100
    equation_repeats: int = 3   # copies of each equation in the corpus
    init_from: str = ""         # continue from this model directory (its weights and tokenizer)
    threads: int = 0            # torch threads (0: leave torch's default)
    time_limit_s: float = 0.0   # stop after this many seconds of training, the schedule shortened to fit (0: none)


def build_tokenizer(corpus: list, train_problems: list, vocab_size: int):
    """Byte-level BPE over the corpus and the formatted training problems."""
    texts = list(corpus) + [synthetic.PROMPT_TEMPLATE.format(question=p["question"]) + " " + p["answer"]
                            for p in train_problems]
    tok = synthetic.train_tokenizer(texts, vocab_size=vocab_size, eos_token=EOS)
    if tok.token_to_id(EOS) is None:
        raise RuntimeError("tokenizer training lost the EOS token")
    return tok


def pack_corpus(corpus: list, tok, seq_len: int, seed: int = 0) -> tuple:
    """(inputs, labels), each (rows, seq_len + 1): whole documents, each followed by EOS, placed
    one after another; every row starts at a document's beginning (so the model learns from the
    zero state, as prompts start at evaluation) and is padded with EOS whose labels are -100."""
    eos = tok.token_to_id(EOS)
    width = seq_len + 1
    docs = [enc.ids + [eos] for enc in tok.encode_batch(corpus)]
    random.Random(seed).shuffle(docs)
    rows, labels, cur = [], [], []
    for ids in docs:
        ids = ids[:width]
        if len(cur) + len(ids) > width:
            rows.append(cur + [eos] * (width - len(cur)))
            labels.append(cur + [-100] * (width - len(cur)))
            cur = []
        cur = cur + ids
    if cur:
        rows.append(cur + [eos] * (width - len(cur)))
        labels.append(cur + [-100] * (width - len(cur)))
    if not rows:
        raise ValueError("empty corpus")
    return torch.tensor(rows, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def _lr_at(step: int, cfg: PretrainConfig, elapsed_s: float = 0.0) -> float:
    """Linear warmup, then cosine to 10% of lr. With a time limit, progress is the larger of the
    step fraction and the time fraction, so the schedule ends when the time does."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.time_limit_s:
        progress = max(progress, elapsed_s / cfg.time_limit_s)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def greedy_complete(model, tok, prompts: list, max_new_tokens: int, batch_size: int = 64) -> list:
    """Greedy continuations of `prompts` (strings), each cut at the first EOS; one prompt length per
    batch (prompts are grouped by token length, so no padding enters the recurrent state)."""
    eos = tok.token_to_id(EOS)
    encoded = [tok.encode(p).ids for p in prompts]
    out = [None] * len(prompts)
    by_len = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    model.eval()
    for length, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            ids = torch.tensor([encoded[i] for i in chunk], dtype=torch.long)
            seqs = model.generate(ids, max_length=length + max_new_tokens, eos_token_id=eos)
            for row, i in zip(seqs.tolist(), chunk):
                gen = row[length:]
                if eos in gen:
                    gen = gen[: gen.index(eos)]
                out[i] = tok.decode(gen)
    return out


def arithmetic_accuracy(model, tok, n: int, seed: int, cfg: synthetic.SyntheticConfig = synthetic.SyntheticConfig()):
    rng = random.Random(seed + 7)
    prompts, answers = [], []
    for _ in range(n):
        a, b = rng.randint(0, cfg.max_corpus_operand), rng.randint(0, cfg.max_corpus_operand)
        op = rng.choice("+-")
        if op == "-" and b > a:
            a, b = b, a
        prompts.append(f"{a} {op} {b} =")
        answers.append(str(a + b if op == "+" else a - b))
    outs = greedy_complete(model, tok, prompts, max_new_tokens=6)
    correct = sum(o.strip().split("\n")[0].strip() == ans for o, ans in zip(outs, answers))
    return correct / n, list(zip(prompts[:5], outs[:5]))


def word_problem_accuracy(model, tok, problems: list, max_new_tokens: int = 40):
    prompts = [synthetic.PROMPT_TEMPLATE.format(question=p["question"]) for p in problems]
    outs = greedy_complete(model, tok, prompts, max_new_tokens=max_new_tokens)
    correct = sum(synthetic.extract_answer(o) == synthetic.extract_answer(p["answer"]) for o, p in zip(outs, problems))
    return correct / max(1, len(problems)), list(zip(prompts[:3], outs[:3]))


def _write_tokenizer(tok, out: Path):
    tok.save(str(out / "tokenizer.json"))
    # A tokenizer_config.json lets AutoTokenizer/lm-eval load the directory with eos and pad named.
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS, "unk_token": EOS,
        "pad_token": EOS, "model_max_length": 2048, "clean_up_tokenization_spaces": False}, indent=2) + "\n")


def pretrain(cfg: PretrainConfig, log=print) -> dict:
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t_start = time.time()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    data_dir = Path(cfg.data_dir)
    train_path, test_path = synthetic.write_dataset(data_dir, n_train=cfg.n_train, n_test=cfg.n_test, seed=cfg.seed)
    train_problems = synthetic.read_jsonl(train_path)
    test_problems = synthetic.read_jsonl(test_path)
    scfg = synthetic.SyntheticConfig(equation_repeats=cfg.equation_repeats)
    corpus = synthetic.pretraining_corpus(seed=cfg.seed, cfg=scfg)
    if cfg.init_from:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(Path(cfg.init_from) / "tokenizer.json"))
    else:
        tok = build_tokenizer(corpus, train_problems, cfg.vocab_size)
    rows, row_labels = pack_corpus(corpus, tok, cfg.seq_len, cfg.seed)
    n_tokens = int((row_labels != -100).sum())
    log(f"corpus: {len(corpus)} documents, {n_tokens} tokens in {rows.shape[0]} rows of {cfg.seq_len + 1}; "
        f"vocabulary {tok.get_vocab_size()}")

    mcfg = MambaConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, vocab_size=tok.get_vocab_size(),
                       ssm_cfg={"d_state": cfg.d_state}, rms_norm=True, residual_in_fp32=True,
                       fused_add_norm=True, pad_vocab_size_multiple=8, tie_embeddings=True)
    if cfg.init_from:
        model = MambaLMHeadModel.from_pretrained(cfg.init_from)
        log(f"continuing from {cfg.init_from}")
    else:
        model = MambaLMHeadModel(mcfg)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: d_model {model.config.d_model}, n_layer {model.config.n_layer}, {n_params} parameters")

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or getattr(p, "_no_weight_decay", False) or "embedding" in name else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses = []
    model.train()
    t_train = time.time()
    steps_done = 0
    for step in range(cfg.steps):
        lr = _lr_at(step, cfg, time.time() - t_train)
        for g in opt.param_groups:
            g["lr"] = lr
        pick = torch.randint(0, rows.shape[0], (cfg.batch_size,), generator=gen)
        batch, target = rows[pick], row_labels[pick]
        out = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]).float(),
                                                 target[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(round(loss.item(), 4))
        steps_done = step + 1
        if step % 50 == 0 or step == cfg.steps - 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}  {time.time() - t_train:.0f}s")
        if cfg.time_limit_s and time.time() - t_train > cfg.time_limit_s:
            log(f"time limit {cfg.time_limit_s}s reached after {steps_done} steps")
            break
    train_s = time.time() - t_train

    model.eval()
    arith_acc, arith_examples = arithmetic_accuracy(model, tok, cfg.eval_equations, cfg.seed)
    wp_acc, wp_examples = word_problem_accuracy(model, tok, test_problems[: cfg.eval_problems])
    log(f"arithmetic accuracy {arith_acc:.3f}; word-problem accuracy (before fine-tuning) {wp_acc:.3f}")
    for p, o in wp_examples[:2]:
        log(f"  {p!r} -> {o!r}")

    out = Path(cfg.out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    _write_tokenizer(tok, tmp)
    summary = {
        "config": asdict(cfg), "n_params": n_params, "steps_done": steps_done, "train_seconds": round(train_s, 1),
        "total_seconds": round(time.time() - t_start, 1), "final_loss_mean_last_50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "arithmetic_accuracy": arith_acc, "arithmetic_examples": arith_examples,
        "word_problem_accuracy_before_finetune": wp_acc, "word_problem_eval_n": min(cfg.eval_problems, len(test_problems)),
        "word_problem_examples": wp_examples, "corpus_documents": len(corpus), "corpus_tokens": n_tokens,
        "losses": losses, "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                      "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (tmp / "pretrain_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    if out.exists():
        keep = out / "README.md"
        readme = keep.read_text() if keep.exists() else None
        shutil.rmtree(out)
        if readme is not None:
            (tmp / "README.md").write_text(readme)
    tmp.rename(out)
    log(f"saved {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.2f} MB); data in {data_dir}")
    return summary


def parse_args(argv=None) -> PretrainConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in asdict(PretrainConfig()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return PretrainConfig(**vars(p.parse_args(argv)))


def main(argv=None):
    cfg = parse_args(argv)
    pretrain(cfg)


if __name__ == "__main__":
    main()
