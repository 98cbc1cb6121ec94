"""Evaluation: lm-evaluation-harness's `--model mamba` (`lm_eval_model`), GSM8K-style answer
extraction and exact match (`math_answers`), and tables of lm-eval results (`results_table`)."""
