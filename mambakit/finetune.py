"""Supervised fine-tuning of a Mamba language model on math word problems (LoRA or full).

The recipe is a short sequence of named steps, each a function of this module::

    cfg = FinetuneConfig(model=..., dataset=..., output_dir=...)
    result = run(cfg)        # = the steps below, in order

    model     = load_model(cfg)                    # MambaLMHeadModel, either checkpoint layout
    tokenizer = load_tokenizer_checked(cfg, model)  # vocabulary must fit the model's embedding
    data      = load_data(cfg, tokenizer)          # template, response-only labels, held-out split
    model     = apply_lora(cfg, model)             # PEFT LoRA on the Mamba projections, or full
    prepare_output_dir(cfg)                        # only now is anything written
    base      = evaluate(cfg, model, ..., "base")  # exact match before training (cached)
    status, steps = train(cfg, model, tokenizer, data)  # Trainer; checkpoints, resume, signals
    tuned     = evaluate(cfg, model, ..., "finetuned")
    save_final(cfg, model, tokenizer)              # adapter (or model) + tokenizer, atomically
    write_summary(cfg, ...)                        # summary.json, log.csv, loss_curve.png, then DONE

Every input is checked before the output directory is created, so a bad argument leaves nothing
behind. A run that stops early (error, signal) leaves checkpoints but never ``summary.json`` or
``DONE``: those two are written last, so a directory that has them is complete.

Checkpoints are Trainer checkpoints (weights or adapter, optimizer, scheduler, RNG states,
trainer state with the data position) written to ``.tmp-checkpoint-N`` and renamed to
``checkpoint-N`` when whole; the newest ``save_total_limit`` are kept. ``resume=True`` continues
from the newest one. SIGTERM or SIGUSR1 (SLURM's warning before preemption) finishes the current
optimizer step, writes a checkpoint and stops; `run` then returns status "preempted" (the CLI
exits with code 3).
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from mambakit.math_data import DataConfig, IGNORE_INDEX, DataCollator, load_math_data, tokenize_examples

logger = logging.getLogger(__name__)

DEFAULT_TARGETS = ("in_proj", "x_proj", "dt_proj", "out_proj")
DONE_MARKER = "DONE"
SUMMARY_NAME = "summary.json"
PREEMPTED_EXIT_CODE = 3


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


# ---------------------------------------------------------------------------------------------
# small helpers


def _dist():
    return torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None


def _is_main() -> bool:
    d = _dist()
    return d is None or d.get_rank() == 0


def _barrier():
    d = _dist()
    if d is not None:
        d.barrier()


def _atomic_write_text(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _atomic_dir(final: Path, write):
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


def _looks_local(name: str) -> bool:
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") != 1


# ---------------------------------------------------------------------------------------------
# step 1: model


def load_model(cfg: FinetuneConfig, device=None):
    """MambaLMHeadModel from a hub id or a local directory (either layout), fp32 master weights."""
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    name = os.path.expanduser(cfg.model)
    if _looks_local(name) and not os.path.isdir(name):
        raise FileNotFoundError(f"model={cfg.model!r}: no such directory (expected a model directory with "
                                f"config.json and weights, or a hub id such as state-spaces/mamba-130m)")
    try:
        model = MambaLMHeadModel.from_pretrained(name, device=device, dtype=torch.float32)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise RuntimeError(f"model={cfg.model!r} could not be loaded: {e}") from e
    return model


def model_vocab_size(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.backbone.embedding.num_embeddings


# ---------------------------------------------------------------------------------------------
# step 2: tokenizer


def load_tokenizer_checked(cfg: FinetuneConfig, model):
    from mambakit.tokenizer import load_tokenizer

    model_dir = cfg.model if os.path.isdir(os.path.expanduser(cfg.model)) else None
    tok = load_tokenizer(cfg.tokenizer, model_dir=model_dir)
    n_model = model_vocab_size(model)
    if len(tok) > n_model:
        raise ValueError(f"tokenizer {cfg.tokenizer or model_dir or 'default'} has {len(tok)} tokens but the model "
                         f"{cfg.model} embeds only {n_model}: token ids >= {n_model} would index past the "
                         f"embedding; use the model's own tokenizer")
    return tok


# ---------------------------------------------------------------------------------------------
# step 3: data


def load_data(cfg: FinetuneConfig, tokenizer):
    """Training rows and held-out examples; also a tokenised held-out set for the eval loss."""
    data = load_math_data(cfg.data_config(), tokenizer)
    if cfg.eval_loss_steps and data.eval_examples:
        from datasets import Dataset

        ids, labels, _ = tokenize_examples([e["prompt"] for e in data.eval_examples],
                                           [e["response"] for e in data.eval_examples], tokenizer, cfg.max_length)
        data.eval_dataset = Dataset.from_dict({"input_ids": ids, "labels": labels})
    return data


# ---------------------------------------------------------------------------------------------
# step 4: adaptation


def _linear_names(model) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n})


def apply_lora(cfg: FinetuneConfig, model):
    """Wrap the target projections in LoRA adapters (PEFT); with full_finetune, train everything."""
    if cfg.full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    names = [n for n, _ in model.named_modules()]
    for t in cfg.target_modules:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ValueError(f"target module {t!r} matches no module of the model; "
                             f"linear modules present: {_linear_names(model)}")
    import transformers

    transformers.set_seed(cfg.seed)  # the adapters' initial A matrices
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.target_modules), bias="none")
    peft_model = get_peft_model(model, lcfg)
    peft_model.peft_config["default"].base_model_name_or_path = cfg.model
    return peft_model


def no_decay_parameter(name: str, param: torch.Tensor) -> bool:
    """A_log, D (tagged _no_weight_decay), biases, norm weights and other 1-d parameters."""
    parts = name.split(".")
    owner = parts[-2].lower() if len(parts) > 1 else ""
    return getattr(param, "_no_weight_decay", False) or param.ndim < 2 or parts[-1] == "bias" or "norm" in owner


# ---------------------------------------------------------------------------------------------
# step 5: output directory


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
    if _is_main():
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
        _atomic_write_text(out / "run_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    _barrier()
    return out


# ---------------------------------------------------------------------------------------------
# step 6 and 8: exact-match evaluation


def _autocast(cfg, device):
    if cfg.resolved_precision() == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(cfg: FinetuneConfig, model, tokenizer, examples: list[dict], tag: str, device=None) -> dict | None:
    """Greedy exact-match accuracy on the held-out examples, shared across ranks; cached in
    output_dir/eval_{tag}.json (so a resumed run does not evaluate the base model again)."""
    from mambakit.math_answers import evaluate_exact_match

    if not examples:
        return None
    cache = Path(cfg.output_dir) / f"eval_{tag}.json"
    key = {k: getattr(cfg, k) for k in ("model", "dataset", "preset", "prompt_field", "response_field", "split",
                                        "eval_split", "eval_size", "eval_max_examples", "seed",
                                        "eval_max_new_tokens", "precision")}
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            return cached
    d = _dist()
    rank, world = (d.get_rank(), d.get_world_size()) if d else (0, 1)
    if device is not None:
        model.to(device)
    dev = next(model.parameters()).device
    t0 = time.time()
    with _autocast(cfg, dev):
        part = evaluate_exact_match(model, tokenizer, examples[rank::world], max_new_tokens=cfg.eval_max_new_tokens,
                                    batch_size=cfg.eval_batch_size, progress=cfg.progress and rank == 0)
    if d is not None:
        parts = [None] * world
        d.all_gather_object(parts, part)
    else:
        parts = [part]
    correct = sum(p["correct"] for p in parts)
    n = sum(p["n"] for p in parts)
    res = {"accuracy": correct / n, "correct": correct, "n": n, "seconds": round(time.time() - t0, 2),
           "samples": parts[0]["samples"], "key": key}
    if _is_main():
        print(f"exact match ({tag}): {correct}/{n} = {res['accuracy']:.4f}", flush=True)
        _atomic_write_text(cache, json.dumps(res, indent=2) + "\n")
    _barrier()
    return res


# ---------------------------------------------------------------------------------------------
# step 7: training


class PreemptionCallback:
    """SIGTERM/SIGUSR1 -> finish the current step, save a checkpoint, stop.

    The handler only sets a flag; at each step end the flag is agreed across ranks (a rank that
    got no signal still stops with the others). `stop_after_steps` simulates a signal (tests).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1), stop_after_steps=None):
        self.signals = signals
        self.received = None
        self.stopped = False
        self.stop_after_steps = stop_after_steps
        self._steps = 0
        self._previous = {}

    def install(self):
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)

    def uninstall(self):
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _handle(self, signum, frame):
        self.received = signum
        print(f"received signal {signal.Signals(signum).name}: will checkpoint after this step and stop", flush=True)

    def callback(self):
        from transformers import TrainerCallback

        outer = self

        class _CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                outer._steps += 1
                flag = outer.received is not None or (
                    outer.stop_after_steps is not None and outer._steps >= outer.stop_after_steps)
                d = _dist()
                if d is not None:
                    t = torch.tensor([1.0 if flag else 0.0],
                                     device="cuda" if d.get_backend() == "nccl" else "cpu")
                    d.all_reduce(t, op=d.ReduceOp.MAX)
                    flag = bool(t.item())
                if flag and state.global_step < state.max_steps:
                    outer.stopped = True
                    control.should_save = True
                    control.should_training_stop = True
                elif state.global_step >= state.max_steps:
                    control.should_save = True  # always a checkpoint at the end: resume after it is a no-op
                return control

        return _CB()


