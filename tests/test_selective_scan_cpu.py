"""The C forward and backward of the CPU scan (mamba_ssm/ops/selective_scan_cpu.py) against their
references (_forward_streaming, the PyTorch backward) and a float64 recurrence; the build, cache
and fall-back."""
import math
import warnings

import pytest
import torch

from mamba_ssm.ops import selective_scan_chunked as chunked
from mamba_ssm.ops import selective_scan_cpu as cpu
from mamba_ssm.ops.packing import seq_idx_from_cu_seqlens
from mamba_ssm.ops.selective_scan_chunked import selective_scan_chunked
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn, selective_scan_ref

needs_lib = pytest.mark.skipif(cpu.library() is None, reason="no C compiler: the C scan cannot be built here")


def inputs(batch, dim, L, n, GB=1, GC=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    dt = torch.nn.functional.softplus(torch.randn(batch, dim, L, generator=g) - 1.0)
    u = torch.randn(batch, dim, L, generator=g)
    A = -torch.exp(torch.rand(dim, n, generator=g) * 3.0)
    B4 = torch.randn(batch, GB, n, L, generator=g)
    C4 = torch.randn(batch, GC, n, L, generator=g)
    return dt, dt * u, A, B4, C4


def recurrence64(dt, x, A, B4, C4, starts=()):
    """float64, one step at a time: y (b, d, L) and every state (L, b, d, n); a state resets at `starts`."""
    dt, x, A, B4, C4 = (t.double() for t in (dt, x, A, B4, C4))
    b, d, L = dt.shape
    GB, GC = B4.shape[1], C4.shape[1]
    Bd = B4.repeat_interleave(d // GB, dim=1)   # (b, d, n, L)
    Cd = C4.repeat_interleave(d // GC, dim=1)
    h = torch.zeros(b, d, A.shape[1], dtype=torch.float64)
    ys, hs = [], []
    for t in range(L):
        decay = torch.exp(dt[:, :, t, None] * A) * (0.0 if t in starts else 1.0)
        h = decay * h + x[:, :, t, None] * Bd[:, :, :, t]
        ys.append((h * Cd[:, :, :, t]).sum(-1))
        hs.append(h)
    return torch.stack(ys, -1), torch.stack(hs)


def layout(L, T, seq_idx=None, cu_seqlens=None):
    K = -(-L // T)
    keep, chunk_keep, ends = chunked._packing_layout(seq_idx, cu_seqlens, L, K, T, torch.device("cpu"))
    return K, dict(keep=keep, chunk_keep=chunk_keep, ends=ends)


CASES = [  # batch, dim, L, n, GB, GC, T
    (1, 48, 100, 16, 1, 1, 16),    # L not a multiple of T
    (2, 37, 64, 16, 1, 1, 8),      # channels not a multiple of the 16 a block advances
    (1, 40, 33, 5, 1, 1, 11),      # another dstate
    (2, 24, 50, 16, 2, 4, 10),     # grouped B and C, groups narrower than a block
    (1, 20, 1, 64, 1, 1, 1),       # one step
    (1, 16, 130, 256, 1, 1, 64),   # the largest dstate
]


@needs_lib
@pytest.mark.parametrize("batch,dim,L,n,GB,GC,T", CASES)
def test_c_forward_matches_the_reference_and_float64(batch, dim, L, n, GB, GC, T):
    dt, x, A, B4, C4 = inputs(batch, dim, L, n, GB, GC, seed=dim + L)
    G, rB, rC = chunked._groups(dim, GB, GC)
    K, pk = layout(L, T)
    y, HS, last = cpu.forward_streaming(dt, x, A, B4, C4, G, rB, rC, T, K, **pk)
    y_ref, HS_ref, last_ref = chunked._forward_streaming(dt, x, A, B4, C4, G, rB, rC, T, K, **pk)
    torch.testing.assert_close(y, y_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(HS, HS_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(last, last_ref, rtol=2e-5, atol=2e-5)
    y64, h64 = recurrence64(dt, x, A, B4, C4)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last.double(), h64[-1], rtol=1e-5, atol=1e-5)
    # HS[:, k] is the state before chunk k: zero, then the state after step k*T - 1
    assert HS[:, 0].abs().max() == 0
    for k in range(1, K):
        torch.testing.assert_close(HS[:, k].double(), h64[k * T - 1].transpose(-1, -2), rtol=1e-5, atol=1e-5)


@needs_lib
@pytest.mark.parametrize("lengths,T", [([1, 7, 30, 2, 24], 8), ([17] * 70 + [3], 32)])
def test_c_forward_packed_resets_at_boundaries_and_returns_each_final_state(lengths, T):
    L = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    seq_idx = seq_idx_from_cu_seqlens(cu, L)
    dt, x, A, B4, C4 = inputs(1, 24, L, 16, seed=len(lengths))
    K, pk = layout(L, T, seq_idx, cu)
    y, HS, finals = cpu.forward_streaming(dt, x, A, B4, C4, 1, 1, 1, T, K, **pk)
    y_ref, HS_ref, finals_ref = chunked._forward_streaming(dt, x, A, B4, C4, 1, 1, 1, T, K, **pk)
    torch.testing.assert_close(y, y_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(HS, HS_ref, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(finals, finals_ref, rtol=2e-5, atol=2e-5)
    starts = set(cu[:-1].tolist())
    y64, h64 = recurrence64(dt, x, A, B4, C4, starts)
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    ends = (cu[1:] - 1).tolist()
    torch.testing.assert_close(finals.double(), h64[ends, 0], rtol=1e-5, atol=1e-5)


@needs_lib
def test_c_forward_writes_into_a_channel_slice_and_underflows_to_zero():
    dt, x, A, B4, C4 = inputs(2, 32, 40, 16)
    A[:8] = -1e4    # exp(dt A) far below the smallest float: 0, no NaN, no denormal
    whole = torch.full((2, 48, 40), float("nan"))
    y_out = whole[:, 8:40]
    y, _, last = cpu.forward_streaming(dt, x, A, B4, C4, 1, 1, 1, 8, 5, y_out=y_out)
    assert y.data_ptr() == y_out.data_ptr()
    assert torch.isnan(whole[:, :8]).all() and torch.isnan(whole[:, 40:]).all()
    y64, _ = recurrence64(dt, x, A, B4, C4)
    torch.testing.assert_close(y_out.double(), y64, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(last).all()


@needs_lib
def test_selective_scan_fn_on_the_cpu_runs_the_c_forward_and_keeps_its_gradients(monkeypatch):
    calls = []
    real = cpu.forward_streaming
    monkeypatch.setattr(cpu, "forward_streaming", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    u, delta = torch.randn(2, 32, 70, generator=g), torch.randn(2, 32, 70, generator=g)
    A = -torch.rand(32, 16, generator=g) - 0.5
    B, C = torch.randn(2, 16, 70, generator=g), torch.randn(2, 16, 70, generator=g)
    D, z, bias = torch.randn(32, generator=g), torch.randn(2, 32, 70, generator=g), torch.randn(32, generator=g)
    args = [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]

    def run():
        out, last = selective_scan_fn(*args[:7], delta_bias=args[7], delta_softplus=True, return_last_state=True)
        grads = torch.autograd.grad((out * out).sum() + last.sum(), args)
        return out, last, grads

    got = run()
    assert calls
    cpu.set_enabled(False)
    try:
        calls.clear()
        expected = run()
        assert not calls
    finally:
        cpu.set_enabled(True)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[2], expected[2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def scan_inputs(batch, dim, L, n, GB, GC, seed):
    """selective_scan_fn's inputs (u, delta, A, B, C, D, z, delta_bias), B and C grouped (b, G, n, L)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, dim, L, generator=g), torch.randn(batch, dim, L, generator=g) - 1.0,
            -torch.rand(dim, n, generator=g) * 2 - 0.1, torch.randn(batch, GB, n, L, generator=g),
            torch.randn(batch, GC, n, L, generator=g), torch.randn(dim, generator=g),
            torch.randn(batch, dim, L, generator=g), torch.randn(dim, generator=g) * 0.5]


def grads_of(fn, ins, with_last, seed=9, **kw):
    ins = [t.clone().requires_grad_() for t in ins]
    res = fn(*ins[:7], delta_bias=ins[7], delta_softplus=True, return_last_state=with_last, **kw)
    out, last = res if with_last else (res, None)
    g = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=g)).sum()
    if last is not None:
        loss = loss + (last * torch.randn(last.shape, generator=g)).sum()
    return [out] + ([last] if with_last else []) + list(torch.autograd.grad(loss, ins))


BWD_CASES = [  # batch, dim, L, n, GB, GC, chunk
    (1, 48, 100, 16, 1, 1, 16),
    (2, 37, 64, 16, 1, 1, 8),
    (1, 40, 33, 5, 1, 1, 11),
    (2, 24, 50, 16, 2, 4, 10),
    (1, 20, 1, 16, 1, 1, 1),
    (1, 16, 70, 64, 1, 1, 70),
]


@needs_lib
@pytest.mark.parametrize("batch,dim,L,n,GB,GC,chunk", BWD_CASES)
@pytest.mark.parametrize("with_last", [False, True])
def test_c_backward_matches_the_pytorch_backward_and_float64(batch, dim, L, n, GB, GC, chunk, with_last):
    ins = scan_inputs(batch, dim, L, n, GB, GC, seed=dim + L + n)
    got = grads_of(selective_scan_chunked, ins, with_last, chunk_size=chunk)
    cpu.set_enabled(False)
    try:
        expected = grads_of(selective_scan_chunked, ins, with_last, chunk_size=chunk)
    finally:
        cpu.set_enabled(True)
    oracle = grads_of(selective_scan_ref, [t.double() for t in ins], with_last)
    for a, b, o in zip(got, expected, oracle):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.double(), o.double(), rtol=1e-4, atol=1e-4)


@needs_lib
@pytest.mark.parametrize("with_last", [True, False])
@pytest.mark.parametrize("lengths,chunk", [([1, 7, 30, 2, 24], 8), ([5] * 70 + [3], 32)])
def test_c_backward_packed_with_each_sequences_final_state(lengths, chunk, with_last):
    L = sum(lengths)
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    ins = scan_inputs(1, 24, L, 16, 1, 1, seed=len(lengths))
    got = grads_of(selective_scan_chunked, ins, with_last, chunk_size=chunk, cu_seqlens=cu)
    cpu.set_enabled(False)
    try:
        expected = grads_of(selective_scan_chunked, ins, with_last, chunk_size=chunk, cu_seqlens=cu)
    finally:
        cpu.set_enabled(True)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    if not with_last:
        return
    # each sequence alone, from a zero state
    for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone = [t[..., s:e] if t.dim() >= 3 else t for t in ins]
        out, last = selective_scan_ref(*[t.double() for t in alone[:7]], delta_bias=alone[7].double(),
                                       delta_softplus=True, return_last_state=True)
        torch.testing.assert_close(got[0][..., s:e].double(), out, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[1][i:i + 1].double(), last.double(), rtol=1e-4, atol=1e-4)


def test_without_a_compiler_it_warns_once_and_the_pytorch_scan_runs(monkeypatch):
    monkeypatch.setattr(cpu, "_lib", None)
    monkeypatch.setattr(cpu, "_failed", None)
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        assert cpu.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu.library() is None and not cpu.usable(16)
        u = torch.randn(1, 8, 20)
        out = selective_scan_fn(u, torch.rand(1, 8, 20), -torch.rand(8, 4), torch.randn(1, 4, 20),
                                torch.randn(1, 4, 20))
    assert torch.isfinite(out).all()


@needs_lib
def test_the_build_is_cached_under_a_key_and_a_failed_native_flag_is_retried_without(monkeypatch, tmp_path):
    monkeypatch.setenv("MAMBA_SSM_CACHE_DIR", str(tmp_path))
    cc = cpu._compiler()
    real_run = cpu.subprocess.run
    path = cpu._build(cc)
    assert path.parent == tmp_path and path.name.startswith("selective_scan_cpu-") and path.exists()
    assert list(tmp_path.iterdir()) == [path]     # no temporary file left behind

    def no_compiling(*a, **k):
        raise AssertionError("compiled again")
    monkeypatch.setattr(cpu.subprocess, "run", no_compiling)
    assert cpu._build(cc) == path

    def reject_native(cmd, **k):
        if cpu.NATIVE in cmd:
            return real_run(["false"], **k)
        return real_run(cmd, **k)
    monkeypatch.setattr(cpu.subprocess, "run", reject_native)
    monkeypatch.setenv("MAMBA_SSM_CACHE_DIR", str(tmp_path / "other"))
    portable = cpu._build(cc)
    assert portable.exists() and portable.name != path.name
    fn = cpu._load(portable).forward
    dt, x, A, B4, C4 = inputs(1, 16, 12, 16)
    y = torch.empty(1, 16, 12)
    assert fn(1, 16, 12, 16, dt.data_ptr(), x.data_ptr(), (A * cpu.LOG2E).data_ptr(),
              B4.transpose(-1, -2).contiguous().data_ptr(), C4.transpose(-1, -2).contiguous().data_ptr(), 1, 1, 16,
              16, None, y.data_ptr(), 192, 12, 12, 1, None, None, None, 0, None) == 0
    torch.testing.assert_close(y.double(), recurrence64(dt, x, A, B4, C4)[0], rtol=1e-5, atol=1e-5)


@needs_lib
def test_dstate_beyond_the_c_limit_takes_the_pytorch_scan():
    assert cpu.usable(cpu.MAX_DSTATE) and not cpu.usable(cpu.MAX_DSTATE + 1)
    dt, x, A, B4, C4 = inputs(1, 4, 6, cpu.MAX_DSTATE + 1)
    with pytest.raises(ValueError, match=r"dstate must be in \[1, 256\], got 257"):
        cpu.forward_streaming(dt, x, A, B4, C4, 1, 1, 1, 6, 1)


@pytest.mark.parametrize("value,expected", [(None, True), ("", True), ("1", True), ("On", True), ("0", False),
                                            ("no", False)])
def test_setting_values(value, expected):
    assert cpu.parse_setting(value) is expected


def test_bad_setting_names_the_variable():
    with pytest.raises(ValueError, match="MAMBA_SSM_CPU_KERNEL='2'"):
        cpu.parse_setting("2")
    with pytest.raises(TypeError, match="enabled must be True or False"):
        cpu.set_enabled(1)


def test_turned_off_gives_no_library():
    cpu.set_enabled(False)
    try:
        assert cpu.library() is None and not cpu.usable(16)
    finally:
        cpu.set_enabled(True)
    assert math.isclose(cpu.LOG2E, math.log2(math.e))


@needs_lib
@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="x86 vector widths")
def test_every_vector_width_gives_the_same_scan(tmp_path):
    """The source's three vector widths (AVX-512: 16 lanes, AVX2: 8, SSE2: 4), each built and run."""
    import subprocess

    g = torch.Generator().manual_seed(0)
    b, d, L, n, T, K = 2, 40, 77, 16, 10, 8
    dt = torch.nn.functional.softplus(torch.randn(b, d, L, generator=g) - 1)
    u = torch.randn(b, d, L, generator=g)
    x = dt * u
    A = -torch.exp(torch.rand(d, n, generator=g) * 2)
    B4, C4 = torch.randn(b, 2, n, L, generator=g), torch.randn(b, 1, n, L, generator=g)
    gy, glast = torch.randn(b, d, L, generator=g), torch.randn(b, d, n, generator=g)
    results = {}
    for arch in ("skylake-avx512", "haswell", "x86-64"):
        out = tmp_path / f"{arch}.so"
        r = subprocess.run([cpu._compiler(), f"-march={arch}", *cpu.FLAGS, str(cpu.SOURCE), "-o", str(out)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        lib = cpu._load(out)
        capability = torch.backends.cpu.get_cpu_capability()    # DEFAULT, AVX2, AVX512, ...
        if (arch == "skylake-avx512" and not capability.startswith("AVX512")) or \
                (arch == "haswell" and capability == "DEFAULT"):
            continue   # built, but this CPU cannot run it
        old = cpu._lib
        cpu._lib = lib
        try:
            y, HS, last = cpu.forward_streaming(dt, x, A, B4, C4, 2, 1, 2, T, K)
            gdt, gu, gA = torch.empty(b, d, L), torch.zeros(b, d, L), torch.zeros(d, n)
            gB, gC = cpu.Backward(dt, x, u, gy, A, B4, C4, T, K, HS, None, None, glast, gdt, gu, gA).part(0, d)
        finally:
            cpu._lib = old
        results[arch] = [y, HS, last, gdt, gu, gA, gB, gC]
    base = results.pop("x86-64")
    y64, _ = recurrence64(dt, x, A, B4, C4)
    torch.testing.assert_close(base[0].double(), y64, rtol=1e-5, atol=1e-5)
    for arch, got in results.items():
        for a, e in zip(got, base):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
