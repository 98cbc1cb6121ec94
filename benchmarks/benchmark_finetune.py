"""LoRA fine-tuning throughput and peak memory of a Mamba shape with random weights.

One training step = forward + response-token cross-entropy + backward + AdamW step on the
adapters, as the recipe in mambakit/finetune.py runs it (LoRA through PEFT on in_proj, x_proj,
dt_proj and out_proj, bf16 autocast). Also timed: forward+backward alone (comparable with the
anchor's train_fwdbwd_tok_per_s, which has no optimizer). Writes JSON to benchmarks/results/.

    # on one GPU (the issue's measurement)
    python benchmarks/benchmark_finetune.py --shape 1.4b --batch-size 4 --seqlen 2048 --rank 64
    # smoke test on a CPU
    python benchmarks/benchmark_finetune.py --shape tiny --seqlen 128 --batch-size 2 --steps 3

The frozen base weights are stored in --base-dtype (bf16 by default: what a LoRA user loads);
the adapters stay fp32 under bf16 autocast. Tokens/s counts batch x seqlen per step.
"""
from __future__ import annotations

import argparse
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


def _peak_gb(device) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process RSS)


def measure(shape="tiny", batch_size=2, seqlen=128, rank=64, precision="bf16", base_dtype="bf16", steps=5,
            warmup=2, device=None, seed=0, profile_path=None, lora_dropout=0.0) -> dict:
    from mambakit.finetune import response_loss

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

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        train_step()
    _sync(device)
    step_times, fb_times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = train_step()
        _sync(device)
        step_times.append(time.perf_counter() - t0)
    for _ in range(steps):
        t0 = time.perf_counter()
        fwd_bwd()
        _sync(device)
        fb_times.append(time.perf_counter() - t0)
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
    return {
        "shape": shape, "d_model": SHAPES[shape][0], "n_layer": SHAPES[shape][1], "batch_size": batch_size,
        "seqlen": seqlen, "lora_rank": rank, "lora_targets": TARGETS, "lora_dropout": lora_dropout,
        "precision": precision,
        "base_dtype": base_dtype, "trainable_params": n_train, "total_params": n_all,
        "train_step_tok_per_s": tokens / statistics.median(step_times),
        "fwdbwd_tok_per_s": tokens / statistics.median(fb_times),
        "train_step_s_median": statistics.median(step_times), "step_times_s": step_times,
        "peak_mem_GB": _peak_gb(device), "peak_mem_kind": "cuda max_memory_allocated" if device.startswith("cuda")
        else "process max RSS", "final_loss": float(loss.detach()),
        "mixer_path": "fused mamba_inner_fn" if mixer._projections_are_plain() else
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
    p.add_argument("--out", help="JSON path (default benchmarks/results/finetune_<shape>_<device>_<time>.json)")
    a = p.parse_args(argv)
    status = 0
    try:
        res = measure(a.shape, a.batch_size, a.seqlen, a.rank, a.precision, a.base_dtype, a.steps, a.warmup,
                      a.device, profile_path=a.profile, lora_dropout=a.lora_dropout)
    except torch.cuda.OutOfMemoryError as e:  # record the failure rather than leave no result
        status = 1
        res = {"shape": a.shape, "batch_size": a.batch_size, "seqlen": a.seqlen, "lora_rank": a.rank,
               "precision": a.precision, "base_dtype": a.base_dtype, "error": f"out of memory: {e}"[:2000],
               "peak_mem_GB": torch.cuda.max_memory_allocated() / 2**30, "peak_mem_kind": "cuda max_memory_allocated",
               "train_step_tok_per_s": None, "fwdbwd_tok_per_s": None, "mixer_path": None, "scan_backend": None}
    res["timestamp"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    res["env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("MAMBA_SSM_")}
    res["anchor_upstream_fwdbwd_tok_per_s_1.4b_bs4x2048_h200"] = 30341
    kind = "gpu" if res["peak_mem_kind"].startswith("cuda") else "cpu"
    out = Path(a.out) if a.out else Path(__file__).resolve().parent / "results" / (
        f"finetune_{a.shape}_{kind}_{datetime.now(timezone.utc).strftime('%Y-%m-%dT%H%M')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps({k: res[k] for k in ("shape", "batch_size", "seqlen", "train_step_tok_per_s", "fwdbwd_tok_per_s",
                                          "peak_mem_GB", "mixer_path", "scan_backend")}, indent=2))
    print(f"wrote {out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
