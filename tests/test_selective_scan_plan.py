"""The CUDA scan's launch planning (mamba_ssm/ops/selective_scan_plan.py) and its settings, on CPU.

The pinned choices are those measured on H100/H200 runs (132 SMs; docs/selective_scan.md); each
number is derived in a comment from the rules, so that a change of rule shows here first.
"""
from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys

import pytest

from mamba_ssm.ops import selective_scan_plan as sp
from mamba_ssm.ops.selective_scan_settings import (
    ENV,
    ScanSettings,
    current_settings,
    env_fields,
    override_settings,
    settings_from_env,
)

SMS = 132
DEFAULT = ScanSettings()


def fwd(batch, dim, seqlen, dstate, groups=1, settings=DEFAULT, sms=SMS):
    return sp.plan_forward(batch, dim, seqlen, dstate, groups, sms, settings)


def bwd(batch, dim, seqlen, dstate, groups=1, settings=DEFAULT, sms=SMS):
    return sp.plan_backward(batch, dim, seqlen, dstate, groups, sms, settings)


# ---- the measured choices -------------------------------------------------------------------
def test_batch1_prefill_takes_the_time_parallel_forward_in_8_channel_blocks():
    # fwd2 would give 4096 x 4 lanes = 512 warps, and 4 x 512 = 2048 < 2 x 16 x 132 = 4224: a small
    # grid, so fwd_tp. Its 16 lanes give 2048 warps, 4 x 2048 = 8192 >= 4224: no split. Blocks: 16
    # divides 4096 but exceeds the default cap 8, so 8.
    p = fwd(1, 4096, 16384, 16)
    assert (p.kernel, p.channels_per_block, p.tp_cpb, p.nsplit) == ("fwd_tp", 8, 8, 1)
    assert (p.R, p.nseg, p.gseg) == (1, 1024, 1024)
    assert p.cpb == 16  # (fwd2's blocks, which a split's carry pass would use)


@pytest.mark.parametrize("shape", [(8, 4096, 2048, 16), (8, 1536, 2048, 16)])
def test_batch8_takes_fwd2_unsplit(shape):
    # 8 x 4096 x 4 / 32 = 4096 and 8 x 1536 x 4 / 32 = 1536 warps: 4 x warps >= 4224, not small
    p = fwd(*shape)
    assert (p.kernel, p.channels_per_block, p.nsplit) == ("fwd2", 16, 1)


def test_fwd2_at_batch1_splits_in_9():
    # (settings.fwd_tp False) 512 warps in a small grid: ceil(4224 / 512) = 9 groups; 1024
    # segments in groups of ceil(1024 / 9) = 114 -> ceil(1024 / 114) = 9
    p = fwd(1, 4096, 16384, 16, settings=ScanSettings(fwd_tp=False))
    assert (p.kernel, p.nsplit, p.gseg) == ("fwd2", 9, 114)


def test_lora_backward_of_1_29_waves_is_split_in_3():
    # LoRA 1.4b step: 4 x 4096 channels, 4 lanes: 2048 warps against 12 x 132 = 1584 resident,
    # 1.29 waves. Estimates: s=1 ceil(1.29) = 2; s=2 ceil(2.59) / 2 x 1.15 = 1.725; s=3 ceil(3.88)
    # / 3 x 1.15 = 1.533; s=4 ceil(5.17) / 4 x 1.15 = 1.725: 3 groups of ceil(128 / 3) = 43 segments
    p = bwd(4, 4096, 2048, 16)
    assert (p.cpb, p.nsplit, p.gseg) == (32, 3, 43)
    assert fwd(4, 4096, 2048, 16).nsplit == 1  # the forward is never wave-balanced


def test_batch1_backward_gets_whole_waves():
    # 512 warps, a small grid (2048 < 2 x 12 x 132 = 3168): 3168 // 512 = 6 groups (1.94 waves; 7
    # would be 2.26 waves, run as 3); 1024 segments in groups of 171 -> 6
    p = bwd(1, 4096, 16384, 16)
    assert (p.cpb, p.parts, p.nsplit, p.gseg) == (32, 128, 6, 171)
    assert p.nsplit * sp.grid_warps(1, 4096, 4) <= 2 * 12 * SMS


