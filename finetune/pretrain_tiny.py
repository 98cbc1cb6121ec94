#!/usr/bin/env python
"""Pretrain the study's tiny base Mamba from scratch on procedurally generated arithmetic (CPU, minutes).

    python finetune/pretrain_tiny.py                      # writes mambakit/assets/tiny-mamba-arith and
                                                          # mambakit/assets/math-word-problems/{train,test}.jsonl
    python finetune/pretrain_tiny.py --out-dir /tmp/tiny --data-dir /tmp/wp --steps 200

Every option is a field of mambakit.finetune.pretrain_tiny.PretrainConfig (--help lists them).
"""
from mambakit.finetune.pretrain_tiny import main

if __name__ == "__main__":
    main()
