"""lm-eval's data-parallel mode for the `mamba` model: one process per GPU (or CPU process), each
evaluating its share of the documents, the results gathered on rank 0.

    accelerate launch -m lm_eval --model mamba --model_args pretrained=... --tasks ...
    torchrun --nproc_per_node 2 evals/lm_harness_eval.py --model mamba ...

lm-eval itself splits the documents by rank and gathers the metrics; the model has to tell it its
rank and world size and provide `all_gather`, `gather_object` and `barrier` (lm-eval's `LM` API).
Both launchers set RANK, WORLD_SIZE and LOCAL_RANK; the process group is initialised here (NCCL on
CUDA, gloo on the CPU) unless the program already did, and each CUDA rank takes GPU LOCAL_RANK.
"""
from __future__ import annotations

import os

import torch


def launched_ranks(environ=os.environ) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) that a launcher set in the environment; (0, 1, 0) without one."""
    try:
        world = int(environ.get("WORLD_SIZE", "1"))
        rank = int(environ.get("RANK", "0"))
        local = int(environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ValueError(f"mamba: RANK, WORLD_SIZE and LOCAL_RANK must be integers, got RANK="
                         f"{environ.get('RANK')!r} WORLD_SIZE={environ.get('WORLD_SIZE')!r} "
                         f"LOCAL_RANK={environ.get('LOCAL_RANK')!r}") from e
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"mamba: RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world, local


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """The device of this rank: CUDA ranks take GPU local_rank (whatever index was asked), others as asked."""
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise ValueError(f"mamba: LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPUs")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_process_group(device: torch.device) -> None:
    """Join the launcher's process group (NCCL on CUDA, gloo otherwise) unless one is initialised."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("mamba: WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)


def all_gather(tensor: torch.Tensor, world_size: int) -> torch.Tensor:
    """Every rank's `tensor`, concatenated along dim 0 (0-d tensors stacked), on every rank."""
    import torch.distributed as dist

    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)


def gather_object(obj, rank: int, world_size: int, dst: int = 0):
    """Every rank's `obj` in rank order on `dst`, None elsewhere."""
    import torch.distributed as dist

    out = [None] * world_size if rank == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()
