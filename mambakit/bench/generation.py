"""Generation timing: Mamba (recurrent cache) against a same-size transformer (KV cache), one run.

What is measured, per model and batch size (upstream's benchmark_generation_mamba_simple.py
method, extended): after one warm-up call, `repeats` timed calls of

* **total**: prompt processing + decoding of exactly `genlen` new tokens (no early stop at EOS);
* **prefill**: the same call with one new token, i.e. prompt processing (+ one sampling step);

decode = total - prefill; throughput = batch * genlen / total (new tokens per second) and
decode throughput = batch * (genlen - 1) / decode. CUDA is synchronised around every timed call.

Models: `--model-name` is a hub id or a local directory loaded with
`MambaLMHeadModel.from_pretrained`; when it cannot be loaded (no network, no cache) and it
names a known size (``130m``, ``370m``, ``790m``, ``1.4b``, ``2.8b``, Mamba-2's ``mamba2-130m`` ...
``mamba2-2.7b``, or a hub id ending in one, e.g. ``state-spaces/mamba-1.4b``), a model of that shape
with random weights is used and the result says so. ``tiny`` is a CPU smoke size. ``--attn-every N``
makes the random model a hybrid of that size: attention (`mamba_ssm.modules.mha.MHA`, head_dim 64 (128
from d_model 2048), rotary on half of it, a conv on qkv, upstream's mamba2attn settings) at every N-th
layer instead of Mamba. The baseline is transformers'
`GPTNeoXForCausalLM` in the matching Pythia shape (random weights, ``attn_implementation="sdpa"``);
for a checkpoint of another shape, a GPT-NeoX of the same width with half as many layers
(one attention+MLP layer holds about as many weights as two Mamba layers).

`--upstream-path DIR` measures upstream mamba-ssm instead of the transformer: upstream has our import
name, so the run goes to benchmarks/benchmark_model.py (mambakit/bench/model.py), which times ours
and upstream in child processes and writes model_<size>_<card>.json (`model_bench_argv` maps the options).
"""
from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mambakit.bench.results import gpu_tag

# name: (d_model, n_layer) for Mamba; the Pythia model of about the same size:
# (hidden, layers, heads, name)
MAMBA_SIZES = {
    "tiny": (64, 2), "130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48),
    "2.8b": (2560, 64),
}
PYTHIA_SIZES = {
    "tiny": (64, 1, 4, "tiny"), "130m": (768, 12, 12, "pythia-160m"), "370m": (1024, 24, 16, "pythia-410m"),
    "790m": (2048, 16, 8, "pythia-1b"), "1.4b": (2048, 24, 16, "pythia-1.4b"),
    "2.8b": (2560, 32, 32, "pythia-2.8b"),
}
# upstream's Mamba-2 checkpoints (state-spaces/mamba2-*): headdim 64, d_state 128, expand 2
MAMBA2_SIZES = {"mamba2-130m": (768, 24), "mamba2-370m": (1024, 48), "mamba2-780m": (1536, 48),
                "mamba2-1.3b": (2048, 48), "mamba2-2.7b": (2560, 64)}
PYTHIA_SIZES.update({"mamba2-130m": PYTHIA_SIZES["130m"], "mamba2-370m": PYTHIA_SIZES["370m"],
                     "mamba2-780m": PYTHIA_SIZES["790m"], "mamba2-1.3b": PYTHIA_SIZES["1.4b"],
                     "mamba2-2.7b": PYTHIA_SIZES["2.8b"]})
MAMBA_VOCAB = 50277
PYTHIA_VOCAB = 50304
RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


@dataclass
class BenchConfig:
    model_name: str = "state-spaces/mamba-130m"
    prompt: str | None = None
    promptlen: int = 100
    genlen: int = 100
    temperature: float = 1.0
    topk: int = 1
    topp: float = 1.0
    minp: float = 0.0
    repetition_penalty: float = 1.0
    batch: list = field(default_factory=lambda: [1])
    repeats: int = 3
    device: str | None = None       # default: cuda when available, else cpu
    dtype: str | None = None        # default: bfloat16 on cuda, float32 on cpu
    cg: bool = False
    baseline: bool = True
    tokenizer: str | None = None
    seed: int = 0
    threads: int = 0
    attn_every: int = 0             # > 0: random weights, attention at every attn_every-th layer

    def resolved_device(self) -> str:
        return self.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def resolved_dtype(self) -> torch.dtype:
        name = self.dtype or ("bfloat16" if self.resolved_device().startswith("cuda") else "float32")
        dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                  "float16": torch.float16, "fp16": torch.float16}
        if name not in dtypes:
            raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
        return dtypes[name]