def test_batch8_backward_is_not_split():
    # 4096 warps = 2.59 waves: s=1 3; s=2 ceil(5.17) / 2 x 1.15 = 3.45; s=3 ceil(7.76) / 3 x 1.15
    # = 3.07; s=4 ceil(10.3) / 4 x 1.15 = 3.16: none below 3
    assert bwd(8, 4096, 2048, 16).nsplit == 1
    # 1536 warps = 0.97 waves: under one wave, never split
    assert bwd(8, 1536, 2048, 16).nsplit == 1


# ---- settings that override the rules -------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 5, 64])
def test_split_forces_n_groups(n):
    s = ScanSettings(split=n)
    for shape in [(1, 4096, 16384, 16), (8, 4096, 2048, 16), (4, 4096, 2048, 16)]:
        f, b = fwd(*shape, settings=s), bwd(*shape, settings=s)
        assert f.nsplit == n and b.nsplit == n, shape
        assert f.gseg == math.ceil(f.nseg / n)


def test_split_is_capped_by_64_and_the_segments_and_leaves_no_group_empty():
    assert fwd(1, 64, 16 * 256, 16, settings=ScanSettings(split=100)).nsplit == 64  # groups of 4 segments
    # 200 segments: 64 groups would be ceil(200 / 64) = 4 segments each, which takes only 50 groups
    assert fwd(1, 64, 16 * 200, 16, settings=ScanSettings(split=100)).nsplit == 50
    assert fwd(1, 64, 16 * 10, 16, settings=ScanSettings(split=40)).nsplit == 10
    # 10 segments asked into 7 groups: groups of 2, so 5 groups (none empty)
    p = fwd(1, 64, 16 * 10, 16, settings=ScanSettings(split=7))
    assert (p.nsplit, p.gseg) == (5, 2)


@pytest.mark.parametrize("shape", [(8, 4096, 2048, 16), (1, 4096, 16384, 16), (1, 24, 100, 16)])
def test_fwd_tp_setting_forces_either_layout(shape):
    assert fwd(*shape, settings=ScanSettings(fwd_tp=True)).kernel == "fwd_tp"
    assert fwd(*shape, settings=ScanSettings(fwd_tp=False)).kernel == "fwd2"


@pytest.mark.parametrize("dim, cap, cpb", [
    (4096, 16, 16), (4096, 8, 8), (4096, 4, 4),
    (24, 16, 8), (24, 8, 8), (24, 4, 4),   # 16 does not divide 24
    (12, 16, 4), (12, 8, 4),               # nor 8 divides 12
])
def test_tp_cpb_caps_the_time_parallel_blocks(dim, cap, cpb):
    p = fwd(1, dim, 2048, 16, settings=ScanSettings(tp_cpb=cap, fwd_tp=True))
    assert (p.kernel, p.channels_per_block) == ("fwd_tp", cpb)


@pytest.mark.parametrize("dstate", [17, 32, 64, 256])
def test_dstate_above_16_never_takes_fwd_tp(dstate):
    for setting in (None, True):
        assert fwd(1, 4096, 16384, dstate, settings=ScanSettings(fwd_tp=setting)).kernel == "fwd2"


def test_channels_per_group_not_a_multiple_of_4_never_take_fwd_tp():
    assert fwd(1, 6, 512, 16, settings=ScanSettings(fwd_tp=True)).kernel == "fwd2"
    assert fwd(1, 24, 512, 16, groups=3, settings=ScanSettings(fwd_tp=True)).kernel == "fwd_tp"  # 8 per group
    assert fwd(1, 24, 512, 16, groups=4, settings=ScanSettings(fwd_tp=True)).kernel == "fwd2"  # 6 per group


def test_segment_sets_R_and_the_segment_count():
    p = fwd(2, 64, 1000, 16, settings=ScanSettings(segment=64))
    assert (p.R, p.nseg) == (4, 16)  # ceil(1000 / 16) = 63 sub-chunks, ceil(63 / 4) = 16
    assert ScanSettings(segment=1).R == 1 and ScanSettings(segment=17).R == 2 and ScanSettings(segment=1024).R == 64


def test_empty_inputs_plan_one_group():
    assert (fwd(0, 64, 100, 16).nsplit, bwd(2, 64, 0, 16).nsplit) == (1, 1)


