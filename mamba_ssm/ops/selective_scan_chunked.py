"""Chunked selective scan in pure PyTorch (the ``torch`` backend of ``selective_scan_fn``).

The recurrence, per batch b, channel d and state n (see selective_scan_interface for names):

    h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t          y_t = C_t · h_t

How it avoids a Python loop over every time step
------------------------------------------------
The sequence (padded to K*T with Δ = 0, which leaves the state untouched) is cut into K chunks
of T steps, and all K chunks advance together: the Python loops run over the T steps of a chunk
and over the K chunks (T + K ~ 2 sqrt(L) iterations), each iteration a few whole-tensor ops.

Forward (``_forward_streaming``), with no (b, d, L, n) tensor at all:
1. Δ and Δu are transposed once to time-major rows (b, K, T, d) (one 2-D transpose per batch row),
   so a step's slice is K contiguous rows of d.
2. Chunk-local sweep: every chunk starts from a zero state; per step the decay ``exp(Δ_t ⊗ A)``
   (taken as ``exp2(Δ_t ⊗ A log2 e)``: torch's exp2 is ~3x faster than its exp on CPU) and the
   input ``Δ_t u_t ⊗ B_t`` are built in a (b, K, n, d) buffer that stays in cache, and
   ``h = decay * h + input``. This gives each chunk's local end state.
3. A loop over chunks turns them into true start states ``hs[k+1] = exp(A ΣΔ_k) hs[k] + end_k``.
4. Full sweep from the true start states, the same per-step ops plus ``y_t = C_t h_t``.
Only exp (exp2) of ``Δ A`` (never of its negation, no cumulative sums in log space) is taken, so
large decays underflow to 0 instead of overflowing; chunk decays are floored at exp(-80) to keep
the CPU off its slow denormal path. The step slice size (``STEP_ELEMS``) sets K: few chunks so
that a step's buffers stay in cache, at most ~sqrt(L) so that both loops stay short.

On the CPU, the forward and backward of each part run in C where a C compiler exists
(``selective_scan_cpu.py``: the same recurrence one step after another per channel);
``_forward_streaming`` and the PyTorch backward below are their references and the fall-back.

On the CPU, big calls are split over channels into one part per intra-op thread, each run on a
worker thread with one intra-op thread (``PARALLEL_MIN_WORK``): the scan is many small ops, and a
fork/join per op stalls badly when the machine is shared. Each part also computes its own
softplus(Δ), Δu, D skip and gate.

Measured and not taken (130m shape (1, 1536, 1024, 16), 2-core EPYC, torch 2.13, 2026-12-07):
``torch.compile`` of a step, or of a whole chunk-local sweep with the state in registers, ran no
faster than these eager ops (inductor's vectorised exp/exp2 is ~2x slower than ATen's exp2 here;
a hand polynomial exp2 gained ~20% on one sweep at 1e-4 relative error); keeping every step's decay
of a channel block for the full sweep (exp once) lost more to short strided ops and a K-step carry
than it saved.

Backward (hand written, no autograd graph over time), per block of channels sized by
``BLOCK_ELEMS``: from the saved chunk start states the states H (T+1, b, K, n, d_block) and the
decays DA are rebuilt (``_scan_block``); the state gradient
``g_t = C_t gy_t + exp(Δ_{t+1} A) g_{t+1}`` runs the same scheme in reverse (chunk-local sweep,
carries across chunks starting from the gradient of last_state, full sweep, in place), and the
input gradients are batched matmuls and reductions:

    gB_t = Σ_d g_t Δ_t u_t,  gC_t = Σ_d gy_t h_t,  g(Δu)_t = Σ_n g_t B_t,
    M_t = g_t ⊙ exp(Δ_t A) ⊙ h_{t-1},  gΔ_t += Σ_n A M_t,  gA = Σ_t Δ_t M_t.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from mamba_ssm.ops import packing, selective_scan_cpu
from mamba_ssm.ops.selective_scan_ref import selective_scan_ref

# Elements of one (T, b, K, d_block, n) intermediate; a block of channels is sized to this.
BLOCK_ELEMS = 1 << 22
# Chunk decays exp(A ΣΔ) are computed from max(A ΣΔ, EXP_FLOOR): below it exp only gives denormals or 0,
# which CPUs compute very slowly; exp(-80) ~ 1.8e-35 is 0 for all purposes of fp32 sums.
EXP_FLOOR = -80.0
# Shortest chunk (below it, one chunk of the whole sequence).
MIN_CHUNK = 8
# Elements of one step's (b, K, n, d) slice in the streaming forward: few chunks so that its buffers stay
# in cache, enough that the per-op overhead of the step loops stays small (2-core EPYC, 2026-12-07: 3 << 17
# was 0-15% faster than 3 << 16 at seqlen 256-4096, dstate 16/64, batch 1-4, forward and backward alike).
STEP_ELEMS = 3 << 17
LOG2E = math.log2(math.e)


def chunk_length(seqlen: int, state_elems: int = 1) -> int:
    """Chunk length T: about sqrt(L) (fewest Python steps T + K), but with few enough chunks K that
    a step's (batch, K, dstate, dim) slice (state_elems = batch*dim*dstate per chunk) stays in cache."""
    if seqlen <= MIN_CHUNK:
        return max(seqlen, 1)
    k_cache = max(1, STEP_ELEMS // max(1, state_elems))
    k = max(1, min(k_cache, int(round(math.sqrt(seqlen)))))
    return max(MIN_CHUNK, -(-seqlen // k))


def _to_time_major(x, K, T):
    """(b, c, L) -> (T, b, K, c), zero padded to K*T steps."""
    b, c, L = x.shape
    if K * T != L:
        x = F.pad(x, (0, K * T - L))
    return x.reshape(b, c, K, T).permute(3, 0, 2, 1).contiguous()


def _from_time_major(x, L):
    """(T, b, K, c) -> (b, c, L)."""
    T, b, K, c = x.shape
    return x.permute(1, 3, 2, 0).reshape(b, c, K * T)[:, :, :L]


def _to_rows(x, K, T):
    """(b, c, L) -> (b, K*T, c), time-major per batch row, zero rows past L.

    One 2-D transpose per batch row: ATen copies a transposed contiguous matrix in cache blocks,
    ~5x faster on CPU than a permuted copy of 3 or more dims (measured on a 2-core EPYC).
    """
    b, c, L = x.shape
    out = x.new_empty((b, K * T, c))
    if K * T != L:
        out[:, L:].zero_()
    for i in range(b):
        out[i, :L].copy_(x[i].t())
    return out


def _from_rows(x, L, out=None):
    """(b, K*T, c) -> (b, c, L), written into out if given (a channel slice of the whole result,
    which saves concatenating the parts afterwards)."""
    b, _, c = x.shape
    if out is None:
        out = x.new_empty((b, c, L))
    for i in range(b):
        out[i].copy_(x[i, :L].t())
    return out


def _bc_time_major(X, K, T):
    """(b, G, n, L) -> (T, b, K, G, n), zero padded."""
    b, G, n, L = X.shape
    if K * T != L:
        X = F.pad(X, (0, K * T - L))
    return X.reshape(b, G, n, K, T).permute(4, 0, 3, 1, 2).contiguous()


def _bc_from_time_major(X, L):
    """(T, b, K, G, n) -> (b, G, n, L)."""
    T, b, K, G, n = X.shape
    return X.permute(1, 3, 4, 2, 0).reshape(b, G, n, K * T)[..., :L]


def _blocks(dim, groups, per_block):
    """Channel blocks [d0, d1) that never straddle a group boundary, with their group index."""
    dg = dim // groups
    size = max(1, min(dg, per_block))
    out = []
    for g in range(groups):
        for d0 in range(g * dg, (g + 1) * dg, size):
            out.append((d0, min(d0 + size, (g + 1) * dg), g))
    return out


def _block_size(batch, K, T, dstate, block_elems):
    return max(1, block_elems // max(1, batch * K * T * dstate))


def _scan_block(dtb, xb, At, Bg, H, DA, keep=None):
    """Fill H (T+1, b, K, n, db) with all states of one channel block, H[0] holding the chunk
    start states on entry; DA (T, b, K, n, db) receives the decays exp(Δ ⊗ A).

    dtb, xb: (T, b, K, db) step sizes and Δ·u; At: (n, db) = A^T; Bg: (T, b, K, n);
    keep: packed sequences' (T, b, K, 1, 1) 0/1 factors of the decays (0 where a sequence starts), or None.
    """
    T = dtb.shape[0]
    DAs, Hs = DA.unbind(0), H.unbind(0)
    dts, xs, Bs = dtb.unsqueeze(-2).unbind(0), xb.unsqueeze(-2).unbind(0), Bg.unsqueeze(-1).unbind(0)
    for t in range(T):
        torch.mul(dts[t], At, out=DAs[t])
        DAs[t].exp_()
        if keep is not None:
            DAs[t].mul_(keep[t])
        torch.mul(xs[t], Bs[t], out=Hs[t + 1])
        torch.addcmul(Hs[t + 1], DAs[t], Hs[t], out=Hs[t + 1])


class _Workspace:
    """Buffers reused by every channel block of one call (fresh memory costs page faults)."""

    def __init__(self, like, max_slice, leading):
        self.flat = [like.new_empty(lead * max_slice) for lead in leading]

    def get(self, *shapes):
        return [f[: math.prod(s)].view(s) for f, s in zip(self.flat, shapes)]


def _step_size(delta, delta_bias, delta_softplus):
    """fp32 (Δ before softplus, Δ)."""
    dt_raw = delta.float()
    if delta_bias is not None:
        dt_raw = dt_raw + delta_bias.float().unsqueeze(-1)
    return dt_raw, (F.softplus(dt_raw) if delta_softplus else dt_raw)


def _prepare(u, delta, A, B, C, delta_bias, delta_softplus):
    """fp32 copies and the step size Δ (after bias and softplus); B, C as (b, G, n, L)."""
    uf = u.float()
    dt_raw, dt = _step_size(delta, delta_bias, delta_softplus)
    Af = A.float()
    B4 = (B.unsqueeze(1) if B.dim() == 3 else B).float()
    C4 = (C.unsqueeze(1) if C.dim() == 3 else C).float()
    return uf, dt_raw, dt, Af, B4, C4


def _groups(dim, gB, gC):
    G = gB * gC // math.gcd(gB, gC)
    return G, G // gB, G // gC


def _packing_layout(seq_idx, cu_seqlens, L, K, T, device):
    """keep (T, b, K) fp32: 0 where a packed sequence starts, else 1 (padding included); chunk_keep
    (b, K): 0 for chunks a sequence starts in (their start state does not carry in); ends: with
    cu_seqlens, {t: (sequence numbers, chunks)} of the sequences that end at step t of a chunk."""
    if seq_idx is None:
        return None, None, None
    keep = packing.keep_mask(seq_idx)
    if K * T != L:
        keep = F.pad(keep, (0, K * T - L), value=1.0)
    keep = keep.view(-1, K, T).permute(2, 0, 1).contiguous()
    ends = None
    if cu_seqlens is not None:
        by_t = {}
        for i, p in enumerate(packing.sequence_ends(cu_seqlens)):
            by_t.setdefault(p % T, ([], []))
            by_t[p % T][0].append(i)
            by_t[p % T][1].append(p // T)
        ends = {t: (torch.tensor(i, device=device), torch.tensor(k, device=device)) for t, (i, k) in by_t.items()}
    return keep, keep.prod(0), ends


def _forward_streaming(dt, x, Af, B4, C4, G, rB, rC, T, K, y_out=None, keep=None, chunk_keep=None, ends=None):
    """Forward without storing any (b, d, L, n) tensor: every step's decays and inputs are built
    on the fly in small buffers that stay in cache, once for the chunk-local sweep and once for the
    full sweep. Returns y (b, d, L) (written into y_out if given), the chunk start states
    (b, K, n, d) and the last state (b, d, n), or with ``ends`` (packed sequences, batch 1) each
    sequence's final state (num_seqs, d, n). keep, chunk_keep, ends: ``_packing_layout``'s.
    """
    batch, dim, L = dt.shape
    n = Af.shape[1]
    dg = dim // G
    # time-major rows (b, K, T, c): step t of every chunk is the slice [:, :, t]
    DTr = _to_rows(dt, K, T).view(batch, K, T, G, 1, dg)
    DTs = DTr.unbind(2)
    Xs = _to_rows(x, K, T).view(batch, K, T, G, 1, dg).unbind(2)
    AtG = Af.reshape(G, dg, n).transpose(1, 2).contiguous()  # (G, n, dg)
    # exp(Δ A) is taken as exp2(Δ (A log2 e)): torch's exp2 is ~3x faster than its exp on this CPU (2-core
    # EPYC, torch 2.13: 57 against 170-230 us for 196608 floats); rounding A log2 e adds one fp32 ulp.
    At2 = AtG * LOG2E
    gidx = torch.arange(G, device=dt.device)
    BtG = _bc_time_major(B4, K, T)[:, :, :, gidx // rB].unsqueeze(-1)  # (T, b, K, G, n, 1)
    CtG = _bc_time_major(C4, K, T)[:, :, :, gidx // rC].unsqueeze(-2)  # (T, b, K, G, 1, n)
    DA = dt.new_empty((batch, K, G, n, dg))
    h = torch.empty_like(DA)
    keeps = keep.view(T, batch, K, 1, 1, 1).unbind(0) if keep is not None else None
    # chunk-local sweep from zero states
    for t in range(T):
        if t == 0:
            torch.mul(Xs[0], BtG[0], out=h)
            continue
        torch.mul(DTs[t], At2, out=DA)
        DA.exp2_()
        if keeps is not None:
            DA.mul_(keeps[t])
        h.mul_(DA).addcmul_(Xs[t], BtG[t])
    # chunk start states
    decay = (DTr.sum(2) * AtG).clamp_min_(EXP_FLOOR).exp_()  # (b, K, G, n, dg)
    if chunk_keep is not None:
        decay.mul_(chunk_keep.view(batch, K, 1, 1, 1))
    hs = torch.empty_like(h)
    hs[:, 0].zero_()
    for k in range(1, K):
        torch.addcmul(h[:, k - 1], decay[:, k - 1], hs[:, k - 1], out=hs[:, k])
    # full sweep from the true start states; y_t = C_t h_t
    h.copy_(hs)
    Y = dt.new_empty((batch, K, T, G, 1, dg))
    Ys = Y.unbind(2)
    y_t = dt.new_empty((batch, K, G, 1, dg))
    finals = h.new_empty((sum(len(i) for i, _ in ends.values()), G, n, dg)) if ends is not None else None
    for t in range(T):
        torch.mul(DTs[t], At2, out=DA)
        DA.exp2_()
        if keeps is not None:
            DA.mul_(keeps[t])
        h.mul_(DA).addcmul_(Xs[t], BtG[t])
        torch.matmul(CtG[t], h, out=y_t)
        Ys[t].copy_(y_t)
        if ends is not None and t in ends:
            finals[ends[t][0]] = h[0, ends[t][1]]
    y = _from_rows(Y.view(batch, K * T, dim), L, out=y_out)
    HS = hs.permute(0, 1, 3, 2, 4).reshape(batch, K, n, dim)
    if finals is not None:
        return y, HS, finals.transpose(-1, -2).reshape(finals.shape[0], dim, n)
    last = h[:, K - 1].transpose(-1, -2).reshape(batch, dim, n)
    return y, HS, last


# Work (batch * dim * dstate * seqlen) from which a CPU call is split over channels into one part per
# intra-op thread, each part run by a worker thread with a single intra-op thread. Scan steps are
# many small ops; splitting whole parts avoids a fork/join per op, which on a busy machine (threads
# descheduled in the middle of a barrier) can cost more than the op itself.
PARALLEL_MIN_WORK = 1 << 21
_pool = None
_pool_key = None


def _executor(workers):
    global _pool, _pool_key
    key = (os.getpid(), workers)  # a forked child does not inherit the parent's worker threads
    if _pool is None or _pool_key != key:
        _pool = ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(1,),
                                   thread_name_prefix="mamba_ssm_scan")
        _pool_key = key
    return _pool


def _channel_parts(u, G, n):
    """[(c0, c1)] channel ranges, one per intra-op thread for big ungrouped CPU calls, else one range."""
    batch, dim, L = u.shape
    parts = torch.get_num_threads()
    if (u.device.type != "cpu" or parts < 2 or G != 1 or dim < 2 * parts
            or batch * dim * n * L < PARALLEL_MIN_WORK):
        return [(0, dim)]
    bounds = [round(i * dim / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _run_parts(fn, parts):
    """fn(c0, c1) for every part, on the worker threads (without grad mode), in order."""
    if len(parts) == 1:
        return [fn(*parts[0])]
    # The parts write into the caller's tensors: under the caller's inference mode (a thread-local
    # mode) those are inference tensors, which only inference mode may update in place.
    inference = torch.is_inference_mode_enabled()

    def job(c0, c1):
        # (inference_mode(False) would turn grad mode back on: choose the context instead)
        with torch.inference_mode() if inference else torch.no_grad():
            return fn(c0, c1)

    futures = [_executor(len(parts)).submit(job, c0, c1) for c0, c1 in parts]
    return [f.result() for f in futures]


class SelectiveScanChunkedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk_size,
                block_elems, seq_idx, cu_seqlens):
        batch, dim, L = u.shape
        n = A.shape[1]
        uf, Af = u.float(), A.float()
        B4 = (B.unsqueeze(1) if B.dim() == 3 else B).float()
        C4 = (C.unsqueeze(1) if C.dim() == 3 else C).float()
        G, rB, rC = _groups(dim, B4.shape[1], C4.shape[1])
        parts = _channel_parts(uf, G, n)
        part_dim = max(c1 - c0 for c0, c1 in parts)
        T = max(1, min(chunk_size or chunk_length(L, batch * part_dim * n), L))
        K = -(-L // T)
        keep, chunk_keep, ends = _packing_layout(seq_idx, cu_seqlens, L, K, T, u.device)
        Df = D.float().unsqueeze(-1) if D is not None else None
        # each part computes its channels from Δ to the gated output, written in place (no concatenation)
        y = uf.new_empty((batch, dim, L))
        # y is kept for backward when gated: the gate is applied into a new tensor
        out = y if z is None else torch.empty_like(y)

        # on the CPU the C forward (selective_scan_cpu.py) where it builds; _forward_streaming is its reference
        forward = selective_scan_cpu.forward_streaming if u.device.type == "cpu" and selective_scan_cpu.usable(n) \
            else _forward_streaming

        def part(c0, c1):
            _, dt = _step_size(delta[:, c0:c1], None if delta_bias is None else delta_bias[c0:c1], delta_softplus)
            ub, yb = uf[:, c0:c1], y[:, c0:c1]
            r = forward(dt, dt * ub, Af[c0:c1], B4, C4, G, rB, rC, T, K, y_out=yb, keep=keep, chunk_keep=chunk_keep,
                        ends=ends)
            if Df is not None:
                yb.addcmul_(ub, Df[c0:c1])
            if z is not None:
                torch.mul(F.silu(z[:, c0:c1].float()), yb, out=out[:, c0:c1])
            return r

        res = _run_parts(part, parts)
        if len(res) == 1:
            _, HS, last = res[0]
        else:
            HS = torch.cat([r[1] for r in res], dim=-1)
            last = torch.cat([r[2] for r in res], dim=1)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, HS, y if z is not None else None)
        ctx.delta_softplus = delta_softplus
        ctx.T = T
        ctx.block_elems = block_elems
        ctx.return_last_state = return_last_state
        ctx.packing = (keep, chunk_keep, ends)
        out = out.to(u.dtype)
        if return_last_state:
            return out, last
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout, *rest):
        u, delta, A, B, C, D, z, delta_bias, HS, y = ctx.saved_tensors
        glast = rest[0] if (ctx.return_last_state and rest) else None
        batch, dim, L = u.shape
        n = A.shape[1]
        T = ctx.T
        K = -(-L // T)
        uf, dt_raw, dt, Af, B4, C4 = _prepare(u, delta, A, B, C, delta_bias, ctx.delta_softplus)
        G, rB, rC = _groups(dim, B4.shape[1], C4.shape[1])
        gout = gout.float()

        gz = None
        if z is not None:
            zf = z.float()
            sz = torch.sigmoid(zf)
            gy = gout * (zf * sz)
            if ctx.needs_input_grad[6]:
                gz = gout * y * (sz * (1 + zf * (1 - sz)))
        else:
            gy = gout
        gD = None
        if D is not None:
            if ctx.needs_input_grad[5]:
                gD = (gy * uf).sum((0, 2))
            gu = gy * D.float().unsqueeze(-1)
        else:
            gu = torch.zeros_like(uf)
        gdt = torch.empty_like(uf)
        x = dt * uf
        glast_f = glast.float() if glast is not None else None
        keep, chunk_keep, ends = ctx.packing

        def run_blocks(c0, c1):
            """Gradients of the channels [c0, c1): written in place, except gB, gC returned as sums.
            (Uses the time-major inputs made below, when the C backward does not run.)"""
            if G == 1:
                size = max(1, min(per_block, c1 - c0))
                blocks = [(d0, min(d0 + size, c1), 0) for d0 in range(c0, c1, size)]
            else:
                blocks = _blocks(dim, G, per_block)
            gBt = torch.zeros_like(Bt)
            gCt = torch.zeros_like(Ct)
            ws = _Workspace(uf, max(d1 - d0 for d0, d1, _ in blocks) * batch * K * n, (T + 1, T, T))
            for d0, d1, g in blocks:
                db = d1 - d0
                Ab = At[:, d0:d1]
                Bg = Bt[:, :, :, g // rB]  # (T, b, K, n)
                Cg = Ct[:, :, :, g // rC]
                dtb = _to_time_major(dt[:, d0:d1], K, T)
                xb = _to_time_major(x[:, d0:d1], K, T)
                gyb = _to_time_major(gy[:, d0:d1], K, T)
                H, DA, Gs = ws.get((T + 1, batch, K, n, db), (T, batch, K, n, db), (T, batch, K, n, db))
                H[0] = HS[..., d0:d1]
                _scan_block(dtb, xb, Ab, Bg, H, DA, keep5)
                # gC_t = Σ_d gy_t h_t
                gCt[:, :, :, g // rC] += torch.matmul(H[1:], gyb.unsqueeze(-1)).squeeze(-1)
                # state gradients g_t = C_t gy_t + DA_{t+1} g_{t+1}: chunk-local sweep from zero ...
                torch.mul(gyb.unsqueeze(-2), Cg.unsqueeze(-1), out=Gs)  # (T, b, K, n, db)
                if ends is not None and glast_f is not None:
                    Gs.index_put_((t_of, torch.zeros_like(t_of), k_of),
                                  glast_f[seq_of, d0:d1].transpose(-1, -2), accumulate=True)
                GSs, DAs = Gs.unbind(0), DA.unbind(0)
                gl = GSs[T - 1].clone()
                for t in range(T - 2, -1, -1):
                    torch.addcmul(GSs[t], DAs[t + 1], gl, out=gl)
                v = gl.mul_(DAs[0])  # what each chunk passes back to the previous chunk's end state
                # ... carries across chunks (from the end, starting with the gradient of last_state) ...
                decay = (dtb.sum(0).unsqueeze(-2) * Ab).clamp_min_(EXP_FLOOR).exp_()
                if chunk_keep is not None:
                    decay.mul_(chunk_keep.view(batch, K, 1, 1))
                carry = torch.empty_like(v)
                if glast_f is not None and ends is None:
                    carry[:, K - 1] = glast_f[:, d0:d1].transpose(-1, -2)
                else:
                    carry[:, K - 1].zero_()
                for k in range(K - 2, -1, -1):
                    torch.addcmul(v[:, k + 1], decay[:, k + 1], carry[:, k + 1], out=carry[:, k])
                # ... and the full sweep, in place
                GSs[T - 1].add_(carry)
                for t in range(T - 2, -1, -1):
                    torch.addcmul(GSs[t], DAs[t + 1], GSs[t + 1], out=GSs[t])
                # g(Δu)_t = Σ_n g_t B_t ;  gB_t = Σ_d g_t (Δu)_t
                gxb = torch.matmul(Bg.unsqueeze(-2), Gs).squeeze(-2)  # (T, b, K, db)
                gBt[:, :, :, g // rB] += torch.matmul(Gs, xb.unsqueeze(-1)).squeeze(-1)
                # M_t = g_t ⊙ DA_t ⊙ h_{t-1};  gΔ_t += Σ_n A M_t;  gA = Σ_t Δ_t M_t
                M = DA.mul_(H[:T]).mul_(Gs)
                gdtb = torch.mul(M, Ab, out=Gs).sum(-2)
                gA[d0:d1] = M.mul_(dtb.unsqueeze(-2)).sum((0, 1, 2)).t()
                ub = _to_time_major(uf[:, d0:d1], K, T)
                gdtb.addcmul_(gxb, ub)
                gdt[:, d0:d1] = _from_time_major(gdtb, L)
                gu[:, d0:d1] += _from_time_major(gxb.mul_(dtb), L)
            return gBt, gCt

        parts = _channel_parts(uf, G, n)
        if uf.device.type == "cpu" and selective_scan_cpu.usable(n):
            # the C backward (selective_scan_cpu.py); run_blocks is its reference
            gA = torch.zeros(Af.shape, dtype=torch.float32)
            gu = gu.contiguous()   # gy * D keeps gy's layout, which may be channel-first
            c_bwd = selective_scan_cpu.Backward(dt, x, uf, gy, Af, B4, C4, T, K, HS, keep, ends, glast_f, gdt, gu, gA)
            sums = _run_parts(c_bwd.part, parts)
            gB4 = sum(r[0] for r in sums).transpose(-1, -2)
            gC4 = sum(r[1] for r in sums).transpose(-1, -2)
        else:
            Bt = _bc_time_major(B4, K, T)
            Ct = _bc_time_major(C4, K, T)
            At = Af.t().contiguous()
            gA = torch.empty_like(Af)
            keep5 = keep.view(T, batch, K, 1, 1) if keep is not None else None
            if ends is not None and glast_f is not None:
                # each sequence's final-state gradient enters the state gradient at its last step
                t_of = torch.cat([torch.full_like(i, t) for t, (i, _) in ends.items()])
                seq_of = torch.cat([i for i, _ in ends.values()])
                k_of = torch.cat([k for _, k in ends.values()])
            per_block = _block_size(batch, K, T, n, ctx.block_elems or BLOCK_ELEMS)
            sums = _run_parts(run_blocks, parts)
            gB4 = _bc_from_time_major(sum(r[0] for r in sums), L)
            gC4 = _bc_from_time_major(sum(r[1] for r in sums), L)
        if ctx.delta_softplus:
            gdt.mul_(torch.sigmoid(dt_raw))
        gdelta_bias = gdt.sum((0, 2)) if delta_bias is not None else None
        gB = gB4.squeeze(1) if B.dim() == 3 else gB4
        gC = gC4.squeeze(1) if C.dim() == 3 else gC4

        def cast(gr, ref):
            return None if gr is None or ref is None else gr.to(ref.dtype)

        return (cast(gu, u), cast(gdt, delta), cast(gA, A), cast(gB, B), cast(gC, C), cast(gD, D), cast(gz, z),
                cast(gdelta_bias, delta_bias), None, None, None, None, None, None)


def selective_scan_chunked(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False, chunk_size=None, block_elems=None, seq_idx=None,
                           cu_seqlens=None):
    """Chunked selective scan; same arguments and results as ``selective_scan_ref``.

    Inputs are assumed checked (``check_selective_scan_inputs``; seq_idx / cu_seqlens by
    ``packing.resolve``). Computes in fp32 and returns ``out`` in u's dtype (and ``last_state`` fp32
    if asked); gradients come back in each input's dtype. Packed sequences: the decay is zeroed at
    each sequence's first step, and so is the decay that carries a state across any chunk that a
    sequence starts in.
    """
    if u.shape[-1] == 0:  # no time step: the reference gives the empty output and zero state
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                                  seq_idx, cu_seqlens)
    seq_idx, cu_seqlens = packing.resolve(seq_idx, cu_seqlens, u.shape[0], u.shape[2], u.device)
    return SelectiveScanChunkedFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus),
                                        bool(return_last_state), chunk_size, block_elems, seq_idx, cu_seqlens)