class JsonlLogCallback:
    """Appends every Trainer log record (with step and epoch) to output_dir/log.jsonl."""

    @staticmethod
    def callback(path: Path):
        from transformers import TrainerCallback

        class _CB(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                # a resumed run repeats the steps after its checkpoint: drop their old records
                if state.is_world_process_zero and path.exists():
                    keep = [l for l in path.read_text().splitlines()
                            if l.strip() and json.loads(l).get("step", 0) <= state.global_step]
                    _atomic_write_text(path, "".join(l + "\n" for l in keep))

            def on_log(self, args, state, control, logs=None, **kwargs):
                if state.is_world_process_zero and logs:
                    rec = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **logs}
                    with open(path, "a") as f:
                        f.write(json.dumps(rec) + "\n")

        return _CB()


class ProfileCallback:
    """MAMBAKIT_PROFILE_STEPS=A-B: record optimizer steps A..B-1 with torch.profiler on every rank and
    write the busiest operators (CPU and GPU time) to output_dir/profile_rank{R}.txt. A debugging aid
    for slow steps (launch overhead, synchronisation, communication); unset, it does nothing."""

    @staticmethod
    def parse(spec: str | None) -> tuple[int, int] | None:
        if not spec:
            return None
        try:
            a, b = (int(x) for x in spec.split("-"))
        except ValueError:
            raise ValueError(f"MAMBAKIT_PROFILE_STEPS={spec!r}: expected FIRST-END, e.g. 10-13") from None
        if not 0 <= a < b:
            raise ValueError(f"MAMBAKIT_PROFILE_STEPS={spec!r}: expected 0 <= FIRST < END")
        return a, b

    @staticmethod
    def callback(out: Path, steps: tuple[int, int]):
        from transformers import TrainerCallback

        first, end = steps

        class _CB(TrainerCallback):
            prof = None
            t0 = 0.0

            def on_step_begin(self, args, state, control, **kwargs):
                if state.global_step == first and self.prof is None:
                    acts = [torch.profiler.ProfilerActivity.CPU]
                    if torch.cuda.is_available():
                        acts.append(torch.profiler.ProfilerActivity.CUDA)
                        torch.cuda.synchronize()
                    self.prof = torch.profiler.profile(activities=acts)
                    self.prof.start()
                    self.t0 = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if self.prof is not None and state.global_step == end:
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    wall = (time.perf_counter() - self.t0) / (end - first)
                    self.prof.stop()
                    rank = _dist().get_rank() if _dist() is not None else 0
                    ka = self.prof.key_averages()
                    gpu_key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
                    text = (f"steps {first}..{end - 1}: {wall * 1e3:.1f} ms per step (wall, rank {rank})\n\n"
                            f"by CPU time (with children):\n{ka.table(sort_by='cpu_time_total', row_limit=25)}\n"
                            f"by own {gpu_key.split('_')[1].upper()} time:\n{ka.table(sort_by=gpu_key, row_limit=25)}\n")
                    out.mkdir(parents=True, exist_ok=True)
                    (out / f"profile_rank{rank}.txt").write_text(text)
                    self.prof = None

        return _CB()


