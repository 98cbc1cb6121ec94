#!/usr/bin/env python
"""Compile the fused decoding-step kernels (mamba_ssm/ops/triton/decode_step.py) for a GPU on a machine
without one, and print each kernel's registers, local memory (spills) and shared memory.

The launchers run on CPU tensors of a model shape with the kernels replaced by recorders; each
recorded launch is specialised as Triton's JIT would (argument types, alignment, ints equal to 1)
and compiled by Triton's bundled ptxas for the target. A compile error here is one the GPU would hit.

    python tools/check_decode_step_compile.py [--shape 1.4b] [--arch 90] [--dtype bf16] [--sass DIR]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile, do not interpret
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPES = {"tiny": (64, 16, 4), "130m": (768, 16, 48), "1.4b": (2048, 16, 128), "2.8b": (2560, 16, 160)}


class _Recorder:
    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((self.fn, grid, args, kwargs))
        return launch


def record_launches(shape="1.4b", dtype_name="bf16", batch=1, variants=False, pdl=False):
    """(fn, grid, args, kwargs) of every kernel launch of the fused paths at a shape, on CPU tensors."""
    import torch

    from mamba_ssm.ops.triton import _decode_step_kernels as K
    from mamba_ssm.ops.triton import decode_step as ds

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    d_model, d_state, dt_rank = SHAPES[shape]
    d_inner, d_conv, e = 2 * d_model, 4, dt_rank + 2 * d_state
    launches = []

    class Kernels:
        conv_xproj = _Recorder(K.conv_xproj, launches)
        ssm_update = _Recorder(K.ssm_update, launches)
        norm_in_proj = _Recorder(K.norm_in_proj, launches)
        norm_in_proj_rows = _Recorder(K.norm_in_proj_rows, launches)
        gemv = _Recorder(K.gemv, launches)
        gemm_rows = _Recorder(K.gemm_rows, launches)
        gated_rmsnorm = _Recorder(K.gated_rmsnorm, launches)

    def t(*s, dt=dtype):
        return torch.zeros(*s, dtype=dt)

    from mamba_ssm.ops.triton import selective_state_update as ssu

    real, real_pdl, real_heads, real_dot = ds._kernels, ds._pdl, ssu._heads_kernel, ds._dot_f32
    heads = _Recorder(real_heads(), launches)
    ds._kernels = lambda: Kernels
    ds._dot_f32 = ds._f32_operands  # as on a GPU (CPU tensors here)
    ssu._heads_kernel = lambda: heads
    if pdl:  # as on a Hopper GPU: programmatic dependent launch
        ds._pdl = lambda t: dict(PDL=True, launch_pdl=True)
    try:
        xz, cs, cw, cb = t(batch, 2 * d_inner), t(batch, d_inner, d_conv), t(d_inner, 1, d_conv), t(d_inner)
        xw, dtw, dtb = t(e, d_inner), t(d_inner, dt_rank), t(d_inner)
        ss, a_log, D = t(batch, d_inner, d_state, dt=torch.float32), t(d_inner, d_state, dt=torch.float32), \
            t(d_inner, dt=torch.float32)
        x, z = xz[:, :d_inner], xz[:, d_inner:]
        x_conv, parts = ds.conv_xproj(x, cs, cw, cb, xw)
        parts = torch.zeros_like(parts)
        x_conv = torch.zeros_like(x_conv)
        ds.state_from_partials(ss, parts, x_conv, z, dtw, dtb, a_log, D)
        ds.conv_xproj(x, cs, cw, cb)
        x_db = t(batch, e)
        ds.state_update(ss, x_conv, z, t(batch, d_inner), x_db[:, dt_rank:dt_rank + d_state],
                        x_db[:, dt_rank + d_state:], dtb, a_log, D)
        nw, inw = t(d_model), t(2 * d_inner, d_model)
        for rows in sorted({1, batch}):  # batch 1: one row a program; more: tiles of rows (other kernels)
            hid, res, cs_rows = t(rows, d_model), t(rows, d_model, dt=torch.float32), t(rows, d_inner, d_conv)
            ds.norm_in_proj_conv_xproj(hid, res, nw, None, 1e-5, True, True, inw, None, cs_rows, cw, cb, xw)
            ds.norm_in_proj_conv_xproj(hid, None, nw, None, 1e-5, True, True, inw, None, cs_rows, cw, cb, xw)
            ds.linear_gemv(t(rows, d_inner), t(d_model, d_inner))  # out_proj
            if variants:  # LayerNorm with biases, no conv bias; out_proj with a bias
                ds.norm_in_proj_conv_xproj(hid, t(rows, d_model), nw, t(d_model), 1e-5, False, False, inw,
                                           t(2 * d_inner), cs_rows, cw, None, xw)
                ds.linear_gemv(t(rows, d_inner), t(d_model, d_inner), t(d_model))
        # Mamba-2's step (headdim 64, ngroups 1): the state with heads, expanded per-head values, and the gated norm
        h, p = d_inner // 64, 64
        ssu.selective_state_update_heads_triton(
            t(batch, h, p, d_state * 8, dt=torch.float32), t(batch, h, p), t(batch, h)[:, :, None].expand(batch, h, p),
            t(h, dt=torch.float32)[:, None, None].expand(h, p, d_state * 8), t(batch, 1, d_state * 8),
            t(batch, 1, d_state * 8), t(h, dt=torch.float32)[:, None].expand(h, p), None,
            t(h)[:, None].expand(h, p), True)
        ds.gated_rmsnorm(t(batch, d_inner), t(batch, d_inner), t(d_inner), 1e-5, d_inner, False)
        if variants:  # the other constexpr branches: no conv bias, no D or z
            ds.conv_xproj(x, cs, cw, None, xw)
            ds.state_from_partials(ss, parts, x_conv, None, dtw, dtb, a_log, None)
    finally:
        ds._kernels, ds._pdl, ssu._heads_kernel, ds._dot_f32 = real, real_pdl, real_heads, real_dot
    return launches


def compile_launch(fn, args, kwargs, arch=90):
    """Compile one recorded launch as the JIT would specialise it; returns the CompiledKernel."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    backend = CUDABackend(target)
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "launch_pdl")}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k not in options})
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", v
            continue
        ty, attr = native_specialize_impl(CUDABackend, v, p.is_const, not p.do_not_specialize,
                                          not p.do_not_specialize_on_alignment)
        sig[p.name] = ty
        if ty == "constexpr":
            constexprs[p.name] = v
        elif attr:
            attrs[(i,)] = backend.parse_attr(attr)
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=target, options=options)


