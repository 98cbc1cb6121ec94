#!/usr/bin/env python
"""Fold a LoRA adapter into its base model and check the result. See finetune/README.md.

    python finetune/merge.py --adapter outputs/gsm8k-lora/adapter --out outputs/gsm8k-merged
"""
import sys

from mambakit.finetune.merge import main

if __name__ == "__main__":
    sys.exit(main())
