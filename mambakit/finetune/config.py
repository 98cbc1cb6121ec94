"""FinetuneConfig: one fine-tuning experiment (data, model, adaptation, optimisation, outputs).

Field names are the command line's flags (``--lora-r`` sets ``lora_r``) and the keys of a config
file (``finetune/finetune.py --config configs/mamba-1.4b-gsm8k.yaml``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mambakit.data.math_data import DataConfig

DEFAULT_TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj")


@dataclass
class FinetuneConfig(DataConfig):
    """One experiment: the data options of `DataConfig` (dataset, preset, fields, splits, max_length,
    packing, template, ...) plus the model, adaptation, optimisation and output options below.
    Field names are the CLI flags (``--lora-r`` sets ``lora_r``)."""

    # model and tokenizer
    model: str = "state-spaces/mamba-130m"
    tokenizer: str | None = None
    output_dir: str = "outputs/finetune"
    # adaptation
    full_finetune: bool = False
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # optimisation
    learning_rate: float = 2e-4
    weight_decay: float = 0.01
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None
    num_epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    precision: str = "auto"
    seed: int = 42  # DataConfig's field, another default: model init, data order and the held-out draw
    # checkpoints and logs
    save_steps: int = 200
    save_total_limit: int = 3
    logging_steps: int = 10
    eval_loss_steps: int = 0
    resume: bool = False
    progress: bool = True
    # multi-GPU
    fsdp: bool = False
    ddp_timeout: int = 7200
    # final evaluation and outputs
    eval_base: bool = True
    eval_finetuned: bool = True
    eval_max_new_tokens: int = 256
    eval_batch_size: int = 32
    merge: bool = False
    # for tests: stop (as if preempted) after this many optimizer steps in this process
    stop_after_steps: int | None = None

    def data_config(self) -> DataConfig:
        return DataConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DataConfig)})

    def validate(self):
        def need(cond, name, expected):
            if not cond:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {expected}")

        need(self.precision in ("auto", "bf16", "fp32"), "precision", "'auto', 'bf16' or 'fp32'")
        need(self.lr_scheduler in ("cosine", "linear", "constant"), "lr_scheduler", "'cosine', 'linear' or 'constant'")
        need(self.lora_r > 0, "lora_r", "a positive integer")
        need(0.0 <= self.lora_dropout < 1.0, "lora_dropout", "a value in [0, 1)")
        need(self.learning_rate > 0, "learning_rate", "a positive value")
        need(self.weight_decay >= 0, "weight_decay", "a value >= 0")
        need(self.batch_size > 0, "batch_size", "a positive integer")
        need(self.grad_accum > 0, "grad_accum", "a positive integer")
        need(self.max_length >= 2, "max_length", "an integer >= 2")
        need(self.save_steps > 0, "save_steps", "a positive integer")
        need(self.save_total_limit > 0, "save_total_limit", "a positive integer")
        need(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "a value in [0, 1)")
        need(self.max_steps != 0, "max_steps", "-1 (use num_epochs) or a positive integer")
        need(bool(self.target_modules) or self.full_finetune, "target_modules", "at least one module name")
        need(not (self.fsdp and not self.full_finetune), "fsdp",
             "False with LoRA (FSDP is for full fine-tuning; LoRA runs under DDP)")

    def resolved_precision(self) -> str:
        if self.precision == "auto":
            return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
        return self.precision

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"config keys {unknown} are unknown; expected keys among {sorted(names)}")
        return cls(**d)


def read_config_file(path) -> dict:
    """A whole experiment as JSON or YAML: keys are FinetuneConfig fields (dashes allowed)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--config {path}: no such file")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        d = yaml.safe_load(text)
    elif p.suffix.lower() == ".json":
        d = json.loads(text)
    else:
        raise ValueError(f"--config {path}: expected a .json, .yaml or .yml file")
    if not isinstance(d, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values, got {type(d).__name__}")
    return {k.replace("-", "_"): v for k, v in d.items()}
