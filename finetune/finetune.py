#!/usr/bin/env python
"""Fine-tune a Mamba model on math word problems (LoRA by default). See finetune/README.md.

    python finetune/finetune.py --model state-spaces/mamba-130m --dataset openai/gsm8k \
        --output-dir outputs/gsm8k-lora --max-steps 1000
    python finetune/finetune.py --config experiment.yaml --resume

Exit status: 0 finished (summary.json and DONE written), 3 stopped by SIGTERM/SIGUSR1 after
writing a checkpoint (run again with --resume), 1 error.
"""
import sys

from mambakit.finetune import main

if __name__ == "__main__":
    sys.exit(main())
