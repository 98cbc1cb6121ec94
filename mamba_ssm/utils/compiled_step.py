"""The CPU decoding step compiled with torch.compile (inductor's C++ code): `decode(..., cg=True)` on a CPU.

An eager step launches ~40 small ops per layer (norm, conv shift, softplus, exp, state update,
gate, ...); at batch 1 each costs more in dispatch than in arithmetic. Here the whole step
(embedding, every layer, final norm, LM head) is one graph of fused C++ loops behind a single guard
check per token. At batch 1 and 2 the matrix products are written as multiply + sum, so that they
too become C++ loops on every thread (torch's CPU matrix-vector product uses one): the 130m model
on 2 cores decodes ~50 tokens/s in fp32 instead of ~21 (2026-12-07); larger batches call the
library's matrix products.

The step is written as a function of plain tensors (`step_logits`: weights and states are
arguments), so it does not depend on how the model object is built, and a model of the same
shapes reuses the compiled code (in this process, and through inductor's disk cache in later ones).

Per layer, the same arithmetic as the eager Block.forward -> Mamba.step:

    hidden, residual (batch, d_model) -> add + norm -> in_proj -> [x, z] (batch, d_inner)
    x -> conv step on conv_state (batch, d_inner, d_conv) -> silu -> x_proj -> [dt, B, C]
    dt -> dt_proj + bias -> softplus;  ssm_state (batch, d_inner, d_state) <- exp(dt A) ssm_state + dt x B
    y = (ssm_state C + D x) silu(z) -> out_proj -> (batch, d_model)

Compilation can fail (no C++ compiler, an unsupported torch build): `CompiledStep.build` compiles
and runs the step once on scratch states, and if that raises it warns once and returns None, and
decoding runs the eager step (the real cache is never touched by a failed attempt). The
environment variable `MAMBA_SSM_COMPILED_STEP=0` turns the compiled step off; it is read once, when
this module is imported (`set_enabled` changes the setting afterwards).
"""
from __future__ import annotations

import os
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.ops.triton.layer_norm import RMSNorm

ENV_VAR = "MAMBA_SSM_COMPILED_STEP"


def _add_norm(hidden, residual, norm_w, norm_b, eps, is_rms, residual_in_fp32):
    """layer_norm_fn(hidden, residual=residual, prenorm=True) of the eager model: (normed, new residual)."""
    in_dtype = hidden.dtype
    if residual_in_fp32 or residual.dtype != hidden.dtype:
        residual = hidden.float() + residual.float()
    else:
        residual = hidden + residual
    r = residual.float()
    if is_rms:
        h = r * torch.rsqrt(r.pow(2).mean(dim=-1, keepdim=True) + eps)
    else:
        h = F.layer_norm(r, (r.shape[-1],), eps=eps)
    h = h * norm_w.float()
    if norm_b is not None:
        h = h + norm_b.float()
    return h.to(in_dtype), residual


# At most this many rows, a matrix product is written as multiply + sum, which inductor compiles into
# one C++ loop over the weight on every thread; torch's own matrix-vector product runs on one thread
# on the CPU (130m shape, 2 cores, fp32, 2026-12-07: the 96 layer products 18.3 ms against 28.9).
GEMV_MAX_ROWS = 2


def _linear(x, w, b=None):
    """F.linear(x, w, b) for x (batch, in): fp32 sums, the result in x's dtype."""
    if x.shape[0] > GEMV_MAX_ROWS:
        return F.linear(x, w, b)
    out = (x.float().unsqueeze(1) * w.float()).sum(-1)
    if b is not None:
        out = out + b.float()
    return out.to(x.dtype)


