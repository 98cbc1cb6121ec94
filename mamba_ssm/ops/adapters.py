"""Low-rank adapters around the Mamba projections, as the channel-first path sees them.

A fine-tuning library wraps a projection (an nn.Linear) in its own module. `project` in
channel_first.py runs such a module on the fast channel-first path when a registered resolver
describes it as an `AdaptedLinear`: the base nn.Linear plus low-rank updates
``scaling * B(A(dropout(x)))``. This package knows no fine-tuning library: `mambakit` registers
PEFT's LoRA (mambakit/peft_lora.py), and anyone can register another::

    from mamba_ssm.ops.adapters import AdaptedLinear, LowRankUpdate, register_adapter_resolver

    @register_adapter_resolver
    def my_lora(module):
        if not isinstance(module, MyLoRALinear):
            return None          # not mine: the next resolver is asked
        return AdaptedLinear(module.base, (LowRankUpdate(module.down, module.up, module.scale, module.drop),))

A module that no resolver describes runs as itself on a transposed copy of the activation (correct,
slower); `describe_adapter` says why, and `project` warns once per module type.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch.nn as nn


@dataclass(frozen=True)
class LowRankUpdate:
    """out += scaling * b(a(dropout(x))). a: nn.Linear (in -> r, no bias); b: nn.Linear (r -> out);
    dropout: nn.Identity or nn.Dropout (another module makes the wrapper run as itself)."""

    a: nn.Linear
    b: nn.Linear
    scaling: float
    dropout: nn.Module


@dataclass(frozen=True)
class AdaptedLinear:
    """A wrapped projection: `base` plus `updates` (empty when the adapters are off or merged into
    the base weight: the base alone is then the module's output)."""

    base: nn.Linear
    updates: tuple = ()

    def modules(self):
        """Every module whose hooks would have run in the wrapper's own forward."""
        return (self.base,) + tuple(m for u in self.updates for m in (u.a, u.b))


Resolver = Callable[[nn.Module], Optional[AdaptedLinear]]
_RESOLVERS: list = []


def register_adapter_resolver(resolver: Resolver) -> Resolver:
    """Add `resolver(module) -> AdaptedLinear | None` (None: not a module it describes). Idempotent."""
    if resolver not in _RESOLVERS:
        _RESOLVERS.append(resolver)
    return resolver


def unregister_adapter_resolver(resolver: Resolver) -> None:
    if resolver in _RESOLVERS:
        _RESOLVERS.remove(resolver)


def describe_adapter(module: nn.Module) -> Optional[AdaptedLinear]:
    """The first registered resolver's description of `module`, or None."""
    for resolver in _RESOLVERS:
        found = resolver(module)
        if found is not None:
            return found
    return None
