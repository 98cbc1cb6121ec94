"""The fine-tune's view of torch.distributed: one process, or one rank of a torchrun job."""
from __future__ import annotations

import torch


def process_group():
    """torch.distributed when a process group is initialised (torchrun), else None."""
    return torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None


def rank_and_world() -> tuple[int, int]:
    d = process_group()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def is_main() -> bool:
    return rank_and_world()[0] == 0


def barrier():
    d = process_group()
    if d is not None:
        d.barrier()