def resource_usage(cubin: bytes) -> dict:
    import triton.backends.nvidia as nv

    tool = Path(nv.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def check(shape="1.4b", arch=90, dtype="bf16", batch=1, sass_dir=None, variants=False, pdl=False, log=print) -> list:
    rows = []
    for fn, grid, args, kwargs in record_launches(shape, dtype, batch, variants, pdl):
        flags = {k: v for k, v in kwargs.items() if k.isupper() and isinstance(v, bool)}
        name = fn.__name__ + "".join(f" {k}" for k, v in flags.items() if v)
        kernel = compile_launch(fn, args, kwargs, arch)
        use = resource_usage(kernel.asm["cubin"])
        row = dict(kernel=name, grid=tuple(grid), num_warps=kwargs.get("num_warps", 4), **use)
        rows.append(row)
        log(f"{name:58s} grid {str(tuple(grid)):12s} warps {row['num_warps']}  regs {use.get('reg')}  "
            f"local {use.get('local')}  stack {use.get('stack')}  shared {use.get('shared')}")
        if sass_dir:
            import triton.backends.nvidia as nv

            Path(sass_dir).mkdir(parents=True, exist_ok=True)
            stem = re.sub(r"\W+", "_", name).strip("_")
            cubin = Path(sass_dir) / f"{stem}.cubin"
            cubin.write_bytes(kernel.asm["cubin"])
            (Path(sass_dir) / f"{stem}.ptx").write_text(kernel.asm["ptx"])
            sass = subprocess.run([str(Path(nv.__file__).parent / "bin" / "cuobjdump"), "-sass", str(cubin)],
                                  capture_output=True, text=True).stdout
            (Path(sass_dir) / f"{stem}.sass").write_text(sass)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1.4b", choices=sorted(SHAPES))
    p.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: H100/H200)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--pdl", action="store_true", help="with programmatic dependent launch, as on Hopper")
    p.add_argument("--sass", default=None, help="also write each kernel's cubin, PTX and SASS here")
    p.add_argument("--variants", action="store_true", help="also the branches Mamba-1 checkpoints do not take "
                                                           "(LayerNorm, biases, no conv bias, D or z)")
    args = p.parse_args(argv)
    return check(args.shape, args.arch, args.dtype, args.batch, args.sass, args.variants, args.pdl)


if __name__ == "__main__":
    main()
