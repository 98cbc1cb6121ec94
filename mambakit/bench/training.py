"""Training throughput and peak memory of a Mamba LM shape: ours in variants (environments, other trees)
and upstream mamba-ssm, each (variant, mode) in its own child process. Command line:
benchmarks/benchmark_training.py; the child protocol and the JSON's frame: mambakit/bench/variants.py.

Loaded by file path (the script does it), also in the children, so that it imports no `mambakit` and
no `mamba_ssm` other than the one a child's PYTHONPATH names (lora_recipe imports the variant's own
`mambakit`, as the recipe does). A child's PYTHONPATH: the variant's tree, then the parent's PYTHONPATH
entries that hold neither `mamba_ssm` nor `mambakit` (a directory PEFT was installed into).

Modes (random weights, seeded; batch x seqlen random token ids; a step synchronised before and after):

  full         the whole model: fp32 weights, forward under bf16 autocast, cross-entropy on the logits
               (every position's next token), backward, no optimizer step: the anchor's
               train_fwdbwd_tok_per_s
  lora_plain   LoRA as a PEFT user writes it: bf16 model, get_peft_model(model, LoraConfig(r=--rank,
               lora_alpha=16, target_modules=[in_proj, x_proj, dt_proj, out_proj])) with PEFT's default
               adapter dtype, no autocast, cross-entropy, backward, AdamW step. It imports no mambakit
               (--plain-resolver does), so our mixer runs PEFT's wrappers as modules unless a resolver
               describes them (the figures say which: adapter_path)
  lora_recipe  the recipe's setup (build in benchmarks/benchmark_finetune.py): bf16 base, adapters
               r=--rank, alpha 2r, no dropout, cast to fp32, bf16 autocast, mambakit's response_loss
               (the first quarter of each row masked as a prompt), gradient clipping, fused AdamW on CUDA

Upstream runs `full` only (--upstream-modes): its Mamba.forward hands in_proj.weight and the other
projections' weights straight to mamba_inner_fn, so PEFT's adapters would be ignored (no gradient
reaches them); its LoRA modes are recorded as "skipped: ...".

Per (variant, mode): tokens_per_s = batch * seqlen / median step time (tokens_per_s_best: the fastest
step), step times, peak memory (CUDA: torch.cuda.max_memory_allocated over the timed steps, after
reset_peak_memory_stats following the warm-up, and over the whole child, warm-up included; CPU: the
process's max RSS, both), the weights' memory, the losses, how many trainable parameters received a
gradient, and which mixer path ran (ours: fused mamba_inner_fn or the unfused path; upstream: from
its use_fast_path and causal_conv1d). A child that fails (out of memory, an import error) is an entry
with an "error" string. Ratios to the baseline per mode: tokens/s variant / baseline, peak memory
variant / baseline (and whether it is at or below).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import statistics
import sys
import time
import traceback
from pathlib import Path


def _load_variants():
    """mambakit/bench/variants.py by path (the shared child protocol); it loads its siblings itself."""
    key = "_mamba_bench_variants"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).with_name("variants.py"))
        sys.modules[key] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[key])
    return sys.modules[key]


_v = _load_variants()
SHAPES, REPO = _v.SHAPES, _v.REPO
VOCAB = 50277  # padded to 50280, a multiple of 8
SCRIPT = REPO / "benchmarks" / "benchmark_training.py"
MODES = ("full", "lora_plain", "lora_recipe")
TARGETS = ["in_proj", "x_proj", "dt_proj", "out_proj"]
DEFAULT_VARIANTS = ("ours",)
UPSTREAM_LORA_SKIPPED = ("skipped: upstream's fused path hands in_proj.weight and the other projections' weights "
                         "straight to mamba_inner_fn, ignoring PEFT's adapters (--upstream-modes runs it anyway)")


# ------------------------------------------------------------------------------------------- child
def next_token_labels(ids):
    """Position t's target is token t+1; the last position has none (-100)."""
    import torch

    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def lm_loss(out, labels):
    """Cross-entropy of the logits as the model returns them against the labels (-100 ignored)."""
    import torch.nn.functional as F

    logits = out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def _base_model(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def mixer_path(model) -> str:
    """Which path the first layer's mixer takes in a training forward."""
    mixer = _base_model(model).backbone.layers[0].mixer
    plain = getattr(mixer, "projections_are_plain", None)
    if plain is not None:  # ours
        return "fused mamba_inner_fn" if mixer.use_fast_path and plain() else \
            "unfused: projections through project, then selective_scan_fn"
    conv = getattr(sys.modules.get(type(mixer).__module__), "causal_conv1d_fn", None)  # upstream's condition
    return "fused mamba_inner_fn" if mixer.use_fast_path and conv is not None else "unfused (no causal_conv1d)"


def adapter_path(model) -> str | None:
    """How our mixer runs PEFT's wrapped in_proj (None where mamba_ssm has no adapter registry)."""
    try:
        from mamba_ssm.ops.adapters import describe_adapter
    except ImportError:
        return None
    if describe_adapter(_base_model(model).backbone.layers[0].mixer.in_proj) is not None:
        return "channel-first (a registered resolver describes PEFT's LoRA)"
    return "module (no resolver describes PEFT's LoRA: its forward on a transposed copy)"


def build_step(mode, shape, batch_size, seqlen, device, seed=0, rank=64, plain_resolver=False):
    """(model, step, info) for a mode; step() runs one training step and returns the loss."""
    import torch

    if mode not in MODES:
        raise ValueError(f"--mode: expected one of {MODES}, got {mode!r}")
    cuda = str(device).startswith("cuda")
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch_size, seqlen), generator=g).to(device)

    def autocast():
        if mode == "lora_plain":
            return contextlib.nullcontext()
        return torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16)

    opt, clip, loss_in_autocast = None, False, mode == "full"
    if mode == "full":
        model = _v.build_lm(shape, device, torch.float32, seed, VOCAB)
        labels, loss_fn = next_token_labels(ids), lm_loss
        info = {"weights": "float32", "autocast": "bfloat16", "loss": "cross-entropy, every next token",
                "optimizer": None}
    else:
        recipe = mode == "lora_recipe"
        if recipe or plain_resolver:
            importlib.import_module("mambakit")  # registers the resolver of PEFT's LoRA, as the recipe does
        import peft
        from peft import LoraConfig, get_peft_model

        base = _v.build_lm(shape, device, torch.bfloat16, seed, VOCAB)
        cfg = (LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS) if recipe
               else LoraConfig(r=rank, lora_alpha=16, target_modules=TARGETS))
        model = get_peft_model(base, cfg)
        if recipe:
            from mambakit.finetune.trainer import response_loss

            for p in model.parameters():  # adapters in fp32 whatever the base dtype
                if p.requires_grad:
                    p.data = p.data.float()
            labels = ids.clone()
            labels[:, : seqlen // 4] = -100  # a prompt part, as in benchmark_finetune.py
            loss_fn, clip = response_loss, True
        else:
            labels, loss_fn = next_token_labels(ids), lm_loss
        info = {"weights": "bfloat16", "autocast": "bfloat16" if recipe else None, "peft": peft.__version__,
                "lora_rank": rank, "lora_alpha": cfg.lora_alpha, "lora_targets": TARGETS,
                "loss": "response_loss (first quarter masked)" if recipe else "cross-entropy, every next token",
                "optimizer": ("AdamW fused" if cuda else "AdamW") + ", clip 1.0" if recipe else "AdamW"}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if mode != "full":
        opt = torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if mode == "lora_recipe" and cuda else {}))
        info["adapter_dtypes"] = sorted({str(p.dtype)[6:] for p in params})
        info["adapter_path"] = adapter_path(model)
    info.update(trainable_tensors=len(params), trainable_params=sum(p.numel() for p in params),
                total_params=sum(p.numel() for p in model.parameters()), mixer_path=mixer_path(model))

    def step():
        with autocast():
            out = model(input_ids=ids)
            loss = loss_fn(out, labels) if loss_in_autocast else None
        if loss is None:
            loss = loss_fn(out, labels)
        del out
        loss.backward()
        if "params_with_grad" not in info:  # once: do the trainable parameters receive gradients?
            info["params_with_grad"] = sum(p.grad is not None for p in params)
        if opt is not None:
            if clip:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    return model, step, info


