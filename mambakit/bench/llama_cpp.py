"""llama.cpp as a CPU baseline for a Mamba-1 model: the model's weights written as GGUF (our own
writer, through the `gguf` package's constants) and greedy decoding through `llama-cpp-python`.

Both are optional: `available()` says why the baseline cannot run (and the benchmark skips it with
that message). The GGUF holds llama.cpp's `mamba` architecture: the tensors of every block
(`blk.N.ssm_*`, `blk.N.attn_norm`), `token_embd`, `output_norm` and, when the LM head is not tied
to the embedding, `output`. A = -exp(A_log) is stored, as llama.cpp expects. The vocabulary is a
placeholder (one made-up piece per id): the benchmark feeds token ids, never text.
"""
from __future__ import annotations

import importlib.util
import time

import torch


def available() -> str | None:
    """None when the baseline can run, else why not."""
    missing = [m for m in ("llama_cpp", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed (pip install llama-cpp-python gguf): "
                "llama.cpp's baseline skipped")
    return None


def write_gguf(model, path, weights: str = "f32") -> None:
    """Write `model` (our MambaLMHeadModel, plain Mamba-1 blocks, RMSNorm) to `path` as GGUF.
    weights: "f32", or "f16" for the matrices (norms, conv, A, D and biases stay f32)."""
    import gguf
    import numpy as np

    if weights not in ("f32", "f16"):
        raise ValueError(f"write_gguf: weights must be 'f32' or 'f16', got {weights!r}")
    cfg, bb = model.config, model.backbone
    m0 = bb.layers[0].mixer
    if not cfg.rms_norm or cfg.attn_layer_idx or getattr(cfg, "d_intermediate", 0):
        raise ValueError("write_gguf: only Mamba-1 models with RMSNorm and no attention or MLP layers")
    names = gguf.TENSOR_NAMES
    T = gguf.MODEL_TENSOR
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_context_length(2 ** 20)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(0)
    w.add_head_count(0)
    w.add_block_count(len(bb.layers))
    w.add_ssm_conv_kernel(m0.d_conv)
    w.add_ssm_inner_size(m0.d_inner)
    w.add_ssm_state_size(m0.d_state)
    w.add_ssm_time_step_rank(m0.dt_rank)
    w.add_layer_norm_rms_eps(float(bb.layers[0].norm.eps))
    w.add_ssm_dt_b_c_rms(False)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if weights == "f16" else gguf.LlamaFileType.ALL_F32)
    vocab = bb.embedding.weight.shape[0]
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([int(gguf.TokenType.NORMAL)] * vocab)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)

    def add(name, t, matrix=False):
        a = t.detach().float().cpu().numpy()
        w.add_tensor(name, a.astype(np.float16) if matrix and weights == "f16" else a)

    add(names[T.TOKEN_EMBD] + ".weight", bb.embedding.weight, matrix=True)
    for i, block in enumerate(bb.layers):
        m = block.mixer
        n = {k: names[k].format(bid=i) for k in (T.ATTN_NORM, T.SSM_IN, T.SSM_CONV1D, T.SSM_X, T.SSM_DT, T.SSM_A,
                                                 T.SSM_D, T.SSM_OUT)}
        add(n[T.ATTN_NORM] + ".weight", block.norm.weight)
        add(n[T.SSM_IN] + ".weight", m.in_proj.weight, matrix=True)
        add(n[T.SSM_CONV1D] + ".weight", m.conv1d.weight.squeeze(1))
        if m.conv1d.bias is not None:
            add(n[T.SSM_CONV1D] + ".bias", m.conv1d.bias)
        add(n[T.SSM_X] + ".weight", m.x_proj.weight, matrix=True)
        add(n[T.SSM_DT] + ".weight", m.dt_proj.weight, matrix=True)
        add(n[T.SSM_DT] + ".bias", m.dt_proj.bias)
        add(n[T.SSM_A], -torch.exp(m.A_log.float()))
        add(n[T.SSM_D], m.D)
        add(n[T.SSM_OUT] + ".weight", m.out_proj.weight, matrix=True)
    add(names[T.OUTPUT_NORM] + ".weight", bb.norm_f.weight)
    if model.lm_head.weight.data_ptr() != bb.embedding.weight.data_ptr():
        add(names[T.OUTPUT] + ".weight", model.lm_head.weight, matrix=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def greedy(path, prompt_ids, gen_len: int, repeats: int, threads: int):
    """Greedy decoding of `gen_len` tokens after `prompt_ids` (a list of ints) by llama.cpp.
    Returns (tokens of the last run, times in s of each run: prompt + gen_len tokens, after a warm-up)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt_ids) + gen_len + 8, n_threads=threads,
                          n_threads_batch=threads, n_batch=512, verbose=False)
    n_vocab = llm.n_vocab()

    def last_logits():  # the last evaluated token's (Llama.scores keeps none without logits_all)
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(n_vocab,))

    def run():
        llm.reset()
        llm.eval(list(prompt_ids))
        out = []
        for i in range(gen_len):
            tok = int(np.argmax(last_logits()))
            out.append(tok)
            if i + 1 < gen_len:  # the last token is not fed back (as generate())
                llm.eval([tok])
        return out

    try:
        run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            tokens = run()
            times.append(time.perf_counter() - t0)
    finally:
        llm.close()  # now, not in a destructor at interpreter exit
    return tokens, times
