"""One decoding step of a Mamba layer with the work between the matrix products fused into Triton
kernels (mamba_ssm/ops/triton/decode_step.py): when it applies, which path, and the step itself.

At batch 1 a layer's eager step (Block.forward -> Mamba.step) launches ~15 kernels (add+norm,
in_proj, seven for the conv step, x_proj, dt_proj, two for A = -exp(A_log), the state update,
out_proj); in a CUDA graph each still costs ~2-3 us, while reading a 1.4b layer's weights takes
~17 us on an H100. Paths, per call (`step_path`, `block_path`):

* ``gemv`` (batch <= GEMV_MAX_BATCH), 3 kernels: `norm_in_proj_conv_xproj` (the add+norm as the
  prologue of a Triton in_proj matrix-vector product, the conv step and x_proj's partial products as
  its epilogue) | `state_from_partials` | `linear_gemv` (out_proj). Entered from Block.forward, since
  it takes the norm into the layer's step. Above batch 1 the two products run in tiles of rows that
  share each weight tile (decode_step.py; untimed, off by default: see GEMV_MAX_BATCH).
* ``partials`` (batch <= PARTIALS_MAX_BATCH), 5 kernels: add+norm (Triton) | in_proj (cuBLAS) |
  `conv_xproj` | `state_from_partials` | out_proj (cuBLAS). x_proj is split over channel blocks:
  the conv kernel writes one fp32 partial product per block (no atomics), `state_from_partials`
  sums them in a fixed order, so results do not depend on scheduling.
* ``gemm`` (larger batch), 7 kernels: as above, but `conv_xproj` only convolves, x_proj and dt_proj
  are cuBLAS products (tensor cores at large batch; the partials' re-reads grow with batch) and
  `state_update` takes dt, B, C from them.

The rule, measured on an H100 (2026-12-07, 1.4b, bf16, ms/token in a CUDA graph): batch 1 gemv 1.64
against partials 1.83; batches 2 and 4 partials 1.84 and 1.83 against gemm 2.14 and 2.20 and gemv 1.89
and 2.65; batch 16 gemm 2.19 against partials 2.70. (gemv then ended in cuBLAS's out_proj.) The gemv
path as it is now, with `linear_gemv` and programmatic dependent launch: 1.416 ms/token at batch 1
(H100, 2026-12-08, tools/device/decode_step_sweep.py); per layer about 15.8 us in_proj, 7.5 out_proj
and 4.8 the state kernel.

Mamba-2 (`mamba2_step`, from Mamba2.step): in_proj | the conv step (`conv_xproj` without x_proj) | the
state step with heads (`selective_state_update_heads_triton`) | `gated_rmsnorm` | out_proj. The eager
step launches about 45 kernels a layer (2,165 a token at 1.3b); this one about 7 (341 a token): 2.06 against
the eager step's 5.41 and upstream's 2.22 ms/token (H100, 2026-12-08, benchmarks/benchmark_decode.py).

MAMBA_SSM_FUSED_STEP (read once at import; utils/switch.py's values): on (default) the rule above; off
the eager step. Tests and
tools/device/decode_step_sweep.py set `MODE`, also to "partials" or "gemm" (one path at every batch).
Each kernel has a PyTorch reference of the same signature (`*_ref`), with the same rounding points:
x and z, x_conv, the normalised activation and y in the activation dtype, everything else
(partials, dt, B, C, the state) in fp32.

The first call of a signature (path, shapes, dtypes) runs on scratch copies of the states: if Triton
fails there (a compiler error), the step warns once and stays eager for that signature.
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_ssm.backend import requested_backend
from mamba_ssm.ops.channel_first import autocast_dtype, has_hooks
from mamba_ssm.ops.triton.decode_step import (_FLOATS, _GATED_NORM_MAX, _MAX_D_STATE, _MAX_DT_RANK,
                                              GEMV_MAX_D_MODEL, conv_xproj, gated_rmsnorm, linear_gemv,
                                              norm_in_proj_conv_xproj, state_from_partials, state_update,
                                              triton_installed)
from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as RMSNormGated
from mamba_ssm.ops.triton.layer_norm import RMSNorm
from mamba_ssm.ops.triton.selective_state_update import heads_update
from mamba_ssm.utils.switch import parse_switch

ENV_VAR = "MAMBA_SSM_FUSED_STEP"
MODES = ("0", "1")
FORCED_PATHS = ("partials", "gemm")  # MODE values for tests and sweeps, not read from the environment


def mode_from_environment(environ=os.environ) -> str:
    """MAMBA_SSM_FUSED_STEP as a MODE, "1" or "0" (`switch.parse_switch`'s values)."""
    on = parse_switch(ENV_VAR, environ.get(ENV_VAR), "the fused decoding step", "the eager step")
    return "1" if on else "0"


MODE = mode_from_environment()  # read once; tests and sweeps set this attribute
INTERPRET_ON_CPU = False  # tests: also send CPU tensors to the kernels (Triton's interpreter must be on)

PARTIALS_MAX_BATCH = 4   # above: the gemm path (the partials are re-read by every channel block of a row)
# above: in_proj by cuBLAS. Batches 2..16 can take the gemv path's tiled kernels (each weight tile read
# once for 16 rows); they are not yet timed on a GPU, so the measured paths stay the default until
# tools/device/decode_step_sweep.py --batch 4 16 --configs '{}' '{"GEMV_MAX_BATCH": 16}' decides.
GEMV_MAX_BATCH = 1


def _plain(mixer) -> bool:
    """A mixer (Mamba or Mamba2) whose projections are plain nn.Linear / nn.Conv1d without hooks."""
    check = getattr(mixer, "projections_are_plain", None)
    return callable(check) and check()


def _weights(mixer):
    names = ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")  # Mamba2 has no x_proj and dt_proj
    return tuple(getattr(mixer, n).weight for n in names if hasattr(mixer, n))


def _kernels_may_run(mixer, hidden) -> bool:
    """What every fused step needs: the mode on, CUDA (or the interpreter), one 16/32-bit token
    (batch, 1, d_model), Triton, no forced PyTorch backend, no autocast, not under torch.compile, plain
    projections with the activation's dtype and device, and no gradients wanted."""
    if MODE == "0" or not (hidden.is_cuda or INTERPRET_ON_CPU) or hidden.dtype not in _FLOATS:
        return False
    if not triton_installed() or hidden.dim() != 3 or hidden.shape[1] != 1:
        return False
    if requested_backend() == "torch" or autocast_dtype(hidden.device.type) is not None:
        return False
    if getattr(getattr(torch, "compiler", None), "is_compiling", lambda: False)():
        return False  # torch.compile traces the PyTorch step
    if not _plain(mixer):
        return False  # wrapped (LoRA) or hooked projections run as modules
    if any(w.dtype != hidden.dtype or w.device != hidden.device for w in _weights(mixer)):
        return False
    # the kernels have no backward
    return not (torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in mixer.parameters())))


