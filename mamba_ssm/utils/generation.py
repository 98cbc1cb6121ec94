"""Autoregressive generation with the recurrent cache (upstream's `decode` and `generate`).

The prompt is processed once (a full forward that leaves each layer's conv and SSM state in
`InferenceParams`); every new token then costs one recurrent `step` per layer, whatever the
prompt's length.

`cg=True` (upstream: CUDA graphs) makes the per-token step cheaper: on a GPU it is captured as a
CUDA graph (`cuda_graph.py`); on a CPU the whole step is compiled with torch.compile into C++
(`compiled_step.py`; measured on the 130m model, 2 cores: ~30 ms/token against ~48 eager). The
first compile of a shape takes ~30-60 s (later processes reuse inductor's disk cache, ~10 s);
`MAMBA_SSM_COMPILED_STEP=0` keeps the eager step, and a failed compile (no C++ compiler) warns
once and falls back to it. Greedy tokens are the same either way; logits agree to fp32 rounding.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from mamba_ssm.utils import compiled_step
from mamba_ssm.utils.cuda_graph import CudaGraphStep
from mamba_ssm.utils.inference_params import InferenceParams  # noqa: F401  (upstream's import path)


@dataclass
class GreedySearchDecoderOnlyOutput:
    sequences: Tensor
    scores: Optional[tuple] = None


@dataclass
class SampleDecoderOnlyOutput:
    sequences: Tensor
    scores: Optional[tuple] = None


def modify_logit_for_repetition_penalty(logits, prev_output_tokens, repetition_penalty=1.0):
    """CTRL's penalty: a token already in the sequence has its logit divided (if > 0) or multiplied."""
    if repetition_penalty == 1.0:
        return logits
    score = torch.gather(logits, 1, prev_output_tokens)
    score = torch.where(score < 0, score * repetition_penalty, score / repetition_penalty)
    return logits.scatter(1, prev_output_tokens, score)


def sample(logits, top_k=1, top_p=0.0, min_p=0.0, temperature=1.0):
    """logits: (batch, vocab) -> token ids (batch,). top_k=1 is greedy."""
    if top_k == 1:
        return logits.argmax(dim=-1)
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
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token once the tokens before it already hold top_p of the mass (the first always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) > top_p
        drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(-1)


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

    inference_params = InferenceParams(max_seqlen=max_length, max_batch_size=batch_size)
    step_fn = _get_step_fn(model, batch_size, max_length, cg)
    if hasattr(step_fn, "bind"):
        step_fn.bind(inference_params)
    timing = {}
    if enable_timing:
        _sync(input_ids)
        start = time.perf_counter()

    sequences = [input_ids]
    scores = []
    finished = torch.zeros(batch_size, dtype=torch.bool, device=input_ids.device)
    logits = model(input_ids, inference_params=inference_params, num_last_tokens=1).logits[:, -1]
    if enable_timing:
        _sync(input_ids)
        timing["prompt_s"] = time.perf_counter() - start
    inference_params.seqlen_offset = prompt_len
    cur_len = prompt_len
    while True:
        if vocab_size is not None:
            logits = logits[:, :vocab_size]
        if output_scores:
            scores.append(logits.clone())
        if teacher_outputs is not None:
            token = teacher_outputs[:, cur_len]
        else:
            if repetition_penalty != 1.0:
                logits = modify_logit_for_repetition_penalty(logits, torch.cat(sequences, dim=1), repetition_penalty)
            token = sample(logits, top_k=top_k, top_p=top_p, min_p=min_p, temperature=temperature)
        if eos_token_id is not None:
            token = torch.where(finished, torch.full_like(token, eos_token_id), token)
            finished |= token == eos_token_id
        sequences.append(token.unsqueeze(1))
        if streamer is not None:
            streamer.put(token.cpu())
        cur_len += 1
        if cur_len >= max_length or (eos_token_id is not None and bool(finished.all())):
            break
        logits = step_fn(token.unsqueeze(1), inference_params)
        inference_params.seqlen_offset += 1
    if streamer is not None:
        streamer.end()
    if enable_timing:
        _sync(input_ids)
        total = time.perf_counter() - start
        print(f"Prompt processing + decoding time: {total * 1000:.0f}ms "
              f"(prompt {timing['prompt_s'] * 1000:.0f}ms)")
    output_cls = GreedySearchDecoderOnlyOutput if top_k == 1 else SampleDecoderOnlyOutput
    return output_cls(sequences=torch.cat(sequences, dim=1), scores=tuple(scores))


def _sync(t):
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def _get_step_fn(model, batch_size, max_length, cg):
    """A function (token (batch, 1), inference_params) -> logits (batch, vocab) for one step.

    cg=True: a CUDA graph on a GPU; on a CPU the step compiled by torch.compile (compiled_step),
    or the eager step when compilation is off (MAMBA_SSM_COMPILED_STEP=0) or fails (one warning).
    """
    if cg and next(model.parameters()).is_cuda:
        return CudaGraphStep(model, batch_size, max_length)
    if cg and next(model.parameters()).device.type == "cpu":
        if compiled_step.ENABLED:
            step = compiled_step.CompiledStep.build(model, batch_size)
            if step is not None:
                return step

    def step(token, inference_params):
        return model(token, inference_params=inference_params, num_last_tokens=1).logits[:, -1]

    return step


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