def _tensorboard_callback(logdir: Path):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    class _TB(TensorBoardCallback):
        # transformers' callback writes model.config.to_json_string(); MambaConfig is a dataclass
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero and self.tb_writer is None:
                self.tb_writer = SummaryWriter(log_dir=str(logdir))
                self.tb_writer.add_text("args", args.to_json_string())

    return _TB()


def response_loss(outputs, labels, num_items_in_batch=None):
    """Next-token cross-entropy summed over response tokens, divided by the number of response
    tokens in the whole accumulated (and, under DDP, global) batch, so every token weighs the same
    whatever the gradient accumulation and the lengths of the rows."""
    logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
    target = labels[:, 1:].to(logits.device)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    n = num_items_in_batch if num_items_in_batch is not None else (target != IGNORE_INDEX).sum()
    if torch.is_tensor(n):
        n = n.to(loss.device)
    return loss / n


def _make_trainer_class():
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    class MambaTrainer(Trainer):
        """Trainer with Mamba's weight-decay groups, atomic checkpoints and tied-weight saving."""

        def get_decay_parameter_names(self, model):
            return [n for n, p in model.named_parameters() if not no_decay_parameter(n, p)]

        def _save(self, output_dir=None, state_dict=None):
            from peft import PeftModel

            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            if isinstance(model, PeftModel):
                # save_embedding_layers=False: PEFT's "auto" would call MambaConfig.from_pretrained
                # (a transformers-only method) and may query the hub; embeddings are not adapted here.
                if self.args.should_save:
                    model.save_pretrained(output_dir or self.args.output_dir, state_dict=state_dict,
                                          save_embedding_layers=False)
                return
            # a plain nn.Module: the Trainer would write its state dict with safetensors, which
            # refuses the tied embedding/lm_head pair; drop the tied copy (load_state_dict re-ties).
            output_dir = output_dir or self.args.output_dir
            if not self.args.should_save:
                return
            import safetensors.torch

            os.makedirs(output_dir, exist_ok=True)
            sd = state_dict if state_dict is not None else model.state_dict()
            if getattr(getattr(model, "config", None), "tie_embeddings", False):
                sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
            sd = {k: v.detach().contiguous() for k, v in sd.items()}
            safetensors.torch.save_file(sd, os.path.join(output_dir, "model.safetensors"), metadata={"format": "pt"})

        def _save_checkpoint(self, model, trial):
            """As Trainer's, but into .tmp-checkpoint-N, renamed to checkpoint-N when complete."""
            from transformers.trainer_callback import ExportableState

            step = self.state.global_step
            run_dir = self.args.output_dir
            final = os.path.join(run_dir, f"checkpoint-{step}")
            tmp = os.path.join(run_dir, f".tmp-checkpoint-{step}")
            if self.args.should_save and os.path.exists(tmp):
                shutil.rmtree(tmp)
            self.accelerator.wait_for_everyone()
            os.makedirs(tmp, exist_ok=True)
            self.store_flos()
            self.save_model(tmp, _internal_call=True)
            if not self.args.save_only_model:
                self._save_optimizer_and_scheduler(tmp)
                self._save_scaler(tmp)
                self._save_rng_state(tmp)
            if self.args.should_save:
                for cb in [c for c in self.callback_handler.callbacks + [self.control]
                           if isinstance(c, ExportableState)]:
                    name = cb.__class__.__name__
                    if isinstance(self.state.stateful_callbacks.get(name), list):
                        self.state.stateful_callbacks[name].append(cb.state())
                    else:
                        self.state.stateful_callbacks[name] = cb.state()
                self.state.save_to_json(os.path.join(tmp, "trainer_state.json"))
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                if os.path.exists(final):
                    shutil.rmtree(final)
                os.replace(tmp, final)
                rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=None, use_mtime=False)
            self.accelerator.wait_for_everyone()

    return MambaTrainer


