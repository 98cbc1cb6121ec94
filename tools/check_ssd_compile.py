#!/usr/bin/env python
"""Compile the SSD scan's Triton kernels (mamba_ssm/ops/triton/ssd_triton.py, forward and backward) for a
GPU on a machine without one, and print each kernel's registers, local memory (spills) and shared memory.

The launches of one forward and backward are recorded on CPU tensors (as tools/check_decode_step_compile.py
does) and compiled with Triton's bundled ptxas for the target. A compile error here is one the GPU would hit.

    python tools/check_ssd_compile.py [--arch 90] [--dtype bf16] [--seqlen 1024] [--chunk 256] [--nheads 24]
        [--headdim 64] [--dstate 128] [--ngroups 1] [--packed]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from check_decode_step_compile import _Recorder, compile_launch, resource_usage  # noqa: E402

KERNELS = ("dt_fwd", "chunk_state", "state_pass_fwd", "chunk_scan_fwd", "state_pass_bwd", "chunk_scan_bwd_dx",
           "chunk_scan_bwd_dc", "dt_bwd")


def record_launches(dtype_name="bf16", batch=1, seqlen=1024, chunk=256, nheads=24, headdim=64, dstate=128,
                    ngroups=1, packed=False):
    """(fn, grid, args, kwargs) of every kernel launch of one forward and backward, on CPU tensors."""
    import torch

    from mamba_ssm.ops.ssd_chunked import _segments
    from mamba_ssm.ops.triton import _ssd_kernels as K
    from mamba_ssm.ops.triton import ssd_triton as st

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    launches = []
    recorders = type("Kernels", (), {name: _Recorder(getattr(K, name), launches) for name in KERNELS})
    b, l, h, p, g, n = batch, seqlen, nheads, headdim, ngroups, dstate

    def t(*s, dt=dtype):
        return torch.zeros(*s, dtype=dt)

    # x, B, C, z as views of one projection, as Mamba-2 passes them
    proj = t(b, l, 2 * h * p + 2 * g * n + h)
    z, x, B, C, dt = torch.split(proj, [h * p, h * p, g * n, g * n, h], dim=-1)
    x, z, B, C = x.reshape(b, l, h, p), z.reshape(b, l, h, p), B.reshape(b, l, g, n), C.reshape(b, l, g, n)
    A, D, dt_bias = t(h, dt=torch.float32), t(h, dt=torch.float32), t(h, dt=torch.float32)
    seg = _segments(torch.zeros(b, l, dtype=torch.int32)) if packed else None
    real = st._kernels
    st._kernels = lambda: recorders
    try:
        out, final, ypre, dtp, cs, states, plan = st._forward(x, dt, A, B, C, D, z, dt_bias, t(b, h, p, n), seg,
                                                              chunk, True, (0.0, float("inf")))
        st._backward((x, dt, A, B, C, D, z, dt_bias, seg, ypre, dtp, cs, states), plan, t(b, l, h, p),
                     t(b, h, p, n, dt=torch.float32), True, (0.0, float("inf")), True)
    finally:
        st._kernels = real
    # the interpreter's bf16 work-around is off on a GPU
    return [(fn, grid, args, {**kw, "DOT_F32": False} if "DOT_F32" in kw else kw) for fn, grid, args, kw in launches]


def check(arch=90, log=print, **shape) -> list:
    rows = []
    for fn, grid, args, kwargs in record_launches(**shape):
        flags = {k: v for k, v in kwargs.items() if k.isupper() and isinstance(v, bool) and k != "DOT_F32"}
        name = fn.__name__ + "".join(f" {k}" for k, v in flags.items() if v)
        kernel = compile_launch(fn, args, kwargs, arch)
        use = resource_usage(kernel.asm["cubin"])
        # cuobjdump's SHARED is the static part; the launch asks for metadata.shared bytes
        row = dict(kernel=name, grid=tuple(grid), num_warps=kwargs.get("num_warps", 4), **use,
                   dynamic_shared=kernel.metadata.shared)
        rows.append(row)
        log(f"{name:52s} grid {str(tuple(grid)):16s} warps {row['num_warps']}  regs {use.get('reg')}  "
            f"local {use.get('local')}  stack {use.get('stack')}  shared {row['dynamic_shared']}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: H100/H200)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--nheads", type=int, default=24)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--dstate", type=int, default=128)
    p.add_argument("--ngroups", type=int, default=1)
    p.add_argument("--packed", action="store_true", help="with seq_idx (the HAS_SEQ branches)")
    a = p.parse_args(argv)
    return check(a.arch, dtype_name=a.dtype, batch=a.batch, seqlen=a.seqlen, chunk=a.chunk, nheads=a.nheads,
                 headdim=a.headdim, dstate=a.dstate, ngroups=a.ngroups, packed=a.packed)


if __name__ == "__main__":
    main()
