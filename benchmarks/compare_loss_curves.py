"""Compare two fine-tune runs' loss curves (their log.jsonl files), as the multi-GPU checks do:
the same run at the same global batch on one GPU and on several must give the same curve.

    python benchmarks/compare_loss_curves.py RUN_DIR_1GPU RUN_DIR_NGPU --out check.json [--label ddp]

Writes the per-step losses, the largest absolute and relative differences, and the steady
optimizer steps/s of each run (from the 10th logged step on, start-up excluded) with their ratio.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(run_dir):
    """The rows of a run's log.jsonl (one JSON object per logged step)."""
    path = Path(run_dir, "log.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"no log.jsonl in {run_dir}: did the run start?")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def steady_steps_per_s(rows, first_step=10):
    pts = [(r["step"], r["time"]) for r in rows if "loss" in r and "time" in r and r["step"] >= first_step]
    if len(pts) < 2 or pts[-1][1] == pts[0][1]:
        return None
    return (pts[-1][0] - pts[0][0]) / (pts[-1][1] - pts[0][1])


def compare(rows_a, rows_b):
    loss_a = {r["step"]: r["loss"] for r in rows_a if "loss" in r}
    loss_b = {r["step"]: r["loss"] for r in rows_b if "loss" in r}
    steps = sorted(set(loss_a) & set(loss_b))
    diffs = [abs(loss_a[s] - loss_b[s]) for s in steps]
    res = {
        "steps_compared": len(steps),
        "steps": steps,
        "loss_a": [loss_a[s] for s in steps],
        "loss_b": [loss_b[s] for s in steps],
        "max_abs_loss_diff": max(diffs) if diffs else None,
        "max_rel_loss_diff": max(d / abs(loss_a[s]) for d, s in zip(diffs, steps)) if diffs else None,
    }
    sa, sb = steady_steps_per_s(rows_a), steady_steps_per_s(rows_b)
    res["steady_steps_per_s_a"], res["steady_steps_per_s_b"] = sa, sb
    res["throughput_ratio_b_over_a"] = sb / sa if sa and sb else None  # same global batch per step
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_a", help="reference run directory (one GPU)")
    ap.add_argument("run_b", help="run directory to compare (several GPUs)")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--label", default="", help="what is compared, stored in the JSON")
    ap.add_argument("--meta", default="{}", help="more JSON fields to store (a JSON object)")
    args = ap.parse_args(argv)
    res = {"label": args.label, "run_a": str(args.run_a), "run_b": str(args.run_b), **json.loads(args.meta)}
    res.update(compare(read_log(args.run_a), read_log(args.run_b)))
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k not in ("steps", "loss_a", "loss_b")}, indent=1))
    return res


if __name__ == "__main__":
    main()
