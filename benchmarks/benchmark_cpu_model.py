"""CPU benchmark of the whole model against transformers' MambaForCausalLM (its PyTorch path),
same weights, in one run. Writes JSON to benchmarks/results/cpu_model_<size>.json (the date is
inside; the next run of that size overwrites it).

  (b) forward and forward+backward tokens/s, batch 1, fp32;
  (c) our forward against the time of its matrix products alone (the CPU floor), the two timed
      alternately; fwd_over_floor is the median of the pairs' ratios;
  (d) greedy decoding tokens/s, ours against transformers' generate. Ours runs generate(cg=True):
      on a CPU the decoding step compiled by torch.compile (mamba_ssm/utils/compiled_step.py).
      The one-time compile is done before timing and reported as ours_greedy_compile_s; the eager
      step (cg=False) is measured too, as ours_greedy_eager_*. greedy_mode says which ran.
      Ours with f16 weights (MAMBA_SSM_COMPILED_STEP_WEIGHTS=f16: the compiled step reads f16 copies
      of the matrices, computes in fp32) is timed alternately with ours fp32, repeat by repeat, so that
      a shared machine's load hits both alike: ours_f16_greedy_*, and how many of its tokens are ours
      fp32's (greedy_tokens_ours_f16_equal_ours).
  (e) llama.cpp's greedy decoding of the same weights (mambakit/bench/llama_cpp.py writes them as
      GGUF, f32 and f16), timed as ours (after ours, in its own loop), and how many of its tokens are
      ours (f32 against ours fp32; f16 against ours fp32 and ours f16); skipped with a message unless
      llama-cpp-python and gguf are installed (--no-llama-cpp skips it).

transformers' forward+backward is very slow at long sequences (the shared CPU anchor records
that it did not finish at 1024 tokens in 800 s), so it is measured at --hf-bwd-seqlen and ours
at both lengths.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mambakit.bench.results import RESULTS_DIR, results_path  # noqa: E402

SHAPES = {"130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48), "2.8b": (2560, 64)}


def timed(fn, repeats, warmup=1, with_min=False):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return (statistics.median(times), min(times)) if with_min else statistics.median(times)


def forward_time(model, ids, repeats, with_min=False):
    with torch.no_grad():
        return timed(lambda: model(ids), repeats, with_min=with_min)


def fwd_bwd_time(model, ids, repeats):
    def run():
        model.zero_grad(set_to_none=True)
        out = model(ids)
        out.logits.float().logsumexp(-1).mean().backward()
    return timed(run, repeats)


def matmul_floor(d_model, n_layer, vocab, seqlen, d_state=16, expand=2):
    """A call running the forward's matrix products alone: in_proj, x_proj, dt_proj, out_proj per layer, and lm_head."""
    d_inner = expand * d_model
    dt_rank = -(-d_model // 16)
    shapes = [(d_model, 2 * d_inner), (d_inner, dt_rank + 2 * d_state), (dt_rank, d_inner), (d_inner, d_model)]
    xs = {k: torch.randn(seqlen, k) for k, _ in shapes}
    ws = [torch.randn(k, n) for k, n in shapes]
    head_x, head_w = torch.randn(seqlen, d_model), torch.randn(d_model, vocab)

    def run():
        for _ in range(n_layer):
            for (k, _), w in zip(shapes, ws):
                torch.mm(xs[k], w)
        torch.mm(head_x, head_w)
    return run


def forward_against_floor(model, ids, floor, pairs):
    """The forward and its floor timed alternately, `pairs` times each after a warm-up of each, so that
    a shared machine's changing load hits both alike: (forward median, min; floor median, min;
    median of the pairs' ratios)."""
    with torch.no_grad():
        model(ids)
        floor()
        fwd, flo = [], []
        for _ in range(pairs):
            t0 = time.perf_counter()
            model(ids)
            t1 = time.perf_counter()
            floor()
            fwd.append(t1 - t0)
            flo.append(time.perf_counter() - t1)
    ratio = statistics.median(a / b for a, b in zip(fwd, flo))
    return statistics.median(fwd), min(fwd), statistics.median(flo), min(flo), ratio


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="130m", choices=sorted(SHAPES))
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--hf-bwd-seqlen", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--gen-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true", help="measure ours only")
    p.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false",
                   help="skip llama.cpp's greedy decoding (run when llama-cpp-python and gguf are installed)")
    p.add_argument("--out", default=str(RESULTS_DIR), help="directory of the JSON (cpu_model_<size>.json)")
    args = p.parse_args(argv)
    load_before = os.getloadavg()
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    d_model, n_layer = SHAPES[args.size]
    vocab = 50280
    model = MambaLMHeadModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab)).float()
    ids = torch.randint(0, vocab, (1, args.seqlen))
    short = ids[:, : args.hf_bwd_seqlen]
    res = {"figures": {}}
    fig = res["figures"]

    (fig["ours_fwd_s"], fig["ours_fwd_min_s"], fig["matmul_floor_fwd_s"], fig["matmul_floor_fwd_min_s"],
     fig["fwd_over_floor"]) = forward_against_floor(model, ids, matmul_floor(d_model, n_layer, vocab, args.seqlen),
                                                    max(5, args.repeats))
    fig["fwd_over_floor_min"] = fig["ours_fwd_min_s"] / fig["matmul_floor_fwd_min_s"]
    fig["ours_fwd_tok_per_s"] = args.seqlen / fig["ours_fwd_s"]
    fig["ours_fwdbwd_s"] = fwd_bwd_time(model, ids, args.repeats)
    fig["ours_fwdbwd_tok_per_s"] = args.seqlen / fig["ours_fwdbwd_s"]
    fig[f"ours_fwdbwd_s[L={args.hf_bwd_seqlen}]"] = fwd_bwd_time(model, short, args.repeats)
    prompt = ids[:, : args.prompt_len]
    max_length = args.prompt_len + args.gen_len
    from mamba_ssm.utils import compiled_step
    from mamba_ssm.utils.compiled_step import CompiledStep

    fig["ours_greedy_eager_s"], fig["ours_greedy_eager_min_s"] = timed(
        lambda: model.generate(prompt, max_length=max_length), args.repeats, with_min=True)
    fig["ours_greedy_eager_tok_per_s"] = args.gen_len / fig["ours_greedy_eager_s"]
    # compile once each, outside the timing (what the first generate(cg=True) of a process pays): ours on the
    # model's fp32 weights, and on f16 copies of its matrices
    setting = compiled_step.WEIGHTS
    builds = {}
    for weights in ("model", "f16"):
        compiled_step.set_weights(weights)
        builds[weights] = CompiledStep.build(model, prompt.shape[0])
    step, step16 = builds["model"], builds["f16"]
    greedy_mode = "compiled step (generate cg=True)" if step is not None else "eager step (compilation failed)"
    fig["ours_greedy_compile_s"] = step.compile_s if step is not None else None
    fig["ours_f16_greedy_compile_s"] = step16.compile_s if step16 is not None else None
    f16_mode = (f"compiled step, {step16.weights} weights" if step16 is not None else
                "eager step (compilation failed), fp32 weights")

    def greedy(weights):
        compiled_step.set_weights(weights)
        return model.generate(prompt, max_length=max_length, cg=True)[0, prompt.shape[1]:].tolist()

    times, tokens = {"model": [], "f16": []}, {}
    try:
        for weights in times:  # warm-up
            greedy(weights)
        for _ in range(args.repeats):  # alternately, so that the machine's load hits both alike
            for weights in times:
                t0 = time.perf_counter()
                tokens[weights] = greedy(weights)
                times[weights].append(time.perf_counter() - t0)
    finally:
        compiled_step.set_weights(setting)
    for key, weights in (("ours_greedy", "model"), ("ours_f16_greedy", "f16")):
        fig[f"{key}_s"], fig[f"{key}_min_s"] = statistics.median(times[weights]), min(times[weights])
        fig[f"{key}_tok_per_s"] = args.gen_len / fig[f"{key}_s"]
    fig["ours_f16_speedup_vs_fp32"] = fig["ours_greedy_s"] / fig["ours_f16_greedy_s"]
    fig["greedy_tokens_ours_f16_equal_ours"] = sum(a == b for a, b in zip(tokens["f16"], tokens["model"]))
    if args.llama_cpp:
        res["llama_cpp"] = llama_cpp_baseline(model, prompt, tokens["model"], tokens["f16"], args, fig)

    if not args.skip_hf:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, layout="transformers")
            torch.save({"ids": ids, "short": short, "prompt": prompt}, Path(tmp) / "inputs.pt")
            with torch.no_grad():
                torch.save(model(short).logits[..., :vocab], Path(tmp) / "ours_logits.pt")
            # transformers imports any installed `mamba_ssm` (ours, here) and would run our ops:
            # the baseline runs in a child process where that import is blocked.
            cmd = [sys.executable, __file__, "--hf-worker", tmp, "--repeats", str(args.repeats),
                   "--gen-len", str(args.gen_len)]
            subprocess.run(cmd, check=True)
            hf_fig = json.loads((Path(tmp) / "hf.json").read_text())
        fig.update(hf_fig)
        L = args.hf_bwd_seqlen
        fig["fwd_speedup_vs_hf"] = fig["hf_fwd_s"] / fig["ours_fwd_s"]
        fig[f"fwdbwd_speedup_vs_hf[L={L}]"] = fig[f"hf_fwdbwd_s[L={L}]"] / fig[f"ours_fwdbwd_s[L={L}]"]
        fig["greedy_speedup_vs_hf"] = fig["hf_greedy_s"] / fig["ours_greedy_s"]
        fig["greedy_eager_speedup_vs_hf"] = fig["hf_greedy_s"] / fig["ours_greedy_eager_s"]

    import transformers

    res.update({
        "benchmark": "cpu_model",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average_before": load_before,
                    "load_average": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()},
        "inputs": {"size": args.size, "d_model": d_model, "n_layer": n_layer, "vocab": vocab, "batch": 1,
                   "seqlen": args.seqlen, "hf_bwd_seqlen": args.hf_bwd_seqlen, "dtype": "float32",
                   "prompt_len": args.prompt_len, "gen_len": args.gen_len, "repeats": args.repeats,
                   "timing": "median of repeats after one warm-up (greedy: *_min_s the fastest repeat)",
                   "greedy_mode": greedy_mode, "greedy_f16_mode": f16_mode,
                   "greedy_timing": "ours fp32 and ours f16 alternately, repeat by repeat, after one warm-up each"},
    })
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results_path("cpu_model", args.size, results_dir=out_dir)
    path.write_text(json.dumps(res, indent=1))
    print(json.dumps(res["figures"], indent=1))
    print(f"wrote {path}")


