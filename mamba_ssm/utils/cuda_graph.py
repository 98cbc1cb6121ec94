"""One decoding step captured as a CUDA graph: one launch per token instead of hundreds.

A graph owns a static cache (every layer's conv and SSM state) and a static token buffer. Graphs
are kept on the model, one per (batch size, dtype, device), and reused by every later call
whatever the prompt or generation length (a Mamba step does not depend on the position). A model
with attention layers (modules whose `cache_holds_sequence` is True) needs a cache as long as the
decoding: its graph is captured for max_length, and captured again for another max_length. When
the model's parameters have moved to other memory since (`.to()` there and back), the graphs,
which read the old addresses, are dropped and captured again.

    step = CudaGraphStep(model, batch_size)   # captures, or takes the model's graph of that size
    step.bind(inference_params)               # copies its states into the static cache and points it there
    logits = step(token, inference_params)    # token (batch, 1) -> logits (batch, vocab)

Only the InferenceParams bound last may step: binding another one to a graph (another decoding
session of the same batch size) takes the static cache over, and the first one's next step raises.
"""
from __future__ import annotations

import torch

from mamba_ssm.utils.inference_params import InferenceParams

_STORE = "_cuda_graph_steps"  # model.__dict__ entry: {"weights": addresses, "graphs": {key: _CapturedStep}}


def _weights(model):
    return tuple(p.data_ptr() for p in model.parameters())


def _store(model):
    store = model.__dict__.setdefault(_STORE, {"weights": None, "graphs": {}})
    weights = _weights(model)
    if store["weights"] != weights:
        store["graphs"].clear()
        store["weights"] = weights
    return store


def cached_graphs(model):
    """[(batch_size, dtype, device)] of the graphs captured for `model` and still usable."""
    return sorted(_store(model)["graphs"], key=lambda k: (k[0], str(k[1]), str(k[2])))


def clear_cuda_graphs(model):
    """Drop `model`'s graphs (their static caches and memory pools are freed with them)."""
    model.__dict__.pop(_STORE, None)


def cache_length(model, max_length):
    """The sequence length a graph's static cache needs: 1 for recurrent layers only (a Mamba step does
    not depend on the position), max_length where a layer caches the sequence (attention)."""
    if not any(getattr(m, "cache_holds_sequence", False) for m in model.modules()):
        return 1
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"CudaGraphStep: a model with attention layers needs max_length (a positive int, the "
                         f"decoding's prompt + new tokens), got {max_length!r}")
    return max_length


class CudaGraphStep:
    """The model's captured step for `batch_size` rows (captured on first use). max_length: the tokens
    a row may hold in all; used only by models with attention layers (see cache_length)."""

    def __init__(self, model, batch_size, max_length=None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"CudaGraphStep: batch_size must be a positive int, got {batch_size!r}")
        param = next(model.parameters())
        if not param.is_cuda:
            raise ValueError(f"CudaGraphStep: the model must be on a CUDA device, got {param.device}")
        graphs = _store(model)["graphs"]
        key = (batch_size, param.dtype, param.device)
        length = cache_length(model, max_length)
        if key not in graphs or graphs[key].cache_length != length:
            graphs.pop(key, None)  # free the old graph's pool before capturing another
            graphs[key] = _CapturedStep(model, batch_size, length)
        self._captured = graphs[key]
        self.batch_size = batch_size

    def bind(self, inference_params):
        """Copy the states in `inference_params` (if any) into the static cache, point it at that cache,
        and make it the one InferenceParams this graph steps."""
        cache = self._captured.cache
        current = inference_params.key_value_memory_dict
        if current is not cache:
            for layer, states in current.items():
                if layer not in cache:
                    raise ValueError(f"CudaGraphStep.bind: inference_params holds layer {layer!r}, the graph's "
                                     f"cache only layers {sorted(cache)}")
                for dst, src in zip(cache[layer], states):
                    if src.shape != dst.shape:
                        raise ValueError(f"CudaGraphStep.bind: layer {layer} state of shape {tuple(src.shape)}, "
                                         f"expected {tuple(dst.shape)} (batch_size={self.batch_size})")
                    dst.copy_(src)
            inference_params.key_value_memory_dict = cache
        self._captured.owner = inference_params

    def __call__(self, token, inference_params):
        """token (batch, 1) -> logits (batch, vocab); the bound states advance by one step."""
        if self._captured.owner is not inference_params:
            raise RuntimeError(f"CudaGraphStep: these inference_params are not bound to the graph of batch size "
                               f"{self.batch_size} (never bound, or another was bound since); call bind() first")
        return self._captured.replay(token)


class _CapturedStep:
    def __init__(self, model, batch_size, cache_length=1):
        device = next(model.parameters()).device
        self.owner = None
        self.cache_length = cache_length
        self.params = InferenceParams(max_seqlen=cache_length, max_batch_size=batch_size)
        self.cache = model.allocate_inference_cache(batch_size, cache_length)
        self.params.key_value_memory_dict = self.cache
        self.params.seqlen_offset = 1  # > 0 selects the recurrent step path
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (lazy inits, allocator)
                model(self.token, inference_params=self.params, num_last_tokens=1)
                for states in self.cache.values():  # an attention cache's lengths back to 0
                    for state in states:
                        state.zero_()
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.token, inference_params=self.params, num_last_tokens=1).logits[:, -1]

    def replay(self, token):
        self.token.copy_(token)
        self.graph.replay()
        return self.logits.clone()
