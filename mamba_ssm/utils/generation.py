"""Autoregressive generation with the recurrent cache: upstream's `decode` / `generate`, and batches
of prompts of different lengths (`DecodingSession`, `generate_ragged`).

A prompt is processed once (a full forward that leaves each layer's conv and SSM state in the
cache); every new token then costs one recurrent `step` per layer, whatever the prompt's length.
A recurrent model reads left to right with no attention mask, so padding a short prompt would run
the pad tokens through its state: a ragged batch is never padded. Prompts of one length are
prefilled together, each row's states land in its row of the batch's cache, and one step per
token then advances every row (`DecodingSession`). `decode` is the same loop on a rectangular batch.

`cg=True` (upstream: CUDA graphs) makes the per-token step cheaper: on a GPU it is captured as a
CUDA graph (`cuda_graph.py`, one per batch size and dtype, kept on the model); on a CPU the whole
step is compiled with torch.compile into C++ (`compiled_step.py`; measured on the 130m model, 2
cores: ~30 ms/token against ~48 eager). The first compile of a shape takes ~30-60 s (later
processes reuse inductor's disk cache, ~10 s); `MAMBA_SSM_COMPILED_STEP=0` keeps the eager step,
and a failed compile (no C++ compiler) or capture warns and falls back to it. Greedy tokens are the
same either way; logits agree to fp32 rounding.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from mamba_ssm.utils import compiled_step
from mamba_ssm.utils.cuda_graph import CudaGraphStep
from mamba_ssm.utils.inference_params import InferenceParams

__all__ = ["InferenceParams", "DecodingSession", "Generated", "generate_ragged", "decode", "sample",
           "filter_logits", "modify_logit_for_repetition_penalty", "GenerationMixin",
           "GreedySearchDecoderOnlyOutput", "SampleDecoderOnlyOutput"]


@dataclass
class GreedySearchDecoderOnlyOutput:
    sequences: Tensor
    scores: Optional[tuple] = None


@dataclass
class SampleDecoderOnlyOutput:
    sequences: Tensor
    scores: Optional[tuple] = None


# ----------------------------------------------------------------------------------------------------
# choosing the next token
# ----------------------------------------------------------------------------------------------------

def modify_logit_for_repetition_penalty(logits, prev_output_tokens, repetition_penalty=1.0):
    """CTRL's penalty. logits (batch, vocab); prev_output_tokens (batch, n), repeats allowed.

    A token in its row of prev_output_tokens has its logit divided by the penalty if > 0, multiplied
    if < 0 (once, however often it occurs); other logits are unchanged. Returns a new tensor.
    """
    if repetition_penalty == 1.0:
        return logits
    score = torch.gather(logits, 1, prev_output_tokens)
    score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
    return logits.scatter(1, prev_output_tokens, score)


def filter_logits(logits, top_k=0, top_p=0.0, min_p=0.0, temperature=1.0):
    """logits (batch, vocab) -> float32 logits / temperature, -inf where a token cannot be sampled.

    In this order, each on what the previous left: top_k > 0 keeps the k largest (and ties with the
    k-th); min_p > 0 keeps tokens of probability >= min_p x the largest's; 0 < top_p < 1 keeps the
    smallest set of most likely tokens that holds top_p of the mass (upstream's and transformers'
    rule: a token goes once the more likely ones hold >= top_p; the most likely always stays).
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: no top-k filter, 1: greedy), got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1], got {top_p}")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k > 0:
        top_k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if 0.0 < top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of the more likely tokens
        drop_sorted = before >= top_p
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0, generator=None):
    """logits (batch, vocab) -> token ids (batch,). top_k=1 is greedy (argmax, other options unused);
    otherwise a draw from softmax(filter_logits(...)), with `generator` if given."""
    if top_k == 1:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature),
                          dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------------
# one batch decoded together
# ----------------------------------------------------------------------------------------------------