def llama_cpp_baseline(model, prompt, ours, ours_f16, args, fig):
    """(e) llama.cpp's greedy decoding of the same weights (GGUF f32 and f16), timed as ours: prompt +
    gen_len tokens, tokens/s = gen_len / time; and whether its tokens are ours (ours: fp32, compiled
    step; ours_f16: the compiled step on f16 copies of the matrices)."""
    from mambakit.bench import llama_cpp

    reason = llama_cpp.available()
    if reason is not None:
        print(reason)
        return {"skipped": reason}
    info = {"version": importlib.metadata.version("llama_cpp_python"), "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        for weights in ("f32", "f16"):
            path = Path(tmp) / f"model-{weights}.gguf"
            llama_cpp.write_gguf(model, path, weights)
            tokens, times = llama_cpp.greedy(path, prompt[0].tolist(), args.gen_len, args.repeats,
                                             torch.get_num_threads())
            fig[f"llama_cpp_{weights}_greedy_s"] = statistics.median(times)
            fig[f"llama_cpp_{weights}_greedy_min_s"] = min(times)
            fig[f"llama_cpp_{weights}_greedy_tok_per_s"] = args.gen_len / statistics.median(times)
            fig[f"greedy_speedup_vs_llama_cpp_{weights}"] = fig[f"llama_cpp_{weights}_greedy_s"] / fig["ours_greedy_s"]
            info[f"{weights}_tokens_equal_ours"] = sum(a == b for a, b in zip(tokens, ours))
            if weights == "f16":
                info["f16_tokens_equal_ours_f16"] = sum(a == b for a, b in zip(tokens, ours_f16))
                fig["greedy_f16_speedup_vs_llama_cpp_f16"] = fig["llama_cpp_f16_greedy_s"] / fig["ours_f16_greedy_s"]
    info["tokens_compared"] = len(ours)
    return info


def hf_worker(directory, repeats, gen_len):
    """Time transformers' MambaForCausalLM on its own PyTorch path (no mamba_ssm importable)."""
    sys.modules["mamba_ssm"] = None  # makes `import mamba_ssm` fail inside transformers
    from transformers import MambaForCausalLM

    d = Path(directory)
    inputs = torch.load(d / "inputs.pt", weights_only=True)
    ids, short, prompt = inputs["ids"], inputs["short"], inputs["prompt"]
    hf = MambaForCausalLM.from_pretrained(d, dtype=torch.float32)
    vocab = torch.load(d / "ours_logits.pt", weights_only=True).shape[-1]
    fig = {}
    with torch.no_grad():  # same weights: the logits must agree before timing means anything
        ours = torch.load(d / "ours_logits.pt", weights_only=True)
        fig["max_abs_logit_diff_vs_hf"] = (hf(short).logits[..., :vocab] - ours).abs().max().item()
    fig["hf_fwd_s"] = forward_time(hf, ids, max(1, repeats - 1))
    fig["hf_fwd_tok_per_s"] = ids.shape[1] / fig["hf_fwd_s"]
    fig[f"hf_fwdbwd_s[L={short.shape[1]}]"] = fwd_bwd_time(hf, short, 1)
    hf.generation_config.pad_token_id = 0

    def generate():
        with torch.no_grad():
            hf.generate(prompt, max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False)
    fig["hf_greedy_s"], fig["hf_greedy_min_s"] = timed(generate, repeats, with_min=True)
    fig["hf_greedy_tok_per_s"] = gen_len / fig["hf_greedy_s"]
    (d / "hf.json").write_text(json.dumps(fig))


if __name__ == "__main__":
    if "--hf-worker" in sys.argv:
        w = argparse.ArgumentParser()
        w.add_argument("--hf-worker")
        w.add_argument("--repeats", type=int)
        w.add_argument("--gen-len", type=int)
        a = w.parse_args()
        hf_worker(a.hf_worker, a.repeats, a.gen_len)
    else:
        main()