def step_path(mixer, hidden):
    """'partials', 'gemm' or None (the eager step) for Mamba.step of `mixer` on hidden (batch, 1, d_model)."""
    mode = MODE
    if not _kernels_may_run(mixer, hidden):
        return None
    if getattr(mixer, "b_c_dt_rms_eps", None) is not None:
        return None  # Falcon-Mamba's norms of dt, B and C: the kernels do not have them, the eager step does
    if mixer.dt_rank > _MAX_DT_RANK or mixer.d_state > _MAX_D_STATE:
        return None
    if mode in FORCED_PATHS:
        return mode
    return "partials" if hidden.shape[0] <= PARTIALS_MAX_BATCH else "gemm"


def block_path(block, hidden, residual) -> bool:
    """Whether Block.forward's step of `block` runs as norm_in_proj_conv_xproj + state_from_partials."""
    if MODE != "1" or block.mlp is not None or hidden.shape[0] > GEMV_MAX_BATCH:
        return False
    if not hasattr(block.mixer, "x_proj"):  # not a Mamba-1 mixer (Mamba2.step has its own fused path)
        return False
    norm = block.norm

    if type(norm) not in (RMSNorm, nn.LayerNorm) or norm.weight is None or has_hooks(norm):
        return False
    if norm.weight.shape != (hidden.shape[-1],) or hidden.shape[-1] > GEMV_MAX_D_MODEL:
        return False
    if residual is not None and (residual.shape != hidden.shape or residual.dtype not in _FLOATS):
        return False
    return step_path(block.mixer, hidden) is not None


