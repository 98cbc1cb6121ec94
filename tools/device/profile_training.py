#!/usr/bin/env python
"""Where a training step's GPU time goes: one step of benchmarks/benchmark_training.py's setup
(mambakit/bench/training.py's build_step) under torch.profiler, after warm-up steps, in this process.
Prints the step's wall time, peak memory, the kernels with the most GPU time, and the host side: the
GPU's idle time (wall minus kernels), the CUDA runtime calls that wait for the GPU (synchronizations,
copies to the host) and the top-level host operators with the most CPU time (their children included). Writes them to --out.

    python tools/device/profile_training.py --shape 1.4b --mode full [--top 25]
Environment settings (MAMBA_SSM_RECOMPUTE=0, ...) apply as in the benchmark.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="1.4b")
    p.add_argument("--mode", default="full", choices=("full", "lora_recipe", "lora_plain"))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--plain-resolver", action="store_true")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu to try the tool")
    a = p.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mambakit.bench.training import build_step

    dev = a.device
    cuda = dev.startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    model, step, info = build_step(a.mode, a.shape, a.batch_size, a.seqlen, dev, plain_resolver=a.plain_resolver)
    for _ in range(a.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    step()
    sync()
    wall_ms = (time.perf_counter() - t0) * 1e3
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else 0.0
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        sync()
    times, counts, host, waits = {}, {}, {}, {}
    for e in prof.events():
        k = e.name[:110]
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[k] = times.get(k, 0.0) + e.time_range.elapsed_us()
            counts[k] = counts.get(k, 0) + 1
        elif k.startswith(("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                           "cudaMalloc", "cudaFree")):
            waits[k] = waits.get(k, 0) + 1
        elif not k.startswith("cuda") and e.cpu_parent is None:  # top-level host operators
            host[k] = host.get(k, 0.0) + e.cpu_time_total
    total = sum(times.values())
    top = sorted(times.items(), key=lambda kv: -kv[1])[:a.top]
    tokens = a.batch_size * a.seqlen
    res = {"shape": a.shape, "mode": a.mode, "env": {k: v for k, v in os.environ.items() if k.startswith("MAMBA_SSM")},
           "step_ms": round(wall_ms, 2), "tokens_per_s": round(tokens / wall_ms * 1e3), "peak_gib": round(peak, 2),
           "kernel_ms_total": round(total / 1e3, 2), "kernels": sum(counts.values()),
           "mixer_path": info.get("mixer_path"), "adapter_path": info.get("adapter_path"),
           "top": [{"us": round(v), "n": counts[k], "name": k} for k, v in top],
           "gpu_idle_ms": round(wall_ms - total / 1e3, 2), "host_waits": waits,
           "host_top": [{"us": round(v), "name": k} for k, v in sorted(host.items(), key=lambda kv: -kv[1])[:10]]}
    print(f"{a.shape} {a.mode} {res['env']}: step {wall_ms:.1f} ms ({res['tokens_per_s']} tokens/s), peak "
          f"{peak:.2f} GiB, kernels {total / 1e3:.1f} ms in {res['kernels']} ({info.get('mixer_path')}, "
          f"{info.get('adapter_path')})", flush=True)
    for r in res["top"]:
        print(f"  {r['us'] / 1e3:8.2f} ms {r['n']:5d}x  {r['name']}", flush=True)
    print(f"  GPU idle {res['gpu_idle_ms']} ms of the step; runtime calls that may wait: {waits}", flush=True)
    for r in res["host_top"]:
        print(f"  host {r['us'] / 1e3:8.2f} ms  {r['name']}", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
