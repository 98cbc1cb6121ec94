"""The selective scan on the CPU in C (`selective_scan_cpu.c`), built on first use.

`forward_streaming` has the signature and results of `selective_scan_chunked._forward_streaming`,
its reference, and replaces it on CPU tensors: the same recurrence, one step after another per
channel, with the states in vector registers instead of a dozen whole-tensor ops per step
(130m shape (1, 1536, 1024, 16), 2-core EPYC, 2026-12-07: 7.5 ms against 29 ms per half of the
channels on one thread). `Backward` replaces the PyTorch backward of SelectiveScanChunkedFn (its
reference): each chunk's states rebuilt from the saved chunk start states, then the state gradient
run back through them, with every input's gradient taken on the way (benchmark_cpu_scan.py at that
shape, 2 threads: forward+backward 80.9 ms against 279.7 ms with both in PyTorch, 2026-12-07).

Building. The first call compiles the source with the system's C compiler (`$CC`, else `cc`,
`gcc`, `clang`; `-O3 -march=native`, retried without `-march=native` if the compiler rejects it)
into a cache folder, `$MAMBA_SSM_CACHE_DIR` or `$XDG_CACHE_HOME/mamba_ssm` (default
`~/.cache/mamba_ssm`), under a name that hashes the source, the compiler, the flags and the CPU
(a cache shared by different machines keeps one library per kind). It is written to a temporary
name and renamed, so concurrent jobs never load half a file. Where no compiler works, or the
library does not load, it warns once and `library()` returns None: the PyTorch forward runs.

`MAMBA_SSM_CPU_KERNEL=0` turns it off (read once, at import; `set_enabled` changes it afterwards).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from mamba_ssm.utils.switch import check_bool, parse_switch

ENV_VAR = "MAMBA_SSM_CPU_KERNEL"
SOURCE = Path(__file__).with_name("selective_scan_cpu.c")
MAX_DSTATE = 256  # the source's MAX_DSTATE
FLAGS = ["-O3", "-ffp-contract=fast", "-fno-math-errno", "-shared", "-fPIC", "-std=gnu11"]
NATIVE = "-march=native"
LOG2E = 1.4426950408889634

def parse_setting(value):
    """MAMBA_SSM_CPU_KERNEL as a bool (`switch.parse_switch`)."""
    return parse_switch(ENV_VAR, value, "the C scan on the CPU", "the PyTorch scan")


ENABLED = parse_setting(os.environ.get(ENV_VAR))

_lock = threading.Lock()
_lib = None
_failed = None   # why the library is unavailable in this process, once known


def set_enabled(enabled):
    """Turn the C forward on or off for this process (True / False)."""
    global ENABLED
    ENABLED = check_bool("set_enabled", enabled)


def cache_dir():
    d = os.environ.get("MAMBA_SSM_CACHE_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mamba_ssm"


def _compiler():
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity():
    """What -march=native depends on: the architecture and, where Linux says, the CPU's model and flags."""
    ident = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    ident.append(line.strip())
                if len(ident) >= 4:
                    break
    except OSError:
        pass
    return "|".join(ident)


def _build(cc):
    """Compile the source into the cache (if not there yet) -> the library's path. Raises on failure."""
    src = SOURCE.read_bytes()
    errors = []
    for flags in ([NATIVE] + FLAGS, FLAGS):
        key = hashlib.sha256(b"\0".join([src, cc.encode(), " ".join(flags).encode(),
                                         _cpu_identity().encode()])).hexdigest()[:16]
        path = cache_dir() / f"selective_scan_cpu-{key}.so"
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            r = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=120)
            if r.returncode == 0:
                os.chmod(tmp, 0o755)   # mkstemp's file is private; a shared cache serves every user
                os.replace(tmp, path)
                return path
            errors.append(f"{' '.join(flags)}: {r.stderr.strip()[-500:]}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


class _Library:
    """The two entry points of the compiled source (ctypes functions, which release the GIL)."""

    def __init__(self, path):
        lib = ctypes.CDLL(str(path))
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self.forward = lib.selective_scan_fwd_f32
        self.forward.restype = ctypes.c_int
        self.forward.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ptr, ptr, i64, i64,
                                 i64, i64, ptr, ptr, ptr, i64, ptr]
        self.backward = lib.selective_scan_bwd_f32
        self.backward.restype = ctypes.c_int
        self.backward.argtypes = [i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64,
                                  i64, ptr, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr, ptr, ptr]


def _load(path):
    return _Library(path)


def library():
    """The compiled library (`.forward`, `.backward`), or None where it cannot be built or is turned off."""
    global _lib, _failed
    if not ENABLED:
        return None
    if _lib is not None or _failed is not None:
        return _lib
    with _lock:
        if _lib is None and _failed is None:
            try:
                cc = _compiler()
                if cc is None:
                    raise RuntimeError("no C compiler found ($CC, cc, gcc, clang)")
                _lib = _load(_build(cc))
            except Exception as e:  # the PyTorch scan is always there to fall back on
                _failed = e
                warnings.warn(f"mamba_ssm: the C selective scan for the CPU is unavailable ({e}); the CPU "
                              f"forward runs in PyTorch (slower). {ENV_VAR}=0 silences this.", RuntimeWarning,
                              stacklevel=3)
    return _lib


def usable(dstate):
    """Whether the C scan can run a scan of this dstate here (builds the library on first use)."""
    return 1 <= dstate <= MAX_DSTATE and library() is not None


def _ptr(t):
    return None if t is None else t.data_ptr()


