"""lm-eval throughput: our `mamba` model against lm-eval's `hf` model running transformers'
MambaForCausalLM, the same random weights, in one run. Writes JSON to
benchmarks/results/lm_eval_<shape>_<card>.json (card: h100, h200, ... or cpu; the date is inside;
the next run of that shape on that card overwrites it).

Two workloads, built by lm-eval itself from the local tasks in evals/tasks:
  * loglikelihood: gsm8k_local_mc, --n_ll requests (default 500 = 125 problems x 4 choices);
  * generate_until: gsm8k_local, --n_gen requests (default 100), greedy, max_gen_toks 256 and the
    task's stop sequences (random weights rarely stop early, so this is close to the worst case).
Requests/s counts the model's calls only (lm-eval's own task preparation and scoring are timed
apart, in total_s). Each model gets a short warm-up first (CUDA init, kernel compilation).

    # on the GPU (the study's shape); lm-eval, datasets and accelerate must be importable
    python benchmarks/benchmark_lm_eval.py --shape 1.4b --device cuda --batch_size 32
    # CPU smoke test
    python benchmarks/benchmark_lm_eval.py --shape tiny --device cpu --n_ll 40 --n_gen 8 --max_gen_toks 32

Needs the GPT-NeoX tokenizer (--tokenizer DIR or tokenizer.json; default the hub's
EleutherAI/gpt-neox-20b) and the GSM8K problems (--gsm8k_dir, default as the tasks:
$MAMBAKIT_GSM8K_DIR, else the hub's openai/gsm8k). The script sets HF_HUB_OFFLINE=1 and
HF_DATASETS_OFFLINE=1 unless they are set, so the hub defaults come from the local cache; export
both as 0 to download.
Dependencies beyond this repository: lm-eval and what it imports (datasets, accelerate for its
`hf` model). Also recorded: how far the two models' loglikelihoods agree (they should, up to
bf16 rounding) and how often their generations are identical (transformers' batched generation
left-pads, which changes a recurrent model's state, so some divergence there is expected).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from mambakit.bench.results import card_tag, results_path  # noqa: E402
TASKS_DIR = REPO / "evals" / "tasks"
SHAPES = {"tiny": (64, 2), "130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48),
          "2.8b": (2560, 64)}
LL_TASK, GEN_TASK, N_CHOICES = "gsm8k_local_mc", "gsm8k_local", 4


class TimedLM:
    """Wraps an lm-eval LM's request methods: time spent, request counts and outputs per method."""

    def __init__(self, lm):
        self.lm, self.seconds, self.count, self.outputs = lm, {}, {}, {}
        for name in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
            setattr(lm, name, self._wrap(name, getattr(lm, name)))

    def _wrap(self, name, fn):
        def timed(requests, *args, **kwargs):
            sync()
            t0 = time.perf_counter()
            out = fn(requests, *args, **kwargs)
            sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.count[name] = self.count.get(name, 0) + len(requests)
            self.outputs.setdefault(name, []).extend(zip([r.args for r in requests], out))
            return out

        return timed

    def reset(self):
        self.seconds, self.count, self.outputs = {}, {}, {}


HF_KERNEL_FUNCS = ("mamba_inner_fn", "mamba_selective_scan", "mamba_selective_state_update", "causal_conv1d_fn",
                   "causal_conv1d_update")


