"""Decoding speed of a Mamba LM shape: ours in variants (environments, other trees) and upstream, each
(variant, batch size) in its own child process. Command line: benchmarks/benchmark_decode.py.

This module is loaded by file path (the script does it), also in the children, so that it never
imports `mambakit` or a `mamba_ssm` other than the one a child's PYTHONPATH names. Children run
`benchmark_decode.py --child ...` from a temporary directory with PYTHONPATH = the variant's tree
(ours: this repository; `PYTHONPATH=DIR` in a variant: that tree alone; upstream: --upstream-path
alone) and the variant's other variables, and print one line `RESULT {json}` (the protocol and the
JSON's frame: mambakit/bench/variants.py). One process per batch size because upstream 2.3.2 crashes
when a smaller batch follows a larger one.

Per child (random weights of the shape; bf16 on CUDA, fp32 on CPU; greedy; `generate(cg=True)`, a
CUDA graph on a GPU; each figure the median of `repeats` calls after one warm-up, synchronised):

  generation  prompt --gen-prompt (2048) + --gen-new (128) tokens: tokens_per_s = batch * new / total;
              prefill_ms = the same prompt with one new token (its forward and one sampling, no step)
  decode      prompt --prompt (16) + --new-tokens (512): ms_per_token = (total - prefill) / (new - 1),
              prefill the prompt + 1 call (no recurrent step); on a GPU also kernels_per_token and
              kernel_us_per_token (profiled: GPU time per kernel name)

Generation runs first: upstream's graph cache is re-captured when max_length grows, never when it
shrinks. The result (one JSON, overwritten by the next run of the shape and card) holds the machine,
the card, versions, the date, the git commit, the inputs, every variant's figures and their ratio to
the baseline (speedup: baseline time / variant time; tokens/s: variant / baseline).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import statistics
import sys
import time
import traceback
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
SHAPES, MARKER, REPO = _v.SHAPES, _v.MARKER, _v.REPO
parse_variant, child_env, gpu_tag, gpu_name, git_commit = (_v.parse_variant, _v.child_env, _v.gpu_tag, _v.gpu_name,
                                                           _v.git_commit)
_ratio, _f = _v.ratio, _v.col
VOCAB = 50280
SCRIPT = REPO / "benchmarks" / "benchmark_decode.py"
DEFAULT_VARIANTS = ("fused:MAMBA_SSM_FUSED_STEP=1", "eager:MAMBA_SSM_FUSED_STEP=0")


# ------------------------------------------------------------------------------------------- child
def build_model(shape, device, dtype, seed=0):
    """A MambaLMHeadModel of the named shape with random weights (ours or upstream's: same API)."""
    return _v.build_lm(shape, device, dtype, seed, VOCAB).eval()


def _timed(call, repeats, sync):
    """Milliseconds of `repeats` calls, after one warm-up call."""
    call()
    sync()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        call()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def measure(model, batch, prompt_len, new_tokens, repeats, cg, device, seed=0):
    """Total and prefill times of generate() for (batch, prompt_len) random ids and `new_tokens` new tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, prompt_len), generator=g).to(device)
    sync = (lambda: torch.cuda.synchronize(device)) if str(device).startswith("cuda") else (lambda: None)

    def gen(n):
        def call():
            out = model.generate(ids, max_length=prompt_len + n, cg=cg, return_dict_in_generate=True,
                                 output_scores=False, enable_timing=False)
            if out.sequences.shape != (batch, prompt_len + n):
                raise RuntimeError(f"generate returned {tuple(out.sequences.shape)}, expected {(batch, prompt_len + n)}")
        return call

    total = _timed(gen(new_tokens), repeats, sync)   # the longest first: upstream's graph is captured once
    prefill = _timed(gen(1), repeats, sync)
    t, p = statistics.median(total), statistics.median(prefill)
    return {"batch": batch, "prompt": prompt_len, "new_tokens": new_tokens, "total_ms": _r(total),
            "prefill_ms_all": _r(prefill), "total_ms_median": round(t, 4), "prefill_ms": round(p, 4),
            "ms_per_token": round((t - p) / max(new_tokens - 1, 1), 5),
            "tokens_per_s": round(batch * new_tokens / (t / 1e3), 2)}


def _r(xs):
    return [round(x, 4) for x in xs]


def kernel_profile(model, batch, prompt_len, device, seed=0, top=12):
    """What one recurrent step runs on the GPU: generate(cg=False) of 3 new tokens minus that of 2, under
    torch.profiler (the kernels a CUDA graph replays). Returns kernels_per_token (kernels and copies) and
    kernel_us_per_token: GPU microseconds per kernel name (the `top` largest, names cut at 90 characters),
    whose sum against ms_per_token tells kernel time from launch gaps."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, prompt_len), generator=g).to(device)

    def run(n):
        model.generate(ids, max_length=prompt_len + n, cg=False)  # warm (lazy inits, compiles)
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.generate(ids, max_length=prompt_len + n, cg=False)
            torch.cuda.synchronize(device)
        count, times = 0, {}
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                count += 1
                times[e.name[:90]] = times.get(e.name[:90], 0.0) + e.time_range.elapsed_us()
        return count, times

    (n3, t3), (n2, t2) = run(3), run(2)
    per_kernel = {k: t3.get(k, 0.0) - t2.get(k, 0.0) for k in t3}
    largest = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:top]
    return {"kernels_per_token": n3 - n2, "kernel_us_per_token_total": round(sum(per_kernel.values()), 1),
            "kernel_us_per_token": {k: round(v, 1) for k, v in largest}}


