"""The selective scan (S6) of Mamba and the fused Mamba inner block, on the chosen backend
(upstream's module: `selective_scan_fn`, `mamba_inner_fn` and their references).

Shapes and the recurrence: `selective_scan_ref` (ops/selective_scan_ref.py).
"""
from __future__ import annotations

import torch

from mamba_ssm.backend import ENV_VAR, choose_backend, requested_backend, warn_fallback_once
from mamba_ssm.ops import packing, recompute
from mamba_ssm.ops.causal_conv1d import causal_conv1d_fn
from mamba_ssm.ops.channel_first import channel_first_linear
from mamba_ssm.ops.selective_scan_chunked import selective_scan_chunked
from mamba_ssm.ops.selective_scan_ref import _shape, check_selective_scan_inputs, selective_scan_ref

__all__ = ["selective_scan_fn", "selective_scan_ref", "mamba_inner_fn", "mamba_inner_ref",
           "check_selective_scan_inputs"]


def selective_scan_fn(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                      return_last_state=False, seq_idx=None, cu_seqlens=None):
    """Selective scan on the fastest available backend (see mamba_ssm.backend).

    Same signature, shapes and results as `selective_scan_ref`; differentiable in every tensor input.
    The ``torch`` backend (any device) is the chunked scan of `selective_scan_chunked`, with a
    hand-written backward; the ``cuda`` backend our kernels (`selective_scan_cuda`). Packed
    sequences: seq_idx / cu_seqlens (mamba_ssm/ops/packing.py), on both.
    """
    check_selective_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    seq_idx, cu_seqlens = packing.resolve(seq_idx, cu_seqlens, u.shape[0], u.shape[2], u.device)
    backend = choose_backend("selective_scan", u.is_cuda)
    lacking = backend == "cuda" and ("complex A" if A.is_complex() else next(
        (f"time-invariant {n} (dim, dstate)" for n, t in (("B", B), ("C", C)) if t.dim() == 2), None))
    if lacking:  # a form the CUDA kernel does not have: refused when forced, else the PyTorch path
        if requested_backend() == "cuda":
            raise NotImplementedError(
                f"selective_scan_fn: {lacking} is not supported by this package's CUDA kernel, which "
                f"{ENV_VAR}/set_backend forces; run the call on the PyTorch path: "
                "`with mamba_ssm.backend.use_backend('torch'):` (or MAMBA_SSM_BACKEND=torch)")
        warn_fallback_once(f"selective_scan: {lacking}",
                           f"mamba_ssm: selective_scan_fn with {lacking} runs on the PyTorch path on CUDA (correct, "
                           "slower): this package's CUDA kernel does not have that form")
    elif backend == "cuda":
        from mamba_ssm.ops.selective_scan_cuda import _selective_scan_cuda

        return _selective_scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                    seq_idx, cu_seqlens)
    if A.is_complex():  # the reference loop is the one complex implementation (autograd for the backward)
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  seq_idx=seq_idx, cu_seqlens=cu_seqlens)
    # time-invariant B / C: the grouped form with one group per channel (a broadcast view, no copy)
    B, C = (t.unsqueeze(0).unsqueeze(-1).expand(u.shape[0], *t.shape, u.shape[-1]) if t.dim() == 2 else t
            for t in (B, C))
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  seq_idx=seq_idx, cu_seqlens=cu_seqlens)