# ---- the backward's shared-memory budget, by hand ---------------------------------------------
def test_backward_shared_memory_by_hand():
    # dstate 16, 32 channels, R = 1 (reduction mode 2: 4 permuted copies of B/C): rows of 20 floats;
    # B/C 4 x (2 x 16 x 20 + 16) = 2624, dt/dtu/dy 32 x 60 = 1920, states 4 x 3 x 128 = 1536,
    # h history 4 x 16 x 128 = 8192, dB/dC 4 warps x 2 x (320 + 16) = 2688: 16960 floats
    assert sp.scan_bwd2_smem_floats(32, 16, 1) == 16960
    assert bwd(8, 4096, 2048, 16).smem_bytes == 16960 * 4
    # dstate 256 (16 slots, mode 1), R = 1: rows of 260 floats. 32 channels: 8320 + 1920 + 24576 +
    # 8192 + 4 x 2 x 4176 = 76416 floats (305,664 B); 16: 8320 + 960 + 12288 + 4096 + 16704 =
    # 42368 (169,472 B); 8: 8320 + 480 + 6144 + 2048 + 8352 = 25344 (101,376 B <= 112,640): 8
    assert [sp.scan_bwd2_smem_floats(c, 256, 1) for c in (32, 16, 8)] == [76416, 42368, 25344]
    p = bwd(1, 64, 4096, 256)
    assert (p.cpb, p.smem_bytes) == (8, 101376)
    # segments of 1024 steps (R = 64) leave nothing under the cap: 1 channel per block
    assert bwd(1, 64, 4096, 256, settings=ScanSettings(segment=1024)).cpb == 1


def test_backward_blocks_respect_the_cap_over_a_sweep():
    for dstate, segment, dim in itertools.product([1, 4, 16, 17, 32, 64, 128, 256], [16, 64, 256, 1024], [8, 96, 4096]):
        p = bwd(2, dim, 2048, dstate, settings=ScanSettings(segment=segment))
        assert dim % p.cpb == 0 and p.cpb & (p.cpb - 1) == 0 and p.parts * p.cpb == dim
        # the largest power of two <= 32 dividing dim whose budget fits (or 1)
        fits = [c for c in (32, 16, 8, 4, 2) if sp.scan_bwd2_smem_floats(c, dstate, p.R) * 4 <= sp.BWD_SMEM_CAP]
        cap = fits[0] if fits else 1
        assert p.cpb == math.gcd(cap, dim & -dim), (dstate, segment, dim, p)