def layer_step(hidden, residual, conv_state, ssm_state, norm_w, norm_b, in_w, in_b, conv_w, conv_b, x_w, dt_w,
               dt_b, A, D, out_w, out_b, eps: float, is_rms: bool, residual_in_fp32: bool, dt_rank: int):
    """One Block(Mamba) step.

    hidden: (batch, d_model) the previous layer's output; residual: (batch, d_model) the residual
    stream (zeros for the first layer: adding them changes no bit). conv_state and ssm_state are
    updated in place. conv_w: (d_inner, d_conv); A = -exp(A_log): (d_inner, d_state).
    Returns (out (batch, d_model), new residual (batch, d_model)).
    """
    h, residual = _add_norm(hidden, residual, norm_w, norm_b, eps, is_rms, residual_in_fp32)
    x, z = _linear(h, in_w, in_b).chunk(2, dim=-1)
    # conv: shift the window left by one and append x; a depthwise dot product over the window
    window = torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
    conv_state.copy_(window)
    x = (window * conv_w).sum(-1)
    if conv_b is not None:
        x = x + conv_b
    x = F.silu(x)

    d_state = A.shape[1]
    x_db = _linear(x, x_w)
    dt, B, C = torch.split(x_db, [dt_rank, d_state, d_state], dim=-1)
    dt = F.softplus(_linear(dt, dt_w).float() + dt_b.float())
    xf = x.float()
    state = ssm_state.float() * torch.exp(dt.unsqueeze(-1) * A) + (dt * xf).unsqueeze(-1) * B.float().unsqueeze(1)
    ssm_state.copy_(state)
    y = (state * C.float().unsqueeze(1)).sum(-1) + xf * D.float()
    y = (y * F.silu(z.float())).to(x.dtype)
    return _linear(y, out_w, out_b), residual


def _layer_args(block):
    """The weights of one Block(Mamba) as layer_step takes them (detached: no autograd, no Parameter guards)."""
    m = block.mixer
    t = _detach
    return (t(block.norm.weight), t(block.norm.bias), t(m.in_proj.weight), t(m.in_proj.bias),
            t(m.conv1d.weight).squeeze(1), t(m.conv1d.bias), t(m.x_proj.weight), t(m.dt_proj.weight),
            t(m.dt_proj.bias), -torch.exp(m.A_log.detach().float()), t(m.D), t(m.out_proj.weight),
            t(m.out_proj.bias))