def training_arguments(cfg: FinetuneConfig):
    from transformers import TrainingArguments

    prec = cfg.resolved_precision()
    kw: dict[str, Any] = {}
    if cfg.fsdp:
        kw["fsdp"] = True
        kw["fsdp_config"] = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                             "transformer_layer_cls_to_wrap": ["Block"], "state_dict_type": "FULL_STATE_DICT"}
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else cfg.warmup_ratio
    if cfg.eval_loss_steps:
        kw.update(eval_strategy="steps", eval_steps=cfg.eval_loss_steps, per_device_eval_batch_size=cfg.batch_size,
                  prediction_loss_only=True)
    args = TrainingArguments(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.num_epochs, max_steps=cfg.max_steps, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=warmup,
        max_grad_norm=cfg.max_grad_norm, bf16=prec == "bf16", seed=cfg.seed, data_seed=cfg.seed,
        save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=cfg.save_total_limit,
        logging_strategy="steps", logging_steps=cfg.logging_steps, logging_first_step=True, report_to="none",
        disable_tqdm=not cfg.progress, remove_unused_columns=False, dataloader_num_workers=0,
        ddp_find_unused_parameters=False, ddp_timeout=cfg.ddp_timeout, use_cpu=not torch.cuda.is_available(),
        optim="adamw_torch_fused" if torch.cuda.is_available() else "adamw_torch", **kw)
    if args.n_gpu > 1:
        # One process seeing several GPUs: the Trainer would wrap the model in nn.DataParallel,
        # which changes the batch (x n_gpu) and the loss scale. Data parallelism is torchrun's job.
        print(f"{args.n_gpu} GPUs are visible to one process: training on one GPU; launch with "
              f"`torchrun --nproc_per_node {args.n_gpu}` to use them all", flush=True)
        args._n_gpu = 1
    return args