def _check_inner_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                        out_proj_bias, A, B, C, B_proj_bias, C_proj_bias):
    """Shape checks of mamba_inner_fn / mamba_inner_ref; returns (conv weight as (dim, width), dt_rank, dstate)."""
    def err(msg):
        raise ValueError("mamba_inner_fn: " + msg)

    for name, t in (("xz", xz), ("conv1d_weight", conv1d_weight), ("x_proj_weight", x_proj_weight),
                    ("delta_proj_weight", delta_proj_weight), ("out_proj_weight", out_proj_weight), ("A", A)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"mamba_inner_fn: {name} must be a torch.Tensor, got {type(t).__name__}")
    if xz.dim() != 3 or xz.shape[1] % 2 != 0:
        err(f"xz must be (batch, 2*dim, seqlen), got {_shape(xz)}")
    dim = xz.shape[1] // 2
    w = conv1d_weight
    if w.dim() == 3:
        if w.shape[1] != 1:
            err(f"conv1d_weight must be (dim, 1, width) or (dim, width), got {_shape(w)}")
        w = w[:, 0]
    if w.dim() != 2 or w.shape[0] != dim:
        err(f"conv1d_weight must be (dim, 1, width) or (dim, width) with dim = {dim}, got {_shape(conv1d_weight)}")
    if conv1d_bias is not None and tuple(conv1d_bias.shape) != (dim,):
        err(f"conv1d_bias must be (dim,) = ({dim},), got {_shape(conv1d_bias)}")
    if A.dim() != 2 or A.shape[0] != dim:
        err(f"A must be (dim, dstate) with dim = {dim}, got {_shape(A)}")
    # x_proj's B and C columns: dstate reals each, or (re, im) pairs of complex A's dstate states
    dstate = A.shape[1] * (2 if A.is_complex() else 1)
    if delta_proj_weight.dim() != 2 or delta_proj_weight.shape[0] != dim:
        err(f"delta_proj_weight must be (dim, dt_rank) with dim = {dim}, got {_shape(delta_proj_weight)}")
    dt_rank = delta_proj_weight.shape[1]
    # rows: dt, then B's dstate (when projected), then C's (the last dstate); with one of B / C given,
    # upstream's test keeps only the projected one's rows, a Mamba layer's x_proj has both
    projected = (B is None) + (C is None)
    rows = x_proj_weight.shape[0] if x_proj_weight.dim() == 2 else -1
    allowed = {0: rows >= dt_rank, 1: rows in (dt_rank + dstate, dt_rank + 2 * dstate),
               2: rows == dt_rank + 2 * dstate}[projected]
    if x_proj_weight.dim() != 2 or x_proj_weight.shape[1] != dim or not allowed:
        want = {0: f"at least dt_rank = {dt_rank} rows (B and C are given)",
                1: f"dt_rank + dstate or dt_rank + 2*dstate = {dt_rank} + {dstate} or {dt_rank} + 2*{dstate} rows",
                2: f"dt_rank + 2*dstate = {dt_rank} + 2*{dstate} rows"}[projected]
        err(f"x_proj_weight must be (rows, dim) with dim = {dim} and {want}"
            f"{' (complex A: dstate counts 2 reals per state)' if A.is_complex() else ''}, "
            f"got {_shape(x_proj_weight)}")
    if out_proj_weight.dim() != 2 or out_proj_weight.shape[1] != dim:
        err(f"out_proj_weight must be (d_model, dim) with dim = {dim}, got {_shape(out_proj_weight)}")
    if out_proj_bias is not None and tuple(out_proj_bias.shape) != (out_proj_weight.shape[0],):
        err(f"out_proj_bias must be (d_model,) = ({out_proj_weight.shape[0]},), got {_shape(out_proj_bias)}")
    for name, bias in (("B_proj_bias", B_proj_bias), ("C_proj_bias", C_proj_bias)):
        if bias is not None and tuple(bias.shape) != (dstate,):
            err(f"{name} must be (dstate,) = ({dstate},), got {_shape(bias)}")
    return w, dt_rank, dstate


def rms_norm_channels(t, weight, eps):
    """RMS norm over the channels of a channel-first t (batch, n, seqlen): t / sqrt(mean_n(t^2) + eps) * weight,
    in float32, returned in t's dtype. weight: (n,)."""
    tf = t.float()
    out = tf * torch.rsqrt(tf.pow(2).mean(dim=1, keepdim=True) + eps) * weight.float().unsqueeze(-1)
    return out.to(t.dtype)


