"""The training loop: transformers' Trainer with Mamba's loss over response tokens, weight-decay
groups, atomic checkpoints, resume, and the FSDP final save."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mambakit.data.math_data import IGNORE_INDEX, DataCollator
from mambakit.finetune.callbacks import JsonlLogCallback, PreemptionCallback, ProfileCallback, tensorboard_callback
from mambakit.finetune.config import FinetuneConfig
from mambakit.finetune import distributed
from mambakit.finetune.lora import no_decay_parameter
from mambakit.finetune.outputs import find_latest_checkpoint, write_final


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


def make_trainer_class():
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    class MambaTrainer(Trainer):
        """Trainer with Mamba's weight-decay groups, atomic checkpoints and tied-weight saving.

        Logs ``num_input_tokens_seen``: real tokens (attention_mask, no padding) over all ranks, kept
        in the trainer state (so a resumed run goes on counting); counted on the device without a
        sync, summed at each log and checkpoint."""

        _tokens_pending = 0

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            self._tokens_pending = self._tokens_pending + (mask.sum() if mask is not None
                                                           else inputs["input_ids"].numel())
            return super().training_step(model, inputs, *args, **kwargs)

        def _flush_tokens(self):
            n = torch.as_tensor(self._tokens_pending, dtype=torch.int64, device=self.args.device)
            group = distributed.process_group()
            if group is not None:
                group.all_reduce(n)
            self.state.num_input_tokens_seen += int(n)
            self._tokens_pending = 0

        def log(self, logs, *args, **kwargs):
            if "loss" in logs:  # the training logs, at the same steps on every rank
                self._flush_tokens()
                logs["num_input_tokens_seen"] = self.state.num_input_tokens_seen
            return super().log(logs, *args, **kwargs)

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
            self._flush_tokens()
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


def finished_checkpoint(checkpoint: str | None) -> dict | None:
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
                 tensorboard_callback(out / "tensorboard")]
    profile_steps = ProfileCallback.parse(os.environ.get("MAMBAKIT_PROFILE_STEPS"))
    if profile_steps:
        callbacks.append(ProfileCallback.callback(out, profile_steps))
    Trainer = make_trainer_class()
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
    done_state = finished_checkpoint(resume_from)
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
    if cfg.fsdp and not trainer.is_fsdp_enabled and distributed.is_main():
        print("fsdp was asked for but the Trainer did not enable it (it needs GPUs); trained with plain data "
              "parallelism", flush=True)
    if trainer.is_fsdp_enabled:
        save_fsdp_final(cfg, trainer, model, tokenizer)
    return "completed", trainer.state.global_step


def save_fsdp_final(cfg: FinetuneConfig, trainer, model, tokenizer):
    """Under FSDP the module's parameters are shards: gather the full state dict (a collective),
    load it on rank 0 into a fresh unsharded model and write output_dir/model from that."""
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    sd = trainer.accelerator.get_state_dict(trainer.model)
    if distributed.is_main():
        fresh = MambaLMHeadModel(model.config, device="cpu", dtype=torch.float32)
        sd = {k.replace("_fsdp_wrapped_module.", ""): v for k, v in sd.items()}
        missing, unexpected = fresh.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"FSDP full state dict does not fit the model: missing {missing}, "
                               f"unexpected {unexpected}")
        # rank 0 alone: save_final's barrier here would pair with another barrier on the other
        # ranks and leave rank 0 one barrier behind (the first 2-GPU run hung at its exit)
        write_final(cfg, fresh, tokenizer)
    distributed.barrier()
