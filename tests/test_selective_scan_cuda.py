"""GPU tests of our CUDA selective scan (mamba_ssm._selective_scan_cuda), forward and backward.

Every result is compared with a float64 scan (written here: selective_scan_ref computes in
float32) run on the same low-precision input values. The tolerance of each tensor is judged
against the package's reference run in the test's dtype: our error must be within a small
multiple of the reference's own error, or under a per-dtype floor (fp32 6e-4, fp16 1e-2,
bf16 3e-2, relative). Outputs are poisoned with NaN before each launch (the poison setting),
so an element the kernels fail to write shows up as NaN. Settings change through
``override_settings`` (the ``scan`` fixture), not the environment, which is read once at import.

With a CUDA device these tests fail, not skip, when the extension did not build or load.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
import torch.nn.functional as F

from mamba_ssm.ops import selective_scan_cuda as ssc
from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
from mamba_ssm.ops.selective_scan_settings import ScanSettings, override_settings

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
DEFAULT = ScanSettings()

FLOOR = {torch.float32: 6e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
MULT = 4.0  # ours may be this many times the low-precision reference's error


@pytest.fixture(autouse=True)
def _extension_and_poison():
    # a CUDA device without the extension is a failed build, not a reason to skip
    if ssc._ext is None:
        pytest.fail(f"CUDA is available but mamba_ssm._selective_scan_cuda did not load: {ssc.import_error()}")
    with override_settings(poison=True):
        yield


class ScanSettingsPatch:
    """Scan settings changed for one test and undone at its end (monkeypatch's setenv for settings)."""

    def __init__(self, stack):
        self._stack = stack

    def set(self, **fields):
        self._stack.enter_context(override_settings(**fields))


@pytest.fixture
def scan():
    with contextlib.ExitStack() as stack:
        yield ScanSettingsPatch(stack)


def scan64(u, delta, A, B, C, D, z, delta_bias, softplus):
    """Float64 selective scan, differentiable; returns (out, last_state)."""
    batch, dim, L = u.shape
    delta = delta + delta_bias[:, None] if delta_bias is not None else delta
    if softplus:
        delta = F.softplus(delta)

    def expand(X):
        if X.dim() == 4:
            return X.repeat_interleave(dim // X.shape[1], dim=1)  # (b, dim, n, L)
        return X[:, None].expand(batch, dim, X.shape[1], L)

    Bx, Cx = expand(B), expand(C)
    dA = torch.exp(delta[..., None] * A[None, :, None, :])      # (b, d, L, n)
    dBu = (delta * u)[..., None] * Bx.permute(0, 1, 3, 2)        # (b, d, L, n)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append((h * Cx[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, h


def make_inputs(seed, batch, dim, L, N, dtype, groups, has_D, has_z, has_bias, softplus, wdtype=None, device="cuda",
                wide_delta=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    wdtype = wdtype or dtype

    def rn(*shape, dt=dtype, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(device=device, dtype=dt)

    u = rn(batch, dim, L)
    if softplus and wide_delta:  # every branch of the softplus: exp series, log2, identity above 20
        delta = (torch.rand(batch, dim, L, generator=g) * 50 - 25).to(device=device, dtype=dtype)
    elif softplus:
        delta = rn(batch, dim, L, scale=1.0, shift=-1.0)
    else:
        delta = (torch.rand(batch, dim, L, generator=g) * 0.5 + 0.01).to(device=device, dtype=dtype)
    A = (-(0.2 + torch.rand(dim, N, generator=g) * 1.5)).to(device)
    if groups is None:
        B = rn(batch, N, L, dt=wdtype)
        C = rn(batch, N, L, dt=wdtype)
    else:
        B = rn(batch, groups, N, L, dt=wdtype)
        C = rn(batch, groups, N, L, dt=wdtype)
    D = rn(dim, dt=torch.float32) if has_D else None
    z = rn(batch, dim, L) if has_z else None
    bias = (torch.rand(dim, generator=g) * 0.5).to(device) if has_bias else None
    return u, delta, A, B, C, D, z, bias


def rel_err(x, ref):
    x = x.double()
    ref = ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def run_all(fn, inputs, softplus, grads_wrt, gout, glast):
    """out, last and the gradients of sum(out*gout) + sum(last*glast) w.r.t. grads_wrt."""
    u, delta, A, B, C, D, z, bias = inputs
    out, last = fn(u, delta, A, B, C, D, z, bias, softplus)
    loss = (out.double() * gout).sum() + (last.double() * glast).sum()
    grads = torch.autograd.grad(loss, [inputs[i] for i in grads_wrt])
    return out, last, grads


def ours(u, delta, A, B, C, D, z, bias, softplus):
    return ssc.selective_scan_cuda(u, delta, A, B, C, D, z, bias, softplus, True)


def plan(u, delta, A, B, C, D, z, bias, softplus):
    """What the forward launches for these inputs under the settings in force."""
    return ssc.forward_plan(u, delta, A, B, C, D, z, bias, softplus)


def ref_low(u, delta, A, B, C, D, z, bias, softplus):
    return selective_scan_ref(u, delta, A, B, C, D, z, bias, softplus, True)


NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def check_case(seed, batch, dim, L, N, dtype, groups, has_D, has_z, has_bias, softplus, wdtype=None,
               noncontig=False, wide_delta=False):
    inputs = make_inputs(seed, batch, dim, L, N, dtype, groups, has_D, has_z, has_bias, softplus, wdtype,
                         wide_delta=wide_delta)
    if noncontig:
        # same values, other strides: u/delta through a transpose, B/C as slices of a wider tensor
        u, delta, A, B, C, D, z, bias = inputs
        u = u.transpose(1, 2).contiguous().transpose(1, 2)
        Bw = torch.cat([B, B], dim=-1)
        B = Bw[..., :L]
        inputs = (u, delta, A, B, C, D, z, bias)
    present = [i for i, t in enumerate(inputs) if t is not None]
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    gout = torch.randn(batch, dim, L, generator=g, dtype=torch.float64).cuda()
    glast = torch.randn(batch, dim, N, generator=g, dtype=torch.float64).cuda()

    def leaf(t, dt=None):
        if t is None:
            return None
        t = t.detach().clone() if dt is None else t.detach().to(dt)
        return t.requires_grad_(True)

    x_ours = [leaf(t) for t in inputs]
    x_low = [leaf(t) for t in inputs]
    x_64 = [leaf(t, torch.float64) for t in inputs]

    o_out, o_last, o_grads = run_all(ours, x_ours, softplus, present, gout, glast)
    l_out, l_last, l_grads = run_all(ref_low, x_low, softplus, present, gout, glast)
    r_out, r_last, r_grads = run_all(scan64, x_64, softplus, present, gout, glast)

    assert o_out.dtype == dtype and o_out.shape == (batch, dim, L)
    assert o_last.dtype == torch.float32 and o_last.shape == (batch, dim, N)
    checks = [("out", o_out, l_out, r_out), ("last_state", o_last, l_last, r_last)]
    for i, og, lg, rg in zip(present, o_grads, l_grads, r_grads):
        assert og.dtype == inputs[i].dtype, f"d{NAMES[i]} dtype {og.dtype} != {inputs[i].dtype}"
        assert og.shape == inputs[i].shape
        checks.append(("d" + NAMES[i], og, lg, rg))
    floor = FLOOR[dtype]
    failures = []
    for name, o, lo, r in checks:
        if not torch.isfinite(o).all():
            failures.append(f"{name}: non-finite values (unwritten or overflow)")
            continue
        e_o, e_l = rel_err(o, r), rel_err(lo, r)
        m_o, m_l = max_err(o, r), max_err(lo, r)
        scale = r.double().abs().max().item()
        if e_o > max(MULT * e_l, floor):
            failures.append(f"{name}: rel err {e_o:.3e} vs reference's {e_l:.3e} (floor {floor})")
        if m_o > max(MULT * m_l, floor * scale) + 1e-30:
            failures.append(f"{name}: max abs err {m_o:.3e} vs reference's {m_l:.3e} (scale {scale:.3e})")
    assert not failures, "; ".join(failures)


# ---- the sampled grid ---------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEQLENS = [1, 7, 128, 2048, 4097]
GROUPS = [None, 1, 2]
DSTATES = [1, 16, 64, 256]


def _grid():
    rng = random.Random(1234)
    cases = []
    # every (dtype, seqlen) pair, with the other factors cycling so each value of each
    # factor appears several times; flags drawn from a seeded generator
    for i, (dtype, L) in enumerate(itertools.product(DTYPES, SEQLENS)):
        for rep in range(2):
            j = 2 * i + rep
            N = DSTATES[j % 4]
            groups = GROUPS[(j // 4 + rep) % 3]
            flags = [rng.random() < 0.5 for _ in range(4)]
            if rep == 0:
                flags = [bool(j & 1), not (j & 2), bool(j & 4), not (j & 8)]
            # keep the float64 loop's memory and time modest
            if L >= 2048:
                batch, dim = 1, 4 if groups != 2 else 4
                N = min(N, 64)
            elif N >= 64:
                batch, dim = 2, 4
            else:
                batch, dim = 2, 32 if groups != 2 else 32
            cases.append((dtype, L, N, groups, *flags, batch, dim))
    # edges: all flags on / off, the largest dstate at a long length, odd channel counts
    cases += [
        (torch.float32, 4097, 256, 2, True, True, True, True, 1, 2),
        (torch.bfloat16, 2048, 256, None, True, True, True, True, 1, 2),
        (torch.float16, 7, 256, 1, False, False, False, False, 2, 3),
        (torch.bfloat16, 128, 16, None, False, False, False, False, 3, 5),
        (torch.float32, 1, 1, 2, True, True, True, True, 1, 2),
        (torch.bfloat16, 4097, 16, None, True, True, True, True, 1, 64),
        (torch.float32, 300, 16, None, True, True, True, True, 2, 48),
        # blocks of >= 8 channels (the backward's warp-shuffle dB/dC sum) with several state slots
        (torch.bfloat16, 300, 64, 2, True, True, True, True, 1, 32),
        (torch.float32, 130, 256, None, True, True, True, True, 1, 16),
        (torch.float16, 2048, 32, 1, True, False, True, True, 1, 64),
    ]
    return cases


GRID = _grid()


def _id(c):
    dtype, L, N, groups, D, z, bias, sp, batch, dim = c
    flags = "".join(ch for ch, on in zip("DzbS", (D, z, bias, sp)) if on) or "-"
    return f"{str(dtype)[6:]}-L{L}-N{N}-g{groups}-{flags}-b{batch}d{dim}"


def _layouts(c):
    # the grid's grids are small, so by default the forward takes the time-parallel layout wherever
    # it applies (dstate <= 16, channels per group a multiple of 4); those cases run with fwd2 too
    dtype, L, N, groups, *_, batch, dim = c
    return ["default", "fwd2"] if N <= 16 and (dim // (groups or 1)) % 4 == 0 else ["default"]


GRID_LAYOUTS = [(c, lay) for c in GRID for lay in _layouts(c)]


@pytest.mark.cuda
@pytest.mark.parametrize("case, layout", GRID_LAYOUTS, ids=[f"{_id(c)}-{lay}" for c, lay in GRID_LAYOUTS])
def test_against_float64(scan, case, layout):
    dtype, L, N, groups, has_D, has_z, has_bias, softplus, batch, dim = case
    scan.set(fwd_tp=False if layout == "fwd2" else None)
    seed = zlib.crc32(_id(case).encode()) % (2**31)
    check_case(seed, batch, dim, L, N, dtype, groups, has_D, has_z, has_bias, softplus)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("groups", [None, 2])
def test_fp32_B_C_with_low_precision_u(dtype, groups):
    check_case(7, 2, 8, 129, 16, dtype, groups, True, True, True, True, wdtype=torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs(dtype):
    check_case(11, 2, 16, 100, 16, dtype, None, True, True, True, True, noncontig=True)


@pytest.mark.cuda
@pytest.mark.parametrize("split", [1, 3, 64])
def test_sequence_split(scan, split):
    # forward and backward split into groups along the sequence (chosen automatically for small
    # batch * dim) agrees with float64 whatever the number of groups, also with longer segments
    scan.set(split=split)
    check_case(21, 1, 64, 2000, 16, torch.bfloat16, None, True, True, True, True)
    check_case(22, 2, 8, 517, 64, torch.float32, 2, True, True, False, True)
    scan.set(segment=64)
    check_case(23, 1, 16, 1500, 32, torch.float16, 1, False, True, True, True)


@pytest.mark.cuda
@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softplus_over_its_whole_range(scan, exact, dtype):
    # delta + bias from -25 to 25 through the special-function-unit softplus (the default) and
    # through log1pf (exact_softplus): outputs and every gradient against float64
    scan.set(exact_softplus=exact)
    check_case(31, 2, 16, 300, 16, dtype, None, True, True, True, True, wide_delta=True)


@pytest.mark.cuda
@pytest.mark.parametrize("save_y", [False, True])
def test_backward_reduction_modes_and_saved_y(scan, save_y):
    # the backward's dB/dC sum over a block's channels in each of its shape-driven modes
    # (scan_bwd2_red_mode): lane-permuted shuffles (dstate <= 16, 8+ channels per block), shuffles
    # with selects (several state slots), per channel in shared memory (fewer than 8 channels per
    # block); and dz from the forward's saved y or from y recomputed (save_y).
    # dstate 7, 13 and 20 leave padded states inside a lane's 4
    scan.set(save_y=save_y)
    check_case(41, 2, 32, 300, 7, torch.bfloat16, 2, True, True, True, True)
    check_case(42, 1, 64, 129, 16, torch.float32, None, True, True, True, True)
    check_case(43, 2, 16, 77, 13, torch.float16, None, False, True, False, True)
    check_case(44, 2, 8, 250, 16, torch.float32, 1, True, False, True, True)  # no z: nothing to save
    check_case(45, 2, 32, 200, 20, torch.bfloat16, None, True, True, True, True)  # 2 slots: with selects
    check_case(46, 2, 32, 200, 32, torch.float32, 1, True, True, True, True)
    check_case(47, 2, 12, 200, 16, torch.bfloat16, 3, True, True, True, True)  # 4 channels per block
    check_case(48, 2, 6, 150, 64, torch.float32, None, True, True, True, True)  # 2 channels per block


def misaligned(t):
    """t's values in rows that start 1 element past a 16-byte boundary (rules out vector loads)."""
    buf = torch.empty(*t.shape[:-1], t.shape[-1] + 1, device=t.device, dtype=t.dtype)
    buf[..., 1:] = t
    return buf[..., 1:]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [32, 16])
def test_forward_instantiations_match(scan, dtype, N):
    # whole sub-chunks, aligned rows and dstate 32 take fwd2's instantiation without bounds checks,
    # dstate 16 with 16-channel blocks its dstate-16 one; the same values in misaligned rows take
    # the bounds-checked one: the same arithmetic, so the same bits. Then against float64 with
    # gradients (the backward uses its checkpoints and saved y), aligned and not a whole number of
    # sub-chunks (bounds-checked)
    scan.set(fwd_tp=False)
    inputs = make_inputs(51, 2, 32, 256, N, dtype, None, True, True, True, True)
    u, delta, A, B, C, D, z, bias = inputs
    checked = (misaligned(u), misaligned(delta), A, B, C, D, misaligned(z), bias)
    with torch.no_grad():
        got = plan(*inputs, True)
        del got["nsplit"]  # (a small grid: split by the usual rule)
        assert got == {"kernel": "fwd2", "full": True, "d16": N == 16, "channels_per_block": 16}
        fast = ours(*inputs, True)
        got = plan(*checked, True)
        assert not got["d16"] and not got["full"]
        plain = ours(*checked, True)
    for a, b in zip(fast, plain):
        assert torch.equal(a, b)
    check_case(52, 2, 32, 256, N, dtype, None, True, True, True, True)
    odd = make_inputs(53, 2, 32, 250, N, dtype, None, True, True, True, True)
    assert not plan(*odd, True)["full"]
    check_case(53, 2, 32, 250, N, dtype, None, True, True, True, True)


@pytest.mark.cuda
@pytest.mark.parametrize("tp", [False, True])
@pytest.mark.parametrize("dim, L, N, groups, dtype, flags, split, segment", [
    # lengths around the 32-step sub-chunk, dstate below a lane's 4 states and not a multiple of 4
    (8, 1, 16, None, torch.float32, "DzbS", None, None),
    (8, 31, 1, 2, torch.bfloat16, "zS", None, None),
    (8, 33, 7, None, torch.float16, "DbS", None, None),
    (12, 100, 13, 1, torch.float32, "DzS", None, 64),
    (4, 2048, 16, None, torch.bfloat16, "DzbS", None, None),
    (32, 100, 16, None, torch.bfloat16, "DzbS", None, None),
    (8, 257, 16, None, torch.float32, "Db", None, 48),
    # sequence groups of odd sub-chunk counts (a group ends inside a 32-step sub-chunk)
    (8, 1000, 16, 2, torch.bfloat16, "DzbS", 3, None),
    (8, 515, 12, None, torch.float32, "DzbS", 5, 32),
    (4, 4097, 16, None, torch.float32, "DzbS", 2, None),
])
def test_time_parallel_forward(scan, tp, dim, L, N, groups, dtype, flags, split, segment):
    # the forward's time-parallel layout (fwd_tp True; auto on small grids) and fwd2 (False)
    # against float64, with every gradient (the backward starts from the checkpoints and saved y
    # the forward wrote); dim 4, 12: blocks of 4 channels, 8 and 32: of 8 (or 4 with 2 groups)
    scan.set(fwd_tp=tp, split=split, segment=segment or DEFAULT.segment)
    seed = zlib.crc32(f"tp{dim}-{L}-{N}-{groups}-{dtype}-{flags}-{split and str(split)}".encode()) % (2**31)
    check_case(seed, 1, dim, L, N, dtype, groups, *(ch in flags for ch in "DzbS"))


@pytest.mark.cuda
@pytest.mark.parametrize("cap, cpb", [(4, 4), (8, 8), (16, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_time_parallel_forward_block_sizes(scan, cap, cpb, dtype):
    # the time-parallel forward in blocks of 4, 8 and 16 channels (tp_cpb; 8 by default, 16 only
    # when asked for), each against float64 with gradients, in both instantiations
    scan.set(fwd_tp=True, tp_cpb=cap, split=1)  # (splits of odd sub-chunk counts take the general one)
    for L in (512, 300):  # whole 32-step sub-chunks (branch-free) and not
        inputs = make_inputs(63, 1, 32, L, 16, dtype, None, True, True, True, True)
        got = plan(*inputs, True)
        assert (got["kernel"], got["channels_per_block"], got["full"]) == ("fwd_tp", cpb, L % 32 == 0)
        check_case(64 + L, 1, 32, L, 16, dtype, None, True, True, True, True)


@pytest.mark.cuda
def test_time_parallel_forward_sub_chunk_counts(scan):
    # the time-parallel forward against float64 with gradients over 1 to 5 whole 32-step
    # sub-chunks (the branch-free instantiation's last sub-chunk reloads itself instead of reading
    # past the end; the carry into slice 0 goes through shared memory), a general instantiation,
    # and sequence splits
    scan.set(fwd_tp=True)
    for L, split in [(32, 1), (64, 1), (96, 1), (128, 1), (160, 1), (300, 1), (320, 2), (1000, 3)]:
        with override_settings(split=split):
            inputs = make_inputs(5, 1, 16, L, 16, torch.bfloat16, None, True, True, True, True)
            got = plan(*inputs, True)
            assert (got["kernel"], got["full"]) == ("fwd_tp", L % 32 == 0 and (split == 1 or L == 320)), (L, split, got)
            check_case(zlib.crc32(f"tpopt{L}-{split}".encode()) % (2**31), 1, 16, L, 16, torch.bfloat16, None,
                       True, True, True, True)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_time_parallel_forward_without_bounds_checks(scan, dtype):
    # whole 32-step sub-chunks, dstate 16, aligned rows: the time-parallel forward's instantiation
    # without bounds checks gives the same bits as its bounds-checked one (the same values in
    # misaligned rows), also with a sequence split into groups of whole sub-chunks; and it agrees
    # with fwd2
    scan.set(fwd_tp=True)
    inputs = make_inputs(61, 1, 16, 512, 16, dtype, None, True, True, True, True)
    u, delta, A, B, C, D, z, bias = inputs
    checked = (misaligned(u), misaligned(delta), A, B, C, D, misaligned(z), bias)
    for split in [1, 2]:
        with torch.no_grad(), override_settings(split=split):
            assert plan(*inputs, True) == {"kernel": "fwd_tp", "full": True, "d16": False, "channels_per_block": 8,
                                           "nsplit": split}
            full = ours(*inputs, True)
            assert plan(*checked, True)["full"] is False
            plain = ours(*checked, True)
            with override_settings(fwd_tp=False):
                fwd2 = ours(*inputs, True)
        for a, b in zip(full, plain):
            assert torch.equal(a, b)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_err(full[0], fwd2[0]) < tol and rel_err(full[1], fwd2[1]) < 1e-5
    # a checkpoint every other chunk (R = 2): its checkpoints take the general instantiation
    with override_settings(segment=32):
        assert plan(*inputs, True)["full"] is False
    assert ssc.forward_plan(*inputs, True, segment=32)["full"] is False
    # with gradients: the backward starts from the checkpoints the branch-free instantiation wrote
    # (split in 2: also those of the second group)
    with override_settings(split=2):
        check_case(62, 1, 16, 512, 16, dtype, None, True, True, True, True)
    check_case(62, 1, 16, 512, 16, dtype, None, True, True, True, True)


@pytest.mark.cuda
@pytest.mark.parametrize("shape, kernel, cpb", [
    ((1, 4096, 16384, 16), "fwd_tp", 8),   # batch 1 prefill: fwd2 would fill a quarter of the GPU
    ((8, 4096, 2048, 16), "fwd2", 16),
    ((8, 1536, 2048, 16), "fwd2", 16),
    ((1, 4096, 2048, 64), "fwd2", 16),     # dstate above the time-parallel layout's 16
    ((1, 24, 2048, 16), "fwd_tp", 8),      # 24 channels: blocks of 8
])
def test_forward_plan_at_benchmark_shapes(shape, kernel, cpb):
    # the default choice of layout at the benchmark's shapes (bf16, z, D, delta_bias, softplus), in
    # the instantiation without bounds checks; fwd_tp False and True override it
    batch, dim, L, N = shape
    inputs = make_inputs(7, batch, dim, L, N, torch.bfloat16, None, True, True, True, True)
    got = plan(*inputs, True)
    assert (got["kernel"], got["full"], got["channels_per_block"]) == (kernel, True, cpb)
    assert got["d16"] == (kernel == "fwd2" and N == 16)  # Mamba's shape: fwd2's dstate-16 instantiation
    with override_settings(fwd_tp=False):
        assert plan(*inputs, True)["kernel"] == "fwd2"
    with override_settings(fwd_tp=True):
        assert plan(*inputs, True)["kernel"] == ("fwd_tp" if N <= 16 else "fwd2")


@pytest.mark.cuda
@pytest.mark.parametrize("segment", [16, 256])
def test_segment_lengths(scan, segment):
    scan.set(segment=segment)
    check_case(5, 2, 16, 1000, 16, torch.float32, None, True, True, True, True)
    check_case(6, 1, 4, 333, 64, torch.bfloat16, 2, True, False, True, False)


@pytest.mark.cuda
def test_user_settings_as_keyword_arguments():
    # segment and save_y as keyword arguments do what the settings do (same kernels, same bits)
    inputs = make_inputs(8, 2, 16, 300, 16, torch.bfloat16, None, True, True, True, True)
    present = [i for i, t in enumerate(inputs) if t is not None]
    gout = torch.randn(2, 16, 300, device="cuda", dtype=torch.float64)
    glast = torch.randn(2, 16, 16, device="cuda", dtype=torch.float64)

    def run(**kwargs):
        x = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
        out, last = ssc.selective_scan_cuda(*x, True, True, **kwargs)
        loss = (out.double() * gout).sum() + (last.double() * glast).sum()
        return [out, last, *torch.autograd.grad(loss, [x[i] for i in present])]

    for fields in ({"segment": 64}, {"save_y": False}, {"segment": 48, "save_y": False}):
        by_keyword = run(**fields)
        with override_settings(**fields):
            by_setting = run()
        for a, b in zip(by_keyword, by_setting):
            assert torch.equal(a, b), fields
    with pytest.raises(ValueError, match="MAMBA_SSM_SCAN_SEGMENT"):
        ssc.selective_scan_cuda(*inputs, True, segment=0)


@pytest.mark.cuda
def test_binding_checks_the_plan():
    """The binding takes the plan's integers and rejects those that do not fit the inputs with an
    error naming the value. Each call runs in a child process: a crash there fails this test
    instead of ending the whole suite (one H100 run, 2026-12-07, ended in a segfault here)."""
    script = textwrap.dedent("""
        import torch
        from mamba_ssm.ops import selective_scan_cuda as ssc
        g = torch.Generator().manual_seed(9)
        rn = lambda *s: torch.randn(*s, generator=g).cuda()
        u, delta, z, B, C = rn(1, 24, 64), rn(1, 24, 64), rn(1, 24, 64), rn(1, 16, 64), rn(1, 16, 64)
        A, D, bias = -torch.rand(24, 16, generator=g).cuda() - 0.2, rn(24), torch.rand(24, generator=g).cuda()
        ok = dict(fwd_tp=False, cpb=8, tp_cpb=8, nsplit=1, gseg=4, exact_softplus=False, poison=False)
        args = (u, delta, A, B, C, D, z, bias, True, 1, False, False)
        assert ssc._ext.fwd(*args, **ok)[0].shape == u.shape
        bad = {BAD}
        try:
            ssc._ext.fwd(*args, **{**ok, **bad})
        except RuntimeError as e:
            print("ERROR:", str(e).splitlines()[0])
        else:
            print("NO ERROR")
    """)
    for bad, message in [({"cpb": 16}, "cpb=16"), ({"cpb": 3}, "cpb=3"), ({"nsplit": 2}, "nsplit=2"),
                         ({"fwd_tp": True, "tp_cpb": 16}, "tp_cpb=16")]:
        r = subprocess.run([sys.executable, "-c", script.replace("{BAD}", repr(bad))], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, f"{bad}: the child ended with {r.returncode}: {r.stderr[-1500:]}"
        assert "ERROR:" in r.stdout and message in r.stdout, (bad, r.stdout)


@pytest.mark.cuda
@pytest.mark.parametrize("dim, L, N, groups, dtype", [
    (64, 1500, 16, None, torch.bfloat16),
    # 4-channel blocks, 16 state slots and a 13-group sequence split (small grid): run 13's
    # prefetch experiment saw last-bit differences here between two kernel variants
    (16, 203, 256, 1, torch.float32),
])
def test_deterministic(dim, L, N, groups, dtype):
    inputs = make_inputs(3, 2, dim, L, N, dtype, groups, True, True, True, True)
    present = [i for i, t in enumerate(inputs) if t is not None]
    gout = torch.randn(2, dim, L, device="cuda", dtype=torch.float64)
    glast = torch.randn(2, dim, N, device="cuda", dtype=torch.float64)
    results = []
    for _ in range(2):
        x = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
        out, last, grads = run_all(ours, x, True, present, gout, glast)
        results.append([out, last, *grads])
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("batch, L", [(0, 64), (2, 0)])
def test_empty_inputs(batch, L):
    # empty batch or sequence: zero-size outputs and gradients, no launch (and no division by the
    # empty grid when the kernels choose their sequence split)
    inputs = make_inputs(5, batch, 8, L, 16, torch.float32, None, True, True, True, True)
    x = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    out, last = ssc.selective_scan_cuda(*x, True, True)
    assert out.shape == (batch, 8, L) and last.shape == (batch, 8, 16)
    assert torch.all(last == 0)
    (out.sum() + last.sum()).backward()
    assert x[0].grad.shape == (batch, 8, L) and x[2].grad.shape == (8, 16)


@pytest.mark.cuda
def test_backend_dispatch_uses_cuda():
    from mamba_ssm.backend import use_backend
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    u, delta, A, B, C, D, z, bias = make_inputs(9, 2, 8, 64, 16, torch.float32, None, True, True, True, True)
    with use_backend("cuda"):
        out = selective_scan_fn(u, delta, A, B, C, D, z, bias, True)
    ref = selective_scan_ref(u, delta, A, B, C, D, z, bias, True)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.cuda
def test_no_grad_forward_matches():
    u, delta, A, B, C, D, z, bias = make_inputs(4, 2, 16, 77, 16, torch.bfloat16, 1, True, True, True, True)
    with torch.no_grad():
        out1, last1 = ssc.selective_scan_cuda(u, delta, A, B, C, D, z, bias, True, True)
    u.requires_grad_(True)
    out2, last2 = ssc.selective_scan_cuda(u, delta, A, B, C, D, z, bias, True, True)
    assert torch.equal(out1, out2.detach()) and torch.equal(last1, last2.detach())


SMALL_CASE = textwrap.dedent(
    """
    import torch
    from mamba_ssm.ops.selective_scan_cuda import override_settings, selective_scan_cuda
    torch.manual_seed(0)
    # (2, 32, 50, 16) and (1, 16, 64, 16) take the lane-permuted backward, (1, 4, 70, 64) and
    # (2, 5, 37, 16) the per-channel one; (1, 16, 64, 32) fwd2's forward without bounds checks,
    # (1, 16, 64, 16) with tp False its dstate-16 instantiation (and carry pass: split in 4), with
    # tp True and no split the time-parallel forward's without bounds checks (a split in groups of
    # one 16-step chunk would take the general one), and (2, 32, 50, 16) its general one
    for (b, d, L, n, g, tp, split) in [
            (2, 5, 37, 16, None, False, None), (1, 4, 70, 64, 2, False, None), (1, 2, 17, 256, None, False, None),
            (2, 32, 50, 16, 1, True, None), (1, 16, 64, 32, None, False, None), (1, 16, 64, 16, None, True, 1),
            (1, 16, 64, 16, None, False, None)]:
        with override_settings(fwd_tp=tp, split=split, poison=True):
            u = torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            dt = torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            A = (-torch.rand(d, n, device="cuda") - 0.1).requires_grad_(True)
            shp = (b, n, L) if g is None else (b, g, n, L)
            B = torch.randn(*shp, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            C = torch.randn(*shp, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            D = torch.randn(d, device="cuda", requires_grad=True)
            z = torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            bias = torch.rand(d, device="cuda", requires_grad=True)
            out, last = selective_scan_cuda(u, dt, A, B, C, D, z, bias, True, True)
            (out.float().sum() + last.sum()).backward()
    torch.cuda.synchronize()
    print("small case done")
    """
)


TP_FORWARD_CASE = textwrap.dedent(
    """
    import torch
    from mamba_ssm.ops.selective_scan_cuda import override_settings, selective_scan_cuda
    torch.manual_seed(0)
    # the time-parallel forward alone: branch-free (64 steps, unsplit), general (50 steps, groups),
    # and in 3 sequence groups (with fwd2's carry pass), in blocks of 16, 4 and 8 channels
    for (b, d, L, g, split) in [(1, 16, 64, None, 1), (2, 32, 50, 1, 1), (1, 16, 200, None, 3),
                                (1, 4, 96, None, 1), (1, 8, 160, None, 1)]:
        with override_settings(fwd_tp=True, tp_cpb=16, split=split, poison=True):
            u, dt, z = (torch.randn(b, d, L, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            A = -torch.rand(d, 16, device="cuda") - 0.1
            shp = (b, 16, L) if g is None else (b, g, 16, L)
            B, C = (torch.randn(*shp, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            D, bias = torch.randn(d, device="cuda"), torch.rand(d, device="cuda")
            out, last = selective_scan_cuda(u, dt, A, B, C, D, z, bias, True, True)
            torch.cuda.synchronize()
    print("tp case done")
    """
)


def run_sanitizer(tool, case, tmp_path):
    """Runs the script `case` under compute-sanitizer's `tool`; returns its exit code and output."""
    script = tmp_path / "case.py"
    script.write_text(case)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd()] + [p for p in sys.path if p])
    proc = subprocess.run(
        ["compute-sanitizer", "--tool", tool, "--error-exitcode", "3", sys.executable, str(script)],
        capture_output=True, text=True, timeout=240, env=env,
    )
    return proc.returncode, proc.stdout + proc.stderr


@pytest.mark.cuda
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not found")
def test_compute_sanitizer_racecheck_time_parallel_forward(tmp_path):
    # the time-parallel forward's double-buffered staging (one __syncthreads per sub-chunk): racecheck
    # finds no shared-memory hazard
    rc, log = run_sanitizer("racecheck", TP_FORWARD_CASE, tmp_path)
    assert rc == 0, log[-4000:]
    # (racecheck's summary reads "RACECHECK SUMMARY: N hazards displayed (E errors, W warnings)")
    assert "tp case done" in log and ("(0 errors" in log or "ERROR SUMMARY: 0 errors" in log), log[-4000:]


@pytest.mark.cuda
@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer not found")
def test_compute_sanitizer_memcheck(tmp_path):
    rc, log = run_sanitizer("memcheck", SMALL_CASE, tmp_path)
    assert rc == 0, log[-4000:]
    assert "small case done" in log and "ERROR SUMMARY: 0 errors" in log, log[-4000:]