@dataclass
class Generated:
    """What DecodingSession.generate made, by row number.

    tokens (rows, steps): row r's new tokens are tokens[r, :lengths[r]] (its eos or stopping token
    included), then padding (eos_token_id; 0 without one). lengths (rows,).
    """

    tokens: Tensor
    lengths: Tensor

    def to_lists(self) -> list[list[int]]:
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths.tolist())]


class DecodingSession:
    """A batch of rows decoded together, one token per row per step; each row prefilled with its own
    prompt, of any length, never padded (a row's state depends on its own tokens only).

        session = DecodingSession(model, batch_size=3, max_seqlen=64)
        session.prefill([[5, 6, 7], [8], [9, 10, 11]])     # -> last-position logits (3, vocab)
        logits = session.step(tokens)                       # tokens (3,) -> logits (3, vocab)
        session.keep_rows([0, 2])                           # drop row 1 (eager steps only)
        out = session.generate(16, eos_token_id=0)          # the sampling loop -> Generated

    Rows keep their numbers (0 .. batch_size - 1) when others are dropped; `rows` lists those in the
    batch, in batch order, and `logits` (batch, vocab) holds each one's latest logits.
    cg=True: steps run as a CUDA graph on a GPU and as the compiled step on a CPU, on a fixed batch
    (keep_rows raises). The graph is captured (or the step compiled) at the first step or at
    prepare_step(); a failure there warns and steps eagerly. One cg session per batch size and model
    at a time: the graph's static cache belongs to the session that bound it last.
    """

    def __init__(self, model, batch_size: int, max_seqlen: int, cg: bool = False):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"DecodingSession: batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(max_seqlen, int) or max_seqlen < 1:
            raise ValueError(f"DecodingSession: max_seqlen must be a positive int, got {max_seqlen!r}")
        self.model = model
        self.cg = bool(cg)
        self.device = next(model.parameters()).device
        self.inference_params = InferenceParams(max_seqlen=max_seqlen, max_batch_size=batch_size)
        self.rows = list(range(batch_size))
        self._n = batch_size
        self._pos = {r: r for r in self.rows}  # row number -> position in the batch
        self._prompts: dict[int, Tensor] = {}  # row number -> its prompt (1-D), once prefilled
        self.logits: Optional[Tensor] = None
        self.steps = 0
        self.step_kind: Optional[str] = None  # "eager", "cuda_graph" or "compiled" once prepared
        self._step_fn = None

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    @property
    def fixed_batch(self) -> bool:
        return self.cg

    def _cache(self):
        cache = self.inference_params.key_value_memory_dict
        if not cache:
            cache.update(self.model.allocate_inference_cache(self._n, self.inference_params.max_seqlen))
        return cache

    # --- prefill -------------------------------------------------------------------------------

    @torch.no_grad()
    def prefill(self, prompts, rows: Optional[Sequence[int]] = None) -> Tensor:
        """Run each prompt to its end, its states into its row of the cache.

        prompts: a LongTensor (n, seqlen), or n token sequences (lists or 1-D tensors) of lengths >= 1;
        rows: the row numbers they go to (default: every row of the batch, in order). A row prefilled
        again starts over. Returns the last-position logits (n, vocab), in prompts' order.
        """
        if isinstance(prompts, Tensor):
            if prompts.dim() != 2 or prompts.shape[1] < 1:
                raise ValueError(f"prefill: a prompts tensor must be (n, seqlen >= 1), got {tuple(prompts.shape)}")
            seqs = list(prompts.to(self.device))
        else:
            seqs = [torch.as_tensor(p, dtype=torch.long, device=self.device) for p in prompts]
            for i, p in enumerate(seqs):
                if p.dim() != 1 or p.numel() < 1:
                    raise ValueError(f"prefill: prompt {i} must be a non-empty token sequence, got shape "
                                     f"{tuple(p.shape)}")
        n = len(seqs)
        if rows is None:
            if n != self.batch_size:
                raise ValueError(f"prefill: {n} prompts for a batch of {self.batch_size} rows; pass rows= to "
                                 "prefill some of them")
            rows = list(self.rows)
        rows = [int(r) for r in rows]
        if len(rows) != n or len(set(rows)) != n or any(r not in self._pos for r in rows):
            raise ValueError(f"prefill: rows must be {n} distinct row numbers among {self.rows}, got {rows}")
        positions = [self._pos[r] for r in rows]
        groups: dict[int, list[int]] = {}
        for i, p in enumerate(seqs):
            groups.setdefault(p.numel(), []).append(i)
        parts = []
        if len(groups) > 1 and _packs(self.model):
            # Mamba-2: every prompt in one packed forward (cu_seqlens), each from a zero state, no padding
            parts.append((list(range(n)), self._prefill_rows(seqs, positions)))
        else:
            for length, idx in groups.items():
                ids = prompts.to(self.device) if isinstance(prompts, Tensor) and len(idx) == n \
                    else torch.stack([seqs[i] for i in idx])
                parts.append((idx, self._prefill_rows(ids, [positions[i] for i in idx])))
        if len(parts) == 1 and positions == list(range(self.batch_size)):
            logits = parts[0][1]
            self.logits = logits
        else:
            vocab, dtype = parts[0][1].shape[-1], parts[0][1].dtype
            logits = torch.empty(n, vocab, dtype=dtype, device=self.device)
            for idx, part in parts:
                logits[torch.tensor(idx, device=self.device)] = part
            if self.logits is None:
                self.logits = torch.zeros(self.batch_size, vocab, dtype=dtype, device=self.device)
            self.logits[torch.tensor(positions, device=self.device)] = logits
        for r, p in zip(rows, seqs):
            self._prompts[r] = p
        params = self.inference_params
        params.seqlen_offset = max(params.seqlen_offset, max(groups))  # > 0: the next calls are steps
        return logits

    def _prefill_rows(self, ids, positions):
        """Prompts of one length, ids (n, seqlen), or a list of n 1-D prompts of any lengths (packed:
        models whose mixers take cu_seqlens), into the batch positions `positions`: (n, vocab)."""
        cache = self._cache()
        first = positions[0]
        contiguous = positions == list(range(first, first + len(positions)))
        # Contiguous rows are written in place through views; others through a cache of their own.
        own = {} if not contiguous else \
            {layer: tuple(s[first:first + len(positions)] for s in states) for layer, states in cache.items()}
        params = InferenceParams(max_seqlen=self.inference_params.max_seqlen, max_batch_size=len(positions),
                                 key_value_memory_dict=own)
        if isinstance(ids, Tensor):
            logits = self.model(ids, inference_params=params, num_last_tokens=1).logits[:, -1]
        else:
            lengths = torch.tensor([0] + [p.numel() for p in ids], device=self.device)
            cu_seqlens = lengths.cumsum(0).to(torch.int32)
            hidden = self.model.backbone(torch.cat(ids).unsqueeze(0), inference_params=params, cu_seqlens=cu_seqlens)
            logits = self.model.lm_head(hidden[0, cu_seqlens[1:].long() - 1])
        if not contiguous:
            index = torch.tensor(positions, device=self.device)
            for layer, states in own.items():
                for dst, src in zip(cache[layer], states):
                    dst.index_copy_(0, index, src)
        return logits

    # --- steps ---------------------------------------------------------------------------------

    def prepare_step(self):
        """Capture the CUDA graph / compile the step now (cg=True) rather than at the first step."""
        if self._step_fn is not None:
            return
        params, fn, kind = self.inference_params, None, "eager"
        if self.cg and self.device.type == "cuda":
            try:
                graph = CudaGraphStep(self.model, self.batch_size)
                graph.bind(params)  # the states prefilled so far move into the graph's static cache
                fn, kind = (lambda token: graph(token, params)), "cuda_graph"
            except Exception as e:  # noqa: BLE001 - a failed capture must not fail the decoding
                warnings.warn(f"mamba_ssm: CUDA graph capture failed for batch size {self.batch_size} "
                              f"({type(e).__name__}: {e}); decoding with eager steps", RuntimeWarning, stacklevel=3)
        elif self.cg and self.device.type == "cpu" and compiled_step.ENABLED:
            step = compiled_step.CompiledStep.build(self.model, self.batch_size)
            if step is not None:
                fn, kind = (lambda token: step(token, params)), "compiled"
        if fn is None:
            def fn(token):
                return self.model(token, inference_params=params, num_last_tokens=1).logits[:, -1]
        self._step_fn, self.step_kind = fn, kind

    @torch.no_grad()
    def step(self, tokens: Tensor) -> Tensor:
        """Feed one token per row: tokens (batch,) or (batch, 1), in batch order -> logits (batch, vocab)."""
        if not isinstance(tokens, Tensor) or not (tokens.dim() == 1 or (tokens.dim() == 2 and tokens.shape[1] == 1)) \
                or tokens.shape[0] != self.batch_size:
            raise ValueError(f"step: tokens must be ({self.batch_size},) or ({self.batch_size}, 1), got "
                             f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
        missing = [r for r in self.rows if r not in self._prompts]
        if missing:
            raise ValueError(f"step: rows {missing} have not been prefilled")
        self.prepare_step()
        logits = self._step_fn(tokens.reshape(-1, 1).to(self.device))
        self.inference_params.seqlen_offset += 1
        self.steps += 1
        self.logits = logits
        return logits

    def keep_rows(self, rows: Sequence[int]):
        """Keep only these row numbers, in this order, and drop the others' states (eager steps only)."""
        if self.fixed_batch:
            raise ValueError(f"keep_rows: a cg=True session steps a fixed batch of {self.batch_size} rows; "
                             "finished rows keep stepping there")
        rows = [int(r) for r in rows]
        if not rows or len(set(rows)) != len(rows) or any(r not in self._pos for r in rows):
            raise ValueError(f"keep_rows: rows must be distinct row numbers among {self.rows}, at least one, "
                             f"got {rows}")
        index = torch.tensor([self._pos[r] for r in rows], device=self.device)
        params = self.inference_params
        params.key_value_memory_dict = {layer: tuple(s.index_select(0, index) for s in states)
                                        for layer, states in self._cache().items()}
        params.max_batch_size = len(rows)
        if self.logits is not None:
            self.logits = self.logits.index_select(0, index)
        self.rows = rows
        self._pos = {r: i for i, r in enumerate(rows)}

    # --- the decoding loop ---------------------------------------------------------------------

    def _history(self):
        """Each row's prompt (batch, longest), a short one filled up with its own first token."""
        prompts = [self._prompts[r] for r in self.rows]
        width = max(p.numel() for p in prompts)
        return torch.stack([torch.cat([p, p[:1].expand(width - p.numel())]) for p in prompts])

    @torch.no_grad()
    def generate(self, max_new_tokens: int, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0, repetition_penalty=1.0,
                 eos_token_id: Optional[int] = None, stop: Optional[Callable[[int, list], bool]] = None,
                 vocab_size: Optional[int] = None, drop_finished: bool = True, teacher_tokens: Optional[Tensor] = None,
                 on_logits: Optional[Callable[[Tensor], None]] = None,
                 on_tokens: Optional[Callable[[Tensor], None]] = None, generator=None) -> Generated:
        """Up to max_new_tokens tokens per row, from the prefilled rows' logits.

        A row finishes when it emits eos_token_id, or when stop(row, its new tokens so far, eos
        excluded) returns True after a token; the loop ends when every row has, or after
        max_new_tokens. Sampling: `sample` on the logits cut to vocab_size, after the repetition
        penalty over the row's prompt and new tokens. drop_finished: finished rows leave the batch
        (eager steps; on a fixed batch they keep stepping, fed eos_token_id if set).
        teacher_tokens (rows, >= max_new_tokens): take these tokens instead (eos still ends a row).
        on_logits(logits (batch, vocab)) and on_tokens(tokens (batch,)) see every step.
        """
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"generate: max_new_tokens must be a positive int, got {max_new_tokens!r}")
        missing = [r for r in self.rows if r not in self._prompts]
        if missing:
            raise ValueError(f"generate: rows {missing} have not been prefilled")
        if teacher_tokens is not None and (teacher_tokens.dim() != 2 or teacher_tokens.shape[0] != self._n
                                           or teacher_tokens.shape[1] < max_new_tokens):
            raise ValueError(f"generate: teacher_tokens must be ({self._n}, >= {max_new_tokens}), got "
                             f"{tuple(teacher_tokens.shape)}")
        device = self.device
        pad = eos_token_id if eos_token_id is not None else 0
        out = torch.full((self._n, max_new_tokens), pad, dtype=torch.long, device=device)
        lengths = torch.zeros(self._n, dtype=torch.long, device=device)
        rows = torch.tensor(self.rows, device=device)
        finished = torch.zeros(len(self.rows), dtype=torch.bool, device=device)
        teacher = teacher_tokens.to(device) if teacher_tokens is not None else None
        history = self._history() if repetition_penalty != 1.0 and teacher is None else None
        said = {r: [] for r in self.rows} if stop is not None else None
        can_finish = eos_token_id is not None or stop is not None
        drop = drop_finished and not self.fixed_batch and can_finish
        logits = self.logits
        for t in range(max_new_tokens):
            if vocab_size is not None:
                logits = logits[:, :vocab_size]
            if on_logits is not None:
                on_logits(logits)
            if teacher is not None:
                token = teacher[rows, t]
            else:
                if history is not None:
                    logits = modify_logit_for_repetition_penalty(logits, history, repetition_penalty)
                token = sample(logits, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature,
                               generator=generator)
            if not can_finish:
                out[rows, t] = token
                live = None
            else:
                live = ~finished
                if eos_token_id is not None:
                    token = torch.where(finished, torch.full_like(token, eos_token_id), token)
                    finished = finished | (token == eos_token_id)
                out[rows, t] = torch.where(live, token, torch.full_like(token, pad))
                lengths.index_add_(0, rows, live.long())
            if stop is not None:
                hits = []
                for pos, (r, tok, alive) in enumerate(zip(self.rows, token.tolist(), live.tolist())):
                    if alive and tok != eos_token_id:
                        said[r].append(tok)
                        if stop(r, said[r]):
                            hits.append(pos)
                if hits:
                    finished[hits] = True
            if on_tokens is not None:
                on_tokens(token)
            if history is not None:
                history = torch.cat([history, token[:, None]], dim=1)
            if t + 1 == max_new_tokens:
                break
            if can_finish:
                done = finished.tolist()
                if all(done):
                    break
                if drop and any(done):
                    keep = [pos for pos, d in enumerate(done) if not d]
                    self.keep_rows([self.rows[pos] for pos in keep])
                    keep_t = torch.tensor(keep, device=device)
                    token, finished, rows = token[keep_t], finished[keep_t], rows[keep_t]
                    if history is not None:
                        history = history[keep_t]
            logits = self.step(token)
        if not can_finish:
            lengths[rows] = t + 1
        return Generated(tokens=out[:, :t + 1], lengths=lengths)


