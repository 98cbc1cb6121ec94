#!/usr/bin/env python
"""Render the latest benchmark results (benchmarks/results/*.json) as docs/results.md: one
markdown table per area (kernels against upstream, generation, the LoRA training step,
lm-eval, CPU), each row a figure, ours, the baseline, their ratio, the card, the date and the
file it comes from.

    python benchmarks/render_results.py            # writes docs/results.md
    python benchmarks/render_results.py --check    # exit 1 when docs/results.md is out of date
    python benchmarks/render_results.py --stdout   # print instead of writing

`render(results_dir)` returns the markdown; tests/test_render_results.py checks it against the
committed results and docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from mambakit.bench.results import RESULTS_DIR, gpu_tag  # noqa: E402

DOC = REPO / "docs" / "results.md"
COMMAND = "python benchmarks/render_results.py"
LINK_BASE = "../benchmarks/results"  # from docs/ to the results
COLUMNS = ("figure", "ours", "baseline", "ratio", "card", "date", "file")

# Upstream's forward+backward of the 1.4b LoRA shape on an H200, measured by the project (anchor);
# benchmark_finetune.py records it in every file under this key.
ANCHOR_KEY = "anchor_upstream_fwdbwd_tok_per_s_1.4b_bs4x2048_h200"


def fmt(x) -> str:
    """A figure with about three significant digits (thousands separated)."""
    if x is None:
        return "-"
    x = float(x)
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    if a >= 0.01:
        return f"{x:.3f}"
    return f"{x:.2e}"


def ratio(ours, base, higher_is_better: bool) -> str:
    """How many times better ours is: base/ours for times, ours/base for rates."""
    if not ours or not base:
        return "-"
    r = ours / base if higher_is_better else base / ours
    return f"{r:.2f}x"


def _date(d: dict) -> str:
    for k in ("date", "timestamp", "date_utc", "utc"):
        if d.get(k):
            return str(d[k])[:10]
    return "-"


def _card(name: str | None) -> str:
    if not name or name in ("cpu", "x86_64", "aarch64", "arm64"):
        return "CPU"
    return gpu_tag(name).upper()


def _shape(s) -> str:
    return "(" + ", ".join(str(v) for v in s) + ")"


class _Table:
    def __init__(self):
        self.rows = []

    def add(self, figure, ours, base, base_label, higher_is_better, card, date, file, ours_text=None):
        base_text = "-" if base is None else f"{fmt(base)} ({base_label})" if base_label else fmt(base)
        self.rows.append((figure, ours_text or fmt(ours), base_text,
                          ratio(ours, base, higher_is_better) if base is not None else "-", card, date,
                          f"[{file}]({LINK_BASE}/{file})"))

    def markdown(self) -> str:
        out = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join(["---"] + ["---:"] * 3 + ["---"] * 3) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(out)


def _load(results_dir: Path, pattern: str):
    for p in sorted(results_dir.glob(pattern)):
        try:
            yield p.name, json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue


def kernels(results_dir: Path) -> _Table:
    t = _Table()
    for name, d in _load(results_dir, "selective_scan_*.json"):
        impls = d.get("impls", {})
        ours, up = impls.get("ours", {}), impls.get("upstream", {})
        label = f"upstream {d.get('versions', {}).get('upstream') or ''}".strip()
        card, date = _card(d.get("machine", {}).get("gpu")), _date(d)
        for shape in d.get("shapes", []):
            key = "[" + ",".join(str(v) for v in shape) + "]"
            for metric, what in (("fwd_ms", "forward"), ("fwdbwd_ms", "forward+backward")):
                if ours.get(metric + key) is None:
                    continue
                t.add(f"selective scan {what}, ms, {_shape(shape)}", ours[metric + key], up.get(metric + key),
                      label, False, card, date, name)
    for name, d in _load(results_dir, "causal_conv1d_*.json"):
        card, date = _card(d.get("machine", {}).get("gpu")), _date(d)
        for r in d.get("results", []):
            for what, key in (("forward", "fwd_ms"), ("forward+backward", "fwdbwd_ms")):
                t.add(f"causal conv1d + SiLU {what}, ms, {_shape(r['shape'])}", r.get(f"triton_{key}"),
                      r.get(f"torch_{key}"), "PyTorch", False, card, date, name)
    return t


def ssd(results_dir: Path) -> _Table:
    t = _Table()
    for name, d in _load(results_dir, "ssd_*.json"):
        variants, base_name = d.get("variants", {}), d.get("baseline")
        card, date = _card(d.get("machine", {}).get("device_name")), _date(d)
        chunk = d.get("inputs", {}).get("chunk_size")
        base_runs = variants.get(base_name, {}).get("runs", {})
        for key in d.get("shapes", []):
            for vname, v in variants.items():
                run = v.get("runs", {}).get(key) or {}
                if vname == base_name or run.get("fwd_ms") is None:
                    continue
                base = base_runs.get(key) or {}
                label = None
                if base.get("fwd_ms") is not None:
                    version = base.get("mamba_ssm_version")
                    label = f"upstream {version or ''}".strip() if base_name == "upstream" else base_name
                for what, metric in (("forward", "fwd_ms"), ("forward+backward", "fwdbwd_ms")):
                    t.add(f"SSD scan {what}, ms, ({key}), chunk {chunk} ({vname})", run[metric], base.get(metric),
                          label, False, card, date, name)
    return t


def generation(results_dir: Path) -> _Table:
    t = _Table()
    for name, d in _load(results_dir, "generation_*.json"):
        machine, inp, models = d.get("machine", {}), d.get("inputs", {}), d.get("models", {})
        mamba = models.get("mamba", {})
        size = mamba.get("size") or Path(str(mamba.get("checkpoint") or inp.get("model_name") or "?")).name
        base_label = models.get("transformer", {}).get("shape", "transformer")
        card = _card(machine.get("gpu") if str(inp.get("device", "")).startswith("cuda") else None)
        runs = d.get("runs", [])
        for batch in sorted({r["batch"] for r in runs}):
            by = {r["model"]: r for r in runs if r["batch"] == batch and "tokens_per_s" in r}
            if "mamba" not in by:
                continue
            fig = (f"Mamba {size} generation, tokens/s, batch {batch}, prompt {by['mamba'].get('promptlen')}, "
                   f"{by['mamba'].get('genlen')} new")
            t.add(fig, by["mamba"]["tokens_per_s"], by.get("transformer", {}).get("tokens_per_s"), base_label,
                  True, card, _date(d), name)
    return t


def _base_label(base_name, base_run: dict):
    """The baseline column's label: upstream and the version its child imported, else the variant's name."""
    if base_name != "upstream":
        return base_name
    return f"upstream {base_run.get('mamba_ssm_version') or ''}".strip()


def _decode_rows(t: _Table, name: str, d: dict, prefill: bool = False) -> None:
    """Rows of a decode JSON (benchmark_decode.py; or model_*.json's decode section): ms/token and
    generation tokens/s per variant and batch (and prefill ms)."""
    inp, variants, base_name = d.get("inputs", {}), d.get("variants", {}), d.get("baseline")
    card, date = _card(d.get("machine", {}).get("device_name")), _date(d)
    base_runs = variants.get(base_name, {}).get("runs", {})
    for vname, v in variants.items():
        if vname == base_name:
            continue
        for b, run in sorted(v.get("runs", {}).items(), key=lambda kv: int(kv[0])):
            base = base_runs.get(b, {})
            label = _base_label(base_name, base)
            dec, gen = run.get("decode") or {}, run.get("generation") or {}
            bdec, bgen = base.get("decode") or {}, base.get("generation") or {}
            if dec.get("ms_per_token") is not None:
                t.add(f"{inp.get('shape')} decoding, ms/token, batch {b} ({vname})", dec["ms_per_token"],
                      bdec.get("ms_per_token"), label, False, card, date, name)
            if gen.get("tokens_per_s") is not None:
                t.add(f"{inp.get('shape')} generation, tokens/s, batch {b}, prompt {gen.get('prompt')}, "
                      f"{gen.get('new_tokens')} new ({vname})", gen["tokens_per_s"], bgen.get("tokens_per_s"), label,
                      True, card, date, name)
            if prefill and gen.get("prefill_ms") is not None:
                t.add(f"{inp.get('shape')} prefill, ms, batch {b}, prompt {gen.get('prompt')} ({vname})",
                      gen["prefill_ms"], bgen.get("prefill_ms"), label, False, card, date, name)


def decoding(results_dir: Path) -> _Table:
    t = _Table()
    for name, d in _load(results_dir, "decode_*.json"):
        _decode_rows(t, name, d)
    return t


def packing(results_dir: Path) -> _Table:
    t = _Table()
    for name, d in _load(results_dir, "finetune_packing_*.json"):
        padded, packed = d.get("padded", {}), d.get("packed", {})
        q = d.get("length_quartiles") or []
        lengths = f", lengths {q[0]}-{q[-1]} (median {q[len(q) // 2]})" if q else ""
        t.add(f"LoRA step, real tokens/s, {d.get('shape')}, {d.get('examples')} examples of {d.get('data')}{lengths}: "
              f"packed rows of {d.get('pack_length')} against padded batches of {d.get('batch_size_padded')}",
              packed.get("real_tok_per_s"), padded.get("real_tok_per_s"), "padded", True,
              _card(d.get("device")), _date(d), name)
    return t


def training(results_dir: Path) -> _Table:
    t = _Table()
    for name, d in _load(results_dir, "finetune_lora_*.json"):
        cfg = f"{d.get('shape')}, batch {d.get('batch_size')} x {d.get('seqlen')}, r {d.get('lora_rank')}"
        if d.get("lora_dropout"):
            cfg += f", dropout {d['lora_dropout']}"
        card = _card(d.get("device") if str(d.get("peak_mem_kind", "")).startswith("cuda") else None)
        same = d.get("baseline_same_run") or {}  # an earlier tree of ours, timed in the same call
        same_label = "ours before, " + same.get("what", "").split("commit ")[-1].split(" ")[0] + ", same call"
        t.add(f"LoRA training step, tokens/s ({cfg})", d.get("train_step_tok_per_s"),
              same.get("train_step_tok_per_s"), same_label if same else None, True, card, _date(d), name)
        anchor, label = same.get("fwdbwd_tok_per_s"), same_label
        if not same and (d.get("shape"), d.get("batch_size"), d.get("seqlen"), card) == ("1.4b", 4, 2048, "H200"):
            anchor, label = d.get(ANCHOR_KEY), "upstream, full fine-tune, *anchor*"
        t.add(f"LoRA forward+backward, tokens/s ({cfg})", d.get("fwdbwd_tok_per_s"), anchor, label, True, card,
              _date(d), name)
    for name, d in _load(results_dir, "ddp_check_*.json"):
        card = d.get("card") or "-"
        card = card.replace("NVIDIA ", "")
        what = f"{d.get('label', 'DDP check')}: optimizer steps/s, {d.get('shape', '?')}, global batch {d.get('global_batch')}"
        t.add(what, d.get("steady_steps_per_s_b"), d.get("steady_steps_per_s_a"), "1 GPU", True, card, _date(d), name)
        t.add(f"{d.get('label', 'DDP check')}: largest relative loss difference over {d.get('steps_compared')} steps",
              d.get("max_rel_loss_diff"), None, None, False, card, _date(d), name)
    return t


TRAINING_MODES = {"full": "full model, forward+backward", "lora_plain": "LoRA step, PEFT as written",
                  "lora_recipe": "LoRA step, the recipe's setup"}


def _training_rows(t: _Table, name: str, d: dict) -> None:
    """Rows of a training JSON (benchmark_training.py; or model_*.json's training section): tokens/s and
    peak memory per variant and mode."""
    inp, variants, base_name = d.get("inputs", {}), d.get("variants", {}), d.get("baseline")
    card, date = _card(d.get("machine", {}).get("device_name")), _date(d)
    cfg = f"{inp.get('shape')}, batch {inp.get('batch_size')} x {inp.get('seqlen')}"
    for vname, v in variants.items():
        if vname == base_name:
            continue
        for mode, run in v.get("runs", {}).items():
            if run.get("tokens_per_s") is None:
                continue
            base = variants.get(base_name, {}).get("runs", {}).get(mode) or {}
            label = _base_label(base_name, base) if base.get("tokens_per_s") is not None else None
            env = ", ".join(f"{k}={val}" for k, val in (v.get("env") or {}).items())
            what = f"{TRAINING_MODES.get(mode, mode)}, {cfg} ({vname}{': ' + env if env else ''})"
            rss = "" if str(run.get("peak_memory_kind", "")).startswith("cuda") else " (process max RSS)"
            t.add(f"{what}, tokens/s", run["tokens_per_s"], base.get("tokens_per_s"), label, True, card, date, name)
            t.add(f"{what}, peak memory, GiB{rss}", run.get("peak_memory_gib"), base.get("peak_memory_gib"),
                  label, False, card, date, name)


def training_vs_upstream(results_dir: Path) -> _Table:
    t = _Table()
    for name, d in _load(results_dir, "training_*.json"):
        _training_rows(t, name, d)
    return t


def _model_section(d: dict, section: str) -> dict:
    """model_*.json's runs.<section> as the driver's own JSON would hold it (decode or training)."""
    return {**d, "variants": {n: {"env": v.get("env"), "runs": (v.get("runs") or {}).get(section) or {}}
                              for n, v in d.get("variants", {}).items()}}


def model(results_dir: Path) -> _Table:
    t = _Table()
    for name, d in _load(results_dir, "model_*.json"):
        _decode_rows(t, name, _model_section(d, "decode"), prefill=True)
        _training_rows(t, name, _model_section(d, "training"))
    return t


def lm_eval(results_dir: Path) -> _Table:
    t = _Table()
    for name, d in _load(results_dir, "lm_eval_*.json"):
        models = d.get("models", {})
        ours, hf = models.get("ours", {}), models.get("hf", {})
        card = _card(d.get("device_name") if str(d.get("device", "")).startswith("cuda") else None)
        impls = set(d.get("hf_kernel_implementations", {}).values())
        hf_label = "lm-eval `hf`, transformers" + (
            "" if all(i.startswith("transformers.") for i in impls) else " on mamba_ssm's kernels")
        for task, r in ours.items():
            base = hf.get(task, {})
            what = (f"{task} ({r.get('requests')} {r.get('request_type')} requests), requests/s, "
                    f"{d.get('shape')}, batch {d.get('ours_batch_size') or d.get('batch_size')}")
            t.add(what + ", model time", r.get("requests_per_s"), base.get("requests_per_s"),
                  hf_label, True, card, _date(d), name)
            n = r.get("requests")
            if n and r.get("total_s") and base.get("total_s"):  # lm-eval's whole call: tokenising, tasks, scoring
                t.add(what + ", wall time", n / r["total_s"], n / base["total_s"], hf_label, True, card, _date(d), name)
            unpacked = models.get("ours_unpacked", {}).get(task, {})
            if unpacked.get("requests_per_s"):  # packed prefill (the default) against packed=false
                t.add(what + ", model time, packed prefill", r.get("requests_per_s"), unpacked["requests_per_s"],
                      "ours, packed=false", True, card, _date(d), name)
    return t


def cpu(results_dir: Path) -> _Table:
    t = _Table()
    for name, d in _load(results_dir, "cpu_model_*.json"):
        f, inp, date = d.get("figures", {}), d.get("inputs", {}), _date(d)
        size, hf = inp.get("size", "?"), "transformers"
        t.add(f"{size} forward, tokens/s, batch 1, {inp.get('seqlen')} tokens", f.get("ours_fwd_tok_per_s"),
              f.get("hf_fwd_tok_per_s"), hf, True, "CPU", date, name)
        t.add(f"{size} forward, s, {inp.get('seqlen')} tokens, against its matrix products alone",
              f.get("ours_fwd_s"), f.get("matmul_floor_fwd_s"), "floor", False, "CPU", date, name)
        t.add(f"{size} forward+backward, s, {inp.get('hf_bwd_seqlen')} tokens",
              f.get(f"ours_fwdbwd_s[L={inp.get('hf_bwd_seqlen')}]"),
              f.get(f"hf_fwdbwd_s[L={inp.get('hf_bwd_seqlen')}]"), hf, False, "CPU", date, name)
        mode = f"; ours: {inp['greedy_mode']}" if inp.get("greedy_mode") else ""
        t.add(f"{size} greedy decoding, tokens/s, prompt {inp.get('prompt_len')}, {inp.get('gen_len')} new{mode}",
              f.get("ours_greedy_tok_per_s"), f.get("hf_greedy_tok_per_s"), hf, True, "CPU", date, name)
        for w in ("f32", "f16"):
            if f.get(f"llama_cpp_{w}_greedy_tok_per_s") is not None:
                t.add(f"{size} greedy decoding, tokens/s, ours fp32 against llama.cpp's {w} weights (same weights)",
                      f.get("ours_greedy_tok_per_s"), f.get(f"llama_cpp_{w}_greedy_tok_per_s"), f"llama.cpp {w}",
                      True, "CPU", date, name)
        if f.get("ours_f16_greedy_tok_per_s") is not None:  # older files have no f16 row
            n, llama = inp.get("gen_len"), d.get("llama_cpp", {})
            load = d.get("machine", {}).get("load_average")
            note = f", load {load[0]:.1f}" if load else ""
            what = (f"{size} greedy decoding, tokens/s, ours with f16 weights (compiled step, "
                    f"MAMBA_SSM_COMPILED_STEP_WEIGHTS=f16; {f.get('greedy_tokens_ours_f16_equal_ours')}/{n} tokens "
                    f"equal ours fp32)")
            t.add(f"{what} against ours fp32, timed alternately{note}", f.get("ours_f16_greedy_tok_per_s"),
                  f.get("ours_greedy_tok_per_s"), "ours fp32", True, "CPU", date, name)
            if f.get("llama_cpp_f16_greedy_tok_per_s") is not None:
                t.add(f"{what} against llama.cpp's f16 weights ({llama.get('f16_tokens_equal_ours_f16')}/{n} "
                      f"tokens equal){note}", f.get("ours_f16_greedy_tok_per_s"),
                      f.get("llama_cpp_f16_greedy_tok_per_s"), "llama.cpp f16", True, "CPU", date, name)
    for name, d in _load(results_dir, "cpu_mamba2_*.json"):
        f, inp, date = d.get("figures", {}), d.get("inputs", {}), _date(d)
        size, hf = f"Mamba-2 {inp.get('size', '?')}", "transformers Mamba2"
        load = d.get("machine", {}).get("load_average")
        note = f", load {load[0]:.1f}" if load else ""
        if f.get("ours_fwd_s") is not None:  # a --no-forward run has none
            t.add(f"{size} forward, s, batch 1, {inp.get('seqlen')} tokens{note}", f.get("ours_fwd_s"),
                  f.get("hf_fwd_s"), hf, False, "CPU", date, name)
            t.add(f"{size} forward, s, against its matrix products alone", f.get("ours_fwd_s"),
                  f.get("matmul_floor_fwd_s"), "floor", False, "CPU", date, name)
            t.add(f"{size} forward+backward, s, {inp.get('seqlen')} tokens{note}", f.get("ours_fwdbwd_s"),
                  f.get("hf_fwdbwd_s"), hf, False, "CPU", date, name)
        if f.get("ours_greedy_tok_per_s") is not None:  # a --no-decode run (or an older file) has none
            n = inp.get("gen_len")
            agree = ("all tokens agree" if f.get("greedy_tokens_all_agree") else
                     f"tokens equal to ours: {f.get('greedy_tokens_ours_eager_equal_ours')}/{n} eager, "
                     f"{f.get('greedy_tokens_hf_equal_ours')}/{n} transformers")
            what = f"{size} greedy decoding, tokens/s, prompt {inp.get('prompt_len')}, {n} new"
            t.add(f"{what}; ours: {inp.get('greedy_mode')}; {agree}{note}", f.get("ours_greedy_tok_per_s"),
                  f.get("hf_greedy_tok_per_s"), hf, True, "CPU", date, name)
            compile_s = f.get("ours_greedy_compile_s")
            built = f", compile {fmt(compile_s)} s" if compile_s is not None else ""
            t.add(f"{what}; compiled step against ours eager (cg=False){built}", f.get("ours_greedy_tok_per_s"),
                  f.get("ours_eager_greedy_tok_per_s"), "ours eager", True, "CPU", date, name)
    for name, d in _load(results_dir, "cpu_scan*.json"):
        r, date = d.get("results", {}), _date(d)
        shape = _shape(d.get("inputs", {}).get("shape_batch_dim_seqlen_dstate", []))
        threads = d.get("machine", {}).get("torch_threads")
        for what, key in (("forward", "fwd"), ("forward+backward", "fwd_bwd")):
            t.add(f"selective scan {what} (chunked), s, {shape}, {threads} threads",
                  r.get(f"chunked_{key}", {}).get("median_s"), r.get(f"ref_{key}", {}).get("median_s"),
                  "per-step reference", False, "CPU", date, name)
        if "chunked_torch_fwd" in r:
            t.add(f"selective scan forward, s, {shape}, {threads} threads, the C loop against the PyTorch one",
                  r["chunked_fwd"].get("median_s"), r["chunked_torch_fwd"].get("median_s"),
                  "PyTorch, MAMBA_SSM_CPU_KERNEL=0", False, "CPU", date, name)
    return t


AREAS = (
    ("Kernels", "The selective scan against upstream mamba-ssm's CUDA kernel, built and timed in the same "
                "job; the causal conv + SiLU (Triton) against PyTorch's conv. bf16, median ms.", kernels),
    ("SSD scan against upstream", "benchmarks/benchmark_ssd.py: Mamba-2's `mamba_chunk_scan_combined` as Mamba2 "
                                  "calls it (bf16 x, dt, B, C; fp32 A, D, dt_bias; softplus; no z), shapes "
                                  "(batch, seqlen, heads, headdim, dstate, groups), ours and upstream mamba-ssm in "
                                  "the same run; median ms (triton do_bench); forward+backward: gradients of "
                                  "x, dt, A, B, C, D and dt_bias.", ssd),
    ("Generation", "Mamba against a same-size GPT-NeoX transformer (transformers; its shape in the baseline "
                   "column), random weights unless a checkpoint is named, greedy; "
                   "tokens/s = batch x new tokens / (prefill + decode).", generation),
    ("Decoding against upstream", "benchmarks/benchmark_decode.py: random weights, bf16, greedy, `generate(cg=True)` "
                                  "(a CUDA graph), ours and upstream mamba-ssm built and timed in the same job; "
                                  "decoding: prompt 16, 512 new tokens, (total - prefill) / new tokens.", decoding),
    ("Training: the LoRA step", "LoRA on in_proj/x_proj/dt_proj/out_proj, bf16 autocast, random weights; the "
                                "baseline is an earlier tree of ours timed in the same call where named, else, "
                                "for forward+backward, upstream's full model (an *anchor*: measured by the "
                                "project on an H200, not in the same job).", training),
    ("Packing", "benchmarks/benchmark_packing.py: the LoRA step (r 64, bf16 base) on real math problems, "
                "packed into rows with each example's state reset against padded batches, the same examples "
                "in the same order; real (non-padding) tokens per second.", packing),
    ("Training against upstream", "benchmarks/benchmark_training.py: random weights, tokens/s of the median "
                                  "step and peak memory (`max_memory_allocated` over the timed steps), ours and "
                                  "upstream mamba-ssm in the same run; the full model: fp32 weights under bf16 "
                                  "autocast, forward + cross-entropy + backward, no optimizer; the LoRA steps "
                                  "(r 64, AdamW) only ours: upstream's fused path ignores PEFT's adapters. "
                                  "Peak memory's ratio: baseline / ours.", training_vs_upstream),
    ("Model against upstream", "benchmarks/benchmark_model.py: every model-level figure of a shape in one run "
                               "and one file, ours and upstream mamba-ssm, each child in its own process: decoding and "
                               "generation as benchmark_decode.py measures them (prefill: the generation's prompt "
                               "and one new token), training as benchmark_training.py does (the LoRA steps only "
                               "ours unless upstream was asked to run them). Peak memory's ratio: baseline / ours.",
     model),
    ("lm-eval", "Our `--model mamba` against lm-eval's `hf` model running transformers' MambaForCausalLM "
                "(on its PyTorch path unless marked), the same random weights, on the local GSM8K tasks; "
                "requests/s counting the model's calls alone (*model time*) and lm-eval's whole run (*wall time*).", lm_eval),
    ("CPU", "Whole 130m-shape model against transformers' MambaForCausalLM (Mamba-2: Mamba2ForCausalLM) "
            "(fp32, batch 1), and the chunked CPU scan against the per-step reference loop.", cpu),
)


def render(results_dir: str | Path = RESULTS_DIR) -> str:
    """The markdown of docs/results.md for the result files in results_dir."""
    results_dir = Path(results_dir)
    parts = [
        "<!-- Generated by `" + COMMAND + "` from benchmarks/results/; do not edit by hand. -->",
        "# Benchmark results",
        "",
        f"Generated by `{COMMAND}` from the latest result file of each benchmark and configuration in "
        "`benchmarks/results/` (the file names the run; date, card and versions are inside it). "
        "*ratio*: how many times better ours is than the baseline (baseline time / ours, or ours / "
        "baseline for rates). Figures from different cards are not comparable with each other.",
    ]
    for title, intro, fn in AREAS:
        table = fn(results_dir)
        if not table.rows:
            continue
        parts += ["", f"## {title}", "", intro, "", table.markdown()]
    study = results_dir / "study_default" / "finetune_summary.json"
    if study.exists():
        s = json.loads(study.read_text())
        parts += ["", "## The embedded study", "",
                  f"`bash run.sh` (2-core CPU): {s.get('model')} fine-tuned for {s.get('steps')} steps, held-out exact "
                  f"match {fmt(s.get('accuracy_base'))} before and {fmt(s.get('accuracy_finetuned'))} after "
                  f"([report]({LINK_BASE}/study_default/report.md), files in `benchmarks/results/study_default/`)."]
    return "\n".join(parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(RESULTS_DIR), help="results directory (default benchmarks/results)")
    p.add_argument("--out", default=str(DOC), help="markdown file to write (default docs/results.md)")
    p.add_argument("--check", action="store_true", help="only compare with --out; exit 1 when it differs")
    p.add_argument("--stdout", action="store_true", help="print instead of writing")
    a = p.parse_args(argv)
    text = render(a.results)
    out = Path(a.out)
    if a.stdout:
        sys.stdout.write(text)
        return 0
    if a.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