def import_hf_mamba(use_mamba_ssm: bool) -> dict:
    """Import transformers' Mamba modeling and say which implementation each kernel hook took.

    transformers (5.x) binds its kernel hooks at import time to an installed `mamba_ssm` (ours,
    here) and `causal_conv1d`. With use_mamba_ssm False, `mamba_ssm` is hidden during that import,
    so MambaForCausalLM runs its own PyTorch path: what a user without Mamba kernels gets.
    """
    name = "transformers.models.mamba.modeling_mamba"
    if name not in sys.modules:
        hidden = {}
        if not use_mamba_ssm:
            hidden = {k: sys.modules.pop(k) for k in list(sys.modules) if k == "mamba_ssm" or k.startswith("mamba_ssm.")}
            sys.modules["mamba_ssm"] = None  # makes `import mamba_ssm` raise ImportError
        try:
            importlib.import_module(name)
        finally:
            if not use_mamba_ssm:
                del sys.modules["mamba_ssm"]
                sys.modules.update(hidden)
    module = sys.modules[name]
    out = {}
    for func in HF_KERNEL_FUNCS:
        f = getattr(module, func, None)
        impls = [c.cell_contents for c in (getattr(f, "__closure__", None) or ())
                 if callable(getattr(c, "cell_contents", None))]
        names = [f"{getattr(i, '__module__', '?')}.{getattr(i, '__name__', '?')}" for i in impls]
        out[func] = names[0] if names else "unknown"
    return out


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def build_checkpoint(shape: str, dtype: torch.dtype, device: str, out_dir: Path, tokenizer_dir: Path, seed: int):
    """Random weights of a named shape, saved in transformers' layout (both models read it)."""
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mambakit.tokenizer import load_tokenizer

    d_model, n_layer = SHAPES[shape]
    torch.manual_seed(seed)
    model = MambaLMHeadModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50277), device=device,
                             dtype=dtype)
    model.save_pretrained(out_dir, layout="transformers")
    load_tokenizer(tokenizer_dir).save_pretrained(out_dir)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()
    return n_params


def run_model(name: str, lm, tasks_limits: list, task_manager, max_gen_toks: int, warmup: bool, num_fewshot=None):
    import lm_eval

    timed = TimedLM(lm)
    report = {}
    if warmup:
        for task, _ in tasks_limits:
            lm_eval.simple_evaluate(model=lm, tasks=[task], limit=2, task_manager=task_manager, log_samples=False,
                                    gen_kwargs={"max_gen_toks": min(8, max_gen_toks)}, bootstrap_iters=0)
        timed.reset()
    for task, limit in tasks_limits:
        t0 = time.perf_counter()
        res = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit, task_manager=task_manager,
                                      log_samples=False, num_fewshot=num_fewshot, gen_kwargs={"max_gen_toks": max_gen_toks},
                                      bootstrap_iters=0)
        total = time.perf_counter() - t0
        kind = "generate_until" if task == GEN_TASK else "loglikelihood"
        n, secs = timed.count.get(kind, 0), timed.seconds.get(kind, float("nan"))
        metrics = {k: v for k, v in res["results"][task].items() if "," in k and "_stderr" not in k}
        report[task] = {"request_type": kind, "requests": n, "model_s": round(secs, 3),
                        "requests_per_s": round(n / secs, 3) if secs > 0 else None, "total_s": round(total, 3),
                        "metrics": metrics}
        print(f"{name:5s} {task:15s} {n:4d} {kind} requests in {secs:8.2f}s: "
              f"{n / secs:8.2f} requests/s", flush=True)
    return report, dict(timed.outputs)


def graph_self_check(lm, n: int = 4, max_gen_toks: int = 32) -> bool:
    """Greedy text with CUDA-graph decoding steps equals text with eager steps (a few prompts)."""
    from lm_eval.api.instance import Instance

    prompts = [f"Question: A shop sells {k + 2} boxes of {3 * k + 5} pencils. How many pencils?\nAnswer:"
               for k in range(n)]
    prompts[0] = "Hi"  # prompts of different lengths in one batch
    reqs = [Instance(request_type="generate_until", doc={}, arguments=(p, {"until": ["\n\n"],
                                                                          "max_gen_toks": max_gen_toks}), idx=i)
            for i, p in enumerate(prompts)]
    with_graph = lm.generate_until(reqs, disable_tqdm=True)
    # Eager steps on the same fixed batch (no dropping of finished rows), so that both runs do
    # the same matrix products: with random weights greedy choices are near ties, and bf16 GEMMs
    # of other shapes could flip them without anything being wrong.
    lm._cuda_graph, lm._compact = False, False
    try:
        eager = lm.generate_until(reqs, disable_tqdm=True)
    finally:
        lm._cuda_graph, lm._compact = True, True
    if with_graph != eager:
        print("WARNING: CUDA-graph decoding differs from eager decoding:", with_graph, eager, flush=True)
    return with_graph == eager