def _peak_gib(cuda, device):
    import torch

    if cuda:
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # KiB -> GiB


def measure_mode(mode, shape, batch_size, seqlen, steps, warmup, device, seed=0, rank=64, plain_resolver=False):
    """One mode's figures in this process: `warmup` steps, then `steps` timed ones."""
    import torch

    cuda = str(device).startswith("cuda")
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model, step, info = build_step(mode, shape, batch_size, seqlen, device, seed, rank, plain_resolver)
    sync()
    res = {"mode": mode}
    if cuda:
        res["model_memory_gib"] = round(torch.cuda.memory_allocated(device) / 2**30, 3)

    def timed(n):
        times, losses = [], []
        for _ in range(n):
            sync()
            t0 = time.perf_counter()
            loss = step()
            sync()
            times.append(time.perf_counter() - t0)
            losses.append(round(float(loss), 5))
        return times, losses

    warm_s, _ = timed(warmup)
    peak_warmup = _peak_gib(cuda, device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    step_s, losses = timed(steps)
    peak = _peak_gib(cuda, device)
    tokens = batch_size * seqlen
    res.update(info)  # params_with_grad: from the first step
    try:  # ours: the backend of the selective scan
        from mamba_ssm.backend import choose_backend

        res["scan_backend"] = choose_backend("selective_scan", cuda)
    except ImportError:
        pass
    res.update(tokens_per_step=tokens, tokens_per_s=round(tokens / statistics.median(step_s), 1),
               tokens_per_s_best=round(tokens / min(step_s), 1),
               step_ms=[round(t * 1e3, 3) for t in step_s], step_ms_median=round(statistics.median(step_s) * 1e3, 3),
               warmup_ms=[round(t * 1e3, 3) for t in warm_s], peak_memory_gib=peak,
               peak_memory_with_warmup_gib=max(peak, peak_warmup),
               peak_memory_kind="cuda max_memory_allocated" if cuda else "process max RSS", losses=losses)
    return res


def child(args):
    """Measure one (variant, mode) in this process; print one RESULT line."""
    res = {"mode": args.mode, "env": {k: os.environ.get(k) for k in args.env_names}}
    t0 = time.perf_counter()
    cuda = False
    try:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cuda = device.startswith("cuda")
        mamba_ssm = _v.import_variant_mamba_ssm()

        res.update(mamba_ssm_file=str(Path(mamba_ssm.__file__).parent), mamba_ssm_version=getattr(
            mamba_ssm, "__version__", None), torch=torch.__version__, device=device,
            pythonpath=os.environ.get("PYTHONPATH"))
        if cuda:
            res["device_name"] = torch.cuda.get_device_name(device)
        res.update(measure_mode(args.mode, args.shape, args.batch_size, args.seqlen, args.steps, args.warmup, device,
                                args.seed, args.rank, args.plain_resolver))
    except Exception as e:  # noqa: BLE001  (out of memory, a crash of one implementation: a result too)
        res["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        res["traceback"] = traceback.format_exc()[-3000:]
        if cuda:
            res["peak_memory_at_error_gib"] = _peak_gib(True, device)
    res["child_s"] = round(time.perf_counter() - t0, 2)
    _v.emit(res)


# ------------------------------------------------------------------------------------------ parent
def run_child(env: dict, mode: str, args) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--child", "--mode", mode, "--shape", args.shape,
           "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--rank", str(args.rank), "--seed", str(args.seed),
           "--env-names", ",".join(sorted(env))]
    if args.device:
        cmd += ["--device", args.device]
    if args.plain_resolver:
        cmd.append("--plain-resolver")
    # the parent's other PYTHONPATH entries stay (PEFT may live in one); mamba_ssm comes from the variant's
    return _v.run_child(cmd, env, args.child_timeout, {"mode": mode}, keep_other_paths=True)


def add_ratios(result: dict, baseline: str) -> None:
    """Per variant and mode: tokens/s variant / baseline, peak memory variant / baseline."""
    base = result["variants"].get(baseline, {}).get("runs", {})
    for v in result["variants"].values():
        ratios = {}
        for mode, run in v["runs"].items():
            ref = base.get(mode)
            if ref is None or "error" in run or "error" in ref:
                continue
            ratios[mode] = {"tokens_per_s_ratio": _v.ratio(run["tokens_per_s"], ref["tokens_per_s"]),
                            "tokens_per_s_best_ratio": _v.ratio(run["tokens_per_s_best"], ref["tokens_per_s_best"]),
                            "peak_memory_ratio": _v.ratio(run["peak_memory_gib"], ref["peak_memory_gib"]),
                            "peak_memory_delta_gib": round(run["peak_memory_gib"] - ref["peak_memory_gib"], 3),
                            "peak_memory_at_or_below_baseline": run["peak_memory_gib"] <= ref["peak_memory_gib"]}
        v["vs_baseline"] = ratios
    result["baseline"] = baseline


def table(result: dict) -> str:
    inp = result["inputs"]
    col = _v.col
    lines = [f"training {inp['shape']}, batch {inp['batch_size']} x {inp['seqlen']}, on "
             f"{result['machine'].get('device_name') or 'cpu'} (baseline {result['baseline']})",
             f"{'variant':>12} {'mode':>11} {'tok/s':>9} {'best':>9} {'x base':>7} {'peak GiB':>8} {'x base':>7} "
             f"{'w/ warm':>8}  path"]
    for mode in inp["modes"]:
        for name, v in result["variants"].items():
            run = v["runs"].get(mode)
            if run is None:
                continue
            if "error" in run:
                lines.append(f"{name:>12} {mode:>11} ERROR {run['error'][:120]}")
                continue
            r = v.get("vs_baseline", {}).get(mode, {})
            path = run.get("mixer_path", "-").split(" ")[0].rstrip(":") + (
                f", adapters {run['adapter_path'].split(' ')[0]}" if run.get("adapter_path") else "")
            lines.append(f"{name:>12} {mode:>11} {col(run.get('tokens_per_s'), 9, 0)} "
                         f"{col(run.get('tokens_per_s_best'), 9, 0)} {col(r.get('tokens_per_s_ratio'), 7, 2)} "
                         f"{col(run.get('peak_memory_gib'), 8, 2)} {col(r.get('peak_memory_ratio'), 7, 3)} "
                         f"{col(run.get('peak_memory_with_warmup_gib'), 8, 2)}  {path}")
    return "\n".join(lines)


def upstream_skip(name: str, mode: str, args) -> dict | None:
    """The record of a mode upstream does not run (not in --upstream-modes), else None."""
    if name != "upstream" or mode in args.upstream_modes:
        return None
    return {"mode": mode, "error": UPSTREAM_LORA_SKIPPED if mode != "full" else "skipped: not in --upstream-modes"}


def summary(r: dict) -> str:
    """A child's figures in one log line."""
    return (f"{r['tokens_per_s']} tok/s (best {r['tokens_per_s_best']}), peak {r['peak_memory_gib']} GiB "
            f"({r['peak_memory_with_warmup_gib']} with warm-up), {r['mixer_path']}")


def run(args, log=print) -> dict:
    variants, baseline = _v.resolve_variants(args.variants or DEFAULT_VARIANTS, args.upstream_path, args.baseline)
    d_model, n_layer = SHAPES[args.shape]
    result = _v.new_result("training_benchmark", args, variants,
                           {"d_model": d_model, "n_layer": n_layer, "vocab": VOCAB, "pad_vocab_size_multiple": 8})
    result["inputs"].pop("mode", None)  # the child's
    # mode-major: a run cut short (a time limit) has every variant's full mode first
    children = [_v.Child(name, env, mode, upstream_skip(name, mode, args) or {"mode": mode})
                for mode in args.modes for name, env in variants]
    _v.run_children(result, children, lambda c: run_child(c.env, c.key, args), summary=summary,
                    add_ratios=add_ratios, baseline=baseline, prefix="training",
                    dirs=_v.result_dirs(args), budget_s=args.budget_s,
                    table=table, log=log)
    return result


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="1.4b", choices=sorted(SHAPES))
    _v.add_parent_arguments(p, DEFAULT_VARIANTS)
    add_measure_arguments(p)
    p.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # child protocol
    return p