def _check_rms_weights(b_rms_weight, c_rms_weight, dt_rms_weight, dim, dt_rank, dstate, B, C):
    """Falcon-Mamba's norms: which of B / C / dt they apply to; dt's is 'before' or 'after' dt_proj."""
    for name, wt, given in (("b_rms_weight", b_rms_weight, B), ("c_rms_weight", c_rms_weight, C)):
        if wt is None:
            continue
        if given is not None:
            raise ValueError(f"mamba_inner_fn: {name} normalises the projected {name[0].upper()}; it cannot be "
                             f"given with {name[0].upper()} as an argument")
        if tuple(wt.shape) != (dstate,):
            raise ValueError(f"mamba_inner_fn: {name} must be (dstate,) = ({dstate},), got {_shape(wt)}")
    if dt_rms_weight is None:
        return None
    if tuple(dt_rms_weight.shape) == (dt_rank,):
        return "before"
    if tuple(dt_rms_weight.shape) == (dim,):
        return "after"
    raise ValueError(f"mamba_inner_fn: dt_rms_weight must be (dt_rank,) = ({dt_rank},) (dt normalised after "
                     f"x_proj) or (dim,) = ({dim},) (upstream's: delta normalised after dt_proj), "
                     f"got {_shape(dt_rms_weight)}")