def size_of(model_name: str) -> str | None:
    """The known size a model name stands for ('1.4b' for 'state-spaces/mamba-1.4b'), else None."""
    name = model_name.lower().rstrip("/")
    if name in MAMBA_SIZES or name in MAMBA2_SIZES:
        return name
    m = re.search(r"(mamba2-(?:130m|370m|780m|1\.3b|2\.7b))(-hf)?$", name)
    if m:
        return m.group(1)
    m = re.search(r"(130m|370m|790m|1\.4b|2\.8b)(-hf)?$", name)
    return m.group(1) if m else None


def hybrid_layout(d_model: int, n_layer: int, attn_every: int) -> dict:
    """MambaConfig fields putting attention at every attn_every-th layer (layers attn_every-1, 2*attn_every-1, ...)."""
    head_dim = 128 if d_model >= 2048 else 64
    attn_cfg = {"num_heads": d_model // head_dim, "head_dim": head_dim, "rotary_emb_dim": head_dim // 2,
                "causal": True, "d_conv": 4, "qkv_proj_bias": False, "out_proj_bias": False}
    return {"attn_layer_idx": list(range(attn_every - 1, n_layer, attn_every)), "attn_cfg": attn_cfg}


def random_mamba(size: str, device, dtype, vocab_size: int = MAMBA_VOCAB, attn_every: int = 0):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    mamba2 = size in MAMBA2_SIZES
    d_model, n_layer = MAMBA2_SIZES[size] if mamba2 else MAMBA_SIZES[size]
    hybrid = hybrid_layout(d_model, n_layer, attn_every) if attn_every else {}
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size, rms_norm=True, residual_in_fp32=True,
                      fused_add_norm=True, pad_vocab_size_multiple=16 if mamba2 else 8, tie_embeddings=True,
                      ssm_cfg={"layer": "Mamba2"} if mamba2 else {}, **hybrid)
    return MambaLMHeadModel(cfg, device=device, dtype=dtype)


def load_mamba(model_name: str, device, dtype, attn_every: int = 0):
    """(model, info): the checkpoint when it loads, else random weights of the named size."""
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    size = size_of(model_name)
    if attn_every:
        if size is None:
            raise ValueError(f"--attn-every builds a random hybrid model of a known size ({', '.join(MAMBA_SIZES)}); "
                             f"got --model-name {model_name!r}")
        model = random_mamba(size, device, dtype, attn_every=attn_every)
        return model, {"weights": "random", "size": size, "attn_layer_idx": model.config.attn_layer_idx,
                       "attn_cfg": model.config.attn_cfg}
    if size == "tiny" or (size is not None and model_name.lower() == size):
        return random_mamba(size, device, dtype), {"weights": "random", "size": size}
    try:
        model = MambaLMHeadModel.from_pretrained(model_name, device=device, dtype=dtype)
        return model, {"weights": "checkpoint", "checkpoint": model_name, "size": size}
    except Exception as e:  # noqa: BLE001  any failure to reach or read the checkpoint
        if size is None:
            raise RuntimeError(f"cannot load {model_name!r} ({type(e).__name__}: {e}) and it names no known size "
                               f"({', '.join(MAMBA_SIZES)}) to fall back to random weights") from e
        print(f"note: {model_name} not reachable ({type(e).__name__}: {str(e)[:160]}); "
              f"using random weights in the {size} shape", file=sys.stderr)
        return random_mamba(size, device, dtype), {"weights": "random", "size": size,
                                                   "fallback_reason": f"{type(e).__name__}: {str(e)[:300]}"}


