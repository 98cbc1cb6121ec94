"""Installs `mamba_ssm` (upstream-compatible Mamba) and `mambakit` (fine-tuning, evaluation, study).

The CUDA kernels in csrc/ are built when torch has CUDA and nvcc is found (see setup_cuda.py);
set MAMBA_SSM_SKIP_CUDA_BUILD=1 to skip them. Without them the package still installs and runs
on PyTorch everywhere.
"""
import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ext_modules, cmdclass = [], {}
try:
    from setup_cuda import build_ext_class, cuda_extensions
except ImportError:  # setup_cuda.py absent: a pure-Python install
    cuda_extensions = build_ext_class = None
if cuda_extensions is not None:
    ext_modules = cuda_extensions()
    if ext_modules:
        cmdclass = {"build_ext": build_ext_class()}

setup(
    name="mamba-ssm-kit",
    version="0.1.0",
    description="Mamba (selective state-space) language models: upstream-compatible mamba_ssm that runs "
                "everywhere, LoRA fine-tuning, lm-eval evaluation and benchmarks for math reasoning",
    packages=find_packages(include=["mamba_ssm", "mamba_ssm.*", "mambakit", "mambakit.*"]),
    # the CPU scan's C source, compiled on first use (mamba_ssm/ops/selective_scan_cpu.py)
    package_data={"mambakit": ["assets/*", "assets/**/*"], "mamba_ssm": ["ops/*.c"]},
    python_requires=">=3.9",
    install_requires=[
        "torch>=2.1",  # bring your own build (CUDA on clusters, CPU on a laptop)
        "numpy",
        "safetensors>=0.4",
        "huggingface_hub>=0.20",
        "tokenizers>=0.15",
        "transformers>=4.40",
    ],
    extras_require={
        "finetune": ["peft>=0.10", "datasets>=2.18", "accelerate>=0.26", "tensorboard", "matplotlib", "tqdm"],
        "eval": ["lm-eval>=0.4.2", "datasets>=2.18"],
        "test": ["pytest>=7", "gguf>=0.10"],
        "all": ["peft>=0.10", "datasets>=2.18", "accelerate>=0.26", "tensorboard", "matplotlib", "tqdm",
                "lm-eval>=0.4.2", "pytest>=7", "gguf>=0.10"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
