"""The fine-tune's inputs: the base model, its tokenizer (checked against the embedding) and the data."""
from __future__ import annotations

import dataclasses
import os

import torch

from mamba_ssm.models.checkpoint import looks_like_hub_id
from mambakit.data.math_data import load_math_data, model_supports_packing, tokenize_examples
from mambakit.finetune.config import FinetuneConfig


def load_model(cfg: FinetuneConfig, device=None):
    """MambaLMHeadModel from a hub id or a local directory (either layout), fp32 master weights."""
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    name = os.path.expanduser(cfg.model)
    if not os.path.isdir(name) and not looks_like_hub_id(name):
        raise FileNotFoundError(f"model={cfg.model!r}: no such directory (expected a model directory with "
                                f"config.json and weights, or a hub id such as state-spaces/mamba-130m)")
    try:
        model = MambaLMHeadModel.from_pretrained(name, device=device, dtype=torch.float32)
    except FileNotFoundError:
        raise
    except Exception as e:
        raise RuntimeError(f"model={cfg.model!r} could not be loaded: {e}") from e
    return model


def model_vocab_size(model) -> int:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.backbone.embedding.num_embeddings




def load_tokenizer_checked(cfg: FinetuneConfig, model):
    from mambakit.tokenizer import load_tokenizer

    model_dir = cfg.model if os.path.isdir(os.path.expanduser(cfg.model)) else None
    tok = load_tokenizer(cfg.tokenizer, model_dir=model_dir)
    n_model = model_vocab_size(model)
    if len(tok) > n_model:
        raise ValueError(f"tokenizer {cfg.tokenizer or model_dir or 'default'} has {len(tok)} tokens but the model "
                         f"{cfg.model} embeds only {n_model}: token ids >= {n_model} would index past the "
                         f"embedding; use the model's own tokenizer")
    return tok


def load_data(cfg: FinetuneConfig, tokenizer, model=None):
    """Training rows and held-out examples; also a tokenised held-out set for the eval loss.

    packing None (the default) packs when ``model`` takes packed sequences; packing asked for a model
    that does not is an error."""
    dcfg = cfg.data_config()
    supported = model is None or model_supports_packing(model)
    if cfg.packing and not supported:
        raise ValueError(f"packing=True: the model {cfg.model} does not take packed sequences (seq_idx); "
                         f"run without --packing")
    dcfg = dataclasses.replace(dcfg, packing=supported if cfg.packing is None else cfg.packing)
    data = load_math_data(dcfg, tokenizer)
    data.stats["packed"] = dcfg.packing
    if cfg.eval_loss_steps and data.eval_examples:
        from datasets import Dataset

        ids, labels, _ = tokenize_examples([e["prompt"] for e in data.eval_examples],
                                           [e["response"] for e in data.eval_examples], tokenizer, cfg.max_length)
        data.eval_dataset = Dataset.from_dict({"input_ids": ids, "labels": labels})
    return data
