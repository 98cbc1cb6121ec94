"""The CPU decoding step compiled with torch.compile (inductor's C++ code): `decode(..., cg=True)` on a CPU.

An eager step launches ~40 small ops per layer (norm, conv shift, softplus, exp, state update,
gate, ...); at batch 1 each costs more in dispatch than in arithmetic. Here the whole step
(embedding, every layer, final norm, LM head) is one graph of fused C++ loops behind a single guard
check per token. At batch 1 and 2 the matrix products are written as multiply + sum, so that they
too become C++ loops on every thread (torch's CPU matrix-vector product uses one): the 130m model
on 2 cores decodes ~50 tokens/s in fp32 instead of ~21 (2026-12-07; Mamba-2's 130m shape: ~44
instead of ~16, one run on a loaded machine); larger batches call the library's matrix products.

The step is written as a function of plain tensors (`step_logits`: weights and states are
arguments), so it does not depend on how the model object is built, and a model of the same
shapes reuses the compiled code (in this process, and through inductor's disk cache in later ones).
A model's layers are all Block(Mamba) or all Block(Mamba2) (no MLP, no attention, no wrapped
projections: `unsupported_reason`); `step_logits` picks the layer function when it is traced.

Per layer, the same arithmetic as the eager Block.forward -> Mamba.step (`layer_step`):

    hidden, residual (batch, d_model) -> add + norm -> in_proj -> [x, z] (batch, d_inner)
    x -> conv step on conv_state (batch, d_inner, d_conv) -> silu -> x_proj -> [dt, B, C]
    dt -> dt_proj + bias -> softplus;  ssm_state (batch, d_inner, d_state) <- exp(dt A) ssm_state + dt x B
    y = (ssm_state C + D x) silu(z) -> out_proj -> (batch, d_model)

or Block.forward -> Mamba2.step (`mamba2_layer_step`), with heads of headdim channels in ngroups
groups (head i reads the B and C of group i // (nheads / ngroups)):

    hidden, residual -> add + norm -> in_proj -> [z0, x0 (d_mlp each), z (d_ssm), xBC, dt (nheads)]
    xBC -> conv step on conv_state (batch, d_ssm + 2 ngroups d_state, d_conv) -> silu -> [x, B, C]
    dt -> + dt_bias -> softplus -> clamp to dt_limit
    ssm_state (batch, nheads, headdim, d_state) <- exp(dt A) ssm_state + dt x B   (A, dt: one per head)
    y = ssm_state C + D x -> gated RMSNorm with z over ngroups groups (or y silu(z))
    [silu(z0) x0, y] -> out_proj -> (batch, d_model)

Compilation can fail (no C++ compiler, an unsupported torch build): `CompiledStep.build` compiles
and runs the step once on scratch states, and if that raises it warns once and returns None, and
decoding runs the eager step (the real cache is never touched by a failed attempt). The
environment variable `MAMBA_SSM_COMPILED_STEP=0` turns the compiled step off; it is read once, when
this module is imported (`set_enabled` changes the setting afterwards).

`MAMBA_SSM_COMPILED_STEP_WEIGHTS=f16` (or `bf16`; `set_weights` in code) runs an fp32 model's step at
batch 1-2 on 16-bit copies of its matrices (in_proj, x_proj, dt_proj, out_proj, embedding, LM head),
all arithmetic still fp32: batch-1 decoding reads the weights once a token, and reads half the bytes
(130m shape, 2 cores, batch 1: 11.8 ms a step against 19.1 in fp32, load 1.1-2.7; benchmark_cpu_model.py,
one run, load 0.9-2.0: 68.0 tokens/s against 42.6, llama.cpp's f16 70.2; all 64 greedy tokens of random
weights equal fp32's, with bf16 copies too).
"""
from __future__ import annotations

import os
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakTensorKeyDictionary

from mamba_ssm.modules.mamba2 import Mamba2
from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.modules.mha import MHA
from mamba_ssm.ops.ssd_chunked import process_dt
from mamba_ssm.ops.triton.layer_norm import RMSNorm
from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as RMSNormGated, rmsnorm_fn
from mamba_ssm.utils.switch import check_bool, parse_switch