def _end_positions(ends, T):
    """_packing_layout's ends {t: (sequence numbers, chunks)} -> int64 positions, one per sequence, in order."""
    seq = torch.cat([i for i, _ in ends.values()])
    pos = torch.cat([k * T + t for t, (_, k) in ends.items()])
    out = torch.empty_like(pos)
    out[seq] = pos
    return out.to(torch.int64).contiguous()


def _keep_rows(keep, batch, K, T, L):
    """_packing_layout's keep (T, b, K) -> (b, L), or None."""
    return None if keep is None else keep.permute(1, 2, 0).reshape(batch, K * T)[:, :L].contiguous()


def _check(status, n):
    if status == 1:
        raise ValueError(f"selective_scan_cpu: dstate must be in [1, {MAX_DSTATE}], got {n}")
    if status != 0:
        raise MemoryError(f"selective_scan_cpu: the C scan could not allocate its work buffer (status {status})")


def forward_streaming(dt, x, Af, B4, C4, G, rB, rC, T, K, y_out=None, keep=None, chunk_keep=None, ends=None):
    """`selective_scan_chunked._forward_streaming` in C, on CPU fp32 tensors (see there for the
    arguments and results): y (b, d, L), the chunk start states (b, K, n, d), and the last state
    (b, d, n), or with `ends` each packed sequence's final state (num_seqs, d, n).
    chunk_keep is implied by keep (one step after another, a chunk needs no start-state factor)."""
    lib = library()
    batch, dim, L = dt.shape
    n = Af.shape[1]
    dt, x = dt.contiguous(), x.contiguous()
    A2 = (Af * LOG2E).contiguous()
    Bt = B4.transpose(-1, -2).contiguous()    # (b, GB, L, n): a step's states side by side
    Ct = C4.transpose(-1, -2).contiguous()
    y = y_out
    if y is None or y.stride(2) != 1:
        y = dt.new_empty((batch, dim, L))
    keep_rows = _keep_rows(keep, batch, K, T, L)
    HS = dt.new_empty((batch, K, n, dim))
    last, finals, ends_t = None, None, None
    if ends is not None:
        ends_t = _end_positions(ends, T)
        finals = dt.new_empty((ends_t.numel(), dim, n))
    else:
        last = dt.new_empty((batch, dim, n))
    _check(lib.forward(batch, dim, L, n, _ptr(dt), _ptr(x), _ptr(A2), _ptr(Bt), _ptr(Ct), Bt.shape[1], Ct.shape[1],
                       dim // Bt.shape[1], dim // Ct.shape[1], _ptr(keep_rows), _ptr(y), y.stride(0), y.stride(1), T,
                       K, _ptr(HS), _ptr(last), _ptr(ends_t), 0 if ends_t is None else ends_t.numel(), _ptr(finals)),
           n)
    if y_out is not None and y is not y_out:
        y_out.copy_(y)
        y = y_out
    return y, HS, (finals if ends is not None else last)


class Backward:
    """The C backward of SelectiveScanChunkedFn, for CPU fp32 tensors; `part(c0, c1)` runs the channels
    [c0, c1) (one call per worker thread) and returns their (gB, gC) contributions (b, G, L, n).

    dt, x = dt u, u, gy: (b, d, L); Af: (d, n); B4, C4: (b, G, n, L); HS: the forward's chunk start
    states (b, K, n, d); keep, ends: _packing_layout's; glast: the gradient of the last state (b, d, n),
    or with ends of each sequence's final state (num_seqs, d, n), or None. gdt (the gradient of dt, before
    softplus) is written, gu and gA (zeroed by the caller) are added to.
    """

    def __init__(self, dt, x, u, gy, Af, B4, C4, T, K, HS, keep, ends, glast, gdt, gu, gA):
        self.lib = library()
        self.batch, self.dim, self.L = dt.shape
        self.n = Af.shape[1]
        self.T, self.K = T, K
        self.dt, self.x, self.u, self.gy = (t.contiguous() for t in (dt, x, u, gy))
        self.A = Af.contiguous()
        self.A2 = (Af * LOG2E).contiguous()
        self.Bt = B4.transpose(-1, -2).contiguous()
        self.Ct = C4.transpose(-1, -2).contiguous()
        self.HS = HS.contiguous()
        self.keep = _keep_rows(keep, self.batch, K, T, self.L)
        # with ends, glast holds each sequence's final-state gradient: without one, no ends are needed
        self.ends = None if ends is None or glast is None else _end_positions(ends, T)
        self.glast = None if glast is None else glast.float().contiguous()
        for name, t in (("gdt", gdt), ("gu", gu), ("gA", gA)):
            if not t.is_contiguous() or t.dtype != torch.float32:
                raise ValueError(f"selective_scan_cpu.Backward: {name} must be contiguous fp32, got {t.dtype} "
                                 f"strides {t.stride()}")
        self.gdt, self.gu, self.gA = gdt, gu, gA

    def part(self, c0, c1):
        gBt, gCt = torch.zeros_like(self.Bt), torch.zeros_like(self.Ct)
        GB, GC = self.Bt.shape[1], self.Ct.shape[1]
        packed = self.ends is not None
        _check(self.lib.backward(
            self.batch, self.dim, self.L, self.n, c0, c1, _ptr(self.dt), _ptr(self.x), _ptr(self.u), _ptr(self.gy),
            _ptr(self.A2), _ptr(self.A), _ptr(self.Bt), _ptr(self.Ct), GB, GC, self.dim // GB, self.dim // GC,
            _ptr(self.keep), self.T, self.K, _ptr(self.HS), None if packed else _ptr(self.glast),
            _ptr(self.ends), 0 if not packed else self.ends.numel(), _ptr(self.glast) if packed else None,
            _ptr(self.gdt), _ptr(self.gu), _ptr(self.gA), _ptr(gBt), _ptr(gCt)), self.n)
        return gBt, gCt
