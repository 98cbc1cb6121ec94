"""The study's report: markdown with PNG charts, built only from result files.

Inputs (each optional; a missing section says so rather than inventing a number):

* lm-eval results of the base and the fine-tuned model (``--eval NAME=PATH``, a results JSON or
  a directory holding one; read with `mambakit.evaluation.results_table`);
* the fine-tune's ``summary.json`` (held-out exact match before/after, loss, steps, time);
* generation-benchmark JSONs (`mambakit.bench.generation`);
* extra JSON files to list (e.g. the base model's ``pretrain_summary.json``, step timings).

Outputs in ``--out``: ``report.md``, ``accuracy.png`` (per task and metric, base against
fine-tuned) and ``throughput.png`` (generated tokens/s against batch size, per model). Every
number in the markdown sits next to the path of the file it was read from.

    python -m mambakit.report --out OUT/report --eval base=OUT/eval/base --eval finetuned=OUT/eval/finetuned \\
        --finetune-summary OUT/finetune/summary.json --generation OUT/bench/generation.json
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path


def _rel(path, start) -> str:
    """A path relative to the report's directory when possible (links work), else absolute."""
    try:
        return os.path.relpath(Path(path).resolve(), Path(start).resolve())
    except ValueError:
        return str(Path(path).resolve())


