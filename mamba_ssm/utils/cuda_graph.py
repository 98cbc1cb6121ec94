"""One decoding step captured as a CUDA graph: one launch per token instead of hundreds.

The graph owns a static cache (the conv and SSM state of every layer); `decode` runs the
prompt into that same cache, then replays the graph for each new token. Graphs are kept on the
model per batch size, so repeated `generate(..., cg=True)` calls capture once.
"""
from __future__ import annotations

import torch


class CudaGraphStep:
    def __init__(self, model, batch_size, max_length):
        graphs = model.__dict__.setdefault("_cuda_graph_steps", {})
        key = (batch_size, next(model.parameters()).dtype)
        if key not in graphs:
            graphs[key] = _CapturedStep(model, batch_size, max_length)
        self.captured = graphs[key]

    def bind(self, inference_params):
        """Make `inference_params` use the graph's static cache (call before the prompt's forward)."""
        inference_params.key_value_memory_dict = self.captured.cache

    def __call__(self, token, inference_params):
        return self.captured.replay(token)


class _CapturedStep:
    def __init__(self, model, batch_size, max_length):
        from mamba_ssm.utils.generation import InferenceParams

        device = next(model.parameters()).device
        self.params = InferenceParams(max_seqlen=max_length, max_batch_size=batch_size)
        self.cache = model.allocate_inference_cache(batch_size, max_length)
        self.params.key_value_memory_dict = self.cache
        self.params.seqlen_offset = 1  # > 0 selects the recurrent step path
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (lazy inits, allocator)
                model(self.token, inference_params=self.params, num_last_tokens=1)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model(self.token, inference_params=self.params, num_last_tokens=1).logits[:, -1]

    def replay(self, token):
        self.token.copy_(token)
        self.graph.replay()
        return self.logits.clone()
