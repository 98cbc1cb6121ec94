"""Mamba-2's SSD scan (`mamba_chunk_scan_combined`): ours in variants (environments, other trees) and
upstream mamba-ssm, each (variant, shape) in its own child process. Command line:
benchmarks/benchmark_ssd.py; the child protocol and the JSON's frame: mambakit/bench/variants.py.

Loaded by file path (the script does it), also in the children, so that no process imports `mambakit`
or a `mamba_ssm` other than the one its PYTHONPATH names.

The call, as Mamba2's forward makes it (ours and upstream's, use_mem_eff_path off, rmsnorm on):
mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, z=None, dt_bias=dt_bias, dt_softplus=True).
Inputs, per shape (batch, seqlen, nheads, headdim, dstate, ngroups), made from one seed on the CPU in
every child, so all see the same values:

  x (b, l, h, p), B and C (b, l, g, n)  bf16, standard normal (the conv's outputs)
  dt (b, l, h)                          bf16, normal * 0.5 (the dt columns of in_proj's bf16 output)
  A (h,)                                fp32, -uniform(1, 16) (A_init_range; -exp(A_log.float()))
  D (h,), dt_bias (h,)                  fp32 parameters (a model in fp32 under bf16 autocast): D ones,
                                        dt_bias the inverse softplus of a log-uniform dt in [1e-3, 1e-1]

Figures per child:

  fwd_ms          median forward time (inputs without gradients)
  fwdbwd_ms       median of forward + torch.autograd.grad of the output (a fixed bf16 cotangent) w.r.t.
                  x, dt, A, B, C, D, dt_bias; bwd_ms = fwdbwd_ms - fwd_ms
  timer           triton.testing.do_bench(return_mode="median") on CUDA with Triton; else a median of
                  CUDA events (or perf_counter on the CPU) over a loop of calls
  peak_memory_gib CUDA: max_memory_allocated over one forward + backward, inputs included
  relerr_vs_float64  ||out - ref|| / ||ref|| on a slice: batch 0, heads 0 and h-1, the first --ref-steps
                  steps (default 512: two chunks of 256, so a state passed between chunks is included);
                  ref from the per-step recurrence in float64 on the CPU from the same (bf16-valued)
                  inputs. Outputs of different processes are never compared with each other.
  ssd_path        ours: "triton" or "torch" (the backend switch, op "ssd"); upstream: "upstream"

Children run the first variant and the baseline at every shape first, then the other variants, so
that a run cut short by --budget-s keeps the comparison it is for; the first child of an
implementation also compiles its kernels (upstream's: and autotunes them), hence --child-timeout 180.
Ratios to the baseline per shape: speedup = baseline ms / variant ms (forward, forward+backward).
Issue 22's acceptance is recorded where "ours" and "upstream" both ran: ours' forward+backward
speedup over upstream >= FWDBWD_TARGET at every shape.
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import os
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
REPO = _v.REPO
SCRIPT = REPO / "benchmarks" / "benchmark_ssd.py"
DEFAULT_VARIANTS = ("ours",)
DEFAULT_SHAPES = ("8,2048,64,64,128,1", "1,16384,64,64,128,1")  # issue 22's
DIMS = ("batch", "seqlen", "nheads", "headdim", "dstate", "ngroups")
FWDBWD_TARGET = 1.2  # issue 22: ours' forward+backward at least 1.2x upstream's


def parse_shape(spec: str) -> tuple:
    """'b,l,h,p,n[,g]' -> (b, l, h, p, n, g), g = 1 when left out."""
    try:
        dims = tuple(int(s) for s in spec.split(","))
    except ValueError:
        dims = ()
    if len(dims) == 5:
        dims += (1,)
    if len(dims) != 6 or min(dims) < 1 or dims[2] % dims[5]:
        raise ValueError(f"--shapes: expected b,l,h,p,n[,g] positive integers with h divisible by g, got {spec!r}")
    return dims


def shape_key(dims) -> str:
    return ",".join(str(d) for d in dims)


# ------------------------------------------------------------------------------------------- child
def make_inputs(dims, seed=0):
    """The scan's inputs on the CPU (see the module's docstring) and the backward's cotangent."""
    import torch

    b, l, h, p, n, g = dims
    gen = torch.Generator().manual_seed(seed)
    bf16 = torch.bfloat16

    def rn(*s):
        return torch.randn(*s, generator=gen)

    x = rn(b, l, h, p).to(bf16)
    dt = (rn(b, l, h) * 0.5).to(bf16)
    A = -(1 + 15 * torch.rand(h, generator=gen))
    B, C = rn(b, l, g, n).to(bf16), rn(b, l, g, n).to(bf16)
    D = torch.ones(h)
    lo, hi = math.log(1e-3), math.log(1e-1)
    dt0 = torch.exp(torch.rand(h, generator=gen) * (hi - lo) + lo)
    dt_bias = dt0 + torch.log(-torch.expm1(-dt0))
    gout = rn(b, l, h, p).to(bf16)
    return {"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "dt_bias": dt_bias}, gout


def reference_slice(inp, steps, heads):
    """out[0, :steps, heads] (steps, len(heads), p) by the per-step recurrence in float64 on the CPU."""
    import torch
    import torch.nn.functional as F

    x, B, C = inp["x"], inp["B"], inp["C"]
    h, g = x.shape[2], B.shape[2]
    cols = []
    for hh in heads:
        xs = x[0, :steps, hh].double().cpu()
        dts = F.softplus(inp["dt"][0, :steps, hh].double().cpu() + float(inp["dt_bias"][hh]))
        a, d = float(inp["A"][hh]), float(inp["D"][hh])
        Bs, Cs = (t[0, :steps, hh // (h // g)].double().cpu() for t in (B, C))
        state = xs.new_zeros(xs.shape[1], Bs.shape[1])
        ys = []
        for t in range(xs.shape[0]):
            state = math.exp(float(dts[t]) * a) * state + float(dts[t]) * torch.outer(xs[t], Bs[t])
            ys.append(state @ Cs[t] + d * xs[t])
        cols.append(torch.stack(ys))
    return torch.stack(cols, 1)


def relerr_vs_float64(out, inp, steps):
    """(relative error, slice description) of out against reference_slice."""
    h = inp["x"].shape[2]
    steps = min(steps, out.shape[1])
    heads = sorted({0, h - 1})
    ref = reference_slice(inp, steps, heads)
    got = out[0, :steps, heads].double().cpu()
    err = float((got - ref).norm() / ref.norm().clamp_min(1e-300))
    return err, f"batch 0, heads {heads}, steps 0..{steps - 1}"


def median_ms(fn, cuda, warmup_ms, rep_ms):
    """(median ms, how): triton's do_bench on CUDA when Triton imports, else a loop of timed calls."""
    import torch

    if cuda:
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"), \
                "triton.testing.do_bench median (L2 flushed between calls)"

    def once():
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            return s.elapsed_time(e)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    est = max(once(), 1e-3)
    for _ in range(min(int(warmup_ms / est), 100)):
        once()
    times = [once() for _ in range(max(3, min(int(rep_ms / est), 1000)))]
    return statistics.median(times), ("median of CUDA events" if cuda else "median of perf_counter") + \
        f" over {len(times)} calls"


def ssd_path(x, B, cuda) -> str:
    """Which implementation runs the call: ours' backend switch, or 'upstream' (no mamba_ssm.backend)."""
    try:
        from mamba_ssm.backend import choose_backend
        from mamba_ssm.ops.triton import ssd_triton
    except ImportError:
        return "upstream"
    if cuda and ssd_triton.supports(x, B) and choose_backend("ssd", True) == "triton":
        return "triton"
    return "torch"


def measure_shape(dims, chunk_size, device, seed=0, warmup_ms=25.0, rep_ms=100.0, ref_steps=512):
    """One shape's figures in this process (the module's docstring)."""
    import torch
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as scan

    cuda = str(device).startswith("cuda")
    cpu_inp, gout = make_inputs(dims, seed)
    inp = {k: t.to(device) for k, t in cpu_inp.items()}
    gout = gout.to(device)
    names = ("x", "dt", "A", "B", "C", "D", "dt_bias")

    def call(t):
        return scan(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk_size, D=t["D"], z=None, dt_bias=t["dt_bias"],
                    dt_softplus=True)

    leaves = {k: inp[k].detach().clone().requires_grad_(True) for k in names}

    def fwdbwd():
        return torch.autograd.grad(call(leaves), [leaves[k] for k in names], gout)

    res = {"dims": dict(zip(DIMS, dims)), "chunk_size": chunk_size, "ssd_path": ssd_path(inp["x"], inp["B"], cuda),
           "dtypes": {k: str(t.dtype)[6:] for k, t in inp.items()}}
    out = call(inp)
    grads = fwdbwd()  # the first calls (compiles) before any timing
    res["grad_dtypes"] = [str(t.dtype)[6:] for t in grads]
    del grads
    if ref_steps > 0:
        res["relerr_vs_float64"], res["ref_slice"] = relerr_vs_float64(out, cpu_inp, ref_steps)
    res["out_dtype"] = str(out.dtype)[6:]
    del out
    res["fwd_ms"], res["timer"] = median_ms(lambda: call(inp), cuda, warmup_ms, rep_ms)
    res["fwdbwd_ms"], _ = median_ms(fwdbwd, cuda, warmup_ms, rep_ms)
    res["bwd_ms"] = res["fwdbwd_ms"] - res["fwd_ms"]
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fwdbwd()
        torch.cuda.synchronize(device)
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return res


def child(args):
    """Measure one (variant, shape) in this process; print one RESULT line."""
    res = {"shape": args.shapes[0], "env": {k: os.environ.get(k) for k in args.env_names}}
    t0 = time.perf_counter()
    cuda, device = False, None
    try:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cuda = device.startswith("cuda")
        mamba_ssm = _v.import_variant_mamba_ssm()

        res.update(mamba_ssm_file=str(Path(mamba_ssm.__file__).parent), mamba_ssm_version=getattr(
            mamba_ssm, "__version__", None), torch=torch.__version__, device=device,
            pythonpath=os.environ.get("PYTHONPATH"))
        try:
            import triton

            res["triton"] = triton.__version__
        except ImportError:
            pass
        if cuda:
            res["device_name"] = torch.cuda.get_device_name(device)
        res.update(measure_shape(parse_shape(args.shapes[0]), args.chunk_size, device, args.seed, args.warmup_ms,
                                 args.rep_ms, args.ref_steps))
    except Exception as e:  # noqa: BLE001  (out of memory, an import error: a result too)
        res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        res["traceback"] = traceback.format_exc()[-3000:]
        if cuda:
            res["peak_memory_at_error_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    res["child_s"] = round(time.perf_counter() - t0, 2)
    _v.emit(res)


# ------------------------------------------------------------------------------------------ parent
def run_child(env: dict, key: str, args) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--child", "--shapes", key, "--chunk-size", str(args.chunk_size),
           "--warmup-ms", str(args.warmup_ms), "--rep-ms", str(args.rep_ms), "--ref-steps", str(args.ref_steps),
           "--seed", str(args.seed), "--env-names", ",".join(sorted(env))]
    if args.device:
        cmd += ["--device", args.device]
    return _v.run_child(cmd, env, args.child_timeout, {"shape": key}, keep_other_paths=True)


def add_ratios(result: dict, baseline: str) -> None:
    """Per variant and shape: speedup = baseline ms / variant ms; issue 22's acceptance (ours vs upstream)."""
    base = result["variants"].get(baseline, {}).get("runs", {})
    for v in result["variants"].values():
        ratios = {}
        for key, run in v["runs"].items():
            ref = base.get(key)
            if ref is None or "error" in run or "error" in ref:
                continue
            ratios[key] = {"fwd_speedup": _v.ratio(ref["fwd_ms"], run["fwd_ms"]),
                           "fwdbwd_speedup": _v.ratio(ref["fwdbwd_ms"], run["fwdbwd_ms"])}
        v["vs_baseline"] = ratios
    result["baseline"] = baseline
    variants = result["variants"]
    if "ours" in variants and "upstream" in variants:
        per = {}
        for key, up in variants["upstream"]["runs"].items():
            ours = variants["ours"]["runs"].get(key, {})
            s = None if "error" in up or "error" in ours else _v.ratio(up["fwdbwd_ms"], ours["fwdbwd_ms"])
            per[key] = {"fwdbwd_speedup": s, "met": s is not None and s >= FWDBWD_TARGET}
        result["acceptance"] = {"what": f"ours' forward+backward >= {FWDBWD_TARGET}x upstream's (issue 22)",
                                "target": FWDBWD_TARGET, "shapes": per,
                                "met": bool(per) and all(p["met"] for p in per.values())}


def table(result: dict) -> str:
    inp, col = result["inputs"], _v.col
    lines = [f"SSD scan, bf16, chunk {inp['chunk_size']}, dt_bias + softplus, z None, on "
             f"{result['machine'].get('device_name') or 'cpu'} (baseline {result['baseline']}; x base: "
             f"baseline ms / ms)",
             f"{'b,l,h,p,n,g':>20} {'variant':>10} {'fwd ms':>9} {'x base':>7} {'fwd+bwd':>9} {'x base':>7} "
             f"{'relerr64':>9} {'peak GiB':>8}  path"]
    for key in result["shapes"]:
        for name, v in result["variants"].items():
            run = v["runs"].get(key)
            if run is None:
                continue
            if "error" in run:
                lines.append(f"{key:>20} {name:>10} ERROR {run['error'][:120]}")
                continue
            r = v.get("vs_baseline", {}).get(key, {})
            err = run.get("relerr_vs_float64")
            lines.append(f"{key:>20} {name:>10} {col(run['fwd_ms'], 9, 3)} {col(r.get('fwd_speedup'), 7, 2)} "
                         f"{col(run['fwdbwd_ms'], 9, 3)} {col(r.get('fwdbwd_speedup'), 7, 2)} "
                         f"{f'{err:9.2e}' if err is not None else '-':>9} {col(run.get('peak_memory_gib'), 8, 2)}  "
                         f"{run.get('ssd_path', '-')}")
    acc = result.get("acceptance")
    if acc:
        lines.append(f"acceptance ({acc['what']}): " + ("met" if acc["met"] else "NOT met") + "; " + ", ".join(
            f"{k}: {col(p['fwdbwd_speedup'], 0, 2).strip()}x" for k, p in acc["shapes"].items()))
    return "\n".join(lines)


def run(args, log=print) -> dict:
    variants, baseline = _v.resolve_variants(args.variants or DEFAULT_VARIANTS, args.upstream_path, args.baseline)
    shapes = [parse_shape(s) for s in args.shapes]
    keys = [shape_key(d) for d in shapes]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--shapes: each shape once, got {keys}")
    result = _v.new_result("ssd_benchmark", args, variants, {k: dict(zip(DIMS, d)) for k, d in zip(keys, shapes)})
    result["shapes"] = keys
    result["what"] = ("mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True) "
                      "as Mamba2 calls it; x, dt, B, C bf16, A, D, dt_bias fp32; median ms; fwdbwd = forward + "
                      "autograd.grad w.r.t. x, dt, A, B, C, D, dt_bias")
    # the first variant and the baseline at every shape, then the others: a run cut short by --budget-s
    # keeps the comparison the run is for
    first = {variants[0][0], baseline}
    children = [_v.Child(n, e, k, {"shape": k}) for k in keys for n, e in variants if n in first] + \
        [_v.Child(n, e, k, {"shape": k}) for k in keys for n, e in variants if n not in first]
    _v.run_children(result, children, lambda c: run_child(c.env, c.key, args), summary=summary,
                    add_ratios=add_ratios, baseline=baseline, prefix="ssd",
                    dirs=_v.result_dirs(args), budget_s=args.budget_s,
                    table=table, log=log)
    return result


def summary(r: dict) -> str:
    """A child's figures in one log line."""
    err = r.get("relerr_vs_float64")
    return (f"fwd {r['fwd_ms']:.3f} ms, fwd+bwd {r['fwdbwd_ms']:.3f} ms, {r['ssd_path']}, relerr64 "
            f"{'-' if err is None else f'{err:.2e}'}")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _v.add_parent_arguments(p, DEFAULT_VARIANTS)
    # a child runs one shape; the first of a variant's children also compiles (upstream: and autotunes)
    p.set_defaults(child_timeout=180.0)
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                   help="b,l,h,p,n[,g] (batch, seqlen, nheads, headdim, dstate, ngroups; g default 1)")
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--warmup-ms", type=float, default=25.0, help="do_bench's warmup (ms of calls)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench's rep (ms of timed calls)")
    p.add_argument("--ref-steps", type=int, default=512,
                   help="steps of the float64 reference slice (0: no relative error)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child:
        args.env_names = [n for n in args.env_names.split(",") if n]
        return child(args)
    for flag, least in (("chunk_size", 1), ("ref_steps", 0), ("warmup_ms", 0)):
        if getattr(args, flag) < least:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}")
    if args.rep_ms <= 0:
        raise SystemExit(f"--rep-ms must be > 0, got {args.rep_ms}")
    if args.child_timeout <= 0 or args.budget_s < 0:
        raise SystemExit(f"--child-timeout must be > 0 and --budget-s >= 0, got {args.child_timeout} and "
                         f"{args.budget_s}")
    try:
        return run(args)
    except ValueError as e:  # a bad --variants, --baseline or --shapes
        raise SystemExit(str(e)) from None
