"""mambakit: the study's machinery around mamba_ssm (math data, LoRA fine-tuning, merging,
lm-eval integration, benchmarks, report). The scripts in finetune/, evals/ and benchmarks/ are
thin command lines over these modules."""
