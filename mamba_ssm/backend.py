"""The one place that chooses which implementation runs an op.

Backends, fastest first: ``cuda`` (our compiled kernels from ``csrc/``),
``triton`` (reserved for Triton kernels), ``torch`` (pure PyTorch, runs on any
device). The choice is made per call from the tensor's device and what is
installed, and can be forced:

* environment: ``MAMBA_SSM_BACKEND=torch`` (or ``cuda``, ``triton``, ``auto``), read once at import;
* code: ``mamba_ssm.backend.set_backend("torch")`` or ``with use_backend("torch"):``.

A forced ``cuda`` or ``triton`` applies to the ops that have an implementation of that kind; the
others are chosen as in ``auto`` (the causal conv has no CUDA kernel, so forcing ``cuda`` for the
scan does not stop a model from running). A forced backend that has an implementation of the op
but cannot run the call (not built, not installed, inputs not on a GPU, a form its kernel lacks) is an
error. In ``auto`` mode a CUDA tensor that has to fall back to PyTorch triggers one warning per op
(and per form the kernel lacks, e.g. the scan's complex A).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import threading
import warnings

BACKENDS = ("cuda", "triton", "torch")
_VALID = BACKENDS + ("auto",)
ENV_VAR = "MAMBA_SSM_BACKEND"

# op name -> module that provides the compiled implementation and an `is_available()`.
_CUDA_PROVIDERS = {
    "selective_scan": "mamba_ssm.ops.selective_scan_cuda",
}
_TRITON_PROVIDERS = {
    "selective_state_update": "mamba_ssm.ops.triton.selective_state_update",
    "causal_conv1d": "mamba_ssm.ops.triton.causal_conv1d",  # MAMBA_SSM_TRITON_CONV=0 turns it off
    "layer_norm": "mamba_ssm.ops.triton.layer_norm",  # the residual add + LayerNorm/RMSNorm
    "ssd": "mamba_ssm.ops.triton.ssd_triton",  # Mamba-2's chunked scan (mamba_chunk_scan_combined)
}
_PROVIDERS = {"cuda": _CUDA_PROVIDERS, "triton": _TRITON_PROVIDERS}

_state = threading.local()
_warned: set[str] = set()


def _check_name(name: str, source: str = "backend") -> str:
    name = name.lower().strip()
    if name not in _VALID:
        raise ValueError(f"{source} must be one of {_VALID}, got {name!r}")
    return name


def backend_from_environment(environ=os.environ) -> str:
    """MAMBA_SSM_BACKEND's choice ('auto' when unset or empty)."""
    return _check_name(environ.get(ENV_VAR, "") or "auto", source=ENV_VAR)


_ENV_CHOICE = backend_from_environment()


def requested_backend() -> str:
    """The backend asked for: set_backend/use_backend first, then the environment, else 'auto'."""
    forced = getattr(_state, "forced", None)
    if forced is not None:
        return forced
    return _ENV_CHOICE


def set_backend(name: str | None) -> None:
    """Force a backend for this thread (None returns to the environment / auto)."""
    _state.forced = None if name is None else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str):
    previous = getattr(_state, "forced", None)
    set_backend(name)
    try:
        yield
    finally:
        _state.forced = previous


def _provider_available(providers: dict, op: str) -> bool:
    module_name = providers.get(op)
    if module_name is None:
        return False
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return False
    return bool(module.is_available())


@functools.lru_cache(maxsize=None)
def available_backends(op: str) -> tuple:
    found = []
    if _provider_available(_CUDA_PROVIDERS, op):
        found.append("cuda")
    if _provider_available(_TRITON_PROVIDERS, op):
        found.append("triton")
    found.append("torch")
    return tuple(found)


def choose_backend(op: str, on_cuda: bool) -> str:
    """Name the backend that runs `op` for inputs on a CUDA device (`on_cuda`) or not."""
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    if requested in ("cuda", "triton") and op in _PROVIDERS[requested]:
        if not on_cuda:
            raise RuntimeError(f"{ENV_VAR}/set_backend forces '{requested}' for {op}, but the inputs are not on a CUDA device")
        if requested not in available_backends(op):
            raise RuntimeError(
                f"{ENV_VAR}/set_backend forces '{requested}' for {op}, but it is not available "
                f"(available: {available_backends(op)}); build the extension with `pip install -e .` "
                "on a machine with nvcc and a CUDA build of torch"
            )
        return requested
    if not on_cuda:
        return "torch"
    for name in available_backends(op):
        if name != "torch":
            return name
    warn_fallback_once(op, f"mamba_ssm: no compiled kernel for {op} is available, falling back to the PyTorch "
                           "implementation on CUDA (correct but slower); build the CUDA extension to speed it up",
                       stacklevel=3)
    return "torch"


def warn_fallback_once(key: str, message: str, stacklevel: int = 2) -> None:
    """One RuntimeWarning per key in a process: a CUDA call that runs on the PyTorch implementation.
    stacklevel as warnings.warn's, counted from the function that calls this one."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=stacklevel + 1)