def _finished_checkpoint(checkpoint: str | None) -> dict | None:
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    if state.get("max_steps") and state.get("global_step", 0) >= state["max_steps"]:
        return state
    return None


def train(cfg: FinetuneConfig, model, tokenizer, data, args=None, preemption: PreemptionCallback | None = None) -> tuple[str, int]:
    """Run the Trainer (resuming from the newest checkpoint when asked).

    Returns (status, global_step) with status "completed" or "preempted"."""
    args = args or training_arguments(cfg)
    out = Path(cfg.output_dir)
    preemption = preemption or PreemptionCallback(stop_after_steps=cfg.stop_after_steps)
    callbacks = [preemption.callback(), JsonlLogCallback.callback(out / "log.jsonl"),
                 _tensorboard_callback(out / "tensorboard")]
    profile_steps = ProfileCallback.parse(os.environ.get("MAMBAKIT_PROFILE_STEPS"))
    if profile_steps:
        callbacks.append(ProfileCallback.callback(out, profile_steps))
    Trainer = _make_trainer_class()
    trainer = Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.eval_dataset,
                      data_collator=DataCollator(tokenizer.pad_token_id), callbacks=callbacks,
                      compute_loss_func=response_loss)
    # MambaLMHeadModel.forward takes **kwargs (for the mixer), which the Trainer reads as "accepts
    # num_items_in_batch"; it does not: the loss is computed by response_loss instead.
    trainer.model_accepts_loss_kwargs = False
    resume_from = find_latest_checkpoint(out) if cfg.resume else None
    if cfg.resume:
        print(f"resuming from {resume_from}" if resume_from else f"--resume: no checkpoint in {out}, starting fresh",
              flush=True)
    done_state = _finished_checkpoint(resume_from)
    if done_state is not None:
        # The Trainer, resumed from a checkpoint at max_steps, would still take one more step;
        # training is over: load the weights and go on to the evaluation.
        print(f"{resume_from} is the last step ({done_state['global_step']}): loading it, no more training", flush=True)
        trainer._load_from_checkpoint(resume_from)
        trainer.state.global_step = done_state["global_step"]
    else:
        trainer.train(resume_from_checkpoint=resume_from)
    for cb in callbacks[2:]:
        if getattr(cb, "tb_writer", None) is not None:
            cb.tb_writer.flush()
    if preemption.stopped:
        print(f"stopped at step {trainer.state.global_step} after a signal; checkpoint written to {out}; "
              f"run again with --resume", flush=True)
        return "preempted", trainer.state.global_step
    if cfg.fsdp and not trainer.is_fsdp_enabled and _is_main():
        print("fsdp was asked for but the Trainer did not enable it (it needs GPUs); trained with plain data "
              "parallelism", flush=True)
    if trainer.is_fsdp_enabled:
        _save_fsdp_final(cfg, trainer, model, tokenizer)
    return "completed", trainer.state.global_step


