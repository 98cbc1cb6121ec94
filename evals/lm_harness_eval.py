#!/usr/bin/env python
"""lm-evaluation-harness's own command line, with our Mamba registered as `--model mamba`.

Every lm-eval option works as documented by lm-eval (this script only registers the model and,
for convenience, adds `--include_path evals/tasks` when a local task is named without it):

    python evals/lm_harness_eval.py --model mamba \
        --model_args pretrained=state-spaces/mamba-130m,tokenizer=/path/to/gpt-neox-20b,dtype=float32 \
        --tasks gsm8k_local --include_path evals/tasks --device cpu --batch_size auto --output_path results/

`--model mamba_ssm` (lm-eval's own wrapper) also runs on our package; see evals/README.md.
`--results_table a=PATH b=PATH` prints mambakit.evaluation.results_table's markdown table instead of evaluating.
"""
import sys
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _local_task_names() -> set:
    """Task names and tags declared in evals/tasks (read as text: lm-eval's YAML has !function tags)."""
    names = set()
    for yaml in TASKS_DIR.rglob("*.yaml"):
        in_tags = False
        for line in yaml.read_text(encoding="utf-8").splitlines():
            if line.startswith("task:"):
                names.add(line.split(":", 1)[1].strip())
            in_tags = line.startswith("tag:") or (in_tags and line.startswith("  - "))
            if in_tags and line.startswith("  - "):
                names.add(line[4:].strip())
    return names


def _add_local_tasks(argv: list) -> list:
    """Append --include_path evals/tasks when a local task is asked for and no include path given."""
    if any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        return argv
    requested = set()
    for i, a in enumerate(argv):
        if a in ("--tasks", "-t"):
            for b in argv[i + 1:]:
                if b.startswith("-"):
                    break
                requested.update(x for x in b.split(",") if x)
        elif a.startswith("--tasks="):
            requested.update(x for x in a.split("=", 1)[1].split(",") if x)
    if requested & _local_task_names():
        return argv + ["--include_path", str(TASKS_DIR)]
    return argv


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--results_table":
        from mambakit.evaluation.results_table import main as report_main

        report_main(argv[1:])
        return
    import mambakit.evaluation.lm_eval_model  # noqa: F401  registers --model mamba
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:  # pragma: no cover
        raise SystemExit(f"lm-eval is not installed ({e}); pip install 'lm-eval>=0.4.2'") from e
    sys.argv = [sys.argv[0]] + _add_local_tasks(argv)
    cli_evaluate()


if __name__ == "__main__":
    main()