def pythia_config(size: str | None, mamba_model):
    """GPTNeoXConfig of the baseline: the Pythia shape of `size`, else matched to the Mamba's width."""
    from transformers import GPTNeoXConfig

    if size in PYTHIA_SIZES:
        hidden, layers, heads, name = PYTHIA_SIZES[size]
        vocab = PYTHIA_VOCAB if size != "tiny" else MAMBA_VOCAB
    else:
        hidden = mamba_model.config.d_model
        layers = max(1, round(mamba_model.config.n_layer / 2))
        heads = max(1, hidden // 64) if hidden % 64 == 0 else 1
        vocab = mamba_model.config.vocab_size
        name = f"gpt-neox-{hidden}x{layers}"
    cfg = GPTNeoXConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                        intermediate_size=4 * hidden, hidden_act="gelu", max_position_embeddings=4096,
                        use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    return cfg, name


def random_transformer(size, mamba_model, device, dtype):
    from transformers import GPTNeoXForCausalLM

    cfg, name = pythia_config(size, mamba_model)
    model = GPTNeoXForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return model.to(device).eval(), {"weights": "random", "shape": name, "hidden_size": cfg.hidden_size,
                                     "num_hidden_layers": cfg.num_hidden_layers,
                                     "num_attention_heads": cfg.num_attention_heads,
                                     "attn_implementation": model.config._attn_implementation}


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def mamba_generate_fn(model, cfg: BenchConfig):
    use_cg = cfg.cg  # a CUDA graph on a GPU, the compiled step on a CPU (mamba_ssm.utils.generation)

    def fn(input_ids, new_tokens):
        return model.generate(input_ids=input_ids, max_length=input_ids.shape[1] + new_tokens, cg=use_cg,
                              return_dict_in_generate=True, output_scores=False, enable_timing=False,
                              temperature=cfg.temperature, top_k=cfg.topk, top_p=cfg.topp, min_p=cfg.minp,
                              repetition_penalty=cfg.repetition_penalty).sequences
    return fn


def transformer_generate_fn(model, cfg: BenchConfig):
    sampling = cfg.topk != 1

    def fn(input_ids, new_tokens):
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=sampling, use_cache=True,
                      pad_token_id=0, eos_token_id=None, repetition_penalty=cfg.repetition_penalty)
        if sampling:
            kwargs.update(temperature=cfg.temperature, top_k=cfg.topk if cfg.topk > 0 else None,
                          top_p=cfg.topp if 0 < cfg.topp < 1 else None, min_p=cfg.minp or None)
        else:
            kwargs.update(temperature=None, top_k=None, top_p=None)
        return model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
    return fn


