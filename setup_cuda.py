"""CUDA extensions of mamba_ssm, for setup.py.

    from setup_cuda import cuda_extensions, build_ext_class
    setup(..., ext_modules=cuda_extensions(), cmdclass={"build_ext": build_ext_class()} if build_ext_class() else {})

`cuda_extensions()` returns [] (never raises) when torch is missing, torch has no CUDA,
nvcc cannot be found, or MAMBA_SSM_SKIP_CUDA_BUILD=1; the package then runs on its PyTorch
backend. Target GPUs come from TORCH_CUDA_ARCH_LIST (default "8.0;9.0"). MAX_JOBS sets
how many nvcc processes the build runs at once.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCAN_DIR = Path("csrc") / "selective_scan"
DEFAULT_ARCHS = "8.0;9.0"


def _skip_reason():
    if os.environ.get("MAMBA_SSM_SKIP_CUDA_BUILD", "").strip().upper() in ("1", "TRUE", "YES", "ON"):
        return "MAMBA_SSM_SKIP_CUDA_BUILD is set"
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception:
        return "torch is not installed"
    if torch.version.cuda is None:
        return "torch has no CUDA support"
    home = cpp_extension.CUDA_HOME
    nvcc = None
    if home:
        cand = Path(home) / "bin" / "nvcc"
        nvcc = str(cand) if cand.exists() else None
    if nvcc is None:
        nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "nvcc was not found (set CUDA_HOME)"
    return None


def _gencode_flags():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch reads it too; keep one source of truth
    flags = []
    for item in archs.replace(",", ";").replace(" ", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item.replace("+PTX", "").replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    return flags


def cuda_extensions():
    """The list of torch CUDAExtension objects to build ([] when CUDA cannot be built)."""
    reason = _skip_reason()
    if reason is not None:
        warnings.warn(f"mamba_ssm: not building the CUDA extension ({reason}); the PyTorch backend will be used")
        return []
    from torch.utils.cpp_extension import CUDAExtension

    sources = [str(SCAN_DIR / "scan_binding.cpp")] + [
        str(SCAN_DIR / f"scan_{kind}_{t}.cu") for kind in ("fwd", "bwd") for t in ("f32", "f16", "bf16")
    ]
    nvcc_flags = [
        "-O3",
        "-std=c++17",
        "--use_fast_math",
        "-lineinfo",
        "--expt-relaxed-constexpr",
        "-U__CUDA_NO_HALF_OPERATORS__",
        "-U__CUDA_NO_HALF_CONVERSIONS__",
        "-U__CUDA_NO_BFLOAT16_OPERATORS__",
        "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    ] + _gencode_flags()
    # Extra flags for kernel experiments, e.g. MAMBA_SSM_NVCC_EXTRA="-Xptxas -warn-spills" or a -D of
    # an experiment's own macro; -D flags reach the C++ binding too.
    extra = os.environ.get("MAMBA_SSM_NVCC_EXTRA", "").split()
    nvcc_flags += extra
    cxx_flags = ["-O3", "-std=c++17"] + [f for f in extra if f.startswith("-D")]
    return [
        CUDAExtension(
            name="mamba_ssm._selective_scan_cuda",
            sources=sources,
            include_dirs=[str(HERE / SCAN_DIR)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        )
    ]


def build_ext_class():
    """torch's BuildExtension (parallel nvcc through ninja), or None without torch."""
    try:
        from torch.utils.cpp_extension import BuildExtension
    except Exception:
        return None
    return BuildExtension.with_options(use_ninja=True)
