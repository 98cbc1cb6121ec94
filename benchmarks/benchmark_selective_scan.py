"""Selective scan: our CUDA kernels vs upstream mamba-ssm vs our PyTorch reference, on one GPU.

    python benchmarks/benchmark_selective_scan.py [--upstream-path DIR] [--out-dir DIR]
        [--variants 'name:VAR=value,VAR=value;name2:...']

Each implementation runs in its own subprocess (upstream's package is also called
`mamba_ssm`: its worker gets PYTHONPATH=DIR and neither our repository nor the current
directory on its path). A variant is ours again with more environment variables: scan settings
(MAMBA_SSM_SCAN_*, read once when its worker imports mamba_ssm), or PYTHONPATH=DIR to time
another tree of ours, e.g. a baseline commit, whose own variables it may set too. Inputs are made from one seed in every worker, so all see the same
values. Shapes (batch, dim, seqlen, dstate) in bf16 with z, D, delta_bias, softplus, B/C
(batch, dstate, seqlen) bf16, A fp32 = -(1..dstate) (Mamba's initialisation), delta_bias
the inverse softplus of a log-uniform dt in [1e-3, 1e-1].

Figures, per implementation and shape:
  fwd_ms        median time of the forward (triton.testing.do_bench, return_mode="median")
  fwd_graph_ms  the same forward replayed from a CUDA graph (no per-call host work)
  fwdbwd_ms     median time of forward + torch.autograd.grad w.r.t. u, delta, A, B, C, D, z, delta_bias
  fwd_GBps      bytes the forward must move (read u, delta, z, B, C once; write out once) / fwd time
  fwd_exp_rate  b*d*L*n exponentials / fwd time, and its fraction of the SFU ceiling
                (multiprocessors x 16 ex2 per clock x 1.98 GHz)
  relerr        ||out - out64|| / ||out64|| over the whole output, out64 from a float64 scan of the
                same (bf16-valued) inputs computed in the worker
The JSON goes to benchmarks/results/selective_scan_<gpu>.json (gpu: h200, h100, ... from the device
name; the date is inside; the next run on that card overwrites it), and to --out-dir if given.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
import tempfile

SHAPES = [(8, 4096, 2048, 16), (1, 4096, 16384, 16), (8, 1536, 2048, 16), (1, 2048, 2048, 16), (1, 1536, 1024, 16)]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFU_PER_CLOCK = 16
CLOCK_HZ = 1.98e9


# ------------------------------------------------------------------------------------ worker
def _inputs(shape, device="cuda", requires_grad=False):
    import torch

    b, d, L, n = shape
    g = torch.Generator(device=device).manual_seed(2026)
    dt = torch.bfloat16

    def rn(*s, dtype=dt):
        return torch.randn(*s, device=device, dtype=torch.float32, generator=g).to(dtype)

    u, z = rn(b, d, L), rn(b, d, L)
    delta = (rn(b, d, L, dtype=torch.float32) * 0.5).to(dt)
    B, C = rn(b, n, L), rn(b, n, L)
    A = -torch.arange(1, n + 1, device=device, dtype=torch.float32).repeat(d, 1)
    D = torch.ones(d, device=device)
    lo, hi = math.log(1e-3), math.log(1e-1)
    dt_init = torch.exp(torch.rand(d, device=device, generator=g) * (hi - lo) + lo)
    delta_bias = dt_init + torch.log(-torch.expm1(-dt_init))
    xs = [u, delta, A, B, C, D, z, delta_bias]
    if requires_grad:
        xs = [x.detach().clone().requires_grad_(True) for x in xs]
    return xs


def _scan64_relerr(out, xs):
    """||out - out64|| / ||out64||, out64 by a float64 step loop (chunked over channels)."""
    import torch
    import torch.nn.functional as F

    u, delta, A, B, C, D, z, bias = [x.detach() for x in xs]
    b, d, L = u.shape
    num = 0.0
    den = 0.0
    step = 4096
    for d0 in range(0, d, step):
        sl = slice(d0, min(d, d0 + step))
        uu = u[:, sl].double()
        dd = F.softplus(delta[:, sl].double() + bias[sl].double()[:, None])
        AA = A[sl].double()
        Bd, Cd = B.double(), C.double()
        h = uu.new_zeros(b, uu.shape[1], A.shape[1])
        ys = []
        for t in range(L):
            h = torch.exp(dd[:, :, t, None] * AA) * h + (dd[:, :, t] * uu[:, :, t])[..., None] * Bd[:, None, :, t]
            ys.append((h * Cd[:, None, :, t]).sum(-1))
        y = torch.stack(ys, -1) + D[sl].double()[:, None] * uu
        y = y * F.silu(z[:, sl].double())
        num += (out[:, sl].double() - y).pow(2).sum().item()
        den += y.pow(2).sum().item()
    return math.sqrt(num / den)


def worker(impl, shapes, with_accuracy, ref_reps):
    import torch
    from triton.testing import do_bench

    if impl == "upstream":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn

        import mamba_ssm
        version = getattr(mamba_ssm, "__version__", "?")
    elif impl == "ours":
        from mamba_ssm.backend import set_backend
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as fn

        set_backend("cuda")
        version = "repo"
        try:  # (a baseline tree may predate the settings module)
            import dataclasses

            from mamba_ssm.ops.selective_scan_settings import current_settings
            settings = dataclasses.asdict(current_settings())
        except ImportError:
            settings = None
    elif impl == "ref":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref as fn

        version = "repo"
    else:
        raise SystemExit(f"unknown impl {impl}")

    results = {"impl": impl, "version": version, "module": fn.__module__}
    if impl == "ours" and settings is not None:
        results["settings"] = settings
    for shape in shapes:
        key = "[" + ",".join(map(str, shape)) + "]"
        xs = _inputs(shape)
        run = lambda: fn(*xs, delta_softplus=True)  # noqa: E731
        if impl == "ref":
            run()
            torch.cuda.synchronize()
            times = []
            for _ in range(ref_reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                run()
                e.record()
                torch.cuda.synchronize()
                times.append(s.elapsed_time(e))
            times.sort()
            results[f"fwd_ms{key}"] = times[len(times) // 2]
            continue
        results[f"fwd_ms{key}"] = do_bench(run, warmup=50, rep=300, return_mode="median")
        # the same forward replayed from a CUDA graph: GPU time without the host's per-call work
        # (where fwd_ms is larger, the GPU waited on Python and the binding)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run()
            results[f"fwd_graph_ms{key}"] = do_bench(graph.replay, warmup=50, rep=300, return_mode="median")
            del graph
        except Exception as exc:  # a graph is a diagnostic here, not a requirement
            results[f"fwd_graph_error{key}"] = repr(exc)[:300]
        xg = _inputs(shape, requires_grad=True)
        gout = torch.randn(shape[:3], device="cuda", generator=torch.Generator("cuda").manual_seed(7)).to(torch.bfloat16)

        def fb():
            out = fn(*xg, delta_softplus=True)
            return torch.autograd.grad(out, xg, gout)

        results[f"fwdbwd_ms{key}"] = do_bench(fb, warmup=50, rep=300, return_mode="median")
        if with_accuracy:
            with torch.no_grad():
                out = run()
            results[f"relerr{key}"] = _scan64_relerr(out, xs)
        del xs, xg
        torch.cuda.empty_cache()
    print("RESULT_JSON " + json.dumps(results), flush=True)


# ------------------------------------------------------------------------------ orchestrator
def _run_worker(impl, args, pythonpath, extra_env=None, accuracy=True):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = pythonpath
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra_env or {})
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--ref-reps", str(args.ref_reps)]
    if args.no_accuracy or not accuracy:
        cmd.append("--no-accuracy")
    res_env = {k: env[k] for k in (extra_env or {})}
    shapes = [list(x) for x in json.loads(args.shapes)] if args.shapes else SHAPES
    # the workers time the shapes asked for (they used to time the defaults whatever --shapes said)
    cmd += ["--shapes", json.dumps(shapes[:1] if impl == "ref" and args.ref_first_only else shapes)]
    with tempfile.TemporaryDirectory() as cwd:  # keep the repo off the path of the upstream worker
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-3000:])
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT_JSON "):
            out = json.loads(line[len("RESULT_JSON "):])
            if res_env:
                out["env"] = res_env
            return out
    return {"impl": impl, "error": (proc.stdout + proc.stderr)[-2000:]}


def _derived(res, shapes):
    import torch

    props = torch.cuda.get_device_properties(0)
    sfu_rate = props.multi_processor_count * SFU_PER_CLOCK * CLOCK_HZ
    for shape in shapes:
        b, d, L, n = shape
        key = "[" + ",".join(map(str, shape)) + "]"
        nbytes = 2 * (4 * b * d * L + 2 * b * n * L)
        nexp = b * d * L * n
        res[f"fwd_bytes{key}"] = nbytes
        res[f"exp_count{key}"] = nexp
        res[f"exp_floor_ms{key}"] = nexp / sfu_rate * 1e3
        res[f"copy_floor_ms{key}"] = nbytes / 4.3e12 * 1e3
        for impl, r in res["impls"].items():
            t = r.get(f"fwd_ms{key}")
            if t:
                r[f"fwd_GBps{key}"] = nbytes / (t * 1e-3) / 1e9
                r[f"fwd_exp_per_s{key}"] = nexp / (t * 1e-3)
                r[f"fwd_frac_of_exp_floor{key}"] = (nexp / sfu_rate) / (t * 1e-3)
        up, ours = res["impls"].get("upstream", {}), res["impls"].get("ours", {})
        for m in ("fwd_ms", "fwdbwd_ms"):
            if up.get(m + key) and ours.get(m + key):
                res[f"speedup_{m}{key}"] = up[m + key] / ours[m + key]
    res["sfu_exp_per_s_ceiling"] = sfu_rate


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", default=None)
    ap.add_argument("--shapes", default=None)
    ap.add_argument("--upstream-path", default=None, help="directory holding upstream's built mamba_ssm")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--no-ref", action="store_true")
    ap.add_argument("--ref-reps", type=int, default=3)
    ap.add_argument("--ref-first-only", action="store_true")
    ap.add_argument("--variants", default="",
                    help="more runs of ours, 'name:VAR=value,VAR=value;name2:...' (environment), no accuracy")
    args = ap.parse_args()
    shapes = [tuple(s) for s in json.loads(args.shapes)] if args.shapes else SHAPES
    if args.worker:  # (its PYTHONPATH names the package it times: never import ours here)
        worker(args.worker, shapes, not args.no_accuracy, args.ref_reps)
        return

    import torch

    sys.path.insert(0, REPO)
    from mambakit.bench.results import gpu_tag, results_path

    date = _dt.date.today().isoformat()
    res = {
        "what": "selective_scan_fn bf16 with z, D, delta_bias, softplus; median ms (triton do_bench); "
                "fwdbwd = forward + torch.autograd.grad w.r.t. all 8 inputs; relerr = ||out-out64||/||out64||",
        "date": date,
        "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"gpu": torch.cuda.get_device_name(0), "host": platform.node(), "python": platform.python_version()},
        "versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
        "shapes": [list(s) for s in shapes],
        "impls": {},
    }
    try:
        import triton

        res["versions"]["triton"] = triton.__version__
    except Exception:
        pass
    res["impls"]["ours"] = _run_worker("ours", args, REPO)
    for spec in [v for v in args.variants.split(";") if v.strip()]:
        name, _, envs = spec.partition(":")
        env = dict(kv.split("=", 1) for kv in envs.split(",") if "=" in kv)
        res["impls"][f"ours_{name.strip()}"] = _run_worker("ours", args, REPO, env, accuracy=False)
    if args.upstream_path:
        res["impls"]["upstream"] = _run_worker("upstream", args, os.path.abspath(args.upstream_path))
        res["versions"]["upstream"] = res["impls"]["upstream"].get("version")
    if not args.no_ref:
        res["impls"]["ref"] = _run_worker("ref", args, REPO)
    _derived(res, shapes)

    name = results_path("selective_scan", gpu_tag(res["machine"]["gpu"])).name
    dirs = [os.path.join(REPO, "benchmarks", "results")] + ([args.out_dir] if args.out_dir else [])
    for dd in dirs:
        os.makedirs(dd, exist_ok=True)
        with open(os.path.join(dd, name), "w") as f:
            json.dump(res, f, indent=1)

    # short table last
    print(f"{'shape':>22} {'impl':>18} {'fwd ms':>8} {'fb ms':>8} {'GB/s':>7} {'exp%':>6} {'relerr':>9}")
    for shape in shapes:
        key = "[" + ",".join(map(str, shape)) + "]"
        for impl, r in res["impls"].items():
            if "error" in r:
                print(f"{key:>22} {impl:>18} ERROR {r['error'][-300:]}")
                continue
            f = r.get(f"fwd_ms{key}")
            fb = r.get(f"fwdbwd_ms{key}")
            print(f"{key:>22} {impl:>18} {f or float('nan'):8.3f} {fb or float('nan'):8.3f} "
                  f"{r.get(f'fwd_GBps{key}', float('nan')):7.0f} {100 * r.get(f'fwd_frac_of_exp_floor{key}', float('nan')):6.1f} "
                  f"{r.get(f'relerr{key}', float('nan')):9.2e}")
        for m in ("fwd_ms", "fwdbwd_ms"):
            if f"speedup_{m}{key}" in res:
                print(f"{key:>22} speedup {m}: {res[f'speedup_{m}{key}']:.2f}x")


if __name__ == "__main__":
    main()
