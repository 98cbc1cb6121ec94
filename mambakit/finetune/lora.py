"""LoRA adapters (PEFT) on the Mamba projections, and Mamba's weight-decay groups."""
from __future__ import annotations

import torch
import torch.nn as nn

from mambakit.finetune.config import DEFAULT_TARGETS, FinetuneConfig


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
    targets = list(cfg.target_modules)
    if targets == list(DEFAULT_TARGETS):
        # the default names Mamba-1's four projections; Mamba-2 mixers have only in_proj and out_proj
        targets = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)] or targets
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise ValueError(f"target module {t!r} matches no module of the model; "
                             f"linear modules present: {_linear_names(model)}")
    import transformers

    transformers.set_seed(cfg.seed)  # the adapters' initial A matrices
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets, bias="none")
    peft_model = get_peft_model(model, lcfg)
    peft_model.peft_config["default"].base_model_name_or_path = cfg.model
    return peft_model


def no_decay_parameter(name: str, param: torch.Tensor) -> bool:
    """A_log, D (tagged _no_weight_decay), biases, norm weights and other 1-d parameters."""
    parts = name.split(".")
    owner = parts[-2].lower() if len(parts) > 1 else ""
    return getattr(param, "_no_weight_decay", False) or param.ndim < 2 or parts[-1] == "bias" or "norm" in owner