def child(args):
    """Measure one (variant, batch) in this process; print one RESULT line."""
    res = {"batch": args.batch, "env": {k: os.environ.get(k) for k in args.env_names}}
    t0 = time.perf_counter()
    try:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            args.dtype or ("bf16" if device.startswith("cuda") else "fp32")]
        mamba_ssm = _v.import_variant_mamba_ssm()

        res.update(mamba_ssm_file=str(Path(mamba_ssm.__file__).parent), mamba_ssm_version=getattr(
            mamba_ssm, "__version__", None), torch=torch.__version__, device=device, dtype=str(dtype)[6:])
        if device.startswith("cuda"):
            res["device_name"] = torch.cuda.get_device_name(device)
        model = build_model(args.shape, device, dtype, args.seed)
        with torch.inference_mode():
            if args.gen:
                res["generation"] = measure(model, args.batch, args.gen_prompt, args.gen_new, args.repeats,
                                            not args.no_cg, device, args.seed)
            if args.decode:
                res["decode"] = measure(model, args.batch, args.prompt, args.new_tokens, args.repeats,
                                        not args.no_cg, device, args.seed)
                if device.startswith("cuda"):
                    try:
                        res["decode"].update(kernel_profile(model, args.batch, args.prompt, device, args.seed))
                    except Exception as e:  # noqa: BLE001  (a diagnostic, not a figure the run needs)
                        res["decode"]["kernels_per_token_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        if device.startswith("cuda"):
            res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        try:  # ours: which fused decoding paths ran (absent in upstream and older trees)
            from mamba_ssm.modules import fused_step

            res["fused_step"] = fused_step.report()
        except ImportError:
            pass
        try:  # ours: whether the prefill's scan ran on the compiled kernels
            from mamba_ssm.backend import available_backends

            res["scan_backends"] = list(available_backends("selective_scan"))
        except ImportError:
            pass
    except Exception as e:  # noqa: BLE001  (out of memory, a crash of one implementation: a result too)
        res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        res["traceback"] = traceback.format_exc()[-3000:]
    res["child_s"] = round(time.perf_counter() - t0, 2)
    _v.emit(res)


# ------------------------------------------------------------------------------------------ parent
def run_child(env: dict, batch: int, args, kinds) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--child", "--shape", args.shape, "--batch", str(batch),
           "--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens), "--gen-prompt", str(args.gen_prompt),
           "--gen-new", str(args.gen_new), "--repeats", str(args.repeats), "--seed", str(args.seed),
           "--env-names", ",".join(sorted(env))]
    cmd += [f"--{k}" for k in kinds]
    for flag in ("device", "dtype"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    if args.no_cg:
        cmd.append("--no-cg")
    return _v.run_child(cmd, env, args.child_timeout, {"batch": batch})


def add_ratios(result: dict, baseline: str) -> None:
    """Per variant and batch: speedup = baseline ms / variant ms (decode, prefill), tokens/s ratio."""
    base = result["variants"].get(baseline, {}).get("runs", {})
    for name, v in result["variants"].items():
        ratios = {}
        for b, run in v["runs"].items():
            ref = base.get(b)
            if ref is None or "error" in run or "error" in ref:
                continue
            r = {}
            if "decode" in run and "decode" in ref:
                r["decode_speedup"] = _ratio(ref["decode"]["ms_per_token"], run["decode"]["ms_per_token"])
            if "generation" in run and "generation" in ref:
                r["tokens_per_s_ratio"] = _ratio(run["generation"]["tokens_per_s"], ref["generation"]["tokens_per_s"])
                r["prefill_speedup"] = _ratio(ref["generation"]["prefill_ms"], run["generation"]["prefill_ms"])
            ratios[b] = r
        v["vs_baseline"] = ratios
    result["baseline"] = baseline


def table(result: dict) -> str:
    head = (f"{'variant':>12} {'batch':>5} {'decode ms/tok':>13} {'x base':>7} {'kern/tok':>8} {'kern us':>8} "
            f"{'gen tok/s':>10} {'x base':>7} {'prefill ms':>10} {'paths':>8}")
    lines = [f"decode {result['inputs']['shape']} on {result['machine'].get('device_name') or 'cpu'} "
             f"(baseline {result['baseline']})", head]
    for name, v in result["variants"].items():
        for b, run in sorted(v["runs"].items(), key=lambda kv: int(kv[0])):
            if "error" in run:
                lines.append(f"{name:>12} {b:>5} ERROR {run['error'][:120]}")
                continue
            d, g, r = run.get("decode", {}), run.get("generation", {}), v.get("vs_baseline", {}).get(b, {})
            fused = run.get("fused_step")
            paths = "-" if fused is None else ",".join(sorted({_path_name(k) for k in fused["ran"]})) or "eager"
            lines.append(f"{name:>12} {b:>5} {_f(d.get('ms_per_token'), 13, 4)} {_f(r.get('decode_speedup'), 7, 2)} "
                         f"{_f(d.get('kernels_per_token'), 8, 0)} {_f(d.get('kernel_us_per_token_total'), 8, 0)} "
                         f"{_f(g.get('tokens_per_s'), 10, 1)} {_f(r.get('tokens_per_s_ratio'), 7, 2)} "
                         f"{_f(g.get('prefill_ms'), 10, 2)} {paths:>8}")
    return "\n".join(lines)


def _path_name(key: str) -> str:
    m = re.match(r"\('(step|block|mamba2)', '?([a-z]*)", key)
    if not m:
        return "?"
    return {"block": "gemv", "mamba2": "mamba2"}.get(m.group(1), m.group(2))


def write(result: dict, dirs) -> list:
    return _v.write(result, "decode", dirs)


def plan(args) -> list:
    """[(batch, kinds)] in increasing batch order: the children of one variant, kinds among "gen" and
    "decode" (--gen-batch and --batch; --no-generation, --no-decode)."""
    decode_b = [] if args.no_decode else list(args.batch)
    gen_b = [] if args.no_generation else list(args.gen_batch)
    return [(b, [k for k, bs in (("gen", gen_b), ("decode", decode_b)) if b in bs])
            for b in sorted(set(decode_b) | set(gen_b))]


def summary(r: dict) -> str:
    """A child's figures in one log line."""
    d, g = r.get("decode", {}), r.get("generation", {})
    return (f"decode {d.get('ms_per_token', '-')} ms/token, generation {g.get('tokens_per_s', '-')} tok/s, "
            f"prefill {g.get('prefill_ms', '-')} ms")


def run(args, log=print) -> dict:
    variants, baseline = _v.resolve_variants(args.variants or DEFAULT_VARIANTS, args.upstream_path, args.baseline)
    result = _v.new_result("decode_benchmark", args, variants,
                           dict(zip(("d_model", "n_layer"), SHAPES[args.shape]), vocab=VOCAB))
    kinds = dict(plan(args))
    # batch-major: a run cut short (a time limit) has every variant at the smaller batches
    children = [_v.Child(name, env, str(b), {"batch": b}, f"batch {b}") for b in kinds for name, env in variants]
    _v.run_children(result, children, lambda c: run_child(c.env, int(c.key), args, kinds[int(c.key)]),
                    summary=summary, add_ratios=add_ratios, baseline=baseline, prefix="decode",
                    dirs=_v.result_dirs(args), budget_s=args.budget_s,
                    table=table, log=log)
    return result


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1.4b", choices=sorted(SHAPES))
    _v.add_parent_arguments(p, DEFAULT_VARIANTS)
    add_measure_arguments(p)
    # child protocol
    p.add_argument("--gen", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    return p


def add_measure_arguments(p) -> None:
    """What the children measure (the parent passes them on; benchmark_model.py takes them too)."""
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64], help="decode ms/token batch sizes")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=512)
    p.add_argument("--gen-batch", type=int, nargs="+", default=[1, 16, 64, 128], help="generation batch sizes")
    p.add_argument("--gen-prompt", type=int, default=2048)
    p.add_argument("--gen-new", type=int, default=128)
    p.add_argument("--no-decode", action="store_true", help="skip the ms/token measurement")
    p.add_argument("--no-generation", action="store_true", help="skip the generation/prefill measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (median)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--no-cg", action="store_true", help="generate(cg=False)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child:
        args.batch = args.batch[0]
        args.env_names = [n for n in args.env_names.split(",") if n]
        return child(args)
    check_arguments(args)
    return run(args)


def check_arguments(args) -> None:
    """SystemExit naming the first argument out of range (the parent's; benchmark_model.py's too)."""
    for flag in ("prompt", "gen_prompt", "repeats"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("new_tokens", "gen_new"):
        if getattr(args, flag) < 2:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 2 (the decode time is total minus a one-token "
                             f"call), got {getattr(args, flag)}")
