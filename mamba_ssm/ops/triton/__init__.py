"""Triton kernels. Importing this package never needs Triton: each kernel compiles on first use."""
import torch


def triton_on_cuda() -> bool:
    """Triton imports and a CUDA device is present, so the kernels here can run."""
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
