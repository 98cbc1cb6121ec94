"""GPU benchmark: the causal conv + SiLU of the Mamba mixer, the Triton kernel
(mamba_ssm/ops/triton/causal_conv1d.py) against the PyTorch path (F.conv1d on a
left-padded input, then SiLU), in the same run.

x is the first half of a (batch, 2*dim, seqlen) bf16 tensor, as in the mixer; the weight is frozen
(a LoRA step) unless --weight-grad. Median ms of the forward and of forward + backward
(triton.testing.do_bench), the largest difference of the output and of dx, and the achieved
bandwidth of the Triton forward (x read, out written). JSON to
benchmarks/results/causal_conv1d_<gpu>.json (the date is inside; the next run on that card
overwrites it).

    python benchmarks/benchmark_causal_conv1d.py [--shapes '[[4,4096,2048],[16,1536,2048]]']
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mambakit.bench.results import gpu_tag, results_path  # noqa: E402

SHAPES = [(4, 4096, 2048), (16, 1536, 2048), (8, 2048, 2048)]


def measure(batch, dim, seqlen, width=4, weight_grad=False, dtype=torch.bfloat16):
    import triton.testing

    from mamba_ssm.ops.causal_conv1d import causal_conv1d_fn
    from mamba_ssm.ops.triton.causal_conv1d import causal_conv1d_triton

    g = torch.Generator(device="cuda").manual_seed(0)
    xz = torch.randn(batch, 2 * dim, seqlen, device="cuda", dtype=dtype, generator=g).requires_grad_()
    weight = torch.randn(dim, width, device="cuda", dtype=dtype, generator=g).requires_grad_(weight_grad)
    bias = torch.randn(dim, device="cuda", dtype=dtype, generator=g).requires_grad_(weight_grad)
    gout = torch.randn(batch, dim, seqlen, device="cuda", dtype=dtype, generator=g)
    from mamba_ssm.backend import use_backend

    def torch_conv():  # causal_conv1d_fn picks the Triton kernel on CUDA unless told otherwise
        with use_backend("torch"):
            return causal_conv1d_fn(xz[:, :dim], weight, bias, "silu")

    impls = {"torch": torch_conv, "triton": lambda: causal_conv1d_triton(xz[:, :dim], weight, bias, "silu")}
    res = {"shape": [batch, dim, seqlen], "width": width, "weight_grad": weight_grad, "dtype": str(dtype)}
    outs = {}
    for name, f in impls.items():
        res[f"{name}_fwd_ms"] = triton.testing.do_bench(lambda f=f: f())

        def fb(f=f):
            out = f()
            torch.autograd.grad(out, [xz] + ([weight, bias] if weight_grad else []), gout)

        res[f"{name}_fwdbwd_ms"] = triton.testing.do_bench(fb)
        out = f()
        outs[name] = (out.float(), torch.autograd.grad(out, [xz], gout)[0][:, :dim].float())
    res["max_abs_diff_out"] = (outs["triton"][0] - outs["torch"][0]).abs().max().item()
    res["max_abs_diff_dx"] = (outs["triton"][1] - outs["torch"][1]).abs().max().item()
    res["speedup_fwd"] = res["torch_fwd_ms"] / res["triton_fwd_ms"]
    res["speedup_fwdbwd"] = res["torch_fwdbwd_ms"] / res["triton_fwdbwd_ms"]
    moved = 2 * batch * dim * seqlen * torch.finfo(dtype).bits // 8
    res["triton_fwd_GBps"] = moved / (res["triton_fwd_ms"] * 1e-3) / 1e9
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help="JSON list of [batch, dim, seqlen]")
    ap.add_argument("--weight-grad", action="store_true", help="also the weight and bias gradients")
    ap.add_argument("--out", help="JSON path (default benchmarks/results/causal_conv1d_<gpu>.json)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmark_causal_conv1d: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    shapes = [tuple(s) for s in json.loads(a.shapes)] if a.shapes else SHAPES
    rows = [measure(*s, weight_grad=a.weight_grad) for s in shapes]
    now = datetime.now(timezone.utc)
    res = {"what": __doc__.splitlines()[0], "date": now.isoformat(timespec="seconds"),
           "machine": {"gpu": torch.cuda.get_device_name(), "host": platform.node()},
           "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__},
           "results": rows}
    out = Path(a.out) if a.out else results_path("causal_conv1d", gpu_tag(torch.cuda.get_device_name()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    for r in rows:
        print(f"{str(r['shape']):>18}  fwd {r['torch_fwd_ms']:.3f} -> {r['triton_fwd_ms']:.3f} ms  "
              f"fwd+bwd {r['torch_fwdbwd_ms']:.3f} -> {r['triton_fwdbwd_ms']:.3f} ms  "
              f"max diff out {r['max_abs_diff_out']:.2e} dx {r['max_abs_diff_dx']:.2e}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
