"""Packed sequences: several sequences laid end to end in one row, each starting from a zero state.

Two ways to say where sequences start (upstream Mamba-2's names and meanings):

    seq_idx    (batch, seqlen) int32: the sequence each position belongs to, non-decreasing along a
               row; a new sequence starts wherever the value changes.
    cu_seqlens (num_seqs + 1,) int32 or int64: cumulative lengths [0, l_0, l_0 + l_1, ..., seqlen]
               of the sequences packed in a single row (batch 1).

The scan resets its state and the causal conv its window at every start, on every backend (the
CUDA scan kernels take seq_idx themselves). With ``cu_seqlens``, ``return_last_state`` gives each
sequence's final state, (num_seqs, dim, dstate); with ``seq_idx`` only, each row's final state,
(batch, dim, dstate), as without packing.

Checking a ``seq_idx`` on a GPU costs a device sync; the last tensor checked is remembered (by
identity and version), so the layers of one model forward check it once (inference tensors, which
have no version, are checked every time).
"""
from __future__ import annotations

import weakref

import torch

_last_checked: tuple | None = None  # (weakref to the seq_idx checked, its _version, batch, seqlen)


def _shape(t):
    return tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__


def check_seq_idx(seq_idx, batch: int, seqlen: int, device=None, who: str = "selective_scan"):
    """Raise a ValueError naming ``seq_idx`` unless it is a (batch, seqlen) int32 tensor, on ``device``
    when given, non-decreasing along each row."""
    global _last_checked
    if not isinstance(seq_idx, torch.Tensor):
        raise TypeError(f"{who}: seq_idx must be a torch.Tensor (batch, seqlen) int32, got {type(seq_idx).__name__}")
    if seq_idx.dtype != torch.int32:
        raise ValueError(f"{who}: seq_idx must have dtype torch.int32, got {seq_idx.dtype}")
    if tuple(seq_idx.shape) != (batch, seqlen):
        raise ValueError(f"{who}: seq_idx must be (batch, seqlen) = ({batch}, {seqlen}), got {_shape(seq_idx)}")
    if device is not None and seq_idx.device != torch.device(device):
        raise ValueError(f"{who}: seq_idx must be on the inputs' device {device}, got {seq_idx.device}")
    # inference tensors have no version counter: checked every time
    version = None if seq_idx.is_inference() else seq_idx._version
    memo = _last_checked
    if version is not None and memo is not None and memo[0]() is seq_idx and memo[1:] == (version, batch, seqlen):
        return
    if seqlen > 1:
        step = seq_idx[:, 1:] - seq_idx[:, :-1]
        if bool((step < 0).any()):
            row, t = (step < 0).nonzero()[0].tolist()
            raise ValueError(f"{who}: seq_idx must be non-decreasing along each row; row {row} goes from "
                             f"{int(seq_idx[row, t])} to {int(seq_idx[row, t + 1])} at position {t + 1}")
    if version is not None:
        _last_checked = (weakref.ref(seq_idx), version, batch, seqlen)


def check_cu_seqlens(cu_seqlens, batch: int, seqlen: int, who: str = "selective_scan"):
    """Raise a ValueError naming ``cu_seqlens`` unless it is a 1-D int32/int64 tensor of cumulative
    lengths from 0 to ``seqlen``, strictly increasing, and the batch is 1."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{who}: cu_seqlens must be a torch.Tensor (num_seqs + 1,), got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{who}: cu_seqlens must have dtype torch.int32 or torch.int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{who}: cu_seqlens must be 1-D (num_seqs + 1,) with num_seqs >= 1, got {_shape(cu_seqlens)}")
    if batch != 1:
        raise ValueError(f"{who}: cu_seqlens packs sequences into a single row, so the batch must be 1, got "
                         f"batch {batch} (use seq_idx (batch, seqlen) for several packed rows)")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"{who}: cu_seqlens must start at 0, got {cu[0]}")
    bad = [i for i in range(1, len(cu)) if cu[i] <= cu[i - 1]]
    if bad:
        i = bad[0]
        raise ValueError(f"{who}: cu_seqlens must be strictly increasing (no empty sequence); "
                         f"cu_seqlens[{i - 1}] = {cu[i - 1]}, cu_seqlens[{i}] = {cu[i]}")
    if cu[-1] != seqlen:
        raise ValueError(f"{who}: cu_seqlens must end at the packed length seqlen = {seqlen}, got {cu[-1]}")


def model_takes_packed_sequences(model) -> bool:
    """Whether every layer's mixer of an LM (``.backbone.layers``, PEFT-wrapped or not) takes seq_idx
    and cu_seqlens: this package's Mamba does."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(base, "backbone", None), "layers", None)
    try:
        return bool(layers) and all({"seq_idx", "cu_seqlens"} <= set(inspect.signature(l.mixer.forward).parameters)
                                    for l in layers)
    except (TypeError, ValueError, AttributeError):
        return False


def seq_idx_from_cu_seqlens(cu_seqlens, seqlen: int, device=None) -> torch.Tensor:
    """(1, seqlen) int32 seq_idx of checked ``cu_seqlens``."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    idx = torch.repeat_interleave(torch.arange(lengths.shape[0], device=cu_seqlens.device, dtype=torch.int32),
                                  lengths, output_size=seqlen)
    return idx.view(1, seqlen).to(device if device is not None else cu_seqlens.device)


def resolve(seq_idx, cu_seqlens, batch: int, seqlen: int, device, who: str = "selective_scan"):
    """Checked (seq_idx (batch, seqlen) int32 or None, cu_seqlens or None) from the caller's arguments.

    With both given, ``seq_idx`` must start a new sequence exactly where ``cu_seqlens`` does.
    """
    if cu_seqlens is None:
        if seq_idx is not None:
            check_seq_idx(seq_idx, batch, seqlen, device, who)
        return seq_idx, None
    check_cu_seqlens(cu_seqlens, batch, seqlen, who)
    derived = seq_idx_from_cu_seqlens(cu_seqlens, seqlen, device)
    if seq_idx is not None:
        check_seq_idx(seq_idx, batch, seqlen, device, who)
        if not torch.equal(starts(seq_idx), starts(derived)):
            raise ValueError(f"{who}: seq_idx and cu_seqlens disagree on where sequences start")
    return (derived if seq_idx is None else seq_idx), cu_seqlens


def starts(seq_idx) -> torch.Tensor:
    """(batch, seqlen) bool: True where a new sequence starts after position 0 of a row."""
    out = torch.zeros(seq_idx.shape, dtype=torch.bool, device=seq_idx.device)
    out[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return out


def keep_mask(seq_idx, dtype=torch.float32) -> torch.Tensor:
    """(batch, seqlen) in ``dtype``: 0 where a sequence starts (the carried state is dropped), else 1."""
    return (~starts(seq_idx)).to(dtype)


def segments(seq_idx) -> list:
    """[(row, start, end)] of every packed sequence, in row-major order (a host sync)."""
    batch, seqlen = seq_idx.shape
    st = starts(seq_idx)
    st[:, 0] = True
    out = []
    for row in range(batch):
        s = st[row].nonzero().flatten().tolist()
        ends = s[1:] + [seqlen]
        out += [(row, a, b) for a, b in zip(s, ends)]
    return out


def sequence_ends(cu_seqlens) -> list:
    """End positions (last index of each sequence) of checked cu_seqlens."""
    return [c - 1 for c in cu_seqlens.tolist()[1:]]
