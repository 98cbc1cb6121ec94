import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Without a GPU, Triton kernels can only run in Triton's interpreter, and the interpreter must be
# on before anything imports Triton (PEFT does, through torch): set per test, it came too late
# whenever an earlier test had imported PEFT.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# A GSM8K sample (the first 200 train and 60 test problems) and the GPT-NeoX-20B tokenizer,
# committed so that the tests need neither a network nor anything outside the repository.
GSM8K_DIR = FIXTURES / "gsm8k"
TOKENIZER_DIR = FIXTURES / "gpt-neox-20b"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