# ---- an independent check of the split arithmetic -----------------------------------------------
def test_wave_balanced_split_against_an_explicit_wave_count():
    # the least of (waves run) / s x (1.15 if split) over s in 1..4, waves counted by an integer
    # ceiling (no floating point in the count): 1.29 waves -> 3, 2.59 -> 1, 1.5 -> 2 (1.5 x 2 = 3
    # whole waves), under one wave -> 1
    def brute(warps, per_wave):
        if warps < per_wave:
            return 1
        cost = {s: (-(-warps * s // per_wave)) * 100 * (115 if s > 1 else 100) // s for s in range(1, 5)}
        return min(cost, key=lambda s: (cost[s], s))

    for warps, per_wave in [(2048, 1584), (4096, 1584), (2376, 1584), (1000, 1584), (1584, 1584), (3169, 1584)]:
        assert sp.wave_balanced_split(warps, per_wave) == brute(warps, per_wave), (warps, per_wave)
    assert sp.wave_balanced_split(2048, 1584) == 3 and sp.wave_balanced_split(2376, 1584) == 2


def test_plan_invariants_over_a_sweep():
    for batch, dim, seqlen, dstate, segment, split in itertools.product(
            [1, 2, 8], [4, 24, 1536, 4096], [1, 31, 2048, 16384], [1, 16, 64], [16, 64], [None, 3]):
        s = ScanSettings(segment=segment, split=split)
        for p in (fwd(batch, dim, seqlen, dstate, settings=s), bwd(batch, dim, seqlen, dstate, settings=s)):
            assert 1 <= p.nsplit <= min(sp.MAX_SPLIT, max(1, p.nseg))
            assert (p.nsplit - 1) * p.gseg < max(1, p.nseg) <= p.nsplit * p.gseg  # none empty, all covered


def test_plans_are_cached_per_shape():
    assert fwd(3, 96, 500, 16) is fwd(3, 96, 500, 16)
    assert bwd(3, 96, 500, 16) is bwd(3, 96, 500, 16)


# ---- settings ----------------------------------------------------------------------------------
def test_settings_from_the_environment():
    env = {ENV["segment"]: "64", ENV["save_y"]: "0", ENV["split"]: "3", ENV["fwd_tp"]: "1", ENV["tp_cpb"]: "16",
           ENV["exact_softplus"]: "1", ENV["poison"]: "1"}
    assert settings_from_env(env) == ScanSettings(segment=64, save_y=False, split=3, fwd_tp=True, tp_cpb=16,
                                                  exact_softplus=True, poison=True)
    assert settings_from_env({}) == ScanSettings()
    assert settings_from_env({ENV["fwd_tp"]: "auto", ENV["split"]: "auto", ENV["segment"]: ""}) == ScanSettings()
    assert env_fields({ENV["fwd_tp"]: "0", "OTHER": "x"}) == {"fwd_tp": False}


@pytest.mark.parametrize("name, value, expected", [
    ("MAMBA_SSM_SCAN_SEGMENT", "sixteen", "1..1024"),
    ("MAMBA_SSM_SCAN_SEGMENT", "0", "1..1024"),
    ("MAMBA_SSM_SCAN_SEGMENT", "2048", "1..1024"),
    ("MAMBA_SSM_SCAN_SAVE_Y", "maybe", "1 or 0"),
    ("MAMBA_SSM_SCAN_SPLIT", "0", "positive"),
    ("MAMBA_SSM_SCAN_FWD_TP", "yes please", "auto, 1 or 0"),
    ("MAMBA_SSM_SCAN_TP_CPB", "32", "4, 8, 16"),
    ("MAMBA_SSM_SCAN_EXACT_SOFTPLUS", "2", "1 or 0"),
    ("MAMBA_SSM_POISON", "nan", "1 or 0"),
])
def test_bad_values_name_the_variable_and_the_expected_values(name, value, expected):
    with pytest.raises(ValueError) as e:
        settings_from_env({name: value})
    assert name in str(e.value) and expected in str(e.value)


def test_bad_fields_name_the_field_and_the_variable():
    with pytest.raises(ValueError, match="MAMBA_SSM_SCAN_SEGMENT.*segment"):
        ScanSettings(segment=0)
    with pytest.raises(ValueError, match="MAMBA_SSM_SCAN_TP_CPB.*tp_cpb"):
        ScanSettings(tp_cpb=2)
    with pytest.raises(ValueError, match="MAMBA_SSM_SCAN_SPLIT"):
        ScanSettings(split=0)
    with pytest.raises(ValueError, match="MAMBA_SSM_SCAN_SAVE_Y"):
        ScanSettings(save_y="0")


def test_removed_switches_warn():
    with pytest.warns(RuntimeWarning, match="MAMBA_SSM_SCAN_BWD_PERM is no longer read"):
        settings_from_env({"MAMBA_SSM_SCAN_BWD_PERM": "0"})


def test_override_settings_is_temporary():
    before = current_settings()
    with override_settings(split=3, fwd_tp=True) as s:
        assert current_settings() is s and (s.split, s.fwd_tp) == (3, True)
        with override_settings(split=None):
            assert current_settings().split is None and current_settings().fwd_tp is True
        assert current_settings().split == 3
    assert current_settings() is before
    with pytest.raises(ValueError):
        with override_settings(segment=5000):
            pass
    assert current_settings() is before


def test_settings_are_read_once_at_import():
    # a fresh interpreter with a setting in its environment sees it; changing os.environ later
    # does not (settings are not read per call)
    code = ("import os; from mamba_ssm.ops import selective_scan_settings as s; a = s.current_settings().segment; "
            "os.environ['MAMBA_SSM_SCAN_SEGMENT'] = '32'; print(a, s.current_settings().segment)")
    env = dict(os.environ, MAMBA_SSM_SCAN_SEGMENT="64")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["64", "64"]
    env["MAMBA_SSM_SCAN_SEGMENT"] = "abc"
    bad = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True)
    assert bad.returncode != 0 and "MAMBA_SSM_SCAN_SEGMENT='abc'" in bad.stderr