def agreement(ours_out: dict, hf_out: dict, tokenizer, names=("ours", "hf")) -> dict:
    """How far two models' outputs agree (names: the two models, for the keys of the token counts)."""
    out = {}
    a = {json.dumps(k, default=str): v for k, v in ours_out.get("loglikelihood", [])}
    b = {json.dumps(k, default=str): v for k, v in hf_out.get("loglikelihood", [])}
    common = sorted(set(a) & set(b))
    if common:
        diffs = [abs(a[k][0] - b[k][0]) for k in common]
        out["loglikelihood"] = {"requests": len(common), "max_abs_diff": max(diffs),
                                "mean_abs_diff": sum(diffs) / len(diffs),
                                "same_is_greedy": sum(a[k][1] == b[k][1] for k in common) / len(common)}
    a = {json.dumps(k, default=str): v for k, v in ours_out.get("generate_until", [])}
    b = {json.dumps(k, default=str): v for k, v in hf_out.get("generate_until", [])}
    common = sorted(set(a) & set(b))
    if common:
        out["generate_until"] = {"requests": len(common), "identical": sum(a[k] == b[k] for k in common) / len(common),
                                 f"{names[0]}_mean_tokens": sum(len(tokenizer.encode(a[k])) for k in common) / len(common),
                                 f"{names[1]}_mean_tokens": sum(len(tokenizer.encode(b[k])) for k in common) / len(common)}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1.4b" if torch.cuda.is_available() else "tiny", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--batch_size", default=None, help="both models (default 32 on CUDA, 4 on the CPU)")
    p.add_argument("--ours_batch_size", default=None, help="ours only (e.g. auto); default --batch_size")
    p.add_argument("--n_ll", type=int, default=500, help="loglikelihood requests (a multiple of 4)")
    p.add_argument("--n_gen", type=int, default=100, help="generate_until requests")
    p.add_argument("--max_gen_toks", type=int, default=256)
    p.add_argument("--num_fewshot", type=int, default=None, help="default: the tasks' own (5)")
    p.add_argument("--tokenizer", default=None,
                   help="directory or tokenizer.json of GPT-NeoX-20B (default: the hub's EleutherAI/gpt-neox-20b)")
    p.add_argument("--gsm8k_dir", default=None)
    p.add_argument("--models", default="ours,ours_unpacked,hf",
                   help="comma-separated subset of ours (packed prefill, the default), ours_unpacked (packed=false), hf")
    p.add_argument("--no_warmup", action="store_true")
    p.add_argument("--no_cuda_graph", action="store_true", help="ours: eager decoding steps on CUDA")
    p.add_argument("--hf_kernels", choices=("torch", "mamba_ssm"), default="torch",
                   help="transformers' MambaForCausalLM on its PyTorch path (default) or on the installed "
                        "mamba_ssm's kernels (ours), which transformers picks up when it can import them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                   help="directory of the JSON (lm_eval_<shape>_<card>.json)")
    args = p.parse_args(argv)

    hf_impls = import_hf_mamba(args.hf_kernels == "mamba_ssm") if "hf" in args.models else {}
    import lm_eval
    from lm_eval.tasks import TaskManager

    from mambakit.evaluation.lm_eval_model import MambaEvalLM, parse_dtype
    from mambakit.tokenizer import load_tokenizer

    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else None
    if tokenizer_dir is not None and not tokenizer_dir.exists():
        raise SystemExit(f"tokenizer {tokenizer_dir} not found: pass --tokenizer DIR (GPT-NeoX-20B's tokenizer.json)")
    if args.gsm8k_dir:
        os.environ["MAMBAKIT_GSM8K_DIR"] = str(Path(args.gsm8k_dir).resolve())
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype or "auto", device)
    dtype_name = str(dtype).replace("torch.", "")
    bs = args.batch_size or (32 if device.type == "cuda" else 4)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.n_ll % N_CHOICES:
        raise SystemExit(f"--n_ll must be a multiple of {N_CHOICES} (each problem gives {N_CHOICES} requests)")
    tasks_limits = [(LL_TASK, args.n_ll // N_CHOICES), (GEN_TASK, args.n_gen)]
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    res = {"benchmark": "lm_eval_requests_per_s", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "shape": args.shape, "d_model": SHAPES[args.shape][0], "n_layer": SHAPES[args.shape][1],
           "dtype": dtype_name, "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
           or platform.machine(), "cpu_threads": torch.get_num_threads(), "batch_size": bs,
           "ours_batch_size": args.ours_batch_size or bs, "hf_kernel_implementations": hf_impls, "max_gen_toks": args.max_gen_toks,
           "tasks": {LL_TASK: f"{args.n_ll} loglikelihood requests", GEN_TASK: f"{args.n_gen} generate_until requests"},
           "versions": {"torch": torch.__version__, "lm_eval": getattr(lm_eval, "__version__", "?"),
                        "python": platform.python_version()}, "models": {}}
    try:
        import transformers

        res["versions"]["transformers"] = transformers.__version__
    except ImportError:
        pass
    from mamba_ssm import backend as mamba_backend

    on_cuda = device.type == "cuda"
    res["mamba_ssm_backends"] = {op: mamba_backend.choose_backend(op, on_cuda)
                                 for op in ("selective_scan", "selective_state_update")}
    outputs = {}
    with tempfile.TemporaryDirectory(prefix="bench_lm_eval_") as tmp:
        ckpt = Path(tmp) / f"mamba-{args.shape}-random"
        res["n_params"] = build_checkpoint(args.shape, dtype, str(device), ckpt, tokenizer_dir, args.seed)
        tokenizer = load_tokenizer(ckpt)
        for name in models:
            if name in ("ours", "ours_unpacked"):
                lm = MambaEvalLM(pretrained=str(ckpt), device=str(device), dtype=dtype_name,
                                 batch_size=args.ours_batch_size or bs, max_length=2048,
                                 max_gen_toks=args.max_gen_toks, cuda_graph=not args.no_cuda_graph,
                                 packed=name == "ours")
            elif name == "hf":
                from lm_eval.models.huggingface import HFLM

                lm = HFLM(pretrained=str(ckpt), tokenizer=str(ckpt), device=str(device), dtype=dtype_name,
                          batch_size=bs, max_length=2048)
                res["hf_model_class"] = type(lm.model).__name__
            else:
                raise SystemExit(f"unknown model {name!r}: use ours, ours_unpacked and/or hf")
            if name == "ours" and device.type == "cuda" and lm._cuda_graph:
                res["ours_cuda_graph_equals_eager"] = graph_self_check(lm)
                if not res["ours_cuda_graph_equals_eager"]:
                    lm._cuda_graph = False  # time the eager path rather than a suspect one
            report, outs = run_model(name, lm, tasks_limits, task_manager, args.max_gen_toks, not args.no_warmup,
                                     args.num_fewshot)
            res["models"][name] = report
            outputs[name] = outs
            if name == "ours":
                res["ours_stats"] = dict(lm.stats)
                # False after a failed capture (the run then used eager steps; see the log).
                res["ours_cuda_graph"] = bool(lm._cuda_graph and device.type == "cuda")
            del lm
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if "ours" in res["models"] and "hf" in res["models"]:
        res["speedup_ours_over_hf"] = {
            task: round(res["models"]["ours"][task]["requests_per_s"] / res["models"]["hf"][task]["requests_per_s"], 3)
            for task, _ in tasks_limits}
        res["agreement"] = agreement(outputs["ours"], outputs["hf"], tokenizer)
    if "ours" in res["models"] and "ours_unpacked" in res["models"]:  # packed prefill against padded (issue 21)
        res["speedup_packed_over_unpacked"] = {
            task: round(res["models"]["ours"][task]["requests_per_s"]
                        / res["models"]["ours_unpacked"][task]["requests_per_s"], 3) for task, _ in tasks_limits}
        res["agreement_packed_unpacked"] = agreement(outputs["ours"], outputs["ours_unpacked"], tokenizer,
                                                     ("packed", "unpacked"))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results_path("lm_eval", args.shape, card_tag(device), results_dir=out_dir)
    path.write_text(json.dumps(res, indent=1, default=str))
    print(json.dumps({k: res.get(k) for k in ("speedup_ours_over_hf", "agreement", "speedup_packed_over_unpacked",
                                             "agreement_packed_unpacked")}, indent=1, default=str))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
