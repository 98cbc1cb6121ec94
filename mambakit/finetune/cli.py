"""The fine-tune's command line (finetune/finetune.py): flags are FinetuneConfig's fields, over an
optional --config file. Exit status: 0 finished, 3 stopped by a signal after a checkpoint, 1 error."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys

from mambakit.finetune.config import FinetuneConfig, read_config_file
from mambakit.finetune.recipe import run

PREEMPTED_EXIT_CODE = 3


def _field_type(f) -> tuple[str, bool]:
    t = str(f.type).replace(" ", "")
    optional = "|None" in t
    return t.replace("|None", ""), optional


def build_parser(parser=None):
    import argparse

    parser = parser or argparse.ArgumentParser(
        description="LoRA (or full) fine-tuning of a Mamba model on math word problems. Flags override "
                    "--config; see finetune/README.md.")
    parser.add_argument("--config", help="JSON or YAML file with any of the options below (flags win)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved options as JSON and exit (run.sh reads the model and data from it)")
    helps = {
        "model": "hub id or local directory (upstream or transformers layout)",
        "tokenizer": "directory or tokenizer.json (default: the model's, else GPT-NeoX-20B)",
        "dataset": "hub id, local json/jsonl/csv/parquet file, or a directory of {split}.<ext> files",
        "preset": "field preset: gsm8k, orca-math, mathinstruct (or 'none' with --prompt-field/--response-field)",
        "eval_size": "held-out examples carved from the training split when --eval-split is not given",
        "template": "prompt template with a {prompt} slot (default 'Question: {prompt}\\nAnswer:')",
        "response_prefix": "text put between the prompt and the response (default one space)",
        "full_finetune": "train every parameter instead of LoRA adapters",
        "target_modules": "LoRA targets (default: in_proj x_proj dt_proj out_proj)",
        "precision": "auto (bf16 on a GPU that has it, else fp32), bf16 or fp32",
        "resume": "continue from the newest checkpoint in --output-dir (starts fresh when there is none)",
        "stop_after_steps": "stop as if preempted after this many optimizer steps (testing)",
        "merge": "after training, also write output_dir/merged (adapter folded in, checked)",
    }
    for f in dataclasses.fields(FinetuneConfig):
        flag = "--" + f.name.replace("_", "-")
        t, optional = _field_type(f)
        h = helps.get(f.name, "")
        if t == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=h)
            continue
        conv = {"str": str, "int": int, "float": float, "list[str]": str}[t]
        if optional:
            conv = (lambda c: (lambda s: None if s.lower() in ("none", "null") else c(s)))(conv)
        kw = {"nargs": "+"} if t == "list[str]" else {}
        parser.add_argument(flag, dest=f.name, type=conv, default=argparse.SUPPRESS, help=h, **kw)
    return parser


def parse_command_line(argv=None) -> tuple[FinetuneConfig, bool]:
    """(the experiment, whether only to print it) from flags over an optional --config file."""
    args = vars(build_parser().parse_args(argv))
    print_only = args.pop("print_config")
    d = read_config_file(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    d.update(args)
    if isinstance(d.get("preset"), str) and d["preset"].lower() == "none":
        d["preset"] = None
    if isinstance(d.get("target_modules"), str):
        d["target_modules"] = [t for t in d["target_modules"].replace(",", " ").split() if t]
    return FinetuneConfig.from_dict(d), print_only


def config_from_cli(argv=None) -> FinetuneConfig:
    return parse_command_line(argv)[0]


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, print_only = parse_command_line(argv)
        if print_only:
            cfg.validate()
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            return 0
        result = run(cfg)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"finetune: error: {msg}", file=sys.stderr, flush=True)
        return 1
    if result.status == "preempted":
        return PREEMPTED_EXIT_CODE
    s = result.summary
    if s:  # rank 0 only
        print(json.dumps({k: s.get(k) for k in ("accuracy_base", "accuracy_finetuned", "first_loss", "last_loss",
                                            "steps", "output")}, indent=2), flush=True)
    return 0
