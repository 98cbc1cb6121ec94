"""The Mamba-2 mixer (SSD layer, Dao & Gu 2024), as upstream mamba_ssm 2.x has it.

u (b, l, d_model) -> in_proj -> [z0, x0 (d_mlp each, only when d_ssm < d_inner), z (d_ssm), xBC, dt (nheads)]
xBC (d_ssm + 2 ngroups d_state) -> causal depthwise conv -> silu -> [x (nheads, headdim), B, C (ngroups, d_state)]
y = SSD(x, dt + dt_bias -> softplus -> clamp(dt_limit), A = -exp(A_log), B, C, D)
y -> gated RMSNorm with z over ngroups groups (or y * silu(z) without rmsnorm)
[silu(z0) * x0, y] -> out_proj -> (b, l, d_model)

The scan is `mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined`. Cached decoding keeps, per
layer, conv_state (batch, conv_dim, d_conv) and ssm_state (batch, nheads, headdim, d_state).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_ssm.modules import fused_step
from mamba_ssm.ops.channel_first import has_hooks
from mamba_ssm.ops.causal_conv1d import causal_conv1d_fn, causal_conv1d_update
from mamba_ssm.ops.packing import seq_idx_from_cu_seqlens
from mamba_ssm.ops.ssd_chunked import conv_seq_idx, process_dt
from mamba_ssm.ops.triton.layernorm_gated import RMSNorm as RMSNormGated
from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
from mamba_ssm.utils.inference_params import layer_cache


class Mamba2(nn.Module):
    def __init__(self, d_model, d_state=128, d_conv=4, conv_init=None, expand=2, headdim=64, d_ssm=None,
                 ngroups=1, A_init_range=(1, 16), D_has_hdim=False, rmsnorm=True, norm_before_gate=False,
                 dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_limit=(0.0, float("inf")), bias=False,
                 conv_bias=True, chunk_size=256, use_mem_eff_path=True, layer_idx=None, process_group=None,
                 sequence_parallel=True, device=None, dtype=None):
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        if process_group is not None:
            raise NotImplementedError(
                f"Mamba2: process_group={process_group!r} (tensor parallelism) is not supported by this package; "
                "pass process_group=None")
        self.process_group = None
        self.sequence_parallel = sequence_parallel
        self.world_size = 1
        self.local_rank = 0
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.conv_init = conv_init
        self.expand = expand
        self.d_inner = int(expand * d_model)
        if self.d_inner != expand * d_model:
            raise ValueError(f"Mamba2: expand * d_model must be an integer, got {expand} * {d_model}")
        self.headdim = headdim
        self.d_ssm = self.d_inner if d_ssm is None else d_ssm
        if not 0 < self.d_ssm <= self.d_inner:
            raise ValueError(f"Mamba2: d_ssm must be in (0, d_inner = {self.d_inner}], got {d_ssm}")
        if headdim <= 0 or self.d_ssm % headdim != 0:
            raise ValueError(f"Mamba2: d_ssm (d_inner = expand * d_model unless given) = {self.d_ssm} must be "
                             f"divisible by headdim = {headdim}")
        self.ngroups = ngroups
        self.nheads = self.d_ssm // headdim
        if ngroups <= 0 or self.nheads % ngroups != 0:
            raise ValueError(f"Mamba2: the number of heads d_ssm / headdim = {self.nheads} must be divisible "
                             f"by ngroups = {ngroups}")
        self.D_has_hdim = D_has_hdim
        self.rmsnorm = rmsnorm
        self.norm_before_gate = norm_before_gate
        self.dt_limit = tuple(dt_limit)
        self.activation = "silu"
        self.chunk_size = chunk_size
        self.use_mem_eff_path = use_mem_eff_path
        self.layer_idx = layer_idx

        d_in_proj = 2 * self.d_inner + 2 * self.ngroups * self.d_state + self.nheads
        self.in_proj = nn.Linear(self.d_model, d_in_proj, bias=bias, **factory_kwargs)
        conv_dim = self.d_ssm + 2 * self.ngroups * self.d_state
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **factory_kwargs)
        if conv_init is not None:
            nn.init.uniform_(self.conv1d.weight, -conv_init, conv_init)
        self.act = nn.SiLU()

        # dt bias: softplus(dt_bias) log-uniform in [dt_min, dt_max] (floored); stored as its inverse softplus
        dt = torch.exp(torch.rand(self.nheads, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min)).clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.dt_bias._no_weight_decay = True
        self.dt_bias._no_reinit = True

        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise ValueError(f"Mamba2: A_init_range must be (lo, hi) with 0 < lo <= hi, got {A_init_range!r}")
        A = torch.empty(self.nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_ssm if D_has_hdim else self.nheads, device=device))
        self.D._no_weight_decay = True
        if rmsnorm:
            self.norm = RMSNormGated(self.d_ssm, eps=1e-5, norm_before_gate=norm_before_gate,
                                     group_size=self.d_ssm // ngroups, **factory_kwargs)
        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)

    # The fused decoding step (modules/fused_step.py) reads the projections' weights directly: only
    # when they are plain modules without hooks (wrapped ones, LoRA adapters, run as modules).
    def projections_are_plain(self):
        layers = (self.in_proj, self.out_proj)
        return all(type(m) is nn.Linear for m in layers) and type(self.conv1d) is nn.Conv1d \
            and not has_hooks(*layers, self.conv1d)

    @property
    def d_mlp(self):
        return self.d_inner - self.d_ssm

    def _D(self):
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _dt_limit_kwargs(self):
        return {} if self.dt_limit == (0.0, float("inf")) else {"dt_limit": self.dt_limit}

    def forward(self, u, seqlen=None, seq_idx=None, cu_seqlens=None, inference_params=None):
        """u: (batch, seqlen, d_model), or (batch * seqlen, d_model) with `seqlen` given -> u's shape.

        seq_idx (batch, seqlen) / cu_seqlens (num_seqs + 1,): packed sequences (batch 1 for cu_seqlens),
        each starting from a zero state; with inference_params, cu_seqlens gives one cache row per sequence.
        """
        seqlen_og = seqlen
        if seqlen is None:
            if u.dim() != 3 or u.shape[-1] != self.d_model:
                raise ValueError(f"Mamba2: u must be (batch, seqlen, {self.d_model}), got {tuple(u.shape)}")
            batch, seqlen, _ = u.shape
        else:
            if u.dim() != 2 or u.shape[-1] != self.d_model or u.shape[0] % seqlen != 0:
                raise ValueError(f"Mamba2: with seqlen={seqlen}, u must be (batch * seqlen, {self.d_model}), "
                                 f"got {tuple(u.shape)}")
            batch = u.shape[0] // seqlen
        if cu_seqlens is not None and seq_idx is None:
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
                    or int(cu_seqlens[-1]) != seqlen or batch != 1:
                raise ValueError(f"Mamba2: cu_seqlens must be (num_seqs + 1,) offsets ending at seqlen = {seqlen} "
                                 f"with batch 1, got {cu_seqlens!r} for batch {batch}")
            seq_idx = seq_idx_from_cu_seqlens(cu_seqlens, seqlen)

        conv_state, ssm_state = None, None
        if inference_params is not None:
            cache_batch = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else batch
            conv_state, ssm_state = self._get_states_from_cache(inference_params, cache_batch)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(u if seqlen_og is None else u.view(batch, 1, -1), conv_state, ssm_state)
                return out if seqlen_og is None else out.view(batch, -1)

        zxbcdt = self.in_proj(u)
        if seqlen_og is not None:
            zxbcdt = zxbcdt.view(batch, seqlen, -1)
        A = -torch.exp(self.A_log.float())
        if self.use_mem_eff_path and inference_params is None and self.d_mlp == 0:
            y = mamba_split_conv1d_scan_combined(
                zxbcdt, self.conv1d.weight, self.conv1d.bias, self.dt_bias, A, self._D(), self.chunk_size,
                seq_idx=seq_idx, activation=self.activation,
                rmsnorm_weight=self.norm.weight if self.rmsnorm else None,
                rmsnorm_eps=self.norm.eps if self.rmsnorm else 1e-6, headdim=None if self.D_has_hdim else self.headdim,
                ngroups=self.ngroups, norm_before_gate=self.norm_before_gate, **self._dt_limit_kwargs())
        else:
            y = self._split_forward(zxbcdt, A, seq_idx, cu_seqlens, conv_state, ssm_state)
        if seqlen_og is not None:
            y = y.reshape(batch * seqlen, -1)
        # out_proj as a module, so that adapters wrapped around it (LoRA) apply
        return self.out_proj(y)

    def _split_forward(self, zxbcdt, A, seq_idx, cu_seqlens, conv_state, ssm_state):
        """The unfused path: zxbcdt (b, l, d_in_proj) -> y (b, l, d_inner) before out_proj; fills the states."""
        b, l, _ = zxbcdt.shape
        d_mlp = self.d_mlp
        z0, x0, z, xBC, dt = torch.split(
            zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * self.ngroups * self.d_state, self.nheads], dim=-1)
        if conv_state is not None:
            conv_state.copy_(self._last_conv_inputs(xBC, cu_seqlens))
        xBC = causal_conv1d_fn(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias, activation=self.activation,
                               seq_idx=conv_seq_idx(seq_idx)).transpose(1, 2)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = mamba_chunk_scan_combined(
            x.reshape(b, l, self.nheads, self.headdim), dt, A, B.reshape(b, l, self.ngroups, self.d_state),
            C.reshape(b, l, self.ngroups, self.d_state), self.chunk_size, D=self._D(),
            z=None if self.rmsnorm else z.reshape(b, l, self.nheads, self.headdim), dt_bias=self.dt_bias,
            dt_softplus=True, seq_idx=seq_idx, cu_seqlens=cu_seqlens, return_final_states=ssm_state is not None,
            return_varlen_states=cu_seqlens is not None and ssm_state is not None, **self._dt_limit_kwargs())
        if ssm_state is not None:
            y, last_state, *rest = y
            ssm_state.copy_(rest[0] if cu_seqlens is not None else last_state)
        y = y.reshape(b, l, self.d_ssm)
        if self.rmsnorm:
            y = self.norm(y, z)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return y

    def _last_conv_inputs(self, xBC, cu_seqlens):
        """The conv's inputs the next step needs: the last d_conv of each sequence, zeros before its start.
        xBC (b, l, conv_dim) -> (b or num_seqs, conv_dim, d_conv)."""
        w = self.d_conv
        if cu_seqlens is None:
            xt = xBC.transpose(1, 2)
            return F.pad(xt, (w - xt.shape[-1], 0))[..., -w:]
        ends = cu_seqlens[1:].long()
        starts = cu_seqlens[:-1].long()
        pos = ends[:, None] - w + torch.arange(w, device=xBC.device)[None, :]     # (num_seqs, w)
        valid = pos >= starts[:, None]
        taken = xBC[0, pos.clamp(min=0)]                                          # (num_seqs, w, conv_dim)
        return (taken * valid[..., None].to(taken.dtype)).transpose(1, 2)

    def step(self, hidden_states, conv_state, ssm_state):
        """One token. hidden_states (batch, 1, d_model); states updated in place.

        Returns (out (batch, 1, d_model), conv_state, ssm_state).
        """
        if hidden_states.dim() != 3 or hidden_states.shape[1] != 1:
            raise ValueError(f"Mamba2.step decodes one token at a time, got hidden_states {tuple(hidden_states.shape)}")
        if fused_step.mamba2_step_path(self, hidden_states):  # the conv and state steps in Triton kernels
            out = fused_step.mamba2_step(self, hidden_states[:, 0], conv_state, ssm_state)
            if out is not None:
                return out.unsqueeze(1), conv_state, ssm_state
        dtype = hidden_states.dtype
        zxbcdt = self.in_proj(hidden_states.squeeze(1))                      # (b, d_in_proj)
        d_mlp = self.d_mlp
        z0, x0, z, xBC, dt = torch.split(
            zxbcdt, [d_mlp, d_mlp, self.d_ssm, self.d_ssm + 2 * self.ngroups * self.d_state, self.nheads], dim=-1)
        xBC = causal_conv1d_update(xBC, conv_state, self.conv1d.weight, self.conv1d.bias, self.activation)
        x, B, C = torch.split(xBC, [self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        b = x.shape[0]
        h, p, g, n = self.nheads, self.headdim, self.ngroups, self.d_state
        f = torch.float64 if ssm_state.dtype == torch.float64 else torch.float32
        A = -torch.exp(self.A_log.to(f))
        dt = process_dt(dt, self.dt_bias, True, self.dt_limit, f)            # (b, h)
        xf = x.to(f).view(b, g, h // g, p)
        Bf = B.to(f).view(b, g, 1, 1, n)
        state = ssm_state.view(b, g, h // g, p, n)
        decay = torch.exp(dt * A).view(b, g, h // g, 1, 1)
        new = state.to(f) * decay + (xf * dt.view(b, g, h // g, 1)).unsqueeze(-1) * Bf
        ssm_state.copy_(new.view_as(ssm_state))
        y = (new * C.to(f).view(b, g, 1, 1, n)).sum(-1)                      # (b, g, h/g, p)
        D = self._D().to(f)
        y = y + xf * (D.view(g, h // g, p) if self.D_has_hdim else D.view(g, h // g, 1))
        y = y.reshape(b, self.d_ssm)
        if self.rmsnorm:
            y = self.norm(y.to(dtype), z)
        else:
            y = (y * F.silu(z.to(f))).to(dtype)
        if d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y).unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        """(conv_state (batch, conv_dim, d_conv), ssm_state (batch, nheads, headdim, d_state)); the ssm
        state in float32 when the weights are 16-bit (it accumulates over many steps)."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.conv1d.weight.shape[0], self.d_conv, device=device,
                                 dtype=conv_dtype)
        ssm_dtype = self.in_proj.weight.dtype if dtype is None else dtype
        ssm_state = torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                dtype=torch.float32 if ssm_dtype in (torch.float16, torch.bfloat16) else ssm_dtype)
        return conv_state, ssm_state

    def _get_states_from_cache(self, inference_params, batch_size, initialize_states=False):
        conv_state, ssm_state = layer_cache(self, inference_params, batch_size, "u")
        if initialize_states:
            conv_state.zero_()
            ssm_state.zero_()
        return conv_state, ssm_state
