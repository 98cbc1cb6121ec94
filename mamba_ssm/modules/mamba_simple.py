"""The Mamba mixer (selective SSM block, Gu & Dao 2023, Fig. 3).

hidden (B, L, d_model) -> in_proj -> [x, z] each (B, d_inner, L)
x -> causal depthwise conv (width d_conv) -> silu -> x_proj -> [dt (dt_rank), B (d_state), C (d_state)]
dt -> dt_proj (adds dt bias) -> softplus -> Δ;   y = selective_scan(x, Δ, A, B, C, D) * silu(z)
y -> out_proj -> (B, L, d_model)

Falcon-Mamba (b_c_dt_rms_eps set): dt, B and C are RMS-normalised (no weight) right after x_proj.

A = -exp(A_log) keeps the state's decay in (0, 1); A_log, D and dt_proj.bias are tagged
`_no_weight_decay` so optimizers can leave them out of weight decay.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_ssm.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from mamba_ssm.ops import packing
from mamba_ssm.ops import selective_scan_interface as _scan
from mamba_ssm.ops.channel_first import has_hooks, project
from mamba_ssm.ops.recompute import recompute_in_backward
from mamba_ssm.modules import fused_step
from mamba_ssm.ops.triton.selective_state_update import selective_state_update
from mamba_ssm.utils.inference_params import layer_cache


class Mamba(nn.Module):
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 use_fast_path=True, layer_idx=None, device=None, dtype=None, b_c_dt_rms_eps=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(self.expand * self.d_model)
        self.dt_rank = math.ceil(self.d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        if b_c_dt_rms_eps is not None and not (isinstance(b_c_dt_rms_eps, (int, float)) and b_c_dt_rms_eps > 0):
            raise ValueError(f"Mamba: b_c_dt_rms_eps must be None (no norms) or a positive number, "
                             f"got {b_c_dt_rms_eps!r}")
        self.b_c_dt_rms_eps = b_c_dt_rms_eps

        self.in_proj = nn.Linear(self.d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory_kwargs)
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + self.d_state * 2, bias=False, **factory_kwargs)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        # dt_proj.weight keeps dt's initial variance independent of dt_rank.
        dt_init_std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise ValueError(f"Mamba: dt_init must be 'constant' or 'random', got {dt_init!r}")
        # dt bias: softplus(bias) is log-uniform in [dt_min, dt_max]; store the inverse softplus.
        dt = torch.exp(torch.rand(self.d_inner, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True

        # S4D-real initialisation: A = -(1, 2, ..., N) for every channel, kept as log in fp32.
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True

        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)

    # The fused path passes the projection weights straight to mamba_inner_fn. It is only taken
    # when every layer is a plain nn.Linear / nn.Conv1d without hooks: wrapped ones (LoRA adapters)
    # go through `project` and hooked ones run as modules, or their updates and hooks would be lost.
    def projections_are_plain(self):
        layers = (self.in_proj, self.x_proj, self.dt_proj, self.out_proj)
        return all(type(m) is nn.Linear for m in layers) and type(self.conv1d) is nn.Conv1d \
            and not has_hooks(*layers, self.conv1d)

    def forward(self, hidden_states, inference_params=None, seq_idx=None, cu_seqlens=None):
        """hidden_states: (batch, seqlen, d_model) -> (batch, seqlen, d_model).

        Packed sequences (mamba_ssm/ops/packing.py): seq_idx (batch, seqlen) int32 or cu_seqlens
        (num_seqs + 1,) restart the conv window and the state at each sequence's start. A prefill
        with inference_params and cu_seqlens fills a cache of batch num_seqs, one row per sequence.
        """
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"Mamba: hidden_states must be (batch, seqlen, {self.d_model}), "
                             f"got {tuple(hidden_states.shape)}")
        batch, seqlen, _ = hidden_states.shape
        packed = seq_idx is not None or cu_seqlens is not None
        if packed:
            seq_idx, cu_seqlens = packing.resolve(seq_idx, cu_seqlens, batch, seqlen, hidden_states.device, "Mamba")
        conv_state, ssm_state = None, None
        if inference_params is not None:
            if packed and (cu_seqlens is None or inference_params.seqlen_offset > 0):
                raise ValueError("Mamba: a packed forward with inference_params is a prefill (seqlen_offset 0) "
                                 "and needs cu_seqlens (its cache holds one row per sequence); got "
                                 f"{'seq_idx only' if cu_seqlens is None else 'seqlen_offset > 0'}")
            cache_batch = cu_seqlens.shape[0] - 1 if packed else batch
            conv_state, ssm_state = self._get_states_from_cache(inference_params, cache_batch)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(hidden_states, conv_state, ssm_state)
                return out

        # in_proj writes xz channel-first, so x and z reach the conv and the scan without copies
        xz = project(self.in_proj, hidden_states.transpose(1, 2))       # (B, 2*d_inner, L)
        if self.use_fast_path and inference_params is None and self.projections_are_plain():
            A = -torch.exp(self.A_log.float())
            return _scan.mamba_inner_fn(xz, self.conv1d.weight, self.conv1d.bias, self.x_proj.weight,
                                  self.dt_proj.weight, self.out_proj.weight, self.out_proj.bias, A,
                                  None, None, self.D.float(), delta_bias=self.dt_proj.bias.float(),
                                  delta_softplus=True, **self._rms_kwargs(xz.device), seq_idx=seq_idx)

        # Adapters (LoRA) around the projections: each is called through `project`, which applies
        # nn.Linear and described adapters (mamba_ssm.ops.adapters) channel-first, any other module as itself.
        if conv_state is not None:
            # Keep the last d_conv inputs (left-padded with zeros) for the next step.
            x = xz[:, :self.d_inner]
            if packed:
                conv_state.copy_(self._last_inputs(x, cu_seqlens))
            else:
                conv_state.copy_(F.pad(x, (self.d_conv - x.shape[-1], 0))[..., -self.d_conv:])
            y = self._gated_scan(xz, seq_idx, cu_seqlens, ssm_state)
        else:  # training: the backward recomputes this part instead of saving it (ops/recompute.py)
            y = recompute_in_backward(self._gated_scan, xz, seq_idx)
        return project(self.out_proj, y, channels_last_out=True).transpose(1, 2)

    def _gated_scan(self, xz, seq_idx=None, cu_seqlens=None, ssm_state=None):
        """The path with adapters from xz (B, 2*d_inner, L) to out_proj's input y (B, d_inner, L);
        with ssm_state, the final states are copied into it."""
        x, z = xz.chunk(2, dim=1)
        x = self._conv(x, seq_idx)
        x_dbl = project(self.x_proj, x)                                    # (B, dt_rank + 2 N, L)
        dt = x_dbl[:, :self.dt_rank]
        B = x_dbl[:, self.dt_rank:self.dt_rank + self.d_state]
        C = x_dbl[:, self.dt_rank + self.d_state:]
        if self.b_c_dt_rms_eps is not None:
            dt, B, C = (_scan.rms_norm_channels(t, torch.ones(t.shape[1], device=t.device), self.b_c_dt_rms_eps)
                        for t in (dt, B, C))
        # the scan adds dt_proj's bias itself, in fp32, before the softplus
        dt = project(self.dt_proj, dt, bias=False)                        # (B, d_inner, L)
        A = -torch.exp(self.A_log.float())
        y = _scan.selective_scan_fn(x, dt, A, B, C, self.D.float(), z=z, delta_bias=self.dt_proj.bias.float(),
                                    delta_softplus=True, return_last_state=ssm_state is not None,
                                    seq_idx=seq_idx, cu_seqlens=cu_seqlens if ssm_state is not None else None)
        if ssm_state is not None:
            y, last_state = y
            ssm_state.copy_(last_state)
        return y

    def _rms_kwargs(self, device):
        """mamba_inner_fn's Falcon-Mamba arguments: weightless norms of B, C and dt (before dt_proj)."""
        if self.b_c_dt_rms_eps is None:
            return {}
        ones = torch.ones(self.d_state, device=device)
        return dict(b_rms_weight=ones, c_rms_weight=ones, dt_rms_weight=torch.ones(self.dt_rank, device=device),
                    b_c_dt_rms_eps=self.b_c_dt_rms_eps)

    def _dt_without_bias(self, dt):
        # The step's state update adds dt_proj's bias itself. A wrapped dt_proj (an adapter) is
        # called as a module so its update applies, and the bias taken off again.
        if type(self.dt_proj) is nn.Linear:
            return F.linear(dt, self.dt_proj.weight)
        return self.dt_proj(dt) - self.dt_proj.bias

    def _conv(self, x, seq_idx=None):
        if type(self.conv1d) is nn.Conv1d:
            return causal_conv1d_fn(x, self.conv1d.weight, self.conv1d.bias, seq_idx=seq_idx, activation=self.activation)
        if seq_idx is not None:
            raise ValueError(f"Mamba: packed sequences need conv1d to be a plain nn.Conv1d (its window restarts at "
                             f"each sequence), got {type(self.conv1d).__name__}")
        return self.act(self.conv1d(x)[..., : x.shape[-1]])

    def _last_inputs(self, x, cu_seqlens):
        """(num_seqs, d_inner, d_conv): each packed sequence's last d_conv conv inputs, zeros before its start.
        x: (1, d_inner, seqlen)."""
        cu = cu_seqlens.to(x.device, torch.int64)
        idx = cu[1:, None] - self.d_conv + torch.arange(self.d_conv, device=x.device)   # (num_seqs, d_conv)
        valid = idx >= cu[:-1, None]
        win = x[0][:, idx.clamp_min(0)] * valid.to(x.dtype)                            # (d_inner, num_seqs, d_conv)
        return win.transpose(0, 1)

    def step(self, hidden_states, conv_state, ssm_state):
        """One token. hidden_states: (batch, 1, d_model); states updated in place.

        Returns (out (batch, 1, d_model), conv_state, ssm_state).
        """
        if hidden_states.shape[1] != 1:
            raise ValueError(f"Mamba.step decodes one token at a time, got hidden_states {tuple(hidden_states.shape)}")
        # on CUDA with plain projections: the conv, x_proj and state step in 2 Triton kernels (modules/fused_step.py)
        path = fused_step.step_path(self, hidden_states)
        if path is not None:
            out = fused_step.mamba_step(self, hidden_states[:, 0], conv_state, ssm_state, path)
            if out is not None:
                return out.unsqueeze(1), conv_state, ssm_state
        xz = self.in_proj(hidden_states.squeeze(1))                # (B, 2*d_inner)
        x, z = xz.chunk(2, dim=-1)
        x = causal_conv1d_update(x, conv_state, self.conv1d.weight, self.conv1d.bias, self.activation)
        x_db = self.x_proj(x)
        dt, B, C = torch.split(x_db, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        if self.b_c_dt_rms_eps is not None:
            dt, B, C = (_scan.rms_norm_channels(t.unsqueeze(-1), torch.ones(t.shape[1], device=t.device),
                                                self.b_c_dt_rms_eps).squeeze(-1) for t in (dt, B, C))
        dt = self._dt_without_bias(dt)
        A = -torch.exp(self.A_log.float())
        y = selective_state_update(ssm_state, x, dt, A, B, C, self.D, z=z, dt_bias=self.dt_proj.bias,
                                   dt_softplus=True)
        out = self.out_proj(y)
        return out.unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype)
        ssm_dtype = self.dt_proj.weight.dtype if dtype is None else dtype
        # The recurrent state accumulates over many steps: keep it in fp32 whatever the weights are.
        ssm_state = torch.zeros(batch_size, self.d_inner, self.d_state, device=device,
                                dtype=torch.float32 if ssm_dtype in (torch.float16, torch.bfloat16) else ssm_dtype)
        return conv_state, ssm_state

    def _get_states_from_cache(self, inference_params, batch_size, initialize_states=False):
        conv_state, ssm_state = layer_cache(self, inference_params, batch_size, "hidden_states")
        if initialize_states:
            conv_state.zero_()
            ssm_state.zero_()
        return conv_state, ssm_state


from mamba_ssm.modules.block import Block  # noqa: E402,F401  (upstream 1.x exported Block from here)
