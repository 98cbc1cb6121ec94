"""Launch planning of the CUDA selective scan: which forward kernel, channels per block, sequence
split. Pure Python (no torch, no GPU): the binding receives the plan's integers and only checks
them. Measurements behind each rule: docs/selective_scan.md.

Terms: a 16-step *sub-chunk*; R sub-chunks per *segment* (a saved state, ScanSettings.segment);
nseg = ceil(ceil(seqlen / 16) / R) segments, cut into ``nsplit`` sequence groups of ``gseg``
segments each. ``cpb``: channels of one batch row per block (a power of two dividing dim / groups).
"""
from __future__ import annotations

import dataclasses
import functools
import math

from mamba_ssm.ops.selective_scan_settings import ScanSettings

MAX_SPLIT = 64
FWD_RESIDENT_WARPS = 16  # per SM: fwd2 (64-thread blocks, 8 per SM) and fwd_tp (16 warps)
BWD_RESIDENT_WARPS = 12  # per SM: bwd2 (128-thread blocks, 3 per SM at 168 registers)
BWD_SMEM_CAP = 110 * 1024  # bytes per backward block: 2 blocks per SM on an H100/H200
FWD2_MAX_CPB = 16
BWD_MAX_CPB = 32
SPLIT_COST = 1.15  # time charged per wave-balancing split (its carry pass)


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    """kernel: "fwd2" (4 lanes per channel) or "fwd_tp" (time-parallel, 16 lanes per channel);
    cpb: fwd2's channels per block (also the split's carry pass, which runs in fwd2's layout);
    tp_cpb: fwd_tp's channels per block (4, 8 or 16; meaningful when kernel is "fwd_tp");
    nsplit, gseg: sequence groups and segments per group; R, nseg: as in the module docstring."""
    kernel: str
    cpb: int
    tp_cpb: int
    nsplit: int
    gseg: int
    R: int
    nseg: int

    @property
    def fwd_tp(self) -> bool:
        return self.kernel == "fwd_tp"

    @property
    def channels_per_block(self) -> int:
        """Channels per block of the main forward kernel."""
        return self.tp_cpb if self.fwd_tp else self.cpb


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    """cpb: bwd2's channels per block; parts = dim / groups / cpb dB/dC partials (summed after);
    nsplit, gseg, R, nseg: as in ForwardPlan; smem_bytes: bwd2's dynamic shared memory."""
    cpb: int
    parts: int
    nsplit: int
    gseg: int
    R: int
    nseg: int
    smem_bytes: int


def pick_cpb(dpg: int, cpb_max: int) -> int:
    """The largest power of two <= cpb_max dividing dpg (channels per group)."""
    c = 1
    while c * 2 <= cpb_max and dpg % (c * 2) == 0:
        c *= 2
    return c


def grid_warps(batch: int, dim: int, lanes: int) -> int:
    """Warps of a launch that gives each of batch x dim channels `lanes` threads."""
    return (batch * dim * lanes + 31) // 32


def small_grid(batch: int, dim: int, lanes: int, resident_warps: int, sm_count: int) -> bool:
    """The grid fills less than half of the two waves the kernels are sized for (batch 1, long
    sequences): the threshold of the sequence split and of the time-parallel forward."""
    return 4 * grid_warps(batch, dim, lanes) < 2 * resident_warps * sm_count


def wave_balanced_split(warps: int, warps_per_wave: int) -> int:
    """A grid of one wave or more loses the idle part of its last one (1.29 waves run as 2). s
    groups give s times the blocks, each s times shorter: the s in 1..4 of least estimated time
    ceil(waves * s) / s, a split charged SPLIT_COST. Below one wave: 1 (fewer warps per SM each
    run faster there, and the estimate does not hold)."""
    if warps < warps_per_wave:
        return 1
    best = float(math.ceil(warps / warps_per_wave))
    n = 1
    for s in range(2, 5):
        t = math.ceil(warps * s / warps_per_wave) / s * SPLIT_COST
        if t < best - 1e-9:
            best, n = t, s
    return n


