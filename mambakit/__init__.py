"""mambakit: the study's machinery around mamba_ssm. The scripts in finetune/, evals/ and
benchmarks/ are thin command lines over these modules.

    data/         math word problems for fine-tuning; the embedded study's synthetic problems
    finetune/     the LoRA / full fine-tuning recipe, merging, the tiny base model's pretraining
    evaluation/   lm-eval's `--model mamba`, GSM8K-style exact match, tables of lm-eval results
    bench/        the generation benchmark (Mamba against a same-size transformer)
    report.py     the study's report (markdown and charts)
    tokenizer.py  tokenizers from a directory, a tokenizer.json or the hub
    peft_lora.py  PEFT's LoRA described for mamba_ssm's channel-first fast path (registered here)
"""
from mambakit import peft_lora as _peft_lora  # noqa: F401  (registers the resolver)
