"""The Triton kernels of the fused decoding step of a Mamba layer, each beside a PyTorch reference of
the same signature (`*_ref`), and their launchers. When they run is decided by
mamba_ssm/modules/fused_step.py.

* `conv_xproj`: the conv step (state shift, window dot, bias, SiLU) and, optionally, x_proj split
  over channel blocks: one fp32 partial product per block (no atomics).
* `state_from_partials`: the partials summed in a fixed order -> dt_low, B, C; dt_proj, softplus,
  the state update, D skip and z gate. `state_update`: the same from dt, B, C given by cuBLAS.
* `norm_in_proj_conv_xproj`: the residual add + norm as the prologue of a Triton in_proj
  matrix-vector product, the conv step and the x_proj partials as its epilogue.
* `linear_gemv`: F.linear at batch 1 as one matrix-vector product (out_proj; cuBLAS splits K over
  two kernels there).
* Above batch 1, `norm_in_proj_conv_xproj` and `linear_gemv` launch their tiled forms
  (`norm_in_proj_rows`, `gemm_rows`): a program takes a tile of ROWS_BLOCK_B rows (at least 16,
  tl.dot's least extent) and reads each weight tile once for all of them; the products are tl.dot
  with fp32 sums (fp32 operands for fp32 weights, and on CPU tensors, where Triton's interpreter
  multiplies bf16 tiles wrongly). The same references hold for both forms.
* `gated_rmsnorm`: Mamba-2's gated RMSNorm (layernorm_gated.rmsnorm_fn without a bias) of a step's rows.

Rounding points as in the eager step: x and z, x_conv, the normalised activation and y in the
activation dtype; everything else (partials, dt, B, C, the state) in fp32.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F


# Block sizes (channels per program). PARTIAL_CHANNELS is the x_proj split of conv_xproj and of
# norm_in_proj_conv_xproj's x programs: partials hold cdiv(d_inner, PARTIAL_CHANNELS) blocks.
PARTIAL_CHANNELS = 64
GEMV_MAX_D_MODEL = 8192  # norm_in_proj_conv_xproj's prologue holds a whole row in registers
_CONV_WARPS = 4
_XPROJ_ROWS = 256         # x_proj rows loaded at once (E <= 256, every Mamba-1 size: all, one round trip)
_STATE_CHANNELS = 64       # every program sums all of its row's partials: fewer programs, fewer re-reads
_STATE_WARPS = 4          # 1.4b, H100, 2026-12-07: 4.0 against 4.6 us a layer with 8 (decode_step_sweep.py)
_PARTIAL_TILE = 4096      # elements of one (partials, dt_rank) chunk summed at once by the state kernel
_GEMV_BLOCK_K = 256
_GEMV_WARPS = 8
# linear_gemv (out_proj of a 1.4b layer, 2048 x 4096 bf16, on an H100, 2026-12-07: 4 rows a program
# 7.6 us, 8 rows 7.9 us, 16 rows x 512: 10.5 us; cuBLAS's split-K pair: 10.0 us; decode_step_sweep.py)
_OUT_ROWS = 4
_OUT_BLOCK_K = 1024
_OUT_WARPS = 4
# batch > 1 (norm_in_proj_rows, gemm_rows): tiles of ROWS_BLOCK_B rows (at least 16, tl.dot's least
# extent) share each weight tile
ROWS_BLOCK_B = 16
_ROWS_IN_BLOCK_K = 256
_ROWS_IN_WARPS = 8
_ROWS_OUT_ROWS = 16
_ROWS_OUT_BLOCK_K = 512
_ROWS_OUT_WARPS = 8
_ROWS_STAGES = 3
_MAX_DT_RANK = 1024
_MAX_D_STATE = 256

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_empty = torch.empty  # every output and scratch buffer (tests poison them with NaN)


def _p2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _xproj_chunks(e, least=1, most=_XPROJ_ROWS):
    ec = max(min(_p2(e), most), least)
    return dict(EC=ec, N_EC=_cdiv(e, ec))


def _rows_block(batch: int) -> int:
    return max(16, min(_p2(batch), ROWS_BLOCK_B))


def _rows_block_k(block_k: int, k: int, f32: bool) -> int:
    """K tile of the tiled kernels: block_k for 16-bit operands, a quarter for fp32 (without tensor
    cores the product holds its operands in registers: more spills than the loads' bytes)."""
    return max(16, min(block_k // 4 if f32 else block_k, _p2(k)))


def _f32_operands(*tensors) -> bool:
    """Whether the tiled kernels' products take fp32 operands: unless every operand is one 16-bit dtype."""
    dtypes = {t.dtype for t in tensors}
    return len(dtypes) != 1 or dtypes.pop() not in (torch.float16, torch.bfloat16)


def _dot_f32(*tensors) -> bool:
    """_f32_operands, and always on CPU tensors: Triton's interpreter (3.9) multiplies bf16 tiles wrongly,
    and fp32 operands hold the same products exactly."""
    return _f32_operands(*tensors) or not tensors[0].is_cuda


@functools.lru_cache(maxsize=None)
def _kernels():
    """The Triton kernels, compiled on first use: importing this module never needs Triton."""
    from mamba_ssm.ops.triton import _decode_step_kernels

    return _decode_step_kernels


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.lru_cache(maxsize=None)
def _pdl_capable(device_index: int) -> bool:
    if torch.version.hip is not None:  # ROCm reports its own architecture numbers; PDL is NVIDIA's
        return False
    from triton.language.extra import cuda as triton_cuda

    return torch.cuda.get_device_capability(device_index)[0] >= 9 and hasattr(triton_cuda, "gdc_wait")


def _pdl(t) -> dict:
    """The launch arguments of programmatic dependent launch (_decode_step_kernels.py) for kernels on
    t's device: on for Hopper and later, off elsewhere (the CPU's interpreter included)."""
    on = t.is_cuda and _pdl_capable(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


# ----------------------------------------------------------------------------- conv + x_proj partials
def _check_conv(x_shape, conv_state, conv_weight, conv_bias, x_proj_weight):
    if len(x_shape) != 2:
        raise ValueError(f"x must be (batch, d_inner), got {tuple(x_shape)}")
    batch, d_inner = x_shape
    w = conv_weight.squeeze(1) if conv_weight.dim() == 3 else conv_weight
    if w.dim() != 2 or w.shape[0] != d_inner:
        raise ValueError(f"conv_weight must be ({d_inner}, d_conv) or ({d_inner}, 1, d_conv), "
                         f"got {tuple(conv_weight.shape)}")
    if conv_state.shape != (batch, d_inner, w.shape[1]):
        raise ValueError(f"conv_state must be (batch, d_inner, d_conv) = {(batch, d_inner, w.shape[1])}, "
                         f"got {tuple(conv_state.shape)}")
    if conv_bias is not None and conv_bias.shape != (d_inner,):
        raise ValueError(f"conv_bias must be ({d_inner},), got {tuple(conv_bias.shape)}")
    if x_proj_weight is not None and (x_proj_weight.dim() != 2 or x_proj_weight.shape[1] != d_inner):
        raise ValueError(f"x_proj_weight must be (dt_rank + 2 d_state, {d_inner}), got {tuple(x_proj_weight.shape)}")
    return w


def conv_xproj(x, conv_state, conv_weight, conv_bias=None, x_proj_weight=None):
    """The conv step and x_proj's partial products, one kernel.

    x: (batch, d_inner), any strides (a view of in_proj's output); conv_state: (batch, d_inner, d_conv),
    updated in place (shifted left, x appended); conv_weight: (d_inner, d_conv) or (d_inner, 1, d_conv);
    conv_bias: (d_inner,) or None; x_proj_weight: (E, d_inner) or None (conv only).
    Returns x_conv = silu(conv) (batch, d_inner) in x's dtype, and partials (batch, P, E) fp32 with
    P = cdiv(d_inner, PARTIAL_CHANNELS): partials[b, p] = x_proj_weight[:, block p] @ x_conv[b, block p]
    (None without x_proj_weight). Grid (P, batch), PARTIAL_CHANNELS channels of one row per program.
    """
    w = _check_conv(x.shape, conv_state, conv_weight, conv_bias, x_proj_weight)
    batch, d_inner = x.shape
    width = w.shape[1]
    n_blocks = _cdiv(d_inner, PARTIAL_CHANNELS)
    x_conv = _empty(batch, d_inner, device=x.device, dtype=x.dtype)
    xproj = x_proj_weight is not None
    e = x_proj_weight.shape[0] if xproj else 1
    partials = _empty(batch if xproj else 1, n_blocks, e, device=x.device, dtype=torch.float32)
    xw = x_proj_weight if xproj else w
    _kernels().conv_xproj[(n_blocks, batch)](
        x, conv_state, w, conv_bias if conv_bias is not None else w, x_conv, xw, partials,
        d_inner, e,
        x.stride(0), x.stride(1), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        w.stride(0), w.stride(1), x_conv.stride(0), x_conv.stride(1), xw.stride(0), xw.stride(1),
        partials.stride(0), partials.stride(1),
        W=width, W_P2=_p2(width), HAS_CONV_BIAS=conv_bias is not None, XPROJ=xproj,
        **_xproj_chunks(e), BLOCK_C=PARTIAL_CHANNELS, num_warps=_CONV_WARPS, **_pdl(x))
    return x_conv, (partials if xproj else None)


def conv_xproj_ref(x, conv_state, conv_weight, conv_bias=None, x_proj_weight=None):
    """conv_xproj in PyTorch (same contract, same rounding points)."""
    w = _check_conv(x.shape, conv_state, conv_weight, conv_bias, x_proj_weight)
    batch, d_inner = x.shape
    window = torch.cat([conv_state[:, :, 1:], x.to(conv_state.dtype).unsqueeze(-1)], dim=-1)
    conv_state.copy_(window)
    pre = (window.float() * w.float()).sum(-1)
    if conv_bias is not None:
        pre = pre + conv_bias.float()
    x_conv = F.silu(pre).to(x.dtype)
    if x_proj_weight is None:
        return x_conv, None
    n_blocks = _cdiv(d_inner, PARTIAL_CHANNELS)
    pad = n_blocks * PARTIAL_CHANNELS - d_inner
    xb = F.pad(x_conv.float(), (0, pad)).view(batch, n_blocks, PARTIAL_CHANNELS)
    wb = F.pad(x_proj_weight.float(), (0, pad)).view(-1, n_blocks, PARTIAL_CHANNELS)
    return x_conv, torch.einsum("bpc,epc->bpe", xb, wb)


# ------------------------------------------------------------------------------------ state update
def _check_state(ssm_state, x_conv, z, dt_proj_bias, A_log, D):
    if ssm_state.dim() != 3:
        raise ValueError(f"ssm_state must be (batch, d_inner, d_state), got {tuple(ssm_state.shape)}")
    batch, d_inner, d_state = ssm_state.shape
    for name, t in (("x_conv", x_conv), ("z", z)):
        if t is not None and t.shape != (batch, d_inner):
            raise ValueError(f"{name} must be (batch, d_inner) = {(batch, d_inner)}, got {tuple(t.shape)}")
    if A_log.shape != (d_inner, d_state):
        raise ValueError(f"A_log must be (d_inner, d_state) = {(d_inner, d_state)}, got {tuple(A_log.shape)}")
    for name, t in (("dt_proj_bias", dt_proj_bias), ("D", D)):
        if t is not None and t.shape != (d_inner,):
            raise ValueError(f"{name} must be ({d_inner},), got {tuple(t.shape)}")
    return batch, d_inner, d_state


def _launch_state(ssm_state, x_conv, z, dt_proj_bias, A_log, D, dt_proj_weight=None, partials=None,
                  dt=None, B=None, C=None):
    batch, d_inner, d_state = ssm_state.shape
    y = _empty(batch, d_inner, device=x_conv.device, dtype=x_conv.dtype)
    from_partials = partials is not None
    if from_partials:
        dt_rank, n_parts = dt_proj_weight.shape[1], partials.shape[1]
        r_p2 = _p2(dt_rank)
        npc = min(_p2(n_parts), max(1, _PARTIAL_TILE // r_p2))  # partial rows summed per unrolled chunk
        n_chunks = _cdiv(n_parts, npc)
        dtw, part, s_dtw, s_part = dt_proj_weight, partials, dt_proj_weight.stride(), partials.stride()[:2]
        dt = B = C = x_conv  # unused pointers
        s_dt = s_B = s_C = (0, 0)
        warps = _STATE_WARPS
    else:
        dt_rank, n_parts, r_p2, npc, n_chunks = 1, 1, 1, 1, 1
        dtw, part, s_dtw, s_part = x_conv, x_conv, (0, 0), (0, 0)
        s_dt, s_B, s_C = dt.stride(), B.stride(), C.stride()
        warps = 4
    zz = z if z is not None else x_conv
    grid = (_cdiv(d_inner, _STATE_CHANNELS), batch)
    _kernels().ssm_update[grid](
        ssm_state, x_conv, zz, A_log, D if D is not None else dt_proj_bias, dt_proj_bias, dtw, part, dt, B, C, y,
        d_inner, dt_rank, d_state, n_parts,
        ssm_state.stride(0), ssm_state.stride(1), ssm_state.stride(2), x_conv.stride(0), x_conv.stride(1),
        zz.stride(0), zz.stride(1), A_log.stride(0), A_log.stride(1), s_dtw[0], s_dtw[1], s_part[0], s_part[1],
        s_dt[0], s_dt[1], s_B[0], s_B[1], s_C[0], s_C[1], y.stride(0), y.stride(1),
        FROM_PARTIALS=from_partials, HAS_D=D is not None, HAS_Z=z is not None,
        R_P2=r_p2, N_P2=_p2(d_state), NPC=npc, N_CHUNKS=n_chunks, BLOCK_C=_STATE_CHANNELS, num_warps=warps,
        **_pdl(ssm_state))
    return y


def _check_partials(ssm_state, partials, dt_proj_weight):
    batch, d_inner, d_state = ssm_state.shape
    if dt_proj_weight.dim() != 2 or dt_proj_weight.shape[0] != d_inner:
        raise ValueError(f"dt_proj_weight must be ({d_inner}, dt_rank), got {tuple(dt_proj_weight.shape)}")
    e = dt_proj_weight.shape[1] + 2 * d_state
    if partials.dim() != 3 or partials.shape[0] != batch or partials.shape[2] != e or partials.dtype != torch.float32:
        raise ValueError(f"partials must be float32 (batch, n_blocks, dt_rank + 2 d_state) = ({batch}, n_blocks, {e}), "
                         f"got {partials.dtype} {tuple(partials.shape)}")
    if partials.stride(2) != 1:
        raise ValueError("partials must be contiguous in its last dimension")


def state_from_partials(ssm_state, partials, x_conv, z, dt_proj_weight, dt_proj_bias, A_log, D=None):
    """The state step from conv_xproj's partials, one kernel.

    ssm_state: (batch, d_inner, d_state), updated in place; partials: (batch, P, dt_rank + 2 d_state)
    fp32; x_conv, z: (batch, d_inner) (z may be None); dt_proj_weight: (d_inner, dt_rank);
    dt_proj_bias, D: (d_inner,) (D may be None); A_log: (d_inner, d_state).
    [dt_low, B, C] = partials summed over P; dt = softplus(dt_proj_weight @ dt_low + dt_proj_bias);
    h = exp(dt A) h + dt x_conv B with A = -exp(A_log); returns y = (C.h + D x_conv) silu(z)
    (batch, d_inner) in x_conv's dtype. Grid (cdiv(d_inner, _STATE_CHANNELS), batch).
    """
    _check_state(ssm_state, x_conv, z, dt_proj_bias, A_log, D)
    _check_partials(ssm_state, partials, dt_proj_weight)
    return _launch_state(ssm_state, x_conv, z, dt_proj_bias, A_log, D, dt_proj_weight=dt_proj_weight,
                         partials=partials)


def _state_ref(ssm_state, x_conv, z, dt, B, C, dt_proj_bias, A_log, D):
    dt = F.softplus(dt + dt_proj_bias.float())
    A = -torch.exp(A_log.float())
    x = x_conv.float()
    h = ssm_state.float() * torch.exp(dt.unsqueeze(-1) * A) + (dt * x).unsqueeze(-1) * B.unsqueeze(1)
    ssm_state.copy_(h)
    y = (h * C.unsqueeze(1)).sum(-1)
    if D is not None:
        y = y + x * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x_conv.dtype)


def state_from_partials_ref(ssm_state, partials, x_conv, z, dt_proj_weight, dt_proj_bias, A_log, D=None):
    """state_from_partials in PyTorch (same contract, same rounding points)."""
    _check_state(ssm_state, x_conv, z, dt_proj_bias, A_log, D)
    _check_partials(ssm_state, partials, dt_proj_weight)
    dt_rank, d_state = dt_proj_weight.shape[1], ssm_state.shape[2]
    total = partials.sum(1)
    dt = total[:, :dt_rank] @ dt_proj_weight.float().t()
    B, C = total[:, dt_rank:dt_rank + d_state], total[:, dt_rank + d_state:]
    return _state_ref(ssm_state, x_conv, z, dt, B, C, dt_proj_bias, A_log, D)


def _check_direct(ssm_state, dt, B, C):
    batch, d_inner, d_state = ssm_state.shape
    if dt.shape != (batch, d_inner):
        raise ValueError(f"dt must be (batch, d_inner) = {(batch, d_inner)}, got {tuple(dt.shape)}")
    for name, t in (("B", B), ("C", C)):
        if t.shape != (batch, d_state):
            raise ValueError(f"{name} must be (batch, d_state) = {(batch, d_state)}, got {tuple(t.shape)}")


def state_update(ssm_state, x_conv, z, dt, B, C, dt_proj_bias, A_log, D=None):
    """The state step from dt (before the bias), B, C (batch, d_state) computed elsewhere, one kernel;
    otherwise as state_from_partials. Any strides (B and C may be views of x_proj's output)."""
    _check_state(ssm_state, x_conv, z, dt_proj_bias, A_log, D)
    _check_direct(ssm_state, dt, B, C)
    return _launch_state(ssm_state, x_conv, z, dt_proj_bias, A_log, D, dt=dt, B=B, C=C)


def state_update_ref(ssm_state, x_conv, z, dt, B, C, dt_proj_bias, A_log, D=None):
    """state_update in PyTorch (same contract, same rounding points)."""
    _check_state(ssm_state, x_conv, z, dt_proj_bias, A_log, D)
    _check_direct(ssm_state, dt, B, C)
    return _state_ref(ssm_state, x_conv, z, dt.float(), B.float(), C.float(), dt_proj_bias, A_log, D)


# ------------------------------------------------------- add + norm + in_proj + conv + x_proj partials
def _residual_dtype(hidden, residual, residual_in_fp32):
    if residual_in_fp32 or (residual is not None and residual.dtype != hidden.dtype):
        return torch.float32
    return hidden.dtype


def _check_norm_in_proj(hidden, residual, norm_weight, norm_bias, in_proj_weight, in_proj_bias):
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (batch, d_model), got {tuple(hidden.shape)}")
    batch, d_model = hidden.shape
    if residual is not None and residual.shape != hidden.shape:
        raise ValueError(f"residual must be (batch, d_model) = {tuple(hidden.shape)}, got {tuple(residual.shape)}")
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None and t.shape != (d_model,):
            raise ValueError(f"{name} must be ({d_model},), got {tuple(t.shape)}")
    if in_proj_weight.dim() != 2 or in_proj_weight.shape[1] != d_model or in_proj_weight.shape[0] % 2:
        raise ValueError(f"in_proj_weight must be (2 d_inner, {d_model}), got {tuple(in_proj_weight.shape)}")
    if in_proj_bias is not None and in_proj_bias.shape != in_proj_weight.shape[:1]:
        raise ValueError(f"in_proj_bias must be ({in_proj_weight.shape[0]},), got {tuple(in_proj_bias.shape)}")
    if d_model > GEMV_MAX_D_MODEL:
        raise ValueError(f"hidden: d_model must be <= {GEMV_MAX_D_MODEL} (GEMV_MAX_D_MODEL), got {d_model}")
    return batch, d_model, in_proj_weight.shape[0] // 2


def norm_in_proj_conv_xproj(hidden, residual, norm_weight, norm_bias, eps, is_rms_norm, residual_in_fp32,
                            in_proj_weight, in_proj_bias, conv_state, conv_weight, conv_bias, x_proj_weight):
    """Add + norm, in_proj, the conv step and x_proj's partials, one kernel.

    hidden: (batch, d_model); residual: (batch, d_model) or None; norm_weight, norm_bias: (d_model,)
    (bias None for RMSNorm); in_proj_weight: (2 d_inner, d_model); in_proj_bias: (2 d_inner,) or None;
    conv_* and x_proj_weight as conv_xproj. As layer_norm_fn(hidden, norm_weight, norm_bias,
    residual=residual, prenorm=True, residual_in_fp32=..., eps=..., is_rms_norm=...) -> h, then
    [x, z] = in_proj(h), then conv_xproj(x, ...). Returns (x_conv, z, partials, new_residual).
    Grid (batch, 2 cdiv(d_inner, PARTIAL_CHANNELS)): x's row blocks, then z's; above batch 1
    (norm_in_proj_rows) (2 cdiv(d_inner, PARTIAL_CHANNELS), row tiles).
    """
    batch, d_model, d_inner = _check_norm_in_proj(hidden, residual, norm_weight, norm_bias, in_proj_weight,
                                                  in_proj_bias)
    w = _check_conv((batch, d_inner), conv_state, conv_weight, conv_bias, x_proj_weight)
    if hidden.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
        raise ValueError("hidden and residual must be contiguous in their last dimension")
    width = w.shape[1]
    e = x_proj_weight.shape[0]
    n_xblk = _cdiv(d_inner, PARTIAL_CHANNELS)
    dev = hidden.device
    new_res = _empty(batch, d_model, device=dev, dtype=_residual_dtype(hidden, residual, residual_in_fp32))
    x_conv = _empty(batch, d_inner, device=dev, dtype=hidden.dtype)
    z = _empty(batch, d_inner, device=dev, dtype=hidden.dtype)
    partials = _empty(batch, n_xblk, e, device=dev, dtype=torch.float32)
    res = residual if residual is not None else hidden
    if batch > 1:
        bb, f32 = _rows_block(batch), _dot_f32(hidden, in_proj_weight, x_proj_weight)
        _kernels().norm_in_proj_rows[(2 * n_xblk, _cdiv(batch, bb))](
            hidden, res, new_res, norm_weight, norm_bias if norm_bias is not None else norm_weight, in_proj_weight,
            in_proj_bias if in_proj_bias is not None else norm_weight, z,
            conv_state, w, conv_bias if conv_bias is not None else w, x_conv, x_proj_weight, partials,
            batch, d_model, d_inner, e, n_xblk, float(eps),
            hidden.stride(0), res.stride(0), new_res.stride(0), in_proj_weight.stride(0), in_proj_weight.stride(1),
            z.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), w.stride(0), w.stride(1),
            x_conv.stride(0), x_proj_weight.stride(0), x_proj_weight.stride(1), partials.stride(0),
            partials.stride(1),
            HAS_RES=residual is not None, IS_RMS=bool(is_rms_norm), HAS_NORM_BIAS=norm_bias is not None,
            HAS_IN_BIAS=in_proj_bias is not None, HAS_CONV_BIAS=conv_bias is not None, W=width, W_P2=_p2(width),
            **_xproj_chunks(e, least=16, most=32 if f32 else _XPROJ_ROWS), DOT_F32=f32,
            BLOCK_N=PARTIAL_CHANNELS, BLOCK_K=_rows_block_k(_ROWS_IN_BLOCK_K, d_model, f32), BLOCK_B=bb,
            num_warps=_ROWS_IN_WARPS, num_stages=_ROWS_STAGES, **_pdl(hidden))
        return x_conv, z, partials, new_res
    _kernels().norm_in_proj[(batch, 2 * n_xblk)](
        hidden, res, new_res, norm_weight, norm_bias if norm_bias is not None else norm_weight, in_proj_weight,
        in_proj_bias if in_proj_bias is not None else norm_weight, z,
        conv_state, w, conv_bias if conv_bias is not None else w, x_conv, x_proj_weight, partials,
        d_model, d_inner, e, n_xblk, float(eps),
        hidden.stride(0), res.stride(0), new_res.stride(0), in_proj_weight.stride(0), in_proj_weight.stride(1),
        z.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), w.stride(0), w.stride(1),
        x_conv.stride(0), x_proj_weight.stride(0), x_proj_weight.stride(1), partials.stride(0), partials.stride(1),
        HAS_RES=residual is not None, IS_RMS=bool(is_rms_norm), HAS_NORM_BIAS=norm_bias is not None,
        HAS_IN_BIAS=in_proj_bias is not None, HAS_CONV_BIAS=conv_bias is not None, W=width, W_P2=_p2(width),
        **_xproj_chunks(e), D_P2=_p2(d_model), BLOCK_N=PARTIAL_CHANNELS, BLOCK_K=min(_GEMV_BLOCK_K, _p2(d_model)),
        num_warps=_GEMV_WARPS, **_pdl(hidden))
    return x_conv, z, partials, new_res


def norm_in_proj_conv_xproj_ref(hidden, residual, norm_weight, norm_bias, eps, is_rms_norm, residual_in_fp32,
                                in_proj_weight, in_proj_bias, conv_state, conv_weight, conv_bias, x_proj_weight):
    """norm_in_proj_conv_xproj in PyTorch (same contract, same rounding points)."""
    _, _, d_inner = _check_norm_in_proj(hidden, residual, norm_weight, norm_bias, in_proj_weight, in_proj_bias)
    s = hidden.float() if residual is None else hidden.float() + residual.float()
    new_res = s.to(_residual_dtype(hidden, residual, residual_in_fp32))
    s = new_res.float()
    if is_rms_norm:
        h = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)
    else:
        h = F.layer_norm(s, s.shape[-1:], eps=eps)
    h = h * norm_weight.float()
    if norm_bias is not None:
        h = h + norm_bias.float()
    h = h.to(hidden.dtype).float()
    xz = h @ in_proj_weight.float().t()
    if in_proj_bias is not None:
        xz = xz + in_proj_bias.float()
    xz = xz.to(hidden.dtype)
    x, z = xz[:, :d_inner], xz[:, d_inner:]
    x_conv, partials = conv_xproj_ref(x, conv_state, conv_weight, conv_bias, x_proj_weight)
    return x_conv, z.contiguous(), partials, new_res


# ------------------------------------------------------------------------------ matrix-vector product
def _check_gemv(x, weight, bias):
    if x.dim() != 2:
        raise ValueError(f"x must be (batch, in_features), got {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be (out_features, {x.shape[1]}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")


def linear_gemv(x, weight, bias=None):
    """F.linear(x, weight, bias) for a few rows, one kernel: x (batch, K), weight (N, K), bias (N,) or None
    -> (batch, N) in x's dtype, fp32 sums. Grid (cdiv(N, _OUT_ROWS), batch) at batch 1; above,
    gemm_rows: (cdiv(N, _ROWS_OUT_ROWS), row tiles), each weight tile read once per tile of rows."""
    _check_gemv(x, weight, bias)
    batch, k = x.shape
    n = weight.shape[0]
    out = _empty(batch, n, device=x.device, dtype=x.dtype)
    if batch > 1:
        bb, f32 = _rows_block(batch), _dot_f32(x, weight)
        _kernels().gemm_rows[(_cdiv(n, _ROWS_OUT_ROWS), _cdiv(batch, bb))](
            x, weight, bias if bias is not None else weight, out, batch, n, k,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
            HAS_BIAS=bias is not None, DOT_F32=f32, BLOCK_N=_ROWS_OUT_ROWS,
            BLOCK_K=_rows_block_k(_ROWS_OUT_BLOCK_K, k, f32), BLOCK_B=bb, num_warps=_ROWS_OUT_WARPS,
            num_stages=_ROWS_STAGES, **_pdl(x))
        return out
    _kernels().gemv[(_cdiv(n, _OUT_ROWS), batch)](
        x, weight, bias if bias is not None else weight, out, n, k,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_N=_OUT_ROWS, BLOCK_K=min(_OUT_BLOCK_K, _p2(k)),
        num_warps=_OUT_WARPS, **_pdl(x))
    return out


def linear_gemv_ref(x, weight, bias=None):
    """linear_gemv in PyTorch (same contract: fp32 sums, one rounding to x's dtype)."""
    _check_gemv(x, weight, bias)
    out = x.float() @ weight.float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- Mamba-2's gated norm
_GATED_NORM_MAX = 16384  # group_size in registers


def _check_gated(x, z, weight, group_size):
    if x.dim() != 2 or z is None or z.shape != x.shape:
        raise ValueError(f"x and z must be (batch, hidden) of one shape, got {tuple(x.shape)} and "
                         f"{None if z is None else tuple(z.shape)}")
    if weight.shape != x.shape[1:]:
        raise ValueError(f"weight must be ({x.shape[1]},), got {tuple(weight.shape)}")
    if group_size <= 0 or x.shape[1] % group_size or group_size > _GATED_NORM_MAX:
        raise ValueError(f"group_size must divide hidden = {x.shape[1]} and be <= {_GATED_NORM_MAX}, got {group_size}")
    if x.stride(1) != 1 or z.stride(1) != 1:
        raise ValueError("x and z must be contiguous in their last dimension")


def gated_rmsnorm(x, z, weight, eps, group_size, norm_before_gate):
    """rmsnorm_fn(x, weight, None, z, eps, group_size, norm_before_gate) for a step's rows, one kernel:
    x, z (batch, hidden) (rows may be strided), weight (hidden,) -> (batch, hidden) in x's dtype.
    Grid (hidden / group_size, batch)."""
    _check_gated(x, z, weight, group_size)
    batch, hidden = x.shape
    out = _empty(batch, hidden, device=x.device, dtype=x.dtype)
    gs_p2 = _p2(group_size)
    _kernels().gated_rmsnorm[(hidden // group_size, batch)](
        x, z, weight, out, group_size, float(eps), x.stride(0), z.stride(0), out.stride(0),
        NORM_BEFORE_GATE=bool(norm_before_gate), GS_P2=gs_p2, num_warps=min(16, max(1, gs_p2 // 256)))
    return out


def gated_rmsnorm_ref(x, z, weight, eps, group_size, norm_before_gate):
    """gated_rmsnorm in PyTorch (same contract): layernorm_gated.rmsnorm_fn."""
    from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn

    _check_gated(x, z, weight, group_size)
    return rmsnorm_fn(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)