def mamba_step(mixer, hidden, conv_state, ssm_state, path):
    """Mamba.step's arithmetic on the fused path. hidden: (batch, d_model); states updated in place.
    Returns out (batch, d_model), or None when Triton failed on this signature (the caller goes eager)."""
    key = ("step", path, tuple(hidden.shape), hidden.dtype, hidden.device.type, conv_state.dtype, ssm_state.dtype,
           mixer.d_inner, mixer.d_state, mixer.dt_rank, mixer.d_conv,
           mixer.conv1d.bias is not None, mixer.in_proj.bias is not None)

    def run(conv_state, ssm_state):
        m = mixer
        xz = F.linear(hidden, m.in_proj.weight, m.in_proj.bias)          # (batch, 2 d_inner)
        x, z = xz[:, :m.d_inner], xz[:, m.d_inner:]
        if path == "partials":
            x_conv, partials = conv_xproj(x, conv_state, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight)
            y = state_from_partials(ssm_state, partials, x_conv, z, m.dt_proj.weight, m.dt_proj.bias, m.A_log, m.D)
        else:
            x_conv, _ = conv_xproj(x, conv_state, m.conv1d.weight, m.conv1d.bias)
            x_db = F.linear(x_conv, m.x_proj.weight)                      # (batch, dt_rank + 2 d_state)
            r, n = m.dt_rank, m.d_state
            dt = F.linear(x_db[:, :r], m.dt_proj.weight)                  # before the bias
            y = state_update(ssm_state, x_conv, z, dt, x_db[:, r:r + n], x_db[:, r + n:], m.dt_proj.bias,
                             m.A_log, m.D)
        return F.linear(y, m.out_proj.weight, m.out_proj.bias)

    return _checked(key, run, conv_state, ssm_state)


def block_step(block, hidden, residual, conv_state, ssm_state):
    """Block.forward's step on the gemv path. hidden, residual: (batch, d_model) (residual None for the
    first block). Returns (out, new_residual) (batch, d_model), or None as mamba_step."""
    m, norm = block.mixer, block.norm
    key = ("block", tuple(hidden.shape), hidden.dtype, hidden.device.type, None if residual is None else residual.dtype,
           type(norm).__name__, norm.bias is not None, bool(block.residual_in_fp32), conv_state.dtype, ssm_state.dtype,
           m.d_inner, m.d_state, m.dt_rank, m.d_conv, m.conv1d.bias is not None, m.in_proj.bias is not None)

    def run(conv_state, ssm_state):
        x_conv, z, partials, new_res = norm_in_proj_conv_xproj(
            hidden, residual, norm.weight, norm.bias, norm.eps, isinstance(norm, RMSNorm), block.residual_in_fp32,
            m.in_proj.weight, m.in_proj.bias, conv_state, m.conv1d.weight, m.conv1d.bias, m.x_proj.weight)
        y = state_from_partials(ssm_state, partials, x_conv, z, m.dt_proj.weight, m.dt_proj.bias, m.A_log, m.D)
        return linear_gemv(y, m.out_proj.weight, m.out_proj.bias), new_res

    return _checked(key, run, conv_state, ssm_state)


def mamba2_step_path(mixer, hidden) -> bool:
    """Whether Mamba2.step of `mixer` on hidden (batch, 1, d_model) runs as `mamba2_step`: what every
    fused step needs (`_kernels_may_run`), and the default dt_limit (the kernel does not clamp dt)."""
    return _kernels_may_run(mixer, hidden) and mixer.dt_limit == (0.0, float("inf")) \
        and mixer.activation == "silu" and mixer.d_state <= _MAX_D_STATE


