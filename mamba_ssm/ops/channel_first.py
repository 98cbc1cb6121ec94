"""Linear layers applied to channel-first activations, without transposing copies.

The selective scan and the causal conv work on (batch, channels, seqlen) tensors; the
projections around them (in_proj, x_proj, dt_proj, out_proj) are nn.Linear layers, which
work on (..., channels). Calling them on a transposed view makes PyTorch copy the whole
activation (a linear on a 3-dim input folds it into a matrix), and a LoRA adapter wrapped
around the layer copies it once more for its own matmul; each copy has a twin in the
backward. On an H200 these copies took 30% of a LoRA training step of the 1.4b shape.

Here a projection is a batched matrix product that reads either memory order directly
(cuBLAS takes a transposed operand for free) and writes the order its consumer wants:

    x: (batch, in, seqlen), any strides with stride(1) == 1 or stride(2) == 1
    out = weight @ x[b] (+ bias), logical shape (batch, out, seqlen), stored
          channel-first  (batch, out, seqlen) contiguous, or
          channels-last  (batch, seqlen, out) contiguous (a transposed view is returned)

`project(module, x, ...)` does this for an nn.Linear and for a low-rank adapter around one
(base + scaling * B(A(dropout(x)))) that a resolver registered in `mamba_ssm.ops.adapters`
describes; any other module, and any module with hooks, is called as itself on the transposed
view (with a one-time warning), so every adapter and hook keeps working, if more slowly.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from mamba_ssm.ops.adapters import describe_adapter

# The weight gradient sums a product per batch row: as one bmm plus a sum when the
# (batch, out, in) intermediate is small, else one matmul per row.
_BMM_GRAD_LIMIT_BYTES = 256 * 2**20


def _bmm_ready(t):
    """t (batch, m, n) as cuBLAS/BLAS can read it without a copy (one of the last strides 1)."""
    return t if (t.stride(-1) == 1 or t.stride(-2) == 1) else t.contiguous()


def _weight_grad(g, x, dtype, alpha=1.0):
    """alpha * sum over batch rows of g[b] @ x[b].T, as `dtype`. g: (batch, out, L); x: (batch, in, L).

    Rows are summed in fp32 at least (one GEMM over all rows, as F.linear does, would round once).
    """
    batch, out_f, in_f = g.shape[0], g.shape[1], x.shape[1]
    acc = torch.promote_types(g.dtype, torch.float32)
    if batch * out_f * in_f * g.element_size() <= _BMM_GRAD_LIMIT_BYTES:
        gw = torch.bmm(g, x.transpose(1, 2)).sum(0, dtype=acc)
    else:
        gw = torch.mm(g[0], x[0].t()).to(acc)
        for b in range(1, batch):
            gw += torch.mm(g[b], x[b].t())
    if alpha != 1.0:
        gw.mul_(alpha)
    return gw.to(dtype)


def _bmm_into(out_t, w, x, channels_last_out, alpha=1.0, beta=0.0):
    """w @ x[b] per row, written (beta=0) or added (beta=1) into out_t by cuBLAS itself.

    out_t: (batch, out, L) logical; stored channels-last when `channels_last_out`. w: (batch, out, k)."""
    if channels_last_out:  # (out^T)[b] = x[b]^T w^T, into the contiguous (batch, L, out) storage
        out_t.transpose(1, 2).baddbmm_(x.transpose(1, 2), w.transpose(1, 2), beta=beta, alpha=alpha)
    else:
        out_t.baddbmm_(w, x, beta=beta, alpha=alpha)


class _ChannelFirstLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, channels_last_out):
        x = _bmm_ready(x)
        w = weight.unsqueeze(0).expand(x.shape[0], -1, -1)       # (batch, out, in), no copy
        if channels_last_out:
            out = torch.bmm(x.transpose(1, 2), w.transpose(1, 2))  # (batch, seqlen, out)
            if bias is not None:
                out.add_(bias)
            out = out.transpose(1, 2)
        else:
            out = torch.bmm(w, x)                                  # (batch, out, seqlen)
            if bias is not None:
                out.add_(bias.unsqueeze(-1))
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g = _bmm_ready(g)
        gx = gw = gb = None
        batch = x.shape[0]
        if ctx.needs_input_grad[0]:
            wt = weight.t().unsqueeze(0).expand(batch, -1, -1)    # (batch, in, out)
            if x.stride(1) == 1 and x.stride(2) != 1:             # x stored channels-last: same for its grad
                gx = torch.bmm(g.transpose(1, 2), wt.transpose(1, 2)).transpose(1, 2)
            else:
                gx = torch.bmm(wt, g)
        if ctx.needs_input_grad[1]:
            gw = _weight_grad(g, x, weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(dim=(0, 2))
        return gx, gw, gb, None


class _ChannelFirstLoRA(torch.autograd.Function):
    """out = W x + bias + scaling * B (A x) in two GEMMs that write the same output (the second
    accumulates through cuBLAS's beta), and a backward that sums the base and adapter input
    gradients the same way. In PEFT's LoRA the separate add of the update, its scaling multiply in
    the backward, and the sum of the two input gradients each moved a whole activation (about 7%
    of a 1.4b LoRA step on an H200). With dropout_p > 0 the adapter reads dropout(x), as in PEFT,
    and its part of the input gradient goes back through the same mask."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, channels_last_out, dropout_p=0.0):
        # the adapter matrices may be fp32 masters under autocast: cast here, and hand their
        # gradients back summed in fp32 (no bf16 rounding, no cast nodes for autograd to run)
        ctx.adapter_dtypes = (lora_a.dtype, lora_b.dtype)
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        x = _bmm_ready(x)
        batch, seqlen = x.shape[0], x.shape[2]
        expand = lambda w: w.unsqueeze(0).expand(batch, -1, -1)  # noqa: E731
        xa, mask = x, None
        if dropout_p > 0.0 and x.is_cuda:
            xa, mask = torch.native_dropout(x, dropout_p, True)          # one kernel; a bool mask
            xa = _bmm_ready(xa)
        elif dropout_p > 0.0:  # on a CPU native_dropout casts 16-bit inputs to fp32 and back
            mask = torch.empty_like(x).bernoulli_(1.0 - dropout_p).div_(1.0 - dropout_p)  # scale folded in
            xa = _bmm_ready(x * mask)
        h = torch.bmm(expand(lora_a), xa)                                # (batch, r, seqlen)
        out_f = weight.shape[0]
        if channels_last_out:
            out = torch.empty(batch, seqlen, out_f, device=x.device, dtype=x.dtype).transpose(1, 2)
        else:
            out = torch.empty(batch, out_f, seqlen, device=x.device, dtype=x.dtype)
        if bias is not None:  # the base GEMM then adds onto the broadcast bias
            out.copy_(bias.view(1, -1, 1).expand_as(out))
        _bmm_into(out, expand(weight), x, channels_last_out, beta=0.0 if bias is None else 1.0)
        _bmm_into(out, expand(lora_b), h, channels_last_out, alpha=scaling, beta=1.0)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h, xa if mask is not None else None, mask)
        ctx.scaling, ctx.has_bias, ctx.dropout_p = scaling, bias is not None, dropout_p
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, lora_a, lora_b, h, xa, mask = ctx.saved_tensors
        xa = x if xa is None else xa
        s = ctx.scaling
        g = _bmm_ready(g)
        batch = x.shape[0]
        expand_t = lambda w: w.t().unsqueeze(0).expand(batch, -1, -1)  # noqa: E731
        gh = torch.bmm(expand_t(lora_b), g).mul_(s)                      # (batch, r, seqlen), small
        gx = gw = gb = ga = gbl = None
        if ctx.needs_input_grad[0]:
            x_channels_last = x.stride(1) == 1 and x.stride(2) != 1
            if x_channels_last:  # same order as x
                gx = torch.empty(batch, x.shape[2], x.shape[1], device=g.device, dtype=g.dtype).transpose(1, 2)
            else:
                gx = torch.empty(x.shape, device=g.device, dtype=g.dtype)
            _bmm_into(gx, expand_t(weight), g, x_channels_last)
            if mask is None:
                _bmm_into(gx, expand_t(lora_a), gh, x_channels_last, beta=1.0)
            else:
                gxa = torch.bmm(expand_t(lora_a), gh)
                if mask.dtype == torch.bool:
                    gxa = torch.ops.aten.native_dropout_backward(gxa, mask, 1.0 / (1.0 - ctx.dropout_p))
                else:
                    gxa.mul_(mask)
                gx.add_(gxa)
        if ctx.needs_input_grad[1]:
            gw = _weight_grad(g, x, weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(dim=(0, 2))
        if ctx.needs_input_grad[3]:
            ga = _weight_grad(gh, xa, ctx.adapter_dtypes[0])
        if ctx.needs_input_grad[4]:
            gbl = _weight_grad(g, h, ctx.adapter_dtypes[1], alpha=s)
        return gx, gw, gb, ga, gbl, None, None, None


def autocast_dtype(device_type):
    """The dtype autocast computes in on this device type, or None when autocast is off."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except TypeError:  # torch < 2.4: per-device functions
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        return None


def cast_for_autocast(dtype, *tensors):
    """The tensors as autocast would hand them to a matmul-like op computing in `dtype`: floating
    tensors other than float64 cast, the rest (and None) unchanged."""
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def channel_first_linear(x, weight, bias=None, channels_last_out=False):
    """weight @ x per batch row (+ bias). x: (batch, in, seqlen); weight: (out, in); bias: (out,).

    Returns (batch, out, seqlen); stored channels-last (a transposed view of a contiguous
    (batch, seqlen, out) tensor) when `channels_last_out`. Honours autocast like F.linear.
    """
    if x.dim() != 3 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"channel_first_linear: x must be (batch, {weight.shape[-1]}, seqlen) for a weight of shape "
                         f"{tuple(weight.shape)}, got x {tuple(x.shape)}")
    dt = autocast_dtype(x.device.type)
    if dt is not None:
        x, weight, bias = cast_for_autocast(dt, x, weight, bias)
    elif weight.dtype != x.dtype:
        raise TypeError(f"channel_first_linear: x is {x.dtype} but weight is {weight.dtype} (outside autocast)")
    if bias is not None:
        bias = bias.to(weight.dtype)
    return _ChannelFirstLinear.apply(x, weight, bias, channels_last_out)


def _dropout_p(dropout):
    """The probability a LoRA's dropout zeroes an input now (0 for Identity or eval mode), or None
    for a module that is not plain dropout."""
    if isinstance(dropout, nn.Identity):
        return 0.0
    if type(dropout) is nn.Dropout:
        if not dropout.training:
            return 0.0
        return float(dropout.p) if dropout.p < 1.0 else None  # p = 1: PEFT's path (all zeros, no 1/(1-p))
    return None


def has_hooks(*modules) -> bool:
    """A forward or backward hook on one of these modules, or a global one (activation capture,
    PEFT's per-request adapters): the module must then run itself, or its hooks would be skipped."""
    import torch.nn.modules.module as mm

    if any(getattr(mm, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                 "_global_backward_hooks", "_global_backward_pre_hooks")):
        return True
    return any(getattr(m, name, None) for m in modules
               for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


_warned_types: set = set()
_NO_RESOLVER = "no registered resolver describes it"


def _run_as_module(module, x, bias, reason):
    """The general path: `module` called on the transposed view (a copy for the matmul), once-per-type warning."""
    key = (type(module).__qualname__, reason)
    if key not in _warned_types:
        _warned_types.add(key)
        advice = ("; a resolver registered with mamba_ssm.ops.adapters.register_adapter_resolver puts an adapter "
                  "on the channel-first path (`import mambakit` registers PEFT's LoRA)"
                  if reason == _NO_RESOLVER else "")
        warnings.warn(f"mamba_ssm: a projection of type {type(module).__module__}.{type(module).__qualname__} runs as "
                      f"a module on a transposed copy of its input ({reason}): correct, but slower{advice}",
                      RuntimeWarning, stacklevel=3)
    out = module(x.transpose(1, 2))
    if not bias and getattr(module, "bias", None) is not None:
        out = out - module.bias
    return out.transpose(1, 2)


def _fp32_masters(dtypes, update) -> bool:
    """A 16-bit base with fp32 adapter matrices (PEFT's default, which upcasts adapters): computed
    as under autocast, the products in the base's dtype and the adapters' gradients summed in fp32,
    instead of PEFT's fp32 copy of every activation. The update then differs from PEFT's by the
    rounding of A, B and A x to 16 bits, below the rounding of the 16-bit output it is added to."""
    return (len(dtypes) == 1 and next(iter(dtypes)) in (torch.bfloat16, torch.float16)
            and update.a.weight.dtype == update.b.weight.dtype == torch.float32)


def project(module, x, channels_last_out=False, bias=True):
    """`module` (nn.Linear, or an adapter around one that `mamba_ssm.ops.adapters` describes)
    applied over the channels of x (batch, in, seqlen).

    Returns (batch, out, seqlen), stored as `channel_first_linear` says. bias=False leaves the
    base layer's bias out (dt_proj: the scan adds it in fp32). Any other module, or one with hooks,
    runs as itself (with a one-time warning naming its type), so that its own forward and hooks apply.
    """
    if type(module) is nn.Linear:
        if has_hooks(module):
            return _run_as_module(module, x, bias, "it has hooks")
        return channel_first_linear(x, module.weight, module.bias if bias else None, channels_last_out)
    adapted = describe_adapter(module)
    if adapted is None:
        return _run_as_module(module, x, bias, _NO_RESOLVER)
    if has_hooks(module, *adapted.modules()):
        return _run_as_module(module, x, bias, "it has hooks")
    base, updates = adapted.base, adapted.updates
    autocast = autocast_dtype(x.device.type)
    p_drop = _dropout_p(updates[0].dropout) if len(updates) == 1 else None
    if p_drop is not None and updates[0].b.bias is None:
        u = updates[0]
        args = (x, base.weight, base.bias if bias else None)
        if autocast is not None:  # the adapter matrices are cast inside (see _ChannelFirstLoRA)
            args = cast_for_autocast(autocast, *args)
        dtypes = {t.dtype for t in args if t is not None}
        if autocast is None and not _fp32_masters(dtypes, u):
            dtypes |= {u.a.weight.dtype, u.b.weight.dtype}
        if len(dtypes) == 1:  # else as PEFT: outside autocast an adapter computes in its own dtype
            return _ChannelFirstLoRA.apply(*args, u.a.weight, u.b.weight, float(u.scaling), channels_last_out, p_drop)
    out = channel_first_linear(x, base.weight, base.bias if bias else None, channels_last_out)
    for u in updates:
        xa = u.dropout(x)
        if autocast is None:
            xa = xa.to(u.a.weight.dtype)  # as PEFT does: the adapter computes in its own dtype
        h = channel_first_linear(xa, u.a.weight)                     # (batch, r, seqlen)
        upd = channel_first_linear(h, u.b.weight, u.b.bias, channels_last_out)
        out = torch.add(out, upd.to(out.dtype), alpha=u.scaling)
    return out
