"""What a fine-tune writes: the output directory's guards, the final adapter or model, the log,
the loss curve and summary.json + DONE (written last, so a directory that has them is complete).
Every write is atomic (a temporary name, then a rename)."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from mambakit.finetune.config import FinetuneConfig
from mambakit.finetune import distributed

DONE_MARKER = "DONE"
SUMMARY_NAME = "summary.json"


def atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_dir(final: Path, write):
    """Call write(tmp_dir), then rename tmp_dir to `final` (replacing an older one)."""
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def find_latest_checkpoint(output_dir) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    if not os.path.isdir(output_dir):
        return None
    return get_last_checkpoint(str(output_dir))


# settings a resumed run must share with the run it continues (the others, e.g. logging, may change)
_TRAJECTORY_FIELDS = ("model", "dataset", "preset", "prompt_field", "response_field", "hub_config", "split",
                      "eval_split", "eval_size", "max_examples", "max_length", "packing", "full_finetune", "lora_r",
                      "lora_alpha", "lora_dropout", "target_modules", "learning_rate", "weight_decay", "lr_scheduler",
                      "batch_size", "grad_accum", "seed", "precision")


def prepare_output_dir(cfg: FinetuneConfig):
    """Create the directory; refuse to overwrite a finished run or to mix runs without --resume."""
    out = Path(cfg.output_dir)
    if distributed.is_main():
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"output_dir={cfg.output_dir!r} exists and is not a directory")
        if (out / DONE_MARKER).exists() and not cfg.resume:
            raise FileExistsError(f"output_dir={cfg.output_dir!r} already holds a finished run ({DONE_MARKER}); "
                                  f"choose a new output_dir")
        if find_latest_checkpoint(out) and not cfg.resume:
            raise FileExistsError(f"output_dir={cfg.output_dir!r} holds checkpoints of an earlier run; pass "
                                  f"--resume to continue it or choose a new output_dir")
        if cfg.resume and (out / "run_config.json").exists():
            before = json.loads((out / "run_config.json").read_text())
            now = dataclasses.asdict(cfg)
            changed = {k: (before.get(k), now[k]) for k in _TRAJECTORY_FIELDS if before.get(k) != now[k]}
            if changed:
                raise ValueError(f"--resume in output_dir={cfg.output_dir!r} with settings that differ from the run "
                                 f"being resumed ({', '.join(f'{k}: {a!r} then, {b!r} now' for k, (a, b) in changed.items())}); "
                                 f"use the same settings or a new output_dir")
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        atomic_write_text(out / "run_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    distributed.barrier()
    return out


def save_final(cfg: FinetuneConfig, model, tokenizer) -> Path:
    """output_dir/adapter (LoRA) or output_dir/model (full), with the tokenizer; written atomically
    by the main process. Every process calls it (it ends in a barrier)."""
    final = write_final(cfg, model, tokenizer) if distributed.is_main() else _final_dir(cfg)
    distributed.barrier()
    return final


def _final_dir(cfg: FinetuneConfig) -> Path:
    return Path(cfg.output_dir) / ("model" if cfg.full_finetune else "adapter")


def write_final(cfg: FinetuneConfig, model, tokenizer) -> Path:
    """The main process's part of save_final: no collective, so it may run on rank 0 alone."""
    final = _final_dir(cfg)

    def write(tmp):
        if cfg.full_finetune:
            model.save_pretrained(str(tmp))
        else:
            model.save_pretrained(str(tmp), save_embedding_layers=False)
        tokenizer.save_pretrained(str(tmp))

    atomic_dir(final, write)
    return final


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    by_key = {}
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            kind = "eval" if "eval_loss" in r else "train" if "loss" in r else "other"
            by_key[(r["step"], kind)] = r
    return [by_key[k] for k in sorted(by_key)]


def write_csv(records: list[dict], path: Path):
    keys = ["step", "epoch"] + sorted({k for r in records for k in r} - {"step", "epoch"})
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in records:
            w.writerow(r)
    os.replace(tmp, path)


def plot_loss(records: list[dict], path: Path, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tr = [(r["step"], r["loss"]) for r in records if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr), label="train loss")
    if ev:
        ax.plot(*zip(*ev), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (response tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_summary(cfg: FinetuneConfig, data, base: dict | None, tuned: dict | None, final: Path, steps: int,
                  seconds: float, extra: dict | None = None) -> dict:
    out = Path(cfg.output_dir)
    records = read_log(out / "log.jsonl")
    if distributed.is_main():
        if records:
            write_csv(records, out / "log.csv")
            plot_loss(records, out / "loss_curve.png", title=f"{Path(cfg.model).name} on {Path(cfg.dataset).name}")
        losses = [r["loss"] for r in records if "loss" in r]
        summary = {
            "model": cfg.model, "dataset": cfg.dataset, "mode": "full" if cfg.full_finetune else "lora",
            "data": data.stats, "steps": steps,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "base": _strip(base), "finetuned": _strip(tuned),
            "accuracy_base": base["accuracy"] if base else None,
            "accuracy_finetuned": tuned["accuracy"] if tuned else None,
            "output": str(final), "seconds": round(seconds, 1), "config": dataclasses.asdict(cfg), **(extra or {}),
        }
        atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
        atomic_write_text(out / DONE_MARKER, time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    else:
        summary = {}
    distributed.barrier()
    return summary


def _strip(res):
    return None if res is None else {k: v for k, v in res.items()}