def add_measure_arguments(p) -> None:
    """What the children measure (the parent passes them on; benchmark_model.py takes them too)."""
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, help="modes to measure, in this order")
    p.add_argument("--upstream-modes", nargs="*", default=["full"], choices=MODES,
                   help="modes upstream runs (default full; the others are recorded as skipped)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median and best)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank of both LoRA modes")
    p.add_argument("--plain-resolver", action="store_true",
                   help="lora_plain imports mambakit too (its resolver puts PEFT's LoRA on our channel-first path)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.child:
        args.env_names = [n for n in args.env_names.split(",") if n]
        return child(args)
    check_arguments(args)
    try:
        return run(args)
    except ValueError as e:  # a bad --variants or --baseline
        raise SystemExit(str(e)) from None


def check_arguments(args) -> None:
    """SystemExit naming the first argument out of range (the parent's; benchmark_model.py's too)."""
    for flag, least in (("batch_size", 1), ("seqlen", 2), ("steps", 1), ("warmup", 0), ("rank", 1)):
        if getattr(args, flag) < least:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= {least}, got {getattr(args, flag)}")
    if len(set(args.modes)) != len(args.modes):
        raise SystemExit(f"--modes: each mode once, got {args.modes}")
    if args.child_timeout <= 0 or args.budget_s < 0:
        raise SystemExit(f"--child-timeout must be > 0 and --budget-s >= 0, got {args.child_timeout} and "
                         f"{args.budget_s}")
