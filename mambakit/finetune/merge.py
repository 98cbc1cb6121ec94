"""Fold a LoRA adapter into its base Mamba model, save it, and prove the result.

Steps (`merge`): load the base model and the adapter (PEFT), compute the adapted model's logits
on sample inputs, merge (``merge_and_unload``), save weights and tokenizer into a temporary
directory next to ``out``, load that directory back with ``MambaLMHeadModel.from_pretrained``,
compare its logits with the adapted ones, print the largest absolute difference, and only when it
is within ``tolerance`` rename the temporary directory to ``out``. A failed check leaves no
``out``. Nothing is uploaded unless ``push_to_hub`` names a repository; the token is read from
the environment (HF_TOKEN), never from an argument.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

SAMPLE_TEXTS = (
    "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?\nAnswer:",
    "Question: A robe takes 2 bolts of blue fiber and half that much white fiber. How many bolts in total does "
    "it take?\nAnswer: It takes 2/2=<<2/2=1>>1 bolt of white fiber",
)


@dataclass
class MergeConfig:
    adapter: str
    out: str
    base: str | None = None  # default: the adapter's base_model_name_or_path
    tokenizer: str | None = None  # default: the adapter directory's tokenizer, else the base's
    layout: str = "mamba_ssm"  # or "transformers"
    dtype: str = "fp32"
    tolerance: float | None = None  # default 1e-4 for fp32, 2e-2 for bf16
    seed: int = 0
    overwrite: bool = False
    push_to_hub: str | None = None
    private: bool = True


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check(cfg: MergeConfig):
    if cfg.layout not in ("mamba_ssm", "transformers"):
        raise ValueError(f"layout={cfg.layout!r}: expected 'mamba_ssm' or 'transformers'")
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"dtype={cfg.dtype!r}: expected one of {sorted(_DTYPES)}")
    a = Path(cfg.adapter)
    if not (a / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter={cfg.adapter!r}: no adapter_config.json there (expected a PEFT adapter "
                                f"directory such as <output_dir>/adapter or <output_dir>/checkpoint-N)")
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"out={cfg.out!r} exists; choose a new directory or pass overwrite")
    if cfg.push_to_hub and not (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")):
        raise ValueError(f"push_to_hub={cfg.push_to_hub!r} needs a token in the environment variable HF_TOKEN")


def resolve_base(cfg: MergeConfig) -> str:
    if cfg.base:
        return cfg.base
    conf = json.loads((Path(cfg.adapter) / "adapter_config.json").read_text())
    base = conf.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"base is not given and {cfg.adapter}/adapter_config.json names no base_model_name_or_path")
    return base


def sample_inputs(tokenizer, vocab_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Two tokenised math prompts and one random-token row (ids below the tokenizer's size)."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]]) for t in SAMPLE_TEXTS]
    rows.append(torch.randint(0, min(len(tokenizer), vocab_size), (2, 37), generator=g))
    return rows


@torch.no_grad()
def _logits(model, inputs):
    model.eval()
    return [model(x).logits.float() for x in inputs]


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def merge(cfg: MergeConfig) -> dict:
    """Merge, save, reload and check. Returns {"out", "max_abs_diff", "tolerance", "base"}."""
    from peft import PeftModel

    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mambakit.tokenizer import load_tokenizer

    _check(cfg)
    base_name = resolve_base(cfg)
    dtype = _DTYPES[cfg.dtype]
    tol = cfg.tolerance if cfg.tolerance is not None else (1e-4 if dtype == torch.float32 else 2e-2)
    if not os.path.exists(base_name) and (base_name.startswith((".", "/", "~")) or base_name.count("/") != 1):
        raise FileNotFoundError(f"base={base_name!r}: no such model directory")
    base = MambaLMHeadModel.from_pretrained(base_name, dtype=dtype)
    tok_src = cfg.tokenizer
    if tok_src is None:
        a = Path(cfg.adapter)
        tok_src = str(a) if ((a / "tokenizer.json").exists() or (a / "tokenizer_config.json").exists()) else None
    tokenizer = load_tokenizer(tok_src, model_dir=base_name if os.path.isdir(base_name) else None)

    adapted = PeftModel.from_pretrained(base, cfg.adapter)
    inputs = sample_inputs(tokenizer, base.backbone.embedding.num_embeddings, cfg.seed)
    ref = _logits(adapted, inputs)
    merged = adapted.merge_and_unload()
    merged_direct = _logits(merged, inputs)

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        merged.save_pretrained(str(tmp), layout=cfg.layout)
        tokenizer.save_pretrained(str(tmp))
        reloaded = MambaLMHeadModel.from_pretrained(str(tmp), dtype=dtype)
        got = _logits(reloaded, inputs)
        diff = _max_diff(ref, got)
        diff_in_memory = _max_diff(ref, merged_direct)
        print(f"merged vs adapted logits: max |diff| = {diff:.3e} after save and reload "
              f"({diff_in_memory:.3e} in memory); tolerance {tol:.1e}", flush=True)
        if not diff <= tol:
            raise RuntimeError(f"merged model's logits differ from the adapted model's by {diff:.3e} > tolerance "
                               f"{tol:.1e}; nothing written to {out}")
        (tmp / "merge_info.json").write_text(json.dumps({
            "base": base_name, "adapter": str(cfg.adapter), "layout": cfg.layout, "dtype": cfg.dtype,
            "max_abs_diff": diff, "tolerance": tol}, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if cfg.push_to_hub:
        push(out, cfg.push_to_hub, private=cfg.private)
    return {"out": str(out), "max_abs_diff": diff, "tolerance": tol, "base": base_name}


def push(folder: Path, repo_id: str, private: bool = True):
    """Upload `folder` to the hub repository `repo_id` with the token from HF_TOKEN."""
    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        raise ValueError("push_to_hub needs a token in the environment variable HF_TOKEN")
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder))
    print(f"pushed {folder} to https://huggingface.co/{repo_id}", flush=True)


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Fold a LoRA adapter into its base Mamba model, save it with the "
                                            "tokenizer, and check the merged logits against the adapted model's.")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory (e.g. <output_dir>/adapter)")
    p.add_argument("--out", required=True, help="directory to write (must not exist unless --overwrite)")
    p.add_argument("--base", help="base model: hub id or directory (default: the adapter's base_model_name_or_path)")
    p.add_argument("--tokenizer", help="directory or tokenizer.json (default: the adapter's, else the base model's)")
    p.add_argument("--layout", choices=["mamba_ssm", "transformers"], default="mamba_ssm")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="fp32")
    p.add_argument("--tolerance", type=float, help="largest allowed |logit difference| (default 1e-4 fp32)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--push-to-hub", metavar="REPO_ID",
                   help="upload the merged directory to this hub repository (token from HF_TOKEN)")
    p.add_argument("--public", action="store_true", help="with --push-to-hub: create a public repository")
    a = p.parse_args(argv)
    try:
        res = merge(MergeConfig(adapter=a.adapter, out=a.out, base=a.base, tokenizer=a.tokenizer, layout=a.layout,
                            dtype=a.dtype, tolerance=a.tolerance, overwrite=a.overwrite, push_to_hub=a.push_to_hub,
                            private=not a.public))
    except (ValueError, RuntimeError, FileNotFoundError, FileExistsError) as e:
        print(f"merge: error: {e}", file=sys.stderr, flush=True)
        return 1
    print(json.dumps(res, indent=2))
    return 0
