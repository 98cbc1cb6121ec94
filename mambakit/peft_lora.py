"""PEFT's LoRA on the Mamba projections, described for mamba_ssm's channel-first fast path.

`mamba_ssm` knows no fine-tuning library: it runs a wrapped projection on its fast path when a
registered resolver describes the wrapper (mamba_ssm/ops/adapters.py). This module is that
resolver for PEFT's `LoraLayer` around an nn.Linear; importing `mambakit` registers it. Reading
PEFT's attributes (`base_layer`, `lora_A`, `lora_B`, `scaling`, `lora_dropout`, `active_adapters`,
`merged`, `disable_adapters`, `lora_variant`/`use_dora`) happens here and nowhere else.
A wrapper this does not describe (DoRA and other variants, fan_in_fan_out, adapters with a
bias on A) runs PEFT's own forward.
"""
from __future__ import annotations

import torch.nn as nn

from mamba_ssm.ops.adapters import AdaptedLinear, LowRankUpdate, register_adapter_resolver


def _is_peft_lora(module) -> bool:
    return type(module).__module__.startswith("peft.") and hasattr(module, "lora_A") and hasattr(module, "base_layer")


def describe_peft_lora(module: nn.Module) -> AdaptedLinear | None:
    if not _is_peft_lora(module):
        return None
    base = module.base_layer
    if type(base) is not nn.Linear or getattr(module, "fan_in_fan_out", False):
        return None
    if getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return AdaptedLinear(base)  # the base layer alone is the output (merged: it holds the update)
    variants = getattr(module, "lora_variant", {}) or {}
    use_dora = getattr(module, "use_dora", {}) or {}
    updates = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in variants or use_dora.get(name, False):
            return None
        a, b = module.lora_A[name], module.lora_B[name]
        if type(a) is not nn.Linear or type(b) is not nn.Linear or a.bias is not None:
            return None
        updates.append(LowRankUpdate(a, b, float(module.scaling[name]), module.lora_dropout[name]))
    return AdaptedLinear(base, tuple(updates))


register_adapter_resolver(describe_peft_lora)