ENV_VAR = "MAMBA_SSM_COMPILED_STEP"
WEIGHTS_ENV_VAR = "MAMBA_SSM_COMPILED_STEP_WEIGHTS"


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


def _conv_step(x, conv_state, conv_w, conv_b):
    """causal_conv1d_update without the activation: shift the window (batch, dim, d_conv) left by one,
    append x (batch, dim), a depthwise dot product over the window (conv_w (dim, d_conv))."""
    window = torch.cat([conv_state[:, :, 1:], x.unsqueeze(-1).to(conv_state.dtype)], dim=-1)
    conv_state.copy_(window)
    out = (window * conv_w).sum(-1)
    return out if conv_b is None else out + conv_b


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
    x = F.silu(_conv_step(x, conv_state, conv_w, conv_b))

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


def mamba2_layer_step(hidden, residual, conv_state, ssm_state, norm_w, norm_b, in_w, in_b, conv_w, conv_b,
                      dt_bias, A, D, gate_w, out_w, out_b, eps: float, is_rms: bool, residual_in_fp32: bool,
                      ngroups: int, dt_limit: tuple, norm_before_gate: bool, gate_eps: float):
    """One Block(Mamba2) step.

    conv_state (batch, d_ssm + 2 ngroups d_state, d_conv) and ssm_state (batch, nheads, headdim,
    d_state) are updated in place. A = -exp(A_log): (nheads,); D: (nheads,) or, D_has_hdim,
    (nheads * headdim,); gate_w: the gated RMSNorm's weight (d_ssm,), None without rmsnorm (then
    y silu(z)). The sizes come from the tensors: d_inner from out_w, d_mlp = d_inner - d_ssm.
    Returns (out (batch, d_model), new residual (batch, d_model)).
    """
    h, residual = _add_norm(hidden, residual, norm_w, norm_b, eps, is_rms, residual_in_fp32)
    dtype, b = h.dtype, h.shape[0]
    nheads, headdim, d_state = ssm_state.shape[1:]
    g, d_ssm = ngroups, nheads * headdim
    d_mlp = out_w.shape[1] - d_ssm
    z0, x0, z, xBC, dt = torch.split(_linear(h, in_w, in_b), [d_mlp, d_mlp, d_ssm, conv_state.shape[1], nheads],
                                     dim=-1)
    xBC = F.silu(_conv_step(xBC, conv_state, conv_w, conv_b))
    x, B, C = torch.split(xBC, [d_ssm, g * d_state, g * d_state], dim=-1)

    # the state update in float32 (float64 for a float64 state), heads grouped as (g, nheads / g)
    f = torch.float64 if ssm_state.dtype == torch.float64 else torch.float32
    dt = process_dt(dt, dt_bias, True, dt_limit, f)                                 # (batch, nheads)
    xf = x.to(f).view(b, g, nheads // g, headdim)
    decay = torch.exp(dt * A.to(f)).view(b, g, nheads // g, 1, 1)
    state = (ssm_state.to(f).view(b, g, nheads // g, headdim, d_state) * decay
             + (xf * dt.view(b, g, nheads // g, 1)).unsqueeze(-1) * B.to(f).view(b, g, 1, 1, d_state))
    ssm_state.copy_(state.view(ssm_state.shape))
    y = (state * C.to(f).view(b, g, 1, 1, d_state)).sum(-1)                        # (b, g, nheads / g, headdim)
    y = (y + xf * D.to(f).view(g, nheads // g, -1)).reshape(b, d_ssm)              # D: per head or per channel

    if gate_w is None:
        y = (y * F.silu(z.to(f))).to(dtype)
    else:
        y = rmsnorm_fn(y.to(dtype), gate_w, None, z=z, eps=gate_eps, group_size=d_ssm // g,
                       norm_before_gate=norm_before_gate)
    if d_mlp > 0:
        y = torch.cat([F.silu(z0) * x0, y], dim=-1)
    return _linear(y, out_w, out_b), residual


def _layer_args(block, matrix=None):
    """The weights of one block as its layer function (layer_step or mamba2_layer_step) takes them
    (detached: no autograd, no Parameter guards). A = -exp(A_log) is computed here, once per build.
    matrix: what the projections' weights become (default: detached; `_weight_copy` for 16-bit copies)."""
    m = block.mixer
    t = _detach
    mat = matrix or t
    head = (t(block.norm.weight), t(block.norm.bias), mat(m.in_proj.weight), t(m.in_proj.bias),
            t(m.conv1d.weight).squeeze(1), t(m.conv1d.bias))
    tail = (mat(m.out_proj.weight), t(m.out_proj.bias))
    if type(m) is Mamba2:
        f = torch.float64 if m.A_log.dtype == torch.float64 else torch.float32  # Mamba2.step's A
        return head + (t(m.dt_bias), -torch.exp(m.A_log.detach().to(f)), t(m.D),
                       t(m.norm.weight) if m.rmsnorm else None) + tail
    return head + (mat(m.x_proj.weight), mat(m.dt_proj.weight), t(m.dt_proj.bias),
                   -torch.exp(m.A_log.detach().float()), t(m.D)) + tail


def _mixer_options(mixer):
    """The layer function's options past the block's (eps, is_rms, residual_in_fp32), as (name, value) pairs."""
    if type(mixer) is Mamba2:
        return (("ngroups", mixer.ngroups), ("dt_limit", tuple(float(v) for v in mixer.dt_limit)),
                ("norm_before_gate", bool(mixer.norm_before_gate)),
                ("gate_eps", float(mixer.norm.eps) if mixer.rmsnorm else 0.0))
    return (("dt_rank", mixer.dt_rank),)


def unsupported_reason(model):
    """Why the compiled step cannot run this model (None if it can)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None or not hasattr(backbone, "layers"):
        return "the model has no backbone.layers"
    for block in backbone.layers:
        m = getattr(block, "mixer", None)
        if isinstance(m, MHA):
            return f"layer {getattr(block, 'layer_idx', '?')} is an attention layer (MHA), which is not compiled"
        if type(m) not in (Mamba, Mamba2):
            return f"layer {getattr(block, 'layer_idx', '?')} is not a plain Mamba or Mamba2 mixer"
        if getattr(block, "mlp", None) is not None:
            return "blocks with an MLP are not compiled"
        if type(m) is Mamba and m.b_c_dt_rms_eps is not None:
            return "Falcon-Mamba's norms of dt, B and C are not compiled"
        # Wrapped projections (LoRA adapters) must run as modules: the compiled step reads raw weights.
        linears = (m.in_proj, m.out_proj) + ((m.x_proj, m.dt_proj) if type(m) is Mamba else ())
        gate_norm_ok = type(m) is Mamba or not m.rmsnorm or type(m.norm) is RMSNormGated
        if not (all(type(p) is nn.Linear for p in linears) and type(m.conv1d) is nn.Conv1d
                and type(block.norm) in (nn.LayerNorm, RMSNorm) and gate_norm_ok):
            return "a projection or norm is wrapped (e.g. a LoRA adapter)"
    # one layer function, with one set of options, for every layer (MambaConfig builds no other model)
    if len({(type(b.mixer), _mixer_options(b.mixer)) for b in backbone.layers}) > 1:
        return "the layers mix Mamba and Mamba2 mixers, or mixers of different options"
    if type(model.lm_head) is not nn.Linear:
        return "lm_head is wrapped"
    if type(backbone.norm_f) is not type(backbone.layers[0].norm):
        return "the final norm is not of the blocks' kind"
    return None


def parse_setting(value):
    """The value of MAMBA_SSM_COMPILED_STEP as a bool (`switch.parse_switch`)."""
    return parse_switch(ENV_VAR, value, "compiled CPU decoding step", "eager step")


# Read once, at import. Tests and programs change it with set_enabled (or by setting ENABLED).
ENABLED = parse_setting(os.environ.get(ENV_VAR))


def set_enabled(enabled):
    """Turn the compiled CPU step on or off for this process (True / False)."""
    global ENABLED
    ENABLED = check_bool("set_enabled", enabled)


# MAMBA_SSM_COMPILED_STEP_WEIGHTS: the weights the compiled step reads, by name -> the copies' dtype.
WEIGHT_DTYPES = {"model": None, "f16": torch.float16, "bf16": torch.bfloat16}


def parse_weights(value):
    """The value of MAMBA_SSM_COMPILED_STEP_WEIGHTS: unset or empty -> "model"; model/f16/bf16 (any case);
    anything else is a ValueError."""
    if value is None or value.strip() == "":
        return "model"
    v = value.strip().lower()
    if v in WEIGHT_DTYPES:
        return v
    raise ValueError(f"{WEIGHTS_ENV_VAR}={value!r}: expected one of model (the model's own weights), "
                     f"f16 or bf16 (16-bit copies of an fp32 model's matrices in the compiled step)")


# Read once, at import. set_weights changes it afterwards.
WEIGHTS = parse_weights(os.environ.get(WEIGHTS_ENV_VAR))


def set_weights(weights):
    """The compiled step's weights for this process: "model", "f16" or "bf16" (MAMBA_SSM_COMPILED_STEP_WEIGHTS)."""
    global WEIGHTS
    if not isinstance(weights, str):
        raise TypeError(f"set_weights: weights must be one of {', '.join(WEIGHT_DTYPES)}, got {weights!r}")
    if weights.strip().lower() not in WEIGHT_DTYPES:
        raise ValueError(f"set_weights: weights must be one of {', '.join(WEIGHT_DTYPES)}, got {weights!r}")
    WEIGHTS = weights.strip().lower()


# The 16-bit copies, one per weight tensor (the Parameter, weakly: a copy goes with its weight), with the
# weight's version counter, data pointer and the copy's dtype: an in-place change of the weight (an
# optimizer step, load_state_dict, `p.data = ...`) or another dtype makes a new copy at the next build
# and drops the old. A change through `p.data.copy_(...)` moves no version counter of p's and is not
# seen: clear_weight_copies() after one. Kept across generate calls: converting the 130m model's
# matrices takes ~0.1-0.3 s (2 cores), a fifth of a 64-token generate at 85 tokens/s.
_copies = WeakTensorKeyDictionary()


def _weight_copy(weight, dtype):
    key = (weight._version, weight.data_ptr(), dtype)
    hit = _copies.get(weight)
    if hit is not None and hit[0] == key:
        return hit[1]
    _copies.pop(weight, None)  # the stale copy goes before the new one is made
    copy = weight.detach().to(dtype)
    _copies[weight] = (key, copy)
    return copy


def clear_weight_copies():
    """Drop every 16-bit copy of a weight kept for the compiled step (the next build makes them anew)."""
    _copies.clear()


def _copy_dtype(model, batch_size):
    """The dtype of the compiled step's weight copies for this model and batch size, None for its own weights:
    copies only with the setting on, of an fp32 model's matrices, at batch <= GEMV_MAX_ROWS. Larger batches
    call F.linear with the model's own fp32 weights (at batch 4, 130m shape: converting 16-bit copies in
    each step made the matrix products ~1.5x slower, 103 ms against 68, eager)."""
    dtype = WEIGHT_DTYPES[WEIGHTS]
    if dtype is None or batch_size is None or batch_size > GEMV_MAX_ROWS:
        return None
    if any(w.dtype != torch.float32 for w in _matrices(model)):
        return None
    return dtype


def _matrices(model):
    """The weights the 16-bit setting copies: the projections, the embedding and the LM head."""
    out = [model.backbone.embedding.weight, model.lm_head.weight]
    for block in model.backbone.layers:
        m = block.mixer
        out += [m.in_proj.weight, m.out_proj.weight]
        if type(m) is Mamba:
            out += [m.x_proj.weight, m.dt_proj.weight]
    return out


def step_logits(token, conv_states, ssm_states, layers, emb_w, norm_f_w, norm_f_b, head_w, head_b, eps: float,
                eps_f: float, is_rms: bool, residual_in_fp32: bool, mamba2: bool, mixer_options: tuple,
                hidden_dtype: torch.dtype | None = None):
    """The whole decoding step: token (batch, 1) -> logits (batch, vocab), states updated in place.

    conv_states, ssm_states: one per layer; layers: one `_layer_args` tuple per layer; mamba2 picks
    the layer function (when the graph is traced), mixer_options: its `_mixer_options`.
    """
    step = mamba2_layer_step if mamba2 else layer_step
    options = dict(mixer_options)
    hidden = F.embedding(token[:, 0], emb_w)
    if hidden_dtype is not None:  # 16-bit copies of an fp32 model's weights: the activations stay fp32
        hidden = hidden.to(hidden_dtype)
    # The first block has no residual yet; zeros of the residual's dtype add nothing.
    residual = torch.zeros(hidden.shape, dtype=torch.float32 if residual_in_fp32 else hidden.dtype)
    for conv_state, ssm_state, args in zip(conv_states, ssm_states, layers):
        hidden, residual = step(hidden, residual, conv_state, ssm_state, *args, eps=eps, is_rms=is_rms,
                                residual_in_fp32=residual_in_fp32, **options)
    # final norm: layer_norm_fn(hidden, residual=residual, prenorm=False)
    hidden, _ = _add_norm(hidden, residual, norm_f_w, norm_f_b, eps_f, is_rms, residual_in_fp32)
    return _linear(hidden, head_w, head_b)


# Each signature (shapes, batch size, dtypes, options) compiled in a process adds an entry to dynamo's
# cache of step_logits; past dynamo's recompile limit (8) a fullgraph compile raises, and the compiled
# step would then be off for the rest of the process (measured: the 3rd model with the limit at 2).
# Calls of step_logits run with this limit instead; dynamo's setting elsewhere is left alone.
MAX_SIGNATURES = 64

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
    weights: "model", or "f16" / "bf16" where the step reads 16-bit copies of the matrices (the setting
    WEIGHTS, for an fp32 model at batch <= GEMV_MAX_ROWS: `_copy_dtype`).
    """

    def __init__(self, model, batch_size=None):
        self.model = model
        bb = model.backbone
        norm, norm_f = bb.layers[0].norm, bb.norm_f
        # Weights detached: no autograd, and plain tensors rather than Parameters as graph inputs.
        # A = -exp(A_log) is computed here once per generate call rather than in every step.
        dtype = _copy_dtype(model, batch_size)
        mat = _detach if dtype is None else (lambda w: _weight_copy(w, dtype))
        self.weights = "model" if dtype is None else WEIGHTS
        self.layers = [_layer_args(block, mat) for block in bb.layers]
        mixer = bb.layers[0].mixer
        self.fixed = (mat(bb.embedding.weight), norm_f.weight.detach(), _detach(norm_f.bias),
                      mat(model.lm_head.weight), _detach(model.lm_head.bias))
        self.static = dict(eps=float(norm.eps), eps_f=float(norm_f.eps), is_rms=isinstance(norm, RMSNorm),
                           residual_in_fp32=bool(bb.residual_in_fp32), mamba2=type(mixer) is Mamba2,
                           mixer_options=_mixer_options(mixer))
        if dtype is not None:  # the embedding's 16-bit rows become fp32 activations (the default graph is unchanged)
            self.static["hidden_dtype"] = torch.float32
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
        step = cls(model, batch_size)
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
        with torch.no_grad(), _signature_limit():
            return self.fn(token, [s[0] for s in states], [s[1] for s in states], self.layers, *self.fixed,
                           **self.static)

    def __call__(self, token, inference_params):
        return self._run(token, inference_params.key_value_memory_dict)


def _signature_limit():
    """dynamo's recompile limit at MAX_SIGNATURES, for one call."""
    import torch._dynamo  # imported by torch.compile already; not at this module's import (~1 s)

    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6
    return config.patch(**{key: MAX_SIGNATURES})


def _detach(t):
    return None if t is None else t.detach()


def _set_failed(e):
    global _failed
    _failed = e
