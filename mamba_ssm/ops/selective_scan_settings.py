"""Settings of the CUDA selective scan, read once from the environment at import.

User settings (also keyword arguments of ``selective_scan_cuda``):

    segment   MAMBA_SSM_SCAN_SEGMENT   16     time steps between the states the forward saves for the
                                              backward: 1..1024, rounded up to a multiple of 16. Longer
                                              saves memory, costs backward time.
    save_y    MAMBA_SSM_SCAN_SAVE_Y    1      with z, save y (the output before the gate) for the
                                              backward's dz: one more tensor of u's size and dtype;
                                              0 recomputes it instead.

Developer settings (A/B runs of launch choices that stay shape-driven by default):

    split           MAMBA_SSM_SCAN_SPLIT           auto   sequence groups n >= 1 for both passes
                                                          (at most 64 and the segment count)
    fwd_tp          MAMBA_SSM_SCAN_FWD_TP          auto   the time-parallel forward: auto, 1, 0
    tp_cpb          MAMBA_SSM_SCAN_TP_CPB          8      its largest channels per block: 4, 8, 16
    exact_softplus  MAMBA_SSM_SCAN_EXACT_SOFTPLUS  0      softplus through log1pf (1), not the SFU

Test setting:

    poison          MAMBA_SSM_POISON               0      fill outputs with NaN before each launch

Booleans take 1/0 (or true/false, yes/no, on/off); an empty variable is unset. A bad value raises
a ValueError naming the variable and the values it takes. ``current_settings()`` returns the
settings in force; ``override_settings(**fields)`` changes them inside a ``with`` block (tests,
benchmarks). The autograd Function keeps the forward's settings for its backward.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import warnings
from typing import Mapping, Optional

ENV = {
    "segment": "MAMBA_SSM_SCAN_SEGMENT",
    "save_y": "MAMBA_SSM_SCAN_SAVE_Y",
    "split": "MAMBA_SSM_SCAN_SPLIT",
    "fwd_tp": "MAMBA_SSM_SCAN_FWD_TP",
    "tp_cpb": "MAMBA_SSM_SCAN_TP_CPB",
    "exact_softplus": "MAMBA_SSM_SCAN_EXACT_SOFTPLUS",
    "poison": "MAMBA_SSM_POISON",
}
# Switches of earlier versions, decided and deleted (docs/selective_scan.md says what won).
REMOVED_ENV = ("MAMBA_SSM_SCAN_IMPL", "MAMBA_SSM_SCAN_FWD_FULL", "MAMBA_SSM_SCAN_FWD_D16",
               "MAMBA_SSM_SCAN_BWD_PERM", "MAMBA_SSM_SCAN_BWD_PREFETCH")
MAX_SEGMENT = 1024
TP_CPB_VALUES = (4, 8, 16)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _where(field: str) -> str:
    return f"{ENV[field]} (ScanSettings.{field})"


@dataclasses.dataclass(frozen=True)
class ScanSettings:
    segment: int = 16
    save_y: bool = True
    split: Optional[int] = None  # None: planned from the shape
    fwd_tp: Optional[bool] = None  # None: auto (small grids)
    tp_cpb: int = 8
    exact_softplus: bool = False
    poison: bool = False

    def __post_init__(self):
        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.segment) or not 1 <= self.segment <= MAX_SEGMENT:
            raise ValueError(f"{_where('segment')} must be an integer number of time steps in 1..{MAX_SEGMENT}, "
                             f"got {self.segment!r}")
        if self.split is not None and (not is_int(self.split) or self.split < 1):
            raise ValueError(f"{_where('split')} must be a positive integer (or auto / None), got {self.split!r}")
        if self.tp_cpb not in TP_CPB_VALUES or not is_int(self.tp_cpb):
            raise ValueError(f"{_where('tp_cpb')} must be one of {TP_CPB_VALUES}, got {self.tp_cpb!r}")
        if self.fwd_tp not in (None, True, False):
            raise ValueError(f"{_where('fwd_tp')} must be auto (None), 1 (True) or 0 (False), got {self.fwd_tp!r}")
        for name in ("save_y", "exact_softplus", "poison"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{_where(name)} must be a bool (1/0), got {getattr(self, name)!r}")

    @property
    def R(self) -> int:
        """16-step sub-chunks per saved state (the kernels' segment length)."""
        return (self.segment + 15) // 16


def _parse(field: str, text: str):
    name = ENV[field]
    v = text.strip().lower()
    if field in ("save_y", "exact_softplus", "poison"):
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise ValueError(f"{name}={text!r}: expected 1 or 0 (true/false, yes/no, on/off)")
    if field == "fwd_tp":
        if v == "auto":
            return None
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        raise ValueError(f"{name}={text!r}: expected auto, 1 or 0")
    if field == "split" and v == "auto":
        return None
    try:
        n = int(v)
    except ValueError:
        n = None
    if field == "segment" and (n is None or not 1 <= n <= MAX_SEGMENT):
        raise ValueError(f"{name}={text!r}: expected time steps in 1..{MAX_SEGMENT} (rounded up to a multiple of 16)")
    if field == "split" and (n is None or n < 1):
        raise ValueError(f"{name}={text!r}: expected a positive number of sequence groups, or auto")
    if field == "tp_cpb" and n not in TP_CPB_VALUES:
        raise ValueError(f"{name}={text!r}: expected one of 4, 8, 16")
    return n


def env_fields(environ: Mapping[str, str]) -> dict:
    """The ScanSettings fields set by the variables in `environ` (empty ones count as unset)."""
    fields = {}
    for field, name in ENV.items():
        text = environ.get(name)
        if text is not None and text.strip() != "":
            fields[field] = _parse(field, text)
    return fields


def settings_from_env(environ: Mapping[str, str] = os.environ) -> ScanSettings:
    """ScanSettings from environment variables (defaults for those unset)."""
    for name in REMOVED_ENV:
        if environ.get(name):
            warnings.warn(f"{name} is no longer read: its choice was decided and its switch deleted "
                          "(docs/selective_scan.md)", RuntimeWarning, stacklevel=2)
    return ScanSettings(**env_fields(environ))


_lock = threading.Lock()
_current = settings_from_env()


def current_settings() -> ScanSettings:
    """The settings in force (the environment's at import, or an override's)."""
    return _current


@contextlib.contextmanager
def override_settings(**fields):
    """Change settings inside a ``with`` block, for every thread (the backward runs on autograd's).

        with override_settings(fwd_tp=True, split=3):
            ...
    """
    global _current
    with _lock:
        previous = _current
        _current = dataclasses.replace(previous, **fields)
    try:
        yield _current
    finally:
        with _lock:
            _current = previous