def _save_fsdp_final(cfg: FinetuneConfig, trainer, model, tokenizer):
    """Under FSDP the module's parameters are shards: gather the full state dict (a collective),
    load it on rank 0 into a fresh unsharded model and write output_dir/model from that."""
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    sd = trainer.accelerator.get_state_dict(trainer.model)
    if _is_main():
        fresh = MambaLMHeadModel(model.config, device="cpu", dtype=torch.float32)
        sd = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in sd.items()}
        missing, unexpected = fresh.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"FSDP full state dict does not fit the model: missing {missing}, "
                               f"unexpected {unexpected}")
        # rank 0 alone: save_final's barrier here would pair with another barrier on the other
        # ranks and leave rank 0 one barrier behind (the first 2-GPU run hung at its exit)
        _write_final(cfg, fresh, tokenizer)
    _barrier()


# ---------------------------------------------------------------------------------------------
# step 9 and 10: outputs


def save_final(cfg: FinetuneConfig, model, tokenizer) -> Path:
    """output_dir/adapter (LoRA) or output_dir/model (full), with the tokenizer; written atomically
    by the main process. Every process calls it (it ends in a barrier)."""
    final = _write_final(cfg, model, tokenizer) if _is_main() else _final_dir(cfg)
    _barrier()
    return final


def _final_dir(cfg: FinetuneConfig) -> Path:
    return Path(cfg.output_dir) / ("model" if cfg.full_finetune else "adapter")