def _fmt(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v != 0 and abs(v) < 10 ** -digits:
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def load_eval_metrics(evals: dict) -> dict:
    """{name: (results json path, {task: {metric: value}})} from {name: path}."""
    from mambakit.evaluation.results_table import find_results_json, load_metrics

    out = {}
    for name, path in evals.items():
        f = find_results_json(path)
        out[name] = (f, load_metrics(f, with_stderr=True))
    return out


def _accuracy_rows(metrics: dict, names: list) -> list:
    """[(task, metric, {name: (value, stderr)})] for metrics every model has (stderr dropped from names)."""
    rows = []
    tasks = sorted({t for _, m in metrics.values() for t in m})
    for task in tasks:
        keys = set()
        for _, m in metrics.values():
            keys |= {k for k in m.get(task, {}) if not k.split(" (")[0].endswith("_stderr")}
        for key in sorted(keys):
            base, _, filt = key.partition(" (")
            err_key = f"{base}_stderr" + (f" ({filt}" if filt else "")
            vals = {n: (metrics[n][1].get(task, {}).get(key), metrics[n][1].get(task, {}).get(err_key)) for n in names}
            rows.append((task, key, vals))
    return rows


def plot_accuracy(rows: list, names: list, png_path, sources: dict, finetune_summary=None):
    """Grouped bars: one group per (task, metric), one bar per model (error bars: lm-eval's stderr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(f"{t}\n{m}", vals) for t, m, vals in rows]
    if finetune_summary is not None:
        s, path = finetune_summary
        if s.get("accuracy_base") is not None or s.get("accuracy_finetuned") is not None:
            groups.append(("fine-tune held-out\nexact match", {names[0]: (s.get("accuracy_base"), None),
                                                               names[-1]: (s.get("accuracy_finetuned"), None)}))
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(groups) + 2), 4))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs, ys, errs = [], [], []
        for i, (_, vals) in enumerate(groups):
            v, e = vals.get(name, (None, None))
            if v is None:
                continue
            xs.append(i + (j - (len(names) - 1) / 2) * width)
            ys.append(v)
            errs.append(0 if e is None or (isinstance(e, float) and math.isnan(e)) else e)
        bars = ax.bar(xs, ys, width, yerr=errs, capsize=3, label=name)
        for b, y in zip(bars, ys):
            ax.text(b.get_x() + b.get_width() / 2, y, f"{y:.3f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g for g, _ in groups], fontsize=7)
    ax.set_ylabel("score")
    ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
    ax.set_title("base vs fine-tuned", fontsize=10)
    ax.legend(fontsize=8)
    src = "; ".join(f"{n}: {p}" for n, p in sources.items())
    fig.text(0.01, 0.01, f"sources: {src}"[:220], fontsize=5, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def plot_throughput(bench: list, png_path):
    """Lines of tokens/s against batch size, per model and per benchmark file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    batches = set()
    for path, res in bench:
        inp = res.get("inputs", {})
        for name, info in res.get("models", {}).items():
            runs = sorted((r for r in res.get("runs", []) if r.get("model") == name and "tokens_per_s" in r),
                          key=lambda r: r["batch"])
            if not runs:
                continue
            label = f"{name} ({info.get('shape') or info.get('size') or inp.get('model_name', '')}), " \
                    f"{inp.get('device', '')} {inp.get('dtype', '')}"
            ax.plot([r["batch"] for r in runs], [r["tokens_per_s"] for r in runs], marker="o", label=label)
            batches |= {r["batch"] for r in runs}
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(batches))
    ax.set_xticklabels([str(b) for b in sorted(batches)])
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s (prompt + decode)")
    ax.set_title("generation throughput", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.text(0.01, 0.01, "sources: " + "; ".join(str(p) for p, _ in bench)[:200], fontsize=5, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def build_report(out_dir, evals: dict | None = None, finetune_summary=None, generation: list | None = None,
                 extra: dict | None = None, title: str = "Mamba math fine-tuning study", notes: list | None = None) -> Path:
    """Write out_dir/report.md (+ PNGs); return the markdown's path.

    evals: {model name: lm-eval results path}, in display order (base first, fine-tuned last).
    finetune_summary: path of the fine-tune's summary.json. generation: benchmark JSON paths.
    extra: {label: JSON path} listed with their top-level numbers. notes: lines added verbatim.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# {title}", "", f"Built {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `mambakit.report` "
          "from the result files named next to each number (paths relative to this report).", ""]
    for line in notes or []:
        md.append(line)
    if notes:
        md.append("")

    # --- fine-tune summary: held-out exact match before / after
    fs = None
    if finetune_summary is not None and Path(finetune_summary).is_file():
        fs = json.loads(Path(finetune_summary).read_text())
        src = _rel(finetune_summary, out)
        md += ["## Held-out accuracy, before and after fine-tuning", "",
               f"Exact match (GSM8K extraction) on the held-out split, measured by the fine-tune itself "
               f"(source: [`{src}`]({src})).", "",
               "| model | held-out exact match | examples |", "|---|---:|---:|"]
        n_eval = (fs.get("base") or fs.get("finetuned") or {}).get("n", (fs.get("data") or {}).get("eval_examples"))
        md.append(f"| base | {_fmt(fs.get('accuracy_base'))} | {_fmt(n_eval)} |")
        md.append(f"| fine-tuned ({fs.get('mode', '?')}) | {_fmt(fs.get('accuracy_finetuned'))} | {_fmt(n_eval)} |")
        md += ["", f"Training: {fs.get('steps')} steps, loss {_fmt(fs.get('first_loss'))} → {_fmt(fs.get('last_loss'))}, "
               f"{fs.get('seconds')} s (source: [`{src}`]({src})).", ""]
        loss_png = Path(finetune_summary).parent / "loss_curve.png"
        if loss_png.is_file():
            md += [f"![loss curve]({_rel(loss_png, out)})", ""]
    elif finetune_summary is not None:
        md += ["## Held-out accuracy, before and after fine-tuning", "",
               f"No fine-tune summary at `{finetune_summary}` (the fine-tune did not finish).", ""]

    # --- lm-eval tasks
    if evals:
        metrics = load_eval_metrics(evals)
        names = list(metrics)
        rows = _accuracy_rows(metrics, names)
        md += ["## lm-eval tasks", ""]
        md += ["| task | metric | " + " | ".join(names) + " | sources |",
               "|---|---|" + "---:|" * len(names) + "---|"]
        srcs = {n: _rel(p, out) for n, (p, _) in metrics.items()}
        src_cell = ", ".join(f"[{n}]({s})" for n, s in srcs.items())
        for task, key, vals in rows:
            cells = []
            for n in names:
                v, e = vals[n]
                c = _fmt(v)
                if v is not None and e is not None and not (isinstance(e, float) and math.isnan(e)):
                    c += f" ± {_fmt(e)}"
                cells.append(c)
            md.append(f"| {task} | {key} | " + " | ".join(cells) + f" | {src_cell} |")
        md.append("")
        md += ["Result files: " + "; ".join(f"{n}: [`{s}`]({s})" for n, s in srcs.items()), ""]
        png = plot_accuracy(rows, names, out / "accuracy.png", srcs,
                            (fs, finetune_summary) if fs is not None else None)
        if png:
            md += ["![accuracy: base vs fine-tuned](accuracy.png)", ""]
    elif fs is not None:
        png = plot_accuracy([], ["base", "fine-tuned"], out / "accuracy.png", {"summary": _rel(finetune_summary, out)},
                            (fs, finetune_summary))
        if png:
            md += ["![accuracy: base vs fine-tuned](accuracy.png)", ""]

    # --- generation benchmark
    bench = []
    for p in generation or []:
        if Path(p).is_file():
            bench.append((p, json.loads(Path(p).read_text())))
    if generation:
        md += ["## Generation throughput", ""]
        if not bench:
            md += [f"No generation results at {', '.join(map(str, generation))}.", ""]
    for path, res in bench:
        src = _rel(path, out)
        inp, mach = res.get("inputs", {}), res.get("machine", {})
        md += [f"Source: [`{src}`]({src}) — {inp.get('device')} {inp.get('dtype')}, prompt "
               f"{res.get('sample', {}).get('prompt_length')} tokens, {inp.get('genlen')} new tokens, "
               f"mean of {inp.get('repeats')} calls after a warm-up; {mach.get('gpu') or mach.get('processor')}, "
               f"torch {mach.get('torch')}, transformers {mach.get('transformers')}, {res.get('date')}.", ""]
        for name, info in res.get("models", {}).items():
            md.append(f"- {name}: {info.get('shape') or info.get('size') or inp.get('model_name')}, "
                      f"{info.get('n_params')} parameters, {info.get('weights')} weights")
        md += ["", "| model | batch | prompt + decode (ms) | prefill (ms) | decode (ms) | tokens/s |",
               "|---|---:|---:|---:|---:|---:|"]
        for r in sorted(res.get("runs", []), key=lambda r: (r["batch"], r["model"])):
            if "error" in r:
                md.append(f"| {r['model']} | {r['batch']} | {r['error'][:60]} | | | |")
            else:
                md.append(f"| {r['model']} | {r['batch']} | {_fmt(r['total_ms_mean'], 1)} | "
                          f"{_fmt(r['prefill_ms_mean'], 1)} | {_fmt(r['decode_ms_mean'], 1)} | {_fmt(r['tokens_per_s'], 1)} |")
        md.append("")
    if bench and plot_throughput(bench, out / "throughput.png"):
        md += ["![throughput against batch size](throughput.png)", ""]

    # --- other files
    if extra:
        md += ["## Other result files", ""]
        for label, p in extra.items():
            if not Path(p).is_file():
                md.append(f"- {label}: `{p}` missing")
                continue
            data = json.loads(Path(p).read_text())
            scalars = {k: v for k, v in data.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)
                       and len(str(v)) < 80} if isinstance(data, dict) else {}
            src = _rel(p, out)
            md.append(f"- {label} ([`{src}`]({src})): " + ", ".join(f"{k} = {_fmt(v)}" for k, v in scalars.items()))
        md.append("")

    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(md) + "\n")
    tmp.replace(path)
    return path


def _pairs(items: list) -> dict:
    out = {}
    for it in items or []:
        name, sep, path = it.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--eval/--extra expects NAME=PATH, got {it!r}")
        out[name] = path
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Build the study's markdown report with charts from result files")
    p.add_argument("--out", required=True, help="report directory (report.md, accuracy.png, throughput.png)")
    p.add_argument("--eval", action="append", default=[], help="NAME=PATH of lm-eval results (base first)")
    p.add_argument("--finetune-summary", default=None, help="the fine-tune's summary.json")
    p.add_argument("--generation", action="append", default=[], help="a generation benchmark JSON (repeatable)")
    p.add_argument("--extra", action="append", default=[], help="LABEL=PATH of another JSON to list")
    p.add_argument("--title", default="Mamba math fine-tuning study")
    p.add_argument("--note", action="append", default=[], help="a line of text added under the title")
    a = p.parse_args(argv)
    path = build_report(a.out, evals=_pairs(a.eval), finetune_summary=a.finetune_summary, generation=a.generation,
                        extra=_pairs(a.extra), title=a.title, notes=a.note)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
