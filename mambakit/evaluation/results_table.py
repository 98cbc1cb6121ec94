"""Side-by-side tables of lm-eval results.

lm-eval writes one JSON per run (`--output_path DIR` gives DIR/<model>/results_<date>.json, with a
"results" mapping {task: {"metric,filter": value, "metric_stderr,filter": stderr, "alias": ...}}).
This module reads those files and compares models:

    from mambakit.evaluation.results_table import load_metrics, results_table
    results_table({"base": "out/base", "lora": "out/lora/results_2026.json"})

or, from a shell (run.sh): `python -m mambakit.evaluation.results_table base=out/base lora=out/lora --out table.md`
(also `python evals/lm_harness_eval.py --results_table base=... lora=...`).
A path may be a results JSON or a directory searched for the newest results_*.json below it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

# Metrics shown first when present, in this order; others follow alphabetically.
PREFERRED_METRICS = ("exact_match", "acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte",
                     "perplexity", "mcc", "f1")


def find_results_json(path: str | os.PathLike) -> Path:
    """The results JSON a path stands for: itself, or the newest results*.json under a directory."""
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        found = sorted((q for q in p.rglob("results*.json") if q.is_file()), key=lambda q: (q.stat().st_mtime, q.name))
        if found:
            return found[-1]
        raise FileNotFoundError(f"no results*.json under {p} (was lm-eval run with --output_path {p}?)")
    raise FileNotFoundError(f"results path {p} does not exist")


def read_results(path: str | os.PathLike) -> dict:
    """lm-eval's results JSON as a dict (must hold a "results" mapping)."""
    f = find_results_json(path)
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise ValueError(f"{f}: not an lm-eval results file (no 'results' mapping)")
    return data


def metrics_from_results(data: dict, with_stderr: bool = False) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} from an lm-eval results dict.

    A metric's name keeps its filter when the filter is not "none" (gsm8k: "exact_match,strict-match"
    -> "exact_match (strict-match)"). With with_stderr, "<metric>_stderr" entries are kept too.
    Entries that are not "metric,filter" (alias, name, sample_len) are dropped; an "N/A" stderr is NaN.
    """
    out: dict[str, dict[str, float]] = {}
    for task, entries in data.get("results", {}).items():
        row = {}
        for key, value in entries.items():
            if "," not in key:  # alias, name, sample_len: not metrics ("metric,filter" are)
                continue
            metric, _, filt = key.partition(",")
            is_stderr = metric.endswith("_stderr")
            if is_stderr and not with_stderr:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                if is_stderr and value == "N/A":
                    value = float("nan")
                else:
                    continue
            name = metric if filt in ("", "none") else f"{metric} ({filt})"
            row[name] = float(value)
        if row:
            out[task] = row
    return out


def load_metrics(path: str | os.PathLike, with_stderr: bool = False) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of one lm-eval results file (or directory)."""
    return metrics_from_results(read_results(path), with_stderr=with_stderr)


def compare_metrics(result_json_paths: dict[str, str | os.PathLike]) -> dict[str, dict[str, dict[str, float]]]:
    """{model name: {task: {metric: value}}} for several runs."""
    if not result_json_paths:
        raise ValueError("compare_metrics: no results given")
    return {name: load_metrics(path) for name, path in result_json_paths.items()}


def _metric_order(metric: str):
    base = metric.split(" (")[0]
    rank = PREFERRED_METRICS.index(base) if base in PREFERRED_METRICS else len(PREFERRED_METRICS)
    return rank, metric


def _fmt(v: float | None, digits: int) -> str:
    if v is None:
        return "–"
    if math.isnan(v):
        return "nan"
    return f"{v:.{digits}f}"


def results_table(result_json_paths: dict[str, str | os.PathLike], digits: int = 4, stderr: bool = True) -> str:
    """A markdown table, one row per (task, metric), one column per model.

    With stderr, a value is written "0.1234 ± 0.0100" when lm-eval reported a standard error.
    A task or metric a model lacks shows "–".
    """
    if not result_json_paths:
        raise ValueError("results_table: no results given")
    per_model = {name: load_metrics(path, with_stderr=stderr) for name, path in result_json_paths.items()}
    names = list(per_model)
    rows = []
    tasks = sorted({t for m in per_model.values() for t in m})
    for task in tasks:
        metrics = {k for m in per_model.values() for k in m.get(task, {}) if not k.split(" (")[0].endswith("_stderr")}
        for metric in sorted(metrics, key=_metric_order):
            base, _, filt = metric.partition(" (")
            err_key = f"{base}_stderr" + (f" ({filt}" if filt else "")
            cells = []
            for name in names:
                entry = per_model[name].get(task, {})
                v = entry.get(metric)
                cell = _fmt(v, digits)
                e = entry.get(err_key)
                if stderr and v is not None and e is not None and not math.isnan(e):
                    cell += f" ± {_fmt(e, digits)}"
                cells.append(cell)
            rows.append([task, metric] + cells)
    header = ["task", "metric"] + names
    esc = [[c.replace("|", "\\|") for c in r] for r in [header] + rows]
    lines = ["| " + " | ".join(esc[0]) + " |", "|" + "|".join(["---", "---"] + ["---:"] * len(names)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc[1:]]
    return "\n".join(lines) + "\n"


def _parse_pairs(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        name, sep, path = p.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"eval_report: expected NAME=PATH, got {p!r}")
        if name in out:
            raise SystemExit(f"eval_report: model name {name!r} given twice")
        out[name] = path
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mambakit.evaluation.results_table",
                                 description="Markdown table comparing lm-eval results of several models.")
    ap.add_argument("runs", nargs="+", metavar="NAME=PATH", help="a model's name and its results JSON or output dir")
    ap.add_argument("--out", help="also write the table (markdown) to this file")
    ap.add_argument("--json", dest="json_out", help="write {model: {task: {metric: value}}} to this JSON file")
    ap.add_argument("--digits", type=int, default=4)
    ap.add_argument("--no_stderr", action="store_true", help="leave standard errors out of the table")
    args = ap.parse_args(argv)
    runs = _parse_pairs(args.runs)
    table = results_table(runs, digits=args.digits, stderr=not args.no_stderr)
    print(table, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table, encoding="utf-8")
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(compare_metrics(runs), indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
