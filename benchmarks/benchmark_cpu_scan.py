"""CPU benchmark: selective_scan_fn (PyTorch backend, chunked scan) against selective_scan_ref (a loop per step).

The chunked scan's forward runs in C where it builds (mamba_ssm/ops/selective_scan_cpu.py); its
PyTorch forward (MAMBA_SSM_CPU_KERNEL=0) is timed too, alternating with it, as chunked_torch_fwd.

Shape (batch, dim, seqlen, dstate) = (1, 1536, 1024, 16) by default, fp32, with z, D, delta_bias and
softplus, inputs drawn as in a freshly initialised Mamba layer. Times the forward (no grad) and the
forward + backward (torch.autograd.grad of <out, cotangent> for all eight inputs), reports medians and
speedups, checks that both give the same numbers, and writes JSON to benchmarks/results/cpu_scan.json
(the date is inside; the next run overwrites it).

The reference's backward goes through autograd over a per-step loop and takes minutes at this shape,
so it is timed fewer times (--ref-bwd-repeats). Other processes on the machine change every figure:
the load average before and after is recorded with them.

    python benchmarks/benchmark_cpu_scan.py [--threads 2] [--repeats 7] [--ref-bwd-repeats 1]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mamba_ssm.backend import use_backend  # noqa: E402
from mamba_ssm.ops import selective_scan_cpu  # noqa: E402
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref  # noqa: E402
from mambakit.bench.results import results_path  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch, dim, seqlen, dstate, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    ins = {
        "u": torch.randn(batch, dim, seqlen, generator=g),
        "delta": 0.5 * torch.randn(batch, dim, seqlen, generator=g),  # dt_proj output without its bias
        "A": -torch.arange(1, dstate + 1, dtype=torch.float32).repeat(dim, 1),  # -exp(A_log), S4D-real init
        "B": torch.randn(batch, dstate, seqlen, generator=g),
        "C": torch.randn(batch, dstate, seqlen, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, seqlen, generator=g),
        "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus of dt ~ log-uniform[1e-3, 0.1]
    }
    return [ins[k].requires_grad_() for k in NAMES]


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return times, result


def summary(times):
    return {"median_s": statistics.median(times), "min_s": min(times), "all_s": times}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=1536)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--dstate", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs of the chunked scan, fwd and fwd+bwd")
    p.add_argument("--ref-fwd-repeats", type=int, default=3)
    p.add_argument("--ref-bwd-repeats", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/cpu_scan.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (args.batch, args.dim, args.seqlen, args.dstate)
    inputs = make_inputs(*shape)
    cot = torch.randn(args.batch, args.dim, args.seqlen, generator=torch.Generator().manual_seed(1))
    load_before = os.getloadavg()

    def fwd(fn):
        def run():
            with torch.no_grad():
                return fn(*inputs, delta_softplus=True)
        return run

    def fwd_bwd(fn):
        def run():
            out = fn(*inputs, delta_softplus=True)
            return torch.autograd.grad(out, inputs, cot)
        return run

    results = {}
    with use_backend("torch"):
        fwd(selective_scan_fn)()  # warm up
        fwd_bwd(selective_scan_fn)()
        c_built = selective_scan_cpu.library() is not None
        t_c, t_torch = [], []
        for _ in range(args.repeats):   # the C forward and the PyTorch one alternate
            t, out_fast = timed(fwd(selective_scan_fn), 1)
            t_c += t
            selective_scan_cpu.set_enabled(False)
            try:
                t_torch += timed(fwd(selective_scan_fn), 1)[0]
            finally:
                selective_scan_cpu.set_enabled(True)
        results["chunked_fwd"] = summary(t_c)
        results["chunked_torch_fwd"] = summary(t_torch)
        t, g_fast = timed(fwd_bwd(selective_scan_fn), args.repeats)
        results["chunked_fwd_bwd"] = summary(t)
        print(f"chunked: fwd {results['chunked_fwd']['median_s'] * 1e3:.1f} ms (C: {c_built}), "
              f"PyTorch fwd {results['chunked_torch_fwd']['median_s'] * 1e3:.1f} ms, "
              f"fwd+bwd {results['chunked_fwd_bwd']['median_s'] * 1e3:.1f} ms", flush=True)
    t, out_ref = timed(fwd(selective_scan_ref), args.ref_fwd_repeats)
    results["ref_fwd"] = summary(t)
    print(f"ref: fwd {results['ref_fwd']['median_s'] * 1e3:.1f} ms", flush=True)
    t, g_ref = timed(fwd_bwd(selective_scan_ref), args.ref_bwd_repeats)
    results["ref_fwd_bwd"] = summary(t)
    print(f"ref: fwd+bwd {results['ref_fwd_bwd']['median_s'] * 1e3:.1f} ms", flush=True)
    load_after = os.getloadavg()

    def rel_err(a, b):
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()

    check = {"out": rel_err(out_fast, out_ref)}
    check.update({f"grad_{k}": rel_err(a, b) for k, a, b in zip(NAMES, g_fast, g_ref)})
    speedup = {
        "fwd": results["ref_fwd"]["median_s"] / results["chunked_fwd"]["median_s"],
        "c_fwd_vs_torch_fwd": results["chunked_torch_fwd"]["median_s"] / results["chunked_fwd"]["median_s"],
        "fwd_bwd": results["ref_fwd_bwd"]["median_s"] / results["chunked_fwd_bwd"]["median_s"],
    }
    now = datetime.datetime.now(datetime.timezone.utc)
    report = {
        "benchmark": "selective_scan_fn (torch backend, chunked) vs selective_scan_ref (per-step loop), CPU",
        "date_utc": now.isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
        },
        "inputs": {
            "shape_batch_dim_seqlen_dstate": shape,
            "dtype": "float32",
            "z": True, "D": True, "delta_bias": True, "delta_softplus": True, "return_last_state": False,
            "init": "A = -(1..dstate); delta ~ 0.5 N(0,1); delta_bias = softplus^-1(log-uniform[1e-3, 0.1]); "
                    "u, B, C, z ~ N(0,1); D = 1",
            "backward": "torch.autograd.grad(out, all 8 inputs, random cotangent)",
            "c_forward_built": c_built,
        },
        "repeats": {"chunked": args.repeats, "ref_fwd": args.ref_fwd_repeats, "ref_fwd_bwd": args.ref_bwd_repeats},
        "results": results,
        "speedup_median": speedup,
        "max_rel_diff_chunked_vs_ref": check,
    }
    print(json.dumps({"speedup_median": speedup, "max_rel_diff": check}, indent=1))
    path = args.out or str(results_path("cpu_scan"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
