"""CPU benchmark of a Mamba-2 model against transformers' Mamba2ForCausalLM (its PyTorch path), same
weights, in one process. Writes benchmarks/results/cpu_mamba2_<size>.json (the date is inside).

Forward and forward+backward (loss: mean logsumexp of the logits), batch 1, fp32. The two models'
repeats alternate, so that a change of load on a shared machine falls on both; the figures are the
median and the fastest repeat of each. The logits are compared before timing. matmul_floor_fwd_s is
the time of the forward's matrix products alone (in_proj, out_proj, LM head), which both models share.

Greedy decoding, batch 1, fp32: a --prompt-len token prompt and --gen-len new tokens, by ours with the
compiled CPU step (generate cg=True, mamba_ssm/utils/compiled_step.py), ours eager (cg=False) and
transformers' generate (greedy, its cache); the three alternate as above. Each time is the whole
generate call (prefill + decoding), tokens/s = gen_len / median time. The compile (or inductor's
disk-cache lookup, when an earlier process compiled this shape) is timed once, before. Whether the
three produced the same tokens is recorded. --no-forward / --no-decode skip a part.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mambakit.bench.results import RESULTS_DIR, results_path  # noqa: E402

# upstream's state-spaces/mamba2-* shapes: (d_model, n_layer); headdim 64, d_state 128, ngroups 1, expand 2
SHAPES = {"130m": (768, 24), "370m": (1024, 48), "780m": (1536, 48), "1.3b": (2048, 48), "2.7b": (2560, 64),
          "tiny": (64, 2)}


def build(size, n_layer=None, vocab=50280, seed=0):
    """(ours, transformers') with the same random weights: transformers' model saved, loaded by ours."""
    import transformers

    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    d_model, layers = SHAPES[size]
    headdim = 64 if d_model >= 256 else 16
    cfg = transformers.Mamba2Config(vocab_size=vocab, hidden_size=d_model, num_hidden_layers=n_layer or layers,
                                    num_heads=2 * d_model // headdim, head_dim=headdim, n_groups=1,
                                    state_size=128 if d_model >= 256 else 16, expand=2, chunk_size=256,
                                    tie_word_embeddings=True)
    torch.manual_seed(seed)
    hf = transformers.Mamba2ForCausalLM(cfg).float().eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = MambaLMHeadModel.from_pretrained(tmp, dtype=torch.float32).eval()
    return ours, hf


def _forward(model, ids, hf):
    return model(ids, use_cache=False).logits if hf else model(ids).logits


def measure(ours, hf, ids, repeats):
    """Alternating repeats of each model's forward and forward+backward -> figures (seconds)."""
    def fwd(m, is_hf):
        with torch.no_grad():
            _forward(m, ids, is_hf)

    def fwd_bwd(m, is_hf):
        m.zero_grad(set_to_none=True)
        _forward(m, ids, is_hf).logsumexp(-1).mean().backward()

    times = {k: [] for k in ("ours_fwd", "hf_fwd", "ours_fwdbwd", "hf_fwdbwd")}
    for i in range(repeats + 1):                    # the first round warms up
        for key, fn, m, is_hf in (("ours_fwd", fwd, ours, False), ("hf_fwd", fwd, hf, True),
                                  ("ours_fwdbwd", fwd_bwd, ours, False), ("hf_fwdbwd", fwd_bwd, hf, True)):
            t0 = time.perf_counter()
            fn(m, is_hf)
            if i:
                times[key].append(time.perf_counter() - t0)
    fig = {}
    for key, ts in times.items():
        fig[f"{key}_s"] = statistics.median(ts)
        fig[f"{key}_min_s"] = min(ts)
    for kind in ("fwd", "fwdbwd"):
        fig[f"{kind}_speedup_vs_hf"] = fig[f"hf_{kind}_s"] / fig[f"ours_{kind}_s"]
        fig[f"{kind}_speedup_vs_hf_min"] = fig[f"hf_{kind}_min_s"] / fig[f"ours_{kind}_min_s"]
    return fig


def matmul_floor(ours, seqlen, repeats):
    """Seconds of the forward's matrix products alone (every in_proj and out_proj, the LM head) on
    random inputs of their shapes: what no scan can go below."""
    import torch.nn.functional as F

    mixers = [layer.mixer for layer in ours.backbone.layers]
    d_model = ours.lm_head.weight.shape[1]
    x = torch.randn(seqlen, d_model)
    ys = [torch.randn(seqlen, m.out_proj.weight.shape[1]) for m in mixers]

    def run():
        with torch.no_grad():
            for m, y in zip(mixers, ys):
                F.linear(x, m.in_proj.weight)
                F.linear(y, m.out_proj.weight)
            F.linear(x, ours.lm_head.weight)
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def greedy(ours, hf, prompt, gen_len, repeats):
    """Alternating repeats of the three greedy generates -> (figures, inputs)."""
    from mamba_ssm.utils.compiled_step import CompiledStep

    max_length = prompt.shape[1] + gen_len
    hf.generation_config.pad_token_id = 0
    hf.generation_config.eos_token_id = None  # as ours: gen_len tokens whatever they are
    t0 = time.perf_counter()
    step = CompiledStep.build(ours, prompt.shape[0])  # what the first generate(cg=True) of a process pays
    compile_s = time.perf_counter() - t0

    def run(key):
        with torch.no_grad():
            if key == "hf":
                out = hf.generate(prompt, max_new_tokens=gen_len, do_sample=False)
            else:
                out = ours.generate(prompt, max_length=max_length, cg=key == "ours")
        return out[0, prompt.shape[1]:].tolist()

    keys = ("ours", "ours_eager", "hf")
    times, tokens = {k: [] for k in keys}, {}
    for i in range(repeats + 1):                    # the first round warms up
        for key in keys:
            t0 = time.perf_counter()
            tokens[key] = run(key)
            if i:
                times[key].append(time.perf_counter() - t0)
    fig = {"ours_greedy_compile_s": compile_s if step is not None else None}
    for key in keys:
        fig[f"{key}_greedy_s"] = statistics.median(times[key])
        fig[f"{key}_greedy_min_s"] = min(times[key])
        fig[f"{key}_greedy_tok_per_s"] = gen_len / fig[f"{key}_greedy_s"]
    fig["greedy_speedup_vs_hf"] = fig["hf_greedy_s"] / fig["ours_greedy_s"]
    fig["greedy_eager_speedup_vs_hf"] = fig["hf_greedy_s"] / fig["ours_eager_greedy_s"]
    fig["greedy_compiled_speedup_vs_eager"] = fig["ours_eager_greedy_s"] / fig["ours_greedy_s"]
    ours_tokens = tokens["ours"]
    for key in ("ours_eager", "hf"):
        fig[f"greedy_tokens_{key}_equal_ours"] = sum(a == b for a, b in zip(tokens[key], ours_tokens))
    fig["greedy_tokens_all_agree"] = tokens["ours"] == tokens["ours_eager"] == tokens["hf"]
    inputs = {"prompt_len": prompt.shape[1], "gen_len": gen_len,
              "greedy_mode": "compiled step (generate cg=True)" if step is not None else
                             "eager step (compilation failed)",
              "greedy_timing": "whole generate call (prefill + gen_len steps), tokens/s = gen_len / median; "
                               "ours_greedy_compile_s: CompiledStep.build once before (a compile, or a lookup "
                               "in inductor's disk cache)"}
    return fig, inputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="130m", choices=sorted(SHAPES))
    p.add_argument("--n-layer", type=int, default=None, help="fewer layers than the size's (a quicker run)")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=16, help="greedy decoding: prompt tokens")
    p.add_argument("--gen-len", type=int, default=64, help="greedy decoding: new tokens")
    p.add_argument("--no-forward", dest="forward", action="store_false", help="skip forward and forward+backward")
    p.add_argument("--no-decode", dest="decode", action="store_false", help="skip greedy decoding")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory of the JSON (cpu_mamba2_<size>.json)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    ours, hf = build(args.size, args.n_layer)
    vocab = hf.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.seqlen), generator=torch.Generator().manual_seed(1))
    fig, decode_inputs = {}, {}
    if args.forward:
        with torch.no_grad():   # same weights: the logits must agree before the timing means anything
            a, b = _forward(ours, ids, False)[..., :vocab], _forward(hf, ids, True)
            rel = ((a - b).abs().max() / b.abs().max()).item()
        fig = measure(ours, hf, ids, args.repeats)
        fig["max_rel_logit_diff_vs_hf"] = rel
        fig["matmul_floor_fwd_s"], fig["matmul_floor_fwd_min_s"] = matmul_floor(ours, args.seqlen, args.repeats)
        fig["ours_fwd_over_floor"] = fig["ours_fwd_s"] / fig["matmul_floor_fwd_s"]
        fig["hf_fwd_over_floor"] = fig["hf_fwd_s"] / fig["matmul_floor_fwd_s"]
    if args.decode:
        prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(2))
        decode_fig, decode_inputs = greedy(ours, hf, prompt, args.gen_len, args.repeats)
        fig.update(decode_fig)
    d_model, layers = SHAPES[args.size]
    res = {
        "benchmark": "cpu_mamba2",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "figures": fig,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "inputs": {"size": args.size, "d_model": d_model, "n_layer": args.n_layer or layers, "vocab": vocab,
                   "batch": 1, "seqlen": args.seqlen if args.forward else None, "dtype": "float32",
                   "repeats": args.repeats, "parts": [k for k in ("forward", "decode") if getattr(args, k)],
                   "baseline": "transformers Mamba2ForCausalLM, its PyTorch path (no kernels)",
                   "timing": "median (and fastest) of alternating repeats after one warm-up round",
                   **decode_inputs},
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = args.size if args.n_layer is None else f"{args.size}-{args.n_layer}layers"
    path = results_path("cpu_mamba2", tag, results_dir=out_dir)
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps(fig, indent=1))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