def _packs(model) -> bool:
    """Every layer's mixer takes packed prompts (cu_seqlens) with a cache row per prompt (Mamba-2)."""
    layers = getattr(getattr(model, "backbone", None), "layers", None)
    return bool(layers) and hasattr(model, "lm_head") and all(
        getattr(getattr(b, "mixer", None), "packed_prefill", False) for b in layers)


def generate_ragged(model, prompts, max_new_tokens: int, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0,
                    repetition_penalty=1.0, eos_token_id=None, stop=None, cg=False, vocab_size=None,
                    drop_finished=True, generator=None) -> list[list[int]]:
    """New tokens for each prompt (token lists of any lengths >= 1), decoded as one batch.

    Each row's list holds its tokens up to and including its eos_token_id, or the token after which
    stop(row, tokens) returned True, or max_new_tokens tokens. The tokens are those of each prompt
    decoded alone (greedy: the same; sampled: from the same distributions). Arguments as in
    DecodingSession.generate; cg as in `decode`.
    """
    prompts = [list(p) for p in prompts]
    if not prompts:
        return []
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate_ragged: max_new_tokens must be a positive int, got {max_new_tokens!r}")
    session = DecodingSession(model, len(prompts), max(len(p) for p in prompts) + max_new_tokens, cg=cg)
    session.prefill(prompts)
    return session.generate(max_new_tokens, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature,
                            repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, stop=stop,
                            vocab_size=vocab_size, drop_finished=drop_finished, generator=generator).to_lists()