def time_call(fn, input_ids, new_tokens, repeats, device) -> list:
    """Milliseconds of `repeats` calls after one warm-up call."""
    fn(input_ids, new_tokens)
    _sync(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn(input_ids, new_tokens)
        _sync(device)
        times.append((time.perf_counter() - t) * 1000)
    return times


def measure(fn, input_ids, cfg: BenchConfig, device) -> dict:
    """Total, prefill and decode time of one model at one batch size (input_ids already batched)."""
    batch = input_ids.shape[0]
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    total = time_call(fn, input_ids, cfg.genlen, cfg.repeats, device)
    prefill = time_call(fn, input_ids, 1, cfg.repeats, device)
    total_ms = sum(total) / len(total)
    prefill_ms = sum(prefill) / len(prefill)
    decode_ms = max(total_ms - prefill_ms, 1e-9)
    out = {"batch": batch, "promptlen": input_ids.shape[1], "genlen": cfg.genlen, "repeats": cfg.repeats,
           "total_ms_mean": round(total_ms, 3), "total_ms": [round(t, 3) for t in total],
           "prefill_ms_mean": round(prefill_ms, 3), "prefill_ms": [round(t, 3) for t in prefill],
           "decode_ms_mean": round(decode_ms, 3),
           "tokens_per_s": round(batch * cfg.genlen / (total_ms / 1000), 2),
           "decode_tokens_per_s": round(batch * max(cfg.genlen - 1, 1) / (decode_ms / 1000), 2)}
    if str(device).startswith("cuda"):
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def machine_info(device) -> dict:
    import transformers

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": str(device),
            "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import mamba_ssm

        info["mamba_ssm"] = mamba_ssm.__version__
    except Exception:  # noqa: BLE001
        pass
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _input_ids(cfg: BenchConfig, tokenizer, batch: int, device, vocab_limit: int):
    if cfg.prompt is not None:
        ids = tokenizer(cfg.prompt, return_tensors="pt").input_ids
    else:
        g = torch.Generator().manual_seed(cfg.seed)
        ids = torch.randint(1, vocab_limit, (1, cfg.promptlen), generator=g)
    return ids.repeat(batch, 1).to(device)


def _load_tokenizer(cfg: BenchConfig):
    from mambakit.tokenizer import load_tokenizer

    model_dir = cfg.model_name if Path(cfg.model_name).is_dir() else None
    has_local = model_dir is not None and any((Path(model_dir) / f).exists()
                                              for f in ("tokenizer.json", "tokenizer_config.json"))
    if cfg.prompt is None and cfg.tokenizer is None and not has_local:
        return None  # random prompt ids: a tokenizer only decodes the sample; do not go to the hub for it
    try:
        return load_tokenizer(cfg.tokenizer, model_dir=model_dir)
    except Exception as e:  # noqa: BLE001
        if cfg.prompt is not None:
            raise RuntimeError(f"--prompt needs a tokenizer and none could be loaded ({type(e).__name__}: {e}); "
                               "pass --tokenizer PATH (a directory or tokenizer.json)") from e
        return None


def run_benchmark(cfg: BenchConfig, log=print) -> dict:
    """Measure Mamba (and the baseline) at every batch size; returns the result dict (not written)."""
    if cfg.genlen < 2:
        raise ValueError(f"genlen must be >= 2 (decode time is total minus a one-token call), got {cfg.genlen}")
    if cfg.prompt is None and cfg.promptlen < 1:
        raise ValueError(f"promptlen must be >= 1, got {cfg.promptlen}")
    if not cfg.batch or any(b < 1 for b in cfg.batch):
        raise ValueError(f"batch sizes must be >= 1, got {cfg.batch}")
    device = torch.device(cfg.resolved_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for but torch sees no CUDA device")
    dtype = cfg.resolved_dtype()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.cg and device.type != "cuda":
        log("note: --cg on the CPU compiles Mamba's decoding step (torch.compile); each batch size compiles "
            "once, in its warm-up call (~10-60 s), which is not timed")
    torch.manual_seed(cfg.seed)

    tokenizer = _load_tokenizer(cfg)
    if cfg.attn_every < 0:
        raise ValueError(f"attn_every must be >= 0, got {cfg.attn_every}")
    mamba, mamba_info = load_mamba(cfg.model_name, device, dtype, attn_every=cfg.attn_every)
    mamba.eval()
    mamba_info.update(n_params=n_params(mamba), d_model=mamba.config.d_model, n_layer=mamba.config.n_layer)
    models = [("mamba", mamba, mamba_generate_fn(mamba, cfg), mamba_info)]
    if cfg.baseline:
        tf, tf_info = random_transformer(mamba_info.get("size"), mamba, device, dtype)
        tf_info["n_params"] = n_params(tf)
        models.append(("transformer", tf, transformer_generate_fn(tf, cfg), tf_info))
    vocab_limit = min(mamba.config.vocab_size, 50277)

    results = {"kind": "generation_benchmark", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine_info(device), "inputs": {**asdict(cfg), "dtype": str(dtype).replace("torch.", ""),
                                                           "device": str(device)},
               "models": {name: info for name, _, _, info in models}, "runs": [], "sample": None}

    # The decoded text of the first prompt (Mamba), as upstream prints it.
    ids = _input_ids(cfg, tokenizer, 1, device, vocab_limit)
    with torch.inference_mode():
        seq = models[0][2](ids, cfg.genlen)
    prompt_len, gen_len = ids.shape[1], seq.shape[1] - ids.shape[1]
    text = tokenizer.batch_decode(seq.tolist())[0] if tokenizer is not None else None
    if text is not None:
        log(text)
    else:
        log(f"(no tokenizer: generated ids {seq[0, prompt_len:prompt_len + 16].tolist()}...)")
    log(f"Prompt length: {prompt_len}, generation length: {gen_len}")
    results["sample"] = {"text": text, "prompt_length": prompt_len, "generation_length": gen_len}

    for batch in cfg.batch:
        ids = _input_ids(cfg, tokenizer, batch, device, vocab_limit)
        for name, model, fn, info in models:
            try:
                with torch.inference_mode():
                    r = measure(fn, ids, cfg, device)
            except torch.cuda.OutOfMemoryError as e:  # a batch that does not fit is a result too
                torch.cuda.empty_cache()
                r = {"batch": batch, "promptlen": ids.shape[1], "genlen": cfg.genlen, "error": f"out of memory: {e}"[:300]}
            r["model"] = name
            results["runs"].append(r)
            if "error" in r:
                log(f"{name} batch {batch}: {r['error']}")
            else:
                log(f"{name} ({cfg.model_name if name == 'mamba' else info['shape']}) batch {batch}: prompt processing + "
                    f"decoding time: {r['total_ms_mean']:.0f}ms (prefill {r['prefill_ms_mean']:.0f}ms, decode "
                    f"{r['decode_ms_mean']:.0f}ms), {r['tokens_per_s']:.1f} tokens/s")
    return results


def default_stem(cfg: BenchConfig, results: dict) -> str:
    """generation_<size>_<card>: one file per model size and card, overwritten by the next run (the
    date, inputs and versions are inside)."""
    size = results["models"]["mamba"].get("size") or Path(cfg.model_name.rstrip("/")).name
    attn_every = getattr(cfg, "attn_every", 0)
    size = f"{size}-attn{attn_every}" if attn_every else size
    gpu = results.get("machine", {}).get("gpu")
    on_cuda = str(results["inputs"]["device"]).startswith("cuda")
    return f"generation_{size}_{gpu_tag(gpu) if on_cuda and gpu else 'cpu'}"


def write_results(results: dict, json_path, png_path=None) -> tuple:
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    if png_path is not None:
        results["png"] = str(png_path)
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(json_path)
    if png_path is not None:
        plot_throughput(results, png_path, source=str(json_path))
    return json_path, png_path


def plot_throughput(results: dict, png_path, source: str = ""):
    """PNG: generated tokens per second against batch size, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in results["models"]:
        runs = sorted((r for r in results["runs"] if r["model"] == name and "tokens_per_s" in r), key=lambda r: r["batch"])
        if runs:
            ax.plot([r["batch"] for r in runs], [r["tokens_per_s"] for r in runs], marker="o",
                    label=f"{name} ({results['models'][name].get('shape') or results['models'][name].get('size') or ''})")
    inp = results["inputs"]
    batches = sorted({r["batch"] for r in results["runs"]})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches)
    ax.set_xticklabels([str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("generated tokens / s (prompt + decode)")
    ax.set_title(f"prompt {results['sample']['prompt_length']}, {inp['genlen']} new tokens, "
                 f"{inp['device']} {inp['dtype']}", fontsize=9)
    if source:
        fig.text(0.01, 0.01, f"source: {source}", fontsize=6, color="gray")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(png_path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def build_parser():
    import argparse

    p = argparse.ArgumentParser(description="Generation speed of Mamba (and a same-size transformer)")
    p.add_argument("--model-name", type=str, default="state-spaces/mamba-130m",
                   help="hub id, local directory, or a size (tiny, 130m, 370m, 790m, 1.4b, 2.8b) for random weights")
    p.add_argument("--prompt", type=str, default=None, help="prompt text (default: random token ids of --promptlen)")
    p.add_argument("--promptlen", type=int, default=100)
    p.add_argument("--genlen", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--topk", type=int, default=1)
    p.add_argument("--topp", type=float, default=1.0)
    p.add_argument("--minp", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="one or more batch sizes (a sweep)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (mean reported)")
    p.add_argument("--device", type=str, default=None)
    p.add_argument("--dtype", type=str, default=None, help="float32, bfloat16, float16 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--cg", action="store_true",
                   help="Mamba's decoding step as a CUDA graph (GPU) or compiled with torch.compile (CPU)")
    p.add_argument("--no-baseline", action="store_true", help="skip the transformer baseline")
    p.add_argument("--tokenizer", type=str, default=None, help="tokenizer directory or tokenizer.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn-every", type=int, default=0,
                   help="random weights of --model-name's size with attention at every N-th layer (a hybrid model)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out-json", type=str, default=None, help=f"result JSON (default: {RESULTS_DIR}/generation_*.json)")
    p.add_argument("--out-png", type=str, default=None, help="throughput PNG (default: next to the JSON)")
    p.add_argument("--upstream-path", type=str, default=None,
                   help="ours beside upstream mamba-ssm built in this directory instead of the transformer, each "
                        "batch in child processes: the run goes to benchmarks/benchmark_model.py (generation only, "
                        "random weights of --model-name's size, greedy), which writes model_<size>_<card>.json; "
                        "options this script does not know go to it (--budget-s, --variants, --results-dir, ...)")
    return p


# options benchmark_model.py's generation children have no counterpart of: with --upstream-path, only their defaults
NOT_WITH_UPSTREAM = ("prompt", "tokenizer", "attn_every", "topk", "topp", "minp", "repetition_penalty", "threads",
                     "out_json", "out_png")
DTYPE_NAMES = {"float32": "fp32", "fp32": "fp32", "bfloat16": "bf16", "bf16": "bf16", "float16": "fp16",
               "fp16": "fp16"}


def model_bench_argv(args, extra=()) -> list:
    """benchmark_model.py's command line for this script's generation run with --upstream-path: the size
    of --model-name as --shape, --batch as --gen-batch, --promptlen/--genlen as --gen-prompt/--gen-new,
    generate(cg=False) unless --cg, no decoding ms/token and no training; `extra` appended."""
    defaults = build_parser()
    for dest in NOT_WITH_UPSTREAM:
        if getattr(args, dest) != defaults.get_default(dest):
            raise SystemExit(f"--{dest.replace('_', '-')}: not with --upstream-path (its children time greedy "
                             f"generation of random ids); expected the default {defaults.get_default(dest)!r}, got "
                             f"{getattr(args, dest)!r}")
    size = size_of(args.model_name)
    if size is None:
        raise SystemExit(f"--model-name: with --upstream-path, expected a size ({', '.join(MAMBA_SIZES)}, "
                         f"{', '.join(MAMBA2_SIZES)}) or a hub id ending in one, got {args.model_name!r}")
    if args.dtype is not None and args.dtype not in DTYPE_NAMES:
        raise SystemExit(f"--dtype: expected one of {sorted(DTYPE_NAMES)}, got {args.dtype!r}")
    argv = ["--shape", size, "--upstream-path", args.upstream_path, "--no-decode", "--no-training",
            "--gen-batch", *map(str, args.batch), "--gen-prompt", str(args.promptlen), "--gen-new", str(args.genlen),
            "--repeats", str(args.repeats), "--seed", str(args.seed)]
    if args.device:
        argv += ["--device", args.device]
    if args.dtype:
        argv += ["--dtype", DTYPE_NAMES[args.dtype]]
    if not args.cg:
        argv.append("--no-cg")
    return argv + list(extra)


def run_model_bench(argv) -> dict:
    """benchmarks/benchmark_model.py's main(argv) in this process (mambakit/bench/model.py, loaded by path
    as its script loads it)."""
    import importlib.util

    name = "_mamba_model_bench"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("model.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name].main(argv)


def main(argv=None):
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.upstream_path:
        return run_model_bench(model_bench_argv(args, extra))
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    cfg = BenchConfig(model_name=args.model_name, prompt=args.prompt, promptlen=args.promptlen, genlen=args.genlen,
                      temperature=args.temperature, topk=args.topk, topp=args.topp, minp=args.minp,
                      repetition_penalty=args.repetition_penalty, batch=args.batch, repeats=args.repeats,
                      device=args.device, dtype=args.dtype, cg=args.cg, baseline=not args.no_baseline,
                      tokenizer=args.tokenizer, seed=args.seed, threads=args.threads, attn_every=args.attn_every)
    results = run_benchmark(cfg)
    json_path = Path(args.out_json) if args.out_json else RESULTS_DIR / (default_stem(cfg, results) + ".json")
    png_path = Path(args.out_png) if args.out_png else json_path.with_suffix(".png")
    write_results(results, json_path, png_path)
    print(f"wrote {json_path} and {png_path}")
    return results


if __name__ == "__main__":
    main()