def mamba2_step(mixer, hidden, conv_state, ssm_state):
    """Mamba2.step's arithmetic in 3 Triton kernels between its matrix products: the conv step
    (`conv_xproj` without x_proj), the state step with heads (`selective_state_update_heads_triton`:
    dt's bias and softplus, the D skip and, without the gated norm, the z gate) and the gated norm
    (`gated_rmsnorm`). hidden: (batch, d_model);
    conv_state (batch, conv_dim, d_conv) and ssm_state (batch, nheads, headdim, d_state) updated in place.
    Returns out (batch, d_model), or None when Triton failed on this signature (the caller goes eager)."""
    m = mixer
    norm = getattr(m, "norm", None) if m.rmsnorm else None
    key = ("mamba2", tuple(hidden.shape), hidden.dtype, hidden.device.type, conv_state.dtype, ssm_state.dtype,
           m.nheads, m.headdim, m.d_state, m.ngroups, m.d_conv, m.d_mlp, m.D_has_hdim,
           m.conv1d.bias is not None, m.in_proj.bias is not None, type(norm).__name__,
           getattr(norm, "group_size", None), getattr(norm, "norm_before_gate", None))

    def run(conv_state, ssm_state):
        b = hidden.shape[0]
        h, p, g, n, d_mlp = m.nheads, m.headdim, m.ngroups, m.d_state, m.d_mlp
        zxbcdt = F.linear(hidden, m.in_proj.weight, m.in_proj.bias)
        z0, x0, z, xBC, dt = torch.split(zxbcdt, [d_mlp, d_mlp, m.d_ssm, m.d_ssm + 2 * g * n, h], dim=-1)
        xBC, _ = conv_xproj(xBC, conv_state, m.conv1d.weight, m.conv1d.bias)
        x, B, C = torch.split(xBC, [m.d_ssm, g * n, g * n], dim=-1)
        D = m.D.view(h, p) if m.D_has_hdim else m.D[:, None].expand(h, p)
        y = heads_update(  # A = -exp(A_log) in the kernel
            ssm_state, x.view(b, h, p), dt[:, :, None].expand(b, h, p), m.A_log[:, None, None].expand(h, p, n),
            B.view(b, g, n), C.view(b, g, n), D, None if m.rmsnorm else z.view(b, h, p),
            m.dt_bias[:, None].expand(h, p), True, a_is_log=True).view(b, m.d_ssm)
        if norm is not None:
            gs = norm.group_size or m.d_ssm
            if type(norm) is RMSNormGated and not has_hooks(norm) and gs <= _GATED_NORM_MAX \
                    and norm.weight.dtype == y.dtype:
                y = gated_rmsnorm(y, z, norm.weight, norm.eps, gs, norm.norm_before_gate)
            else:
                y = norm(y, z)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return F.linear(y, m.out_proj.weight, m.out_proj.bias)

    return _checked(key, run, conv_state, ssm_state)


_proven: set = set()     # signatures whose kernels compiled and ran in this process
_failed: dict = {}       # signature -> the exception Triton raised on it


def _checked(key, run, conv_state, ssm_state):
    if key in _proven:
        return run(conv_state, ssm_state)
    if key in _failed:
        return None
    try:  # the first call of a signature compiles; on scratch states, so a failure leaves the cache as it was
        run(conv_state.clone(), ssm_state.clone())
    except Exception as e:  # noqa: BLE001  (a Triton compile or launch error: decode eagerly instead)
        _failed[key] = e
        warnings.warn(f"mamba_ssm: the fused decoding step failed for {key[:2]} ({type(e).__name__}: "
                      f"{str(e)[:300]}); this signature decodes with the eager step", RuntimeWarning, stacklevel=4)
        return None
    _proven.add(key)
    return run(conv_state, ssm_state)


def report() -> dict:
    """What ran in this process: the mode, the signatures that ran fused and those that failed."""
    return {"mode": MODE, "ran": sorted(repr(k) for k in _proven),
            "failed": {repr(k): f"{type(e).__name__}: {str(e)[:500]}" for k, e in _failed.items()}}