# ----------------------------------------------------------------------------------------------------
# upstream's decode / generate
# ----------------------------------------------------------------------------------------------------

def _sync(t):
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


@torch.no_grad()
def decode(input_ids, model, max_length, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0, repetition_penalty=1.0,
           eos_token_id=None, teacher_outputs=None, vocab_size=None, cg=False, enable_timing=False,
           output_scores=False, streamer=None):
    """Generate until `max_length` tokens in all (prompt included) or every sequence has emitted eos.

    input_ids: (batch, seqlen). teacher_outputs (batch, >= max_length) forces the tokens taken
    (the scores are still the model's). A finished sequence is padded with eos_token_id.
    Returns an object with .sequences (batch, <= max_length) and .scores (tuple of (batch, vocab)).
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"decode: input_ids must be (batch, seqlen >= 1), got {tuple(input_ids.shape)}")
    batch_size, prompt_len = input_ids.shape
    if max_length <= prompt_len:
        raise ValueError(f"decode: max_length ({max_length}) must exceed the prompt length ({prompt_len})")
    if teacher_outputs is not None and teacher_outputs.shape[1] < max_length:
        raise ValueError(f"decode: teacher_outputs must hold max_length={max_length} tokens, "
                         f"got {tuple(teacher_outputs.shape)}")
    if streamer is not None:
        streamer.put(input_ids.cpu())

    session = DecodingSession(model, batch_size, max_length, cg=cg)
    if max_length > prompt_len + 1:
        session.prepare_step()  # capture / compile before the clock starts
    if enable_timing:
        _sync(input_ids)
        start = time.perf_counter()
    session.prefill(input_ids)
    if enable_timing:
        _sync(input_ids)
        prompt_s = time.perf_counter() - start
    scores = []
    out = session.generate(
        max_length - prompt_len, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature,
        repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, vocab_size=vocab_size, drop_finished=False,
        teacher_tokens=teacher_outputs[:, prompt_len:] if teacher_outputs is not None else None,
        on_logits=(lambda logits: scores.append(logits.clone())) if output_scores else None,
        on_tokens=(lambda token: streamer.put(token.cpu())) if streamer is not None else None)
    if streamer is not None:
        streamer.end()
    if enable_timing:
        _sync(input_ids)
        total = time.perf_counter() - start
        print(f"Prompt processing + decoding time: {total * 1000:.0f}ms (prompt {prompt_s * 1000:.0f}ms)")
    output_cls = GreedySearchDecoderOnlyOutput if top_k == 1 else SampleDecoderOnlyOutput
    sequences = torch.cat([input_ids, out.tokens.to(input_ids.device)], dim=1)
    return output_cls(sequences=sequences, scores=tuple(scores))


class GenerationMixin:
    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        raise NotImplementedError

    def generate(self, input_ids, max_length, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0,
                 return_dict_in_generate=False, output_scores=False, **kwargs):
        output = decode(input_ids, self, max_length, top_k=top_k, top_p=top_p, min_p=min_p,
                        temperature=temperature, output_scores=output_scores, **kwargs)
        if not output_scores:
            output.scores = None
        return output if return_dict_in_generate else output.sequences
