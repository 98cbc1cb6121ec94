"""Finding the tokenizer of a Mamba model.

Mamba checkpoints use GPT-NeoX-20B's tokenizer but often ship without it. Order of search:
an explicit path (a directory or a tokenizer.json file), then the model directory, then the
hub id of GPT-NeoX-20B (needs a network or a filled HF cache).
"""
from __future__ import annotations

import os
from pathlib import Path

from mamba_ssm.models.checkpoint import looks_like_hub_id

DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"


def _from_tokenizer_json(path: Path):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    # GPT-NeoX's tokenizer.json names its specials; the fast wrapper needs to be told which is which.
    vocab = tok.get_vocab()
    for attr, candidates in (("eos_token", ["<|endoftext|>", "</s>"]), ("bos_token", ["<|endoftext|>", "<s>"]),
                             ("unk_token", ["<|endoftext|>", "<unk>"])):
        for c in candidates:
            if c in vocab:
                setattr(tok, attr, c)
                break
    return tok


def load_tokenizer(tokenizer: str | os.PathLike | None = None, model_dir: str | os.PathLike | None = None):
    """Return a transformers fast tokenizer with eos set and pad = eos when it had none."""
    from transformers import AutoTokenizer

    tok = None
    if tokenizer is not None:
        p = Path(tokenizer)
        if p.is_file():
            tok = _from_tokenizer_json(p)
        elif p.is_dir():
            if (p / "tokenizer_config.json").exists():
                tok = AutoTokenizer.from_pretrained(str(p))
            elif (p / "tokenizer.json").exists():
                tok = _from_tokenizer_json(p / "tokenizer.json")
            else:
                raise FileNotFoundError(f"tokenizer directory {p} holds neither tokenizer.json nor tokenizer_config.json")
        elif looks_like_hub_id(str(tokenizer)):
            tok = AutoTokenizer.from_pretrained(str(tokenizer))
        else:
            raise FileNotFoundError(f"tokenizer {tokenizer}: no such file or directory, and not a hub id "
                                    f"(expected a tokenizer.json, a directory holding one, or e.g. {DEFAULT_TOKENIZER})")
    elif model_dir is not None and Path(model_dir).is_dir() and (
            (Path(model_dir) / "tokenizer.json").exists() or (Path(model_dir) / "tokenizer_config.json").exists()):
        return load_tokenizer(model_dir)
    else:
        tok = AutoTokenizer.from_pretrained(DEFAULT_TOKENIZER)
    if tok.eos_token is None:
        raise ValueError(f"tokenizer {tokenizer or model_dir} defines no end-of-sequence token")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