def _interleave_pairs(X):
    """x_proj's B or C of complex A, (batch, 2*dstate, seqlen) with columns (re, im) per state ->
    (batch, dstate, 2*seqlen) with (re, im) interleaved along time, as the scan takes them."""
    b, n2, L = X.shape
    return X.reshape(b, n2 // 2, 2, L).transpose(2, 3).reshape(b, n2 // 2, 2 * L)


def _mamba_inner(scan, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                 out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus, checkpoint_lvl,
                 b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None, b_c_dt_rms_eps=1e-6, seq_idx=None,
                 cu_seqlens=None):
    if checkpoint_lvl not in (0, 1):
        raise ValueError(f"mamba_inner_fn: checkpoint_lvl must be 0 or 1, got {checkpoint_lvl!r}")
    _, dt_rank, dstate = _check_inner_inputs(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                                             out_proj_weight, out_proj_bias, A, B, C, B_proj_bias, C_proj_bias)
    dt_norm = _check_rms_weights(b_rms_weight, c_rms_weight, dt_rms_weight, xz.shape[1] // 2, dt_rank, dstate,
                                 B, C)
    if A.is_complex() and (b_rms_weight is not None or c_rms_weight is not None):
        raise ValueError("mamba_inner_fn: b_rms_weight / c_rms_weight (Falcon-Mamba's norms) are for real A; "
                         f"got complex A ({A.dtype})")
    seq_idx, cu_seqlens = packing.resolve(seq_idx, cu_seqlens, xz.shape[0], xz.shape[2], xz.device,
                                          "mamba_inner_fn")

    def gated_scan(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C, D, delta_bias,
                   B_proj_bias, C_proj_bias, b_rms_weight, c_rms_weight, dt_rms_weight):
        w = conv1d_weight[:, 0] if conv1d_weight.dim() == 3 else conv1d_weight     # (dim, width)
        return _inner_scan(scan, xz, w, conv1d_bias, x_proj_weight,
                           delta_proj_weight, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus,
                           dt_rank, dstate, dt_norm, b_rms_weight, c_rms_weight, dt_rms_weight, b_c_dt_rms_eps,
                           seq_idx)

    args = (xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C, D, delta_bias, B_proj_bias,
            C_proj_bias, b_rms_weight, c_rms_weight, dt_rms_weight)
    y = recompute.recompute_in_backward(gated_scan, *args) if checkpoint_lvl == 1 else gated_scan(*args)
    return channel_first_linear(y, out_proj_weight, out_proj_bias, channels_last_out=True).transpose(1, 2)


def _inner_scan(scan, xz, w, conv1d_bias, x_proj_weight, delta_proj_weight, A, B, C, D, delta_bias, B_proj_bias,
                C_proj_bias, delta_softplus, dt_rank, dstate, dt_norm, b_rms_weight, c_rms_weight, dt_rms_weight,
                b_c_dt_rms_eps, seq_idx):
    """mamba_inner_fn up to out_proj: the gated scan output y (batch, dim, seqlen)."""
    x, z = xz.chunk(2, dim=1)
    x = causal_conv1d_fn(x, w, conv1d_bias, seq_idx=seq_idx, activation="silu")  # (batch, dim, seqlen)
    # the projections read and write channel-first tensors: no transposing copies (channel_first.py)
    x_dbl = channel_first_linear(x, x_proj_weight)                           # (batch, dt_rank + 2*dstate, seqlen)
    dt = x_dbl[:, :dt_rank]
    if dt_norm == "before":
        dt = rms_norm_channels(dt, dt_rms_weight, b_c_dt_rms_eps)
    delta = channel_first_linear(dt, delta_proj_weight)                      # (batch, dim, seqlen)
    if dt_norm == "after":
        delta = rms_norm_channels(delta, dt_rms_weight, b_c_dt_rms_eps)
    if B is None:
        B = x_dbl[:, dt_rank:dt_rank + dstate]
        if B_proj_bias is not None:
            B = B + B_proj_bias.to(B.dtype).unsqueeze(-1)
        if b_rms_weight is not None:
            B = rms_norm_channels(B, b_rms_weight, b_c_dt_rms_eps)
        if A.is_complex():
            B = _interleave_pairs(B)
    if C is None:
        C = x_dbl[:, x_dbl.shape[1] - dstate:]
        if C_proj_bias is not None:
            C = C + C_proj_bias.to(C.dtype).unsqueeze(-1)
        if c_rms_weight is not None:
            C = rms_norm_channels(C, c_rms_weight, b_c_dt_rms_eps)
        if A.is_complex():
            C = _interleave_pairs(C)
    return scan(x, delta, A, B, C, D, z, delta_bias, delta_softplus, seq_idx=seq_idx)


def mamba_inner_fn(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                   out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                   delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                   b_c_dt_rms_eps=1e-6, seq_idx=None, cu_seqlens=None):
    """The Mamba block between in_proj and the output: conv1d + SiLU, x_proj, dt_proj, selective scan
    gated by z, out_proj. xz: (batch, 2*dim, seqlen) (in_proj's output); returns (batch, seqlen, d_model).

    conv1d_weight: (dim, 1, width) or (dim, width); x_proj_weight: (dt_rank + 2*dstate, dim);
    delta_proj_weight: (dim, dt_rank) (its bias is ``delta_bias``, added inside the scan);
    out_proj_weight: (d_model, dim). B / C given as arguments replace the projected ones.
    ``checkpoint_lvl`` 1 (the default, as upstream's) saves only xz and out_proj's input for the
    backward, which recomputes the conv output, delta and the scan (mamba_ssm/ops/recompute.py;
    MAMBA_SSM_RECOMPUTE=0 turns that off everywhere); 0 saves them all: a faster backward for more
    memory. Packed sequences: seq_idx / cu_seqlens
    (mamba_ssm/ops/packing.py) reset the conv window and the scan's state where a sequence starts.

    Falcon-Mamba's RMS norms (eps b_c_dt_rms_eps; each None = no norm): b_rms_weight and c_rms_weight
    (dstate,) normalise the projected B and C over dstate. dt_rms_weight (dt_rank,) normalises dt after
    x_proj, before dt_proj: Falcon-Mamba as transformers (5.x), llama.cpp and mlx-lm compute it.
    dt_rms_weight (dim,) normalises delta after dt_proj (before its bias), which is what upstream's
    mamba_inner_fn does with it (transformers 4.x's CUDA path passed ones of that size).
    """
    return _mamba_inner(selective_scan_fn, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                        out_proj_weight, out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias,
                        delta_softplus, checkpoint_lvl, b_rms_weight, c_rms_weight, dt_rms_weight, b_c_dt_rms_eps,
                        seq_idx, cu_seqlens)


def mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, out_proj_weight,
                    out_proj_bias, A, B=None, C=None, D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None,
                    delta_softplus=True, checkpoint_lvl=1, b_rms_weight=None, c_rms_weight=None, dt_rms_weight=None,
                    b_c_dt_rms_eps=1e-6, seq_idx=None, cu_seqlens=None):
    """Reference of `mamba_inner_fn` (same signature), built on `selective_scan_ref`."""
    return _mamba_inner(selective_scan_ref, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                        out_proj_weight, out_proj_bias, A, B, C, D, delta_bias, B_proj_bias, C_proj_bias,
                        delta_softplus, checkpoint_lvl, b_rms_weight, c_rms_weight, dt_rms_weight, b_c_dt_rms_eps,
                        seq_idx, cu_seqlens)
