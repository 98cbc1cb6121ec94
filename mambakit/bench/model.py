"""The model-level speed figures of a Mamba LM shape in one run and one JSON: ours in variants
(environments, other trees) and upstream mamba-ssm, each child in its own process. Command line:
benchmarks/benchmark_model.py.

The children are those of the two drivers, run through their scripts, so nothing is measured here:

  decode.py     (benchmark_decode.py --child), one per (variant, batch size): generation of
                --gen-prompt + --gen-new tokens at every --gen-batch (tokens/s, prefill ms) and decoding
                ms/token at every --batch (prompt --prompt + --new-tokens), `generate(cg=True)` unless --no-cg
  training.py   (benchmark_training.py --child), one per (variant, mode): tokens/s and peak memory of
                `full` (the whole model) and of the LoRA step in both setups, `lora_plain` (PEFT as its
                user writes it) and `lora_recipe` (the recipe's); upstream runs --upstream-modes (full)

Their docstrings say what each figure is. The child protocol, the variants, the JSON's frame (machine,
card, versions, date, git commit, inputs) and the loop over the children: variants.py. Order: the
smallest batch's child of every variant, then each training mode's, then the larger batches, so that
a run cut short by --budget-s holds every kind of figure. The JSON, model_<shape>_<card>.json
(model_<tag>_<shape>_<card>.json with --tag: a run of some parts keeps its own file), is written
(whole, then renamed) after every child:

  variants.<name>.runs.decode.<batch>      decode.py's record: "generation" {tokens_per_s, prefill_ms, ...},
                                           "decode" {ms_per_token, ...}, or an "error"
  variants.<name>.runs.training.<mode>     training.py's record: tokens_per_s, peak_memory_gib, ... or an "error"
  variants.<name>.vs_baseline.decode.<batch>   decode_speedup, tokens_per_s_ratio, prefill_speedup
  variants.<name>.vs_baseline.training.<mode>  tokens_per_s_ratio, peak_memory_ratio, ...

Ratios refer to the baseline (upstream when --upstream-path is given): speedup = baseline time /
variant time, tokens/s and peak memory variant / baseline (decode.add_ratios and training.add_ratios).

Loaded by file path (the script does it) like its siblings; it runs no child of its own, so no process
here imports `mambakit`.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from pathlib import Path


def _load_variants():
    """mambakit/bench/variants.py by path (the shared child protocol); it loads its siblings itself."""
    key = "_mamba_bench_variants"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name("variants.py"))
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


_v = _load_variants()
decode = _v.load_sibling("decode")
training = _v.load_sibling("training")
SHAPES, REPO = _v.SHAPES, _v.REPO
DEFAULT_VARIANTS = ("ours",)
SECTIONS = {"decode": decode, "training": training}  # runs.<section>: the driver whose children fill it


def plan(args, variants) -> list:
    """The children in run order (the module's docstring): the smallest batch, the modes, the other batches."""
    batches = [b for b, _ in decode.plan(args)]
    modes = [] if args.no_training else list(args.modes)

    def at_batch(b):
        return [_v.Child(n, e, ("decode", str(b)), {"batch": b}, f"batch {b}") for n, e in variants]

    def in_mode(m):
        return [_v.Child(n, e, ("training", m), training.upstream_skip(n, m, args) or {"mode": m}, m)
                for n, e in variants]

    return [c for b in batches[:1] for c in at_batch(b)] + [c for m in modes for c in in_mode(m)] + \
        [c for b in batches[1:] for c in at_batch(b)]


def section(result: dict, name: str) -> dict:
    """The result as its driver's JSON would hold one section (runs.<name> as each variant's runs):
    what decode's or training's add_ratios and table read. The runs are the same objects, not copies."""
    return {**result, "variants": {n: {"env": v.get("env"), "runs": v.get("runs", {}).get(name, {}),
                                       "vs_baseline": v.get("vs_baseline", {}).get(name, {})}
                                   for n, v in result["variants"].items()}}


def add_ratios(result: dict, baseline: str) -> None:
    """vs_baseline.<section> of every variant, by the section's driver."""
    for name, driver in SECTIONS.items():
        view = section(result, name)
        driver.add_ratios(view, baseline)
        for n, v in result["variants"].items():
            v.setdefault("vs_baseline", {})[name] = view["variants"][n]["vs_baseline"]
    result["baseline"] = baseline


def table(result: dict) -> str:
    """The drivers' tables of the sections that ran."""
    parts = []
    for name, driver in SECTIONS.items():
        view = section(result, name)
        if any(v["runs"] for v in view["variants"].values()):
            parts.append(driver.table(view))
    return "\n\n".join(parts) or "nothing measured"


def summary(r: dict) -> str:
    """A child's figures in one log line (its driver's)."""
    return training.summary(r) if "mode" in r else decode.summary(r)


def measure(child, args, kinds: dict) -> dict:
    """Run one child through its driver's run_child."""
    name, key = child.key
    if name == "decode":
        return decode.run_child(child.env, int(key), args, kinds[int(key)])
    return training.run_child(child.env, key, args)


def run(args, log=print) -> dict:
    variants, baseline = _v.resolve_variants(args.variants or DEFAULT_VARIANTS, args.upstream_path, args.baseline)
    d_model, n_layer = SHAPES[args.shape]
    result = _v.new_result("model_benchmark", args, variants, {
        "d_model": d_model, "n_layer": n_layer, "vocab": {"decode": decode.VOCAB, "training": training.VOCAB},
        "pad_vocab_size_multiple": 8})
    result["sections"] = {"decode": "benchmarks/benchmark_decode.py's children, one per (variant, batch)",
                          "training": "benchmarks/benchmark_training.py's children, one per (variant, mode)"}
    kinds = dict(decode.plan(args))
    _v.run_children(result, plan(args, variants), lambda c: measure(c, args, kinds), summary=summary,
                    add_ratios=add_ratios, baseline=baseline, prefix=result_prefix(args.tag),
                    dirs=_v.result_dirs(args), budget_s=args.budget_s,
                    table=table, log=log)
    return result


def result_prefix(tag: str) -> str:
    """The result file's name before _<shape>_<card>.json."""
    return f"model_{tag}" if tag else "model"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1.4b", choices=sorted(SHAPES))
    _v.add_parent_arguments(p, DEFAULT_VARIANTS)
    decode.add_measure_arguments(p.add_argument_group(
        "decoding and generation (benchmark_decode.py's children; --dtype: theirs alone)"))
    group = p.add_argument_group("training (benchmark_training.py's children)")
    training.add_measure_arguments(group)
    group.add_argument("--no-training", action="store_true", help="skip the training modes")
    p.add_argument("--tag", default="", help="a name for a run of some parts (letters, digits, '-'): the JSON "
                   "is model_<tag>_<shape>_<card>.json, so it does not replace the whole run's")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child:
        raise SystemExit("--child: benchmark_model.py runs no child of its own (its children are "
                         "benchmark_decode.py's and benchmark_training.py's)")
    decode.check_arguments(args)
    training.check_arguments(args)
    if not re.fullmatch(r"[A-Za-z0-9-]*", args.tag):
        raise SystemExit(f"--tag: expected letters, digits and '-', got {args.tag!r}")
    for flag in ("batch", "gen_batch"):
        if min(getattr(args, flag)) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')}: batch sizes must be >= 1, got {getattr(args, flag)}")
    if args.upstream_path and not (Path(args.upstream_path) / "mamba_ssm").is_dir():
        raise SystemExit(f"--upstream-path: expected a directory holding upstream's built mamba_ssm package "
                         f"(DIR/mamba_ssm), got {args.upstream_path!r}")
    if args.no_decode and args.no_generation and args.no_training:
        raise SystemExit("--no-decode, --no-generation and --no-training: expected at most two of them "
                         "(nothing would be measured)")
    try:
        return run(args)
    except ValueError as e:  # a bad --variants or --baseline
        raise SystemExit(str(e)) from None