def _write_final(cfg: FinetuneConfig, model, tokenizer) -> Path:
    """The main process's part of save_final: no collective, so it may run on rank 0 alone."""
    final = _final_dir(cfg)

    def write(tmp):
        if cfg.full_finetune:
            model.save_pretrained(str(tmp))
        else:
            model.save_pretrained(str(tmp), save_embedding_layers=False)
        tokenizer.save_pretrained(str(tmp))

    _atomic_dir(final, write)
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
    if _is_main():
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
        _atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
        _atomic_write_text(out / DONE_MARKER, time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    else:
        summary = {}
    _barrier()
    return summary


def _strip(res):
    return None if res is None else {k: v for k, v in res.items()}


# ---------------------------------------------------------------------------------------------
# the recipe


@dataclass
class FinetuneResult:
    status: str  # "completed" or "preempted"
    output_dir: str
    summary: dict | None = None
    model: Any = None


def run(cfg: FinetuneConfig) -> FinetuneResult:
    t0 = time.time()
    cfg.validate()
    out = Path(cfg.output_dir)
    if cfg.resume and (out / DONE_MARKER).exists() and (out / SUMMARY_NAME).exists():
        print(f"{out} already holds a finished run; nothing to do", flush=True)
        return FinetuneResult("completed", str(out), json.loads((out / SUMMARY_NAME).read_text()))
    preemption = PreemptionCallback(stop_after_steps=cfg.stop_after_steps)
    preemption.install()
    try:
        args = training_arguments(cfg)  # also sets up the process group under torchrun
        model = load_model(cfg)
        tokenizer = load_tokenizer_checked(cfg, model)
        data = load_data(cfg, tokenizer)
        model = apply_lora(cfg, model)
        if not cfg.full_finetune:
            model.print_trainable_parameters()
        prepare_output_dir(cfg)
        device = args.device
        base = evaluate(cfg, model, tokenizer, data.eval_examples, "base", device=device) if cfg.eval_base else None
        if preemption.received is not None:
            print("signal received before training: stopping without a checkpoint", flush=True)
            return FinetuneResult("preempted", str(out))
        status, steps = train(cfg, model, tokenizer, data, args=args, preemption=preemption)
        if status == "preempted" or preemption.received is not None:
            # a signal after the last step: the final checkpoint is written; --resume evaluates and saves
            return FinetuneResult("preempted", str(out), model=model)
        # the fine-tuned weights are new: never take their evaluation from an earlier attempt's cache
        cache = out / "eval_finetuned.json"
        if cache.exists() and _is_main():
            cache.unlink()
        _barrier()
        if cfg.fsdp and (out / "model").is_dir():
            # written by _save_fsdp_final from the gathered weights; evaluate that, unsharded
            final = out / "model"
            model = load_model(dataclasses.replace(cfg, model=str(final)))
            model.to(args.device)
        else:
            final = None
        tuned = evaluate(cfg, model, tokenizer, data.eval_examples, "finetuned") if cfg.eval_finetuned else None
        if final is None:
            final = save_final(cfg, model, tokenizer)
        extra = {}
        if cfg.merge and not cfg.full_finetune:
            from mambakit.merge import MergeConfig, merge

            if _is_main():
                mres = merge(MergeConfig(base=cfg.model, adapter=str(final), out=str(out / "merged"),
                                         tokenizer=str(final), overwrite=True))
                extra["merged"] = {"path": str(out / "merged"), "max_abs_diff": mres["max_abs_diff"]}
            _barrier()
        summary = write_summary(cfg, data, base, tuned, final, steps, time.time() - t0, extra)
        return FinetuneResult("completed", str(out), summary, model=model)
    finally:
        preemption.uninstall()


# ---------------------------------------------------------------------------------------------
# command line (finetune/finetune.py is a thin wrapper over these)


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


def _field_type(f) -> tuple[str, bool]:
    t = str(f.type).replace(" ", "")
    optional = "|None" in t
    return t.replace("|None", ""), optional


def build_parser(parser=None):
    import argparse

    parser = parser or argparse.ArgumentParser(
        description="LoRA (or full) fine-tuning of a Mamba model on math word problems. Flags override "
                    "--config; see finetune/README.md.")
    parser.add_argument("--config", help="JSON or YAML file with any of the options below (flags win)")
    helps = {
        "model": "hub id or local directory (upstream or transformers layout)",
        "tokenizer": "directory or tokenizer.json (default: the model's, else GPT-NeoX-20B)",
        "dataset": "hub id, local json/jsonl/csv/parquet file, or a directory of {split}.<ext> files",
        "preset": "field preset: gsm8k, orca-math, mathinstruct (or 'none' with --prompt-field/--response-field)",
        "eval_size": "held-out examples carved from the training split when --eval-split is not given",
        "template": "prompt template with a {prompt} slot (default 'Question: {prompt}\\nAnswer:')",
        "response_prefix": "text put between the prompt and the response (default one space)",
        "full_finetune": "train every parameter instead of LoRA adapters",
        "target_modules": "LoRA targets (default: in_proj x_proj dt_proj out_proj)",
        "precision": "auto (bf16 on a GPU that has it, else fp32), bf16 or fp32",
        "resume": "continue from the newest checkpoint in --output-dir (starts fresh when there is none)",
        "stop_after_steps": "stop as if preempted after this many optimizer steps (testing)",
        "merge": "after training, also write output_dir/merged (adapter folded in, checked)",
    }
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        t, optional = _field_type(f)
        h = helps.get(f.name, "")
        if t == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=h)
            continue
        conv = {"str": str, "int": int, "float": float, "list[str]": str}[t]
        if optional:
            conv = (lambda c: (lambda s: None if s.lower() in ("none", "null") else c(s)))(conv)
        kw = {"nargs": "+"} if t == "list[str]" else {}
        parser.add_argument(flag, dest=f.name, type=conv, default=argparse.SUPPRESS, help=h, **kw)
    return parser


def config_from_cli(argv=None) -> FinetuneConfig:
    args = vars(build_parser().parse_args(argv))
    d = read_config_file(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    d.update(args)
    if isinstance(d.get("preset"), str) and d["preset"].lower() == "none":
        d["preset"] = None
    if isinstance(d.get("target_modules"), str):
        d["target_modules"] = [t for t in d["target_modules"].replace(",", " ").split() if t]
    return FinetuneConfig.from_dict(d)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = config_from_cli(argv)
        result = run(cfg)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"finetune: error: {msg}", file=sys.stderr, flush=True)
        return 1
    if result.status == "preempted":
        return PREEMPTED_EXIT_CODE
    s = result.summary
    if s:  # rank 0 only
        print(json.dumps({k: s.get(k) for k in ("accuracy_base", "accuracy_finetuned", "first_loss", "last_loss",
                                            "steps", "output")}, indent=2), flush=True)
    return 0