def unsupported_reason(model):
    """Why the compiled step cannot run this model (None if it can)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "layers"):
        return "the model has no backbone.layers"
    for block in backbone.layers:
        m = getattr(block, "mixer", None)
        if type(m) is not Mamba:
            return f"layer {getattr(block, 'layer_idx', '?')} is not a plain Mamba mixer"
        if getattr(block, "mlp", None) is not None:
            return "blocks with an MLP are not compiled"
        if m.b_c_dt_rms_eps is not None:
            return "Falcon-Mamba's norms of dt, B and C are not compiled"
        # Wrapped projections (LoRA adapters) must run as modules: the compiled step reads raw weights.
        if not (all(type(p) is nn.Linear for p in (m.in_proj, m.x_proj, m.dt_proj, m.out_proj))
                and type(m.conv1d) is nn.Conv1d and type(block.norm) in (nn.LayerNorm, RMSNorm)):
            return "a projection or norm is wrapped (e.g. a LoRA adapter)"
    if type(model.lm_head) is not nn.Linear:
        return "lm_head is wrapped"
    if type(backbone.norm_f) is not type(backbone.layers[0].norm):
        return "the final norm is not of the blocks' kind"
    return None


_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_setting(value):
    """The value of MAMBA_SSM_COMPILED_STEP as a bool: unset or empty -> True; 1/true/yes/on -> True;
    0/false/no/off -> False (any case); anything else is a ValueError."""
    if value is None or value.strip() == "":
        return True
    v = value.strip().lower()
    if v in _ON or v in _OFF:
        return v in _ON
    raise ValueError(f"{ENV_VAR}={value!r}: expected one of {', '.join(_ON)} (compiled CPU decoding step) "
                     f"or {', '.join(_OFF)} (eager step)")


# Read once, at import. Tests and programs change it with set_enabled (or by setting ENABLED).
ENABLED = parse_setting(os.environ.get(ENV_VAR))


def set_enabled(enabled):
    """Turn the compiled CPU step on or off for this process (True / False)."""
    global ENABLED
    if not isinstance(enabled, bool):
        raise TypeError(f"set_enabled: enabled must be True or False, got {enabled!r}")
    ENABLED = enabled


def step_logits(token, conv_states, ssm_states, layers, emb_w, norm_f_w, norm_f_b, head_w, head_b, eps: float,
                eps_f: float, is_rms: bool, residual_in_fp32: bool, dt_rank: int):
    """The whole decoding step: token (batch, 1) -> logits (batch, vocab), states updated in place.

    conv_states, ssm_states: one per layer; layers: one `_layer_args` tuple per layer.
    """
    hidden = F.embedding(token[:, 0], emb_w)
    # The first block has no residual yet; zeros of the residual's dtype add nothing.
    residual = torch.zeros(hidden.shape, dtype=torch.float32 if residual_in_fp32 else hidden.dtype)
    for conv_state, ssm_state, args in zip(conv_states, ssm_states, layers):
        hidden, residual = layer_step(hidden, residual, conv_state, ssm_state, *args, eps=eps, is_rms=is_rms,
                                      residual_in_fp32=residual_in_fp32, dt_rank=dt_rank)
    # final norm: layer_norm_fn(hidden, residual=residual, prenorm=False)
    hidden, _ = _add_norm(hidden, residual, norm_f_w, norm_f_b, eps_f, is_rms, residual_in_fp32)
    return _linear(hidden, head_w, head_b)


_compiled = None
_failed = None     # the exception that made compilation unusable in this process, if any
_warned = False
_proven = set()    # signatures (shapes, dtypes, options) that compiled and ran in this process


def _get_compiled():
    global _compiled
    if _compiled is None:
        # dynamic=False: code specialised to the shapes, no symbolic-shape guards to evaluate per call.
        # cpp_wrapper: the graph's ~170 calls (kernels, matrix products) are made from C++, not from a
        # Python wrapper (measured ~1-1.5 ms of a ~31 ms step; it doubles the first compile, ~60 s).
        _compiled = torch.compile(step_logits, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
    return _compiled


def _warn_fallback(reason):
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"mamba_ssm: compiled CPU decoding step unavailable ({reason}); decoding with the eager step",
                      RuntimeWarning, stacklevel=4)


class CompiledStep:
    """step(token (batch, 1), inference_params) -> logits (batch, vocab), the compiled step of `model`.

    Build with `CompiledStep.build(model, batch_size)`, which returns None where the eager step must
    run. compile_s: seconds the build took (compiling the first time in a process, a cache lookup after).
    """

    def __init__(self, model):
        self.model = model
        bb = model.backbone
        norm, norm_f = bb.layers[0].norm, bb.norm_f
        # Weights detached: no autograd, and plain tensors rather than Parameters as graph inputs.
        # A = -exp(A_log) is computed here once per generate call rather than in every step.
        self.layers = [_layer_args(block) for block in bb.layers]
        self.fixed = (bb.embedding.weight.detach(), norm_f.weight.detach(), _detach(norm_f.bias),
                      model.lm_head.weight.detach(), _detach(model.lm_head.bias))
        self.static = dict(eps=float(norm.eps), eps_f=float(norm_f.eps), is_rms=isinstance(norm, RMSNorm),
                           residual_in_fp32=bool(bb.residual_in_fp32), dt_rank=bb.layers[0].mixer.dt_rank)
        self.fn = None
        self.compile_s = 0.0

    @classmethod
    def build(cls, model, batch_size):
        reason = unsupported_reason(model)
        if reason is None and _failed is not None:
            reason = f"compilation failed earlier in this process: {_failed!r}"
        if reason is not None:
            _warn_fallback(reason)
            return None
        t0 = time.perf_counter()
        step = cls(model)
        step.fn = _get_compiled()
        key = step._signature(batch_size)
        if key not in _proven:
            try:
                step._trial(batch_size)
            except Exception as e:  # whatever fails in compilation, decoding itself must not
                _set_failed(e)
                _warn_fallback(repr(e))
                return None
            _proven.add(key)
        step.compile_s = time.perf_counter() - t0
        return step

    def _signature(self, batch_size):
        """What the compiled code is specialised to: a step with the same signature needs no trial."""
        def desc(t):
            return None if t is None else (tuple(t.shape), t.dtype)

        return (batch_size, len(self.layers), tuple(map(desc, self.layers[0] + self.fixed)),
                tuple(sorted(self.static.items())))

    def _trial(self, batch_size):
        """Compile (or look up) the graph by running it on scratch states: the real cache stays untouched."""
        scratch = self.model.allocate_inference_cache(batch_size, 1)
        token = torch.zeros(batch_size, 1, dtype=torch.long)
        self._run(token, scratch)

    def _run(self, token, cache):
        states = [cache[block.mixer.layer_idx] for block in self.model.backbone.layers]
        with torch.no_grad():
            return self.fn(token, [s[0] for s in states], [s[1] for s in states], self.layers, *self.fixed,
                           **self.static)

    def __call__(self, token, inference_params):
        return self._run(token, inference_params.key_value_memory_dict)


def _detach(t):
    return None if t is None else t.detach()


def _set_failed(e):
    global _failed
    _failed = e
