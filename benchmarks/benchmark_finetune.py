"""LoRA fine-tuning throughput and peak memory of a Mamba shape with random weights.

One training step = forward + response-token cross-entropy + backward + AdamW step on the
adapters, as the recipe in mambakit/finetune/ runs it (LoRA through PEFT on in_proj, x_proj,
dt_proj and out_proj, bf16 autocast). Also timed: forward+backward alone (comparable with the
anchor's train_fwdbwd_tok_per_s, which has no optimizer). Writes JSON to
benchmarks/results/finetune_lora_<shape>_<card>.json (card: h100, h200, ... or cpu; the time is
inside; the next run of that shape on that card overwrites it, so pass --out for variants).

    # on one GPU (the issue's measurement)
    python benchmarks/benchmark_finetune.py --shape 1.4b --batch-size 4 --seqlen 2048 --rank 64
    # smoke test on a CPU
    python benchmarks/benchmark_finetune.py --shape tiny --seqlen 128 --batch-size 2 --steps 3
    # A/B of settings in one process (the scan's MAMBA_SSM_SCAN_* settings, read once at import,
    # through override_settings; other variables through os.environ): the steps alternate between
    # the default environment and the variant's
    python benchmarks/benchmark_finetune.py --ab-env "nosavey:MAMBA_SSM_SCAN_SAVE_Y=0,MAMBA_SSM_SCAN_SEGMENT=64"

The frozen base weights are stored in --base-dtype (bf16 by default: what a LoRA user loads);
the adapters stay fp32 under bf16 autocast. Tokens/s counts batch x seqlen per step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mambakit.bench.results import gpu_tag, results_path  # noqa: E402

SHAPES = {"tiny": (64, 2), "130m": (768, 24), "370m": (1024, 48), "790m": (1536, 48), "1.4b": (2048, 48),
          "2.8b": (2560, 64)}
TARGETS = ["in_proj", "x_proj", "dt_proj", "out_proj"]
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def build(shape: str, rank: int, base_dtype: torch.dtype, device: str, seed: int = 0, lora_dropout: float = 0.0):
    from peft import LoraConfig, get_peft_model

    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    if shape not in SHAPES:
        raise ValueError(f"--shape {shape!r}: expected one of {sorted(SHAPES)}")
    d_model, n_layer = SHAPES[shape]
    torch.manual_seed(seed)
    cfg = MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=50277, pad_vocab_size_multiple=8)
    model = MambaLMHeadModel(cfg, device=device, dtype=base_dtype)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=lora_dropout,
                                              target_modules=TARGETS))
    for n, p in model.named_parameters():  # adapters in fp32 whatever the base dtype
        if p.requires_grad:
            p.data = p.data.float()
    return model


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def _environ(env: dict):
    """os.environ with `env` applied inside the block, as it was after; the CUDA scan's settings
    among them (read once at import) also through its override_settings."""
    from mamba_ssm.ops.selective_scan_settings import env_fields, override_settings

    fields = env_fields(env)  # (a bad value raises here, before anything is changed)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with override_settings(**fields):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def parse_ab_env(spec: str) -> tuple[str, dict]:
    """'name:VAR=value,VAR=value' -> (name, {VAR: value})."""
    name, sep, rest = spec.partition(":")
    pairs = [kv for kv in rest.split(",") if kv.strip()]
    if not sep or not name.strip() or not pairs or any("=" not in kv for kv in pairs):
        raise ValueError(f"--ab-env {spec!r}: expected 'name:VAR=value[,VAR=value...]'")
    if name.strip() == "default":
        raise ValueError("--ab-env: the name 'default' is taken by the unchanged environment")
    return name.strip(), dict(kv.strip().split("=", 1) for kv in pairs)


def _peak_gb(device) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process RSS)


def measure(shape="tiny", batch_size=2, seqlen=128, rank=64, precision="bf16", base_dtype="bf16", steps=5,
            warmup=2, device=None, seed=0, profile_path=None, lora_dropout=0.0, ab=None) -> dict:
    """Throughput and peak memory of the LoRA step. ab = (name, env): the timed steps alternate
    between the unchanged environment ("default", the top-level figures) and `env`, one step each,
    and the result gains ab = {variant: figures}: both see the same machine state, which separate
    calls do not (the step's spread between calls is several percent)."""
    from mambakit.finetune.trainer import response_loss

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build(shape, rank, _DTYPES[base_dtype], device, seed, lora_dropout)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=device.startswith("cuda"))
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, 50277, (batch_size, seqlen), generator=g).to(device)
    labels = ids.clone()
    labels[:, : seqlen // 4] = -100  # a prompt part, as in the recipe
    amp = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if precision == "bf16" else None

    def fwd_bwd():
        if amp is not None:
            with amp:
                out = model(input_ids=ids)
        else:
            out = model(input_ids=ids)
        loss = response_loss(out, labels)
        loss.backward()
        return loss

    def train_step():
        loss = fwd_bwd()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    variants = [("default", {})] + ([ab] if ab else [])
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for name, env in variants:
        with _environ(env):
            for _ in range(warmup):
                train_step()
    _sync(device)
    step_times = {name: [] for name, _ in variants}
    fb_times = {name: [] for name, _ in variants}
    peaks = {name: 0.0 for name, _ in variants}

    def timed(name, env, fn, into):
        with _environ(env):
            if cuda and ab:  # each variant's own peak (else the whole run's, as before)
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            out = fn()
            _sync(device)
            into[name].append(time.perf_counter() - t0)
            peaks[name] = max(peaks[name], _peak_gb(device))
        return out

    for _ in range(steps):
        for name, env in variants:
            loss_v = timed(name, env, train_step, step_times)
            if name == "default":
                loss = loss_v
    for _ in range(steps):
        for name, env in variants:
            timed(name, env, fwd_bwd, fb_times)
            opt.zero_grad(set_to_none=True)
    if profile_path:
        _profile(train_step, device, profile_path)
    mixer = model.get_base_model().backbone.layers[0].mixer
    try:
        from mamba_ssm.backend import choose_backend

        scan_backend = choose_backend("selective_scan", device.startswith("cuda"))
    except Exception as e:  # report, do not fail the measurement
        scan_backend = f"unknown ({e})"
    tokens = batch_size * seqlen
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    figures = {name: {"env": env, "train_step_tok_per_s": tokens / statistics.median(step_times[name]),
                      "train_step_tok_per_s_best": tokens / min(step_times[name]),
                      "fwdbwd_tok_per_s": tokens / statistics.median(fb_times[name]),
                      "step_times_s": step_times[name], "fwdbwd_times_s": fb_times[name],
                      "peak_mem_GB": peaks[name]} for name, env in variants}
    extra = {"ab": figures} if ab else {}
    step_times, fb_times = step_times["default"], fb_times["default"]
    return {**extra,
        "shape": shape, "d_model": SHAPES[shape][0], "n_layer": SHAPES[shape][1], "batch_size": batch_size,
        "seqlen": seqlen, "lora_rank": rank, "lora_targets": TARGETS, "lora_dropout": lora_dropout,
        "precision": precision,
        "base_dtype": base_dtype, "trainable_params": n_train, "total_params": n_all,
        "train_step_tok_per_s": tokens / statistics.median(step_times),
        # the fastest step: on the H200 the 1.4b step time was bimodal (~225 or ~270 ms, the mode
        # switching within a run), which moves the median between runs more than the code does
        "train_step_tok_per_s_best": tokens / min(step_times),
        "fwdbwd_tok_per_s": tokens / statistics.median(fb_times),
        "train_step_s_median": statistics.median(step_times), "step_times_s": step_times,
        "peak_mem_GB": peaks["default"] if ab else _peak_gb(device), "peak_mem_kind": "cuda max_memory_allocated" if device.startswith("cuda")
        else "process max RSS", "final_loss": float(loss.detach()),
        "mixer_path": "fused mamba_inner_fn" if mixer.projections_are_plain() else
        "unfused (adapters called as modules) + selective_scan_fn",
        "scan_backend": scan_backend, "device": torch.cuda.get_device_name() if device.startswith("cuda") else
        platform.processor() or platform.machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "steps": steps, "warmup": warmup,
    }


def _profile(train_step, device, path, steps=2):
    """torch.profiler over `steps` training steps: the busiest operators, by GPU (or CPU) time."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            train_step()
        _sync(device)
    ka = prof.key_averages()
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    Path(path).write_text(f"{steps} training steps\n\nby own {'GPU' if 'device' in key else 'CPU'} time:\n"
                          f"{ka.table(sort_by=key, row_limit=40, max_name_column_width=90)}\n"
                          f"by CPU time (with children):\n{ka.table(sort_by='cpu_time_total', row_limit=25)}\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1.4b", choices=sorted(SHAPES))
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--lora-dropout", type=float, default=0.0, help="the recipe's default is 0.05")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--base-dtype", choices=sorted(_DTYPES), default="bf16")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--profile", metavar="FILE", help="also profile 2 training steps and write the table to FILE")
    p.add_argument("--out", help="JSON path (default benchmarks/results/finetune_lora_<shape>_<card>.json, card "
                                 "h100, h200, ... or cpu)")
    p.add_argument("--ab-env", metavar="NAME:VAR=V,...",
                   help="also time a variant environment, its steps alternating with the default's (settings "
                        "read at each call, and the scan's MAMBA_SSM_SCAN_* settings)")
    a = p.parse_args(argv)
    ab = None
    if a.ab_env:
        try:
            ab = parse_ab_env(a.ab_env)
        except ValueError as e:
            p.error(str(e))
    status = 0
    try:
        res = measure(a.shape, a.batch_size, a.seqlen, a.rank, a.precision, a.base_dtype, a.steps, a.warmup,
                      a.device, profile_path=a.profile, lora_dropout=a.lora_dropout, ab=ab)
    except torch.cuda.OutOfMemoryError as e:  # record the failure rather than leave no result
        status = 1
        res = {"shape": a.shape, "batch_size": a.batch_size, "seqlen": a.seqlen, "lora_rank": a.rank,
               "precision": a.precision, "base_dtype": a.base_dtype, "error": f"out of memory: {e}"[:2000],
               "peak_mem_GB": torch.cuda.max_memory_allocated() / 2**30, "peak_mem_kind": "cuda max_memory_allocated",
               "train_step_tok_per_s": None, "fwdbwd_tok_per_s": None, "mixer_path": None, "scan_backend": None}
    res["timestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    res["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MAMBA_SSM_")}
    res["anchor_upstream_fwdbwd_tok_per_s_1.4b_bs4x2048_h200"] = 30341
    card = gpu_tag(torch.cuda.get_device_name()) if res["peak_mem_kind"].startswith("cuda") else "cpu"
    out = Path(a.out) if a.out else results_path("finetune_lora", a.shape, card)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("shape", "batch_size", "seqlen", "train_step_tok_per_s", "fwdbwd_tok_per_s",
                                          "peak_mem_GB", "mixer_path", "scan_backend")}, indent=2))
    for name, f in res.get("ab", {}).items():
        print(f"{name:>12}: step {f['train_step_tok_per_s']:.0f} tok/s (fastest {f['train_step_tok_per_s_best']:.0f}), "
              f"fwd+bwd {f['fwdbwd_tok_per_s']:.0f} tok/s, "
              f"peak {f['peak_mem_GB']:.2f} GB")
    print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