def pick_split(batch: int, dim: int, nseg: int, lanes: int, resident_warps: int, sm_count: int,
               balance_waves: bool, forced: int | None) -> tuple[int, int]:
    """(nsplit, gseg). Small grids split to about two waves (rounded down to whole waves with
    balance_waves: the backward); with balance_waves larger grids take wave_balanced_split;
    `forced` (ScanSettings.split) overrides both. At most MAX_SPLIT and nseg groups, none empty."""
    gseg = max(1, nseg)
    if batch <= 0 or dim <= 0 or nseg <= 0:
        return 1, gseg  # empty input: nothing is launched
    warps = grid_warps(batch, dim, lanes)
    want = 2 * resident_warps * sm_count
    if forced is not None:
        n = max(1, forced)
    elif small_grid(batch, dim, lanes, resident_warps, sm_count):
        n = want // warps if balance_waves else (want + warps - 1) // warps
    elif balance_waves:
        n = wave_balanced_split(warps, resident_warps * sm_count)
    else:
        n = 1
    n = min(n, MAX_SPLIT, nseg)
    gseg = (nseg + n - 1) // n
    return (nseg + gseg - 1) // gseg, gseg


def segments(seqlen: int, R: int) -> int:
    return ((seqlen + 15) // 16 + R - 1) // R


def scan_bwd2_smem_floats(cpb: int, dstate: int, R: int) -> int:
    """bwd2's dynamic shared memory in floats (a copy of scan_params.h's scan_bwd2_smem_floats)."""
    spl = (dstate + 15) // 16
    nthr = 4 * cpb
    bw = spl * 16 + 4
    red_mode = 0 if cpb < 8 else (2 if spl == 1 else 1)  # scan_bwd2_red_mode
    bc = 4 * (2 * 16 * bw + 16) if red_mode == 2 else 2 * 16 * bw
    slots = cpb // 8 if red_mode else cpb
    return bc + cpb * 3 * 20 + 4 * (R + 2) * spl * nthr + 4 * 16 * nthr + slots * 2 * (16 * bw + 16)


@functools.lru_cache(maxsize=1024)
def plan_forward(batch: int, dim: int, seqlen: int, dstate: int, groups: int, sm_count: int,
                 settings: ScanSettings) -> ForwardPlan:
    """The forward's launch for u (batch, dim, seqlen), A (dim, dstate), B/C in `groups` groups,
    on a GPU of `sm_count` multiprocessors. fwd_tp (dstate <= 16, 4 | dim / groups) by default
    where fwd2 would leave the GPU mostly idle (small_grid with fwd2's 4 lanes); blocks of 8
    channels where 8 divides dim / groups, 16 only with settings.tp_cpb 16."""
    dpg = dim // groups
    R = settings.R
    nseg = segments(seqlen, R)
    cpb = pick_cpb(dpg, FWD2_MAX_CPB)
    tp_cpb = 4
    fwd_tp = False
    if dstate <= 16 and dpg % 4 == 0:
        for c in (16, 8):
            if tp_cpb == 4 and c <= settings.tp_cpb and dpg % c == 0:
                tp_cpb = c
        if settings.fwd_tp is None:
            fwd_tp = small_grid(batch, dim, 4, FWD_RESIDENT_WARPS, sm_count)
        else:
            fwd_tp = settings.fwd_tp
    nsplit, gseg = pick_split(batch, dim, nseg, 16 if fwd_tp else 4, FWD_RESIDENT_WARPS, sm_count, False,
                              settings.split)
    return ForwardPlan("fwd_tp" if fwd_tp else "fwd2", cpb, tp_cpb, nsplit, gseg, R, nseg)


@functools.lru_cache(maxsize=1024)
def plan_backward(batch: int, dim: int, seqlen: int, dstate: int, groups: int, sm_count: int,
                  settings: ScanSettings) -> BackwardPlan:
    """The backward's launch (same arguments as plan_forward): the largest power-of-two channel
    count <= 32 whose shared memory fits BWD_SMEM_CAP, then the split (whole waves on small grids,
    wave_balanced_split on larger ones)."""
    dpg = dim // groups
    R = settings.R
    nseg = segments(seqlen, R)
    cap = BWD_MAX_CPB
    while cap > 1 and scan_bwd2_smem_floats(cap, dstate, R) * 4 > BWD_SMEM_CAP:
        cap //= 2
    cpb = pick_cpb(dpg, cap)
    nsplit, gseg = pick_split(batch, dim, nseg, 4, BWD_RESIDENT_WARPS, sm_count, True, settings.split)
    return BackwardPlan(cpb, dpg // cpb, nsplit, gseg, R, nseg, scan_bwd2_smem_floats(cpb, dstate, R) * 4)
