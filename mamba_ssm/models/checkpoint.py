"""Reading and writing Mamba checkpoints in the two layouts users have.

* upstream ``mamba_ssm`` ("mamba_ssm"): ``config.json`` with d_model, n_layer, vocab_size, ssm_cfg, ...
  and ``pytorch_model.bin`` (this package also writes and prefers ``model.safetensors``). Keys
  ``backbone.embedding.weight``, ``backbone.layers.{i}.mixer.*``, ``backbone.layers.{i}.norm.weight``,
  ``backbone.norm_f.weight``, ``lm_head.weight`` (tied to the embedding, stored under both keys in
  upstream's .bin).
* transformers' ``MambaForCausalLM`` ("transformers"): ``config.json`` with model_type "mamba",
  hidden_size, num_hidden_layers, state_size, expand, conv_kernel, time_step_rank, use_bias, ...; weights
  in ``model.safetensors`` (possibly sharded with ``model.safetensors.index.json``) or
  ``pytorch_model.bin``. Same keys except ``backbone.embeddings.weight``; ``lm_head.weight`` is absent
  when the embeddings are tied. The embedding has exactly ``vocab_size`` rows (no padding).
* transformers' ``Mamba2ForCausalLM`` (also "transformers"): model_type "mamba2", num_heads, head_dim,
  n_groups, state_size, chunk_size, time_step_limit, ...; mixer keys as upstream's Mamba-2
  (in_proj, conv1d, dt_bias, A_log, D, norm, out_proj); ``lm_head.weight`` present when untied.
  Upstream's Mamba-2 checkpoints use upstream's layout with ``ssm_cfg {"layer": "Mamba2", ...}``.

The layout is told from config.json. Pickled files are only read with ``torch.load(weights_only=True)``.
Every parameter of the model must come from the checkpoint: a missing, mis-shaped or unexpected tensor
is an error that names it. Writes go to a temporary directory next to the target and are renamed into
place, so an interrupted save never leaves a directory that looks like a complete checkpoint.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import pickle
import shutil
import uuid
import warnings
from typing import Callable

import torch
import torch.nn as nn

from mamba_ssm.models.config_mamba import MambaConfig

CONFIG_NAME = "config.json"
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
WEIGHTS_NAME = "pytorch_model.bin"
WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"
# In order of preference when a directory holds several.
_WEIGHT_CANDIDATES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
_STALE_WEIGHT_PATTERNS = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME,
                          "model-*-of-*.safetensors", "pytorch_model-*-of-*.bin")

LAYOUTS = ("mamba_ssm", "transformers")

EMBEDDING_KEY = "backbone.embedding.weight"
LM_HEAD_KEY = "lm_head.weight"
_HF_EMBEDDING_KEY = "backbone.embeddings.weight"

# The Mamba mixer's defaults (modules/mamba_simple.Mamba) and the matching transformers config fields.
_MIXER_DEFAULTS = {"d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": "auto", "dt_min": 0.001, "dt_max": 0.1,
                   "dt_init": "random", "dt_scale": 1.0, "dt_init_floor": 1e-4, "conv_bias": True, "bias": False}
_HF_TO_SSM = {"state_size": "d_state", "conv_kernel": "d_conv", "expand": "expand", "time_step_rank": "dt_rank",
              "time_step_min": "dt_min", "time_step_max": "dt_max", "time_step_init_scheme": "dt_init",
              "time_step_scale": "dt_scale", "time_step_floor": "dt_init_floor", "use_conv_bias": "conv_bias",
              "use_bias": "bias"}
_FALCON_MIXER_RMS_EPS = 1e-6  # transformers' FalconMambaConfig.mixer_rms_eps default
_DEFAULT_NORM_EPS = 1e-5       # what MambaLMHeadModel gives its norms; upstream's config cannot change it
_HF_TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")


class CheckpointError(ValueError):
    """A checkpoint's config or weights do not fit the model, or a file cannot be read."""


# ----------------------------------------------------------------------------------------------------
# config.json <-> MambaConfig
# ----------------------------------------------------------------------------------------------------


def _merge_ssm_cfg(ssm: dict, ssm_cfg: dict, known: set) -> None:
    """ssm (transformers' defaults) updated from ssm_cfg's fields it has; a field outside `known` is an error."""
    unknown = sorted(set(ssm_cfg) - known)
    if unknown:
        raise CheckpointError(f"ssm_cfg field(s) {', '.join(unknown)} have no transformers equivalent")
    ssm.update({k: v for k, v in ssm_cfg.items() if k in ssm})


def _integer_expand(expand, config_name: str) -> int:
    if float(expand) != int(expand):
        raise CheckpointError(f"transformers' {config_name} needs an integer expand, got {expand!r}")
    return int(expand)

def detect_layout(config_dict: dict, source: str = "config.json") -> str:
    """'mamba_ssm' for upstream's config (d_model, n_layer, ...), 'transformers' for MambaForCausalLM's."""
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"{source}: expected a JSON object, got {type(config_dict).__name__}")
    model_type = config_dict.get("model_type")
    if model_type == "falcon_mamba":
        return "transformers"
    if model_type not in (None, "mamba", "mamba2"):
        raise CheckpointError(f"{source}: model_type {model_type!r} is not supported; this package loads Mamba "
                              f"checkpoints (upstream mamba_ssm's config, or transformers' model_type 'mamba', "
                              f"'mamba2' or 'falcon_mamba')")
    keys = set(config_dict)
    if keys & {"hidden_size", "num_hidden_layers"}:
        return "transformers"
    if keys & _UPSTREAM_MARKERS:
        return "mamba_ssm"
    if model_type in ("mamba", "mamba2") or keys & _TRANSFORMERS_MARKERS:
        return "transformers"
    raise CheckpointError(f"{source}: cannot tell the checkpoint layout: it has neither upstream mamba_ssm's "
                          f"fields (d_model, n_layer, ...) nor transformers' (model_type 'mamba', hidden_size, ...)")


_UPSTREAM_MARKERS = {"d_model", "n_layer", "d_intermediate", "ssm_cfg", "rms_norm", "fused_add_norm",
                     "pad_vocab_size_multiple", "tie_embeddings", "attn_layer_idx", "attn_cfg"}
_TRANSFORMERS_MARKERS = {"state_size", "conv_kernel", "time_step_rank", "use_conv_bias", "layer_norm_epsilon",
                         "tie_word_embeddings", "intermediate_size"}


def _require(config_dict, fields, source):
    missing = [f for f in fields if f not in config_dict]
    if missing:
        raise CheckpointError(f"{source}: missing required field(s) {', '.join(repr(f) for f in missing)}")
    for f in fields:
        v = config_dict[f]
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise CheckpointError(f"{source}: field {f!r} must be a positive integer, got {v!r}")


# Bookkeeping fields that some tools add to any config.json; ignored without a warning.
_GENERIC_CONFIG_FIELDS = {"model_type", "architectures", "transformers_version", "torch_dtype", "dtype",
                          "_name_or_path"}


def _mamba_config_fields():
    return {f.name for f in dataclasses.fields(MambaConfig)}


def config_from_mamba_ssm_dict(config_dict: dict, source: str = "config.json") -> MambaConfig:
    """Upstream's config.json -> MambaConfig (fields absent from older upstream configs take the defaults)."""
    _require(config_dict, ("d_model", "n_layer", "vocab_size"), source)
    known = _mamba_config_fields()
    unknown = sorted(k for k in config_dict if k not in known and k not in _GENERIC_CONFIG_FIELDS)
    if unknown:
        warnings.warn(f"{source}: ignoring field(s) MambaConfig does not have: {', '.join(unknown)}", stacklevel=3)
    kwargs = {k: v for k, v in config_dict.items() if k in known}
    for name, typ in (("ssm_cfg", dict), ("attn_cfg", dict), ("attn_layer_idx", list)):
        if name in kwargs and kwargs[name] is None:
            kwargs[name] = typ()
        if name in kwargs and not isinstance(kwargs[name], typ):
            raise CheckpointError(f"{source}: field {name!r} must be a JSON {'object' if typ is dict else 'array'}, "
                                  f"got {kwargs[name]!r}")
    return MambaConfig(**kwargs)


def config_from_transformers_dict(config_dict: dict, source: str = "config.json"):
    """transformers' MambaConfig dict -> (MambaConfig, extras).

    extras: {"norm_epsilon": float, "token_ids": {...}} for what upstream's config cannot hold.
    Fields transformers would default are defaulted the same way (see its MambaConfig).
    """
    _require(config_dict, ("hidden_size", "num_hidden_layers", "vocab_size"), source)
    if config_dict.get("model_type") == "mamba2":
        return config_from_transformers_mamba2_dict(config_dict, source)
    d_model = config_dict["hidden_size"]
    act = config_dict.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (the Mamba mixer uses 'silu')")
    ssm_cfg = {}
    for hf_name, ssm_name in _HF_TO_SSM.items():
        if hf_name not in config_dict:
            continue
        value = config_dict[hf_name]
        if ssm_name == "dt_rank" and value != "auto":
            if isinstance(value, bool) or not isinstance(value, int):
                raise CheckpointError(f"{source}: field 'time_step_rank' must be an integer or 'auto', got {value!r}")
            if value == math.ceil(d_model / 16):
                value = "auto"
        if value != _MIXER_DEFAULTS[ssm_name]:
            ssm_cfg[ssm_name] = value
    if config_dict.get("model_type") == "falcon_mamba":   # FalconMambaForCausalLM: norms of dt, B, C
        ssm_cfg["b_c_dt_rms_eps"] = float(config_dict.get("mixer_rms_eps", _FALCON_MIXER_RMS_EPS))
    expand = ssm_cfg.get("expand", _MIXER_DEFAULTS["expand"])
    if "intermediate_size" in config_dict and config_dict["intermediate_size"] != int(expand * d_model):
        raise CheckpointError(f"{source}: intermediate_size {config_dict['intermediate_size']} is not "
                              f"expand * hidden_size = {expand} * {d_model}")
    return _transformers_lm_config(config_dict, d_model, ssm_cfg, tie_default=True)


def _transformers_lm_config(config_dict: dict, d_model: int, ssm_cfg: dict, tie_default: bool):
    """(MambaConfig, extras) of a transformers config dict once its mixer settings are in ssm_cfg."""
    config = MambaConfig(
        d_model=d_model, d_intermediate=0, n_layer=config_dict["num_hidden_layers"],
        vocab_size=config_dict["vocab_size"], ssm_cfg=ssm_cfg, attn_layer_idx=[], attn_cfg={}, rms_norm=True,
        residual_in_fp32=bool(config_dict.get("residual_in_fp32", True)), fused_add_norm=True,
        pad_vocab_size_multiple=8, tie_embeddings=bool(config_dict.get("tie_word_embeddings", tie_default)))
    extras = {"norm_epsilon": float(config_dict.get("layer_norm_epsilon", _DEFAULT_NORM_EPS)),
              "token_ids": {k: config_dict[k] for k in _HF_TOKEN_FIELDS if k in config_dict}}
    return config, extras


# transformers' Mamba2Config field -> (Mamba2 argument, transformers' default)
_HF2_TO_SSM = {"state_size": ("d_state", 128), "conv_kernel": ("d_conv", 4), "expand": ("expand", 2),
               "n_groups": ("ngroups", 8), "head_dim": ("headdim", 64), "chunk_size": ("chunk_size", 256),
               "time_step_min": ("dt_min", 0.001), "time_step_max": ("dt_max", 0.1),
               "time_step_floor": ("dt_init_floor", 1e-4), "use_bias": ("bias", False),
               "use_conv_bias": ("conv_bias", True)}
# Mamba2's constructor defaults (modules/mamba2.Mamba2), to write only what differs
_MAMBA2_DEFAULTS = {"d_state": 128, "d_conv": 4, "expand": 2, "headdim": 64, "ngroups": 1, "chunk_size": 256,
                    "dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4, "bias": False, "conv_bias": True,
                    "dt_limit": (0.0, math.inf)}


def _json_float(v):
    """A number of config.json: a JSON number, Python's Infinity, or transformers 5's {"__float__": "Infinity"}."""
    if isinstance(v, dict) and set(v) == {"__float__"}:
        v = v["__float__"]
    if isinstance(v, bool):
        raise TypeError(v)
    return float(v)


def config_from_transformers_mamba2_dict(config_dict: dict, source: str = "config.json"):
    """transformers' Mamba2Config dict -> (MambaConfig with ssm_cfg layer "Mamba2", extras)."""
    d_model = config_dict["hidden_size"]
    act = config_dict.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{source}: hidden_act {act!r} is not supported (the Mamba-2 mixer uses 'silu')")
    ssm_cfg = {"layer": "Mamba2"}
    for hf_name, (name, hf_default) in _HF2_TO_SSM.items():
        value = config_dict.get(hf_name, hf_default)
        if value != _MAMBA2_DEFAULTS[name]:
            ssm_cfg[name] = value
    limit = config_dict.get("time_step_limit", (0.0, math.inf))
    try:
        limit = tuple(_json_float(v) for v in limit)
    except (TypeError, ValueError):
        limit = None
    if limit is None or len(limit) != 2:
        raise CheckpointError(f"{source}: time_step_limit must be a pair [min, max], got "
                              f"{config_dict.get('time_step_limit')!r}")
    if limit != (0.0, math.inf):
        ssm_cfg["dt_limit"] = limit
    expand = config_dict.get("expand", 2)
    heads = config_dict.get("num_heads", 128)
    head_dim = config_dict.get("head_dim", 64)
    if heads * head_dim != expand * d_model:
        raise CheckpointError(f"{source}: num_heads * head_dim = {heads} * {head_dim} must equal expand * "
                              f"hidden_size = {expand} * {d_model}")
    return _transformers_lm_config(config_dict, d_model, ssm_cfg, tie_default=False)


def config_to_transformers_mamba2_dict(config, ssm_cfg, vocab_rows, norm_epsilon, dtype, token_ids) -> dict:
    """MambaConfig with Mamba-2 layers -> transformers' Mamba2Config dict."""
    ssm = dict(_MAMBA2_DEFAULTS)
    holdable = set(ssm) | {"use_mem_eff_path", "A_init_range", "conv_init"}
    cannot = {"d_ssm": None, "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False}
    for name, only in cannot.items():
        if name in ssm_cfg and ssm_cfg[name] != only:
            raise CheckpointError(f"transformers' Mamba2ForCausalLM cannot hold ssm_cfg {name}={ssm_cfg[name]!r} "
                                  f"(it has {name}={only!r})")
    _merge_ssm_cfg(ssm, ssm_cfg, holdable | set(cannot))
    expand = _integer_expand(ssm["expand"], "Mamba2Config")
    d_inner = expand * config.d_model
    lo, hi = (float(v) for v in ssm["dt_limit"])
    out = {
        "architectures": ["Mamba2ForCausalLM"],
        "model_type": "mamba2",
        "vocab_size": int(vocab_rows if vocab_rows is not None else _padded_vocab_size(config)),
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "num_heads": d_inner // ssm["headdim"],
        "head_dim": ssm["headdim"],
        "n_groups": ssm["ngroups"],
        "state_size": ssm["d_state"],
        "expand": expand,
        "conv_kernel": ssm["d_conv"],
        "chunk_size": ssm["chunk_size"],
        "time_step_limit": [lo, hi],
        "time_step_min": float(ssm["dt_min"]),
        "time_step_max": float(ssm["dt_max"]),
        "time_step_floor": float(ssm["dt_init_floor"]),
        "time_step_rank": math.ceil(config.d_model / 16),
        "use_bias": bool(ssm["bias"]),
        "use_conv_bias": bool(ssm["conv_bias"]),
        "hidden_act": "silu",
        "layer_norm_epsilon": float(norm_epsilon),
        "residual_in_fp32": bool(config.residual_in_fp32),
        "tie_word_embeddings": bool(config.tie_embeddings),
        "rescale_prenorm_residual": False,
        "use_cache": True,
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    out.update(token_ids or {})
    if dtype is not None:
        out["dtype"] = str(dtype).replace("torch.", "")
    return out


def config_from_dict(config_dict: dict, source: str = "config.json"):
    """Any supported config.json -> (MambaConfig, layout, extras)."""
    layout = detect_layout(config_dict, source)
    if layout == "mamba_ssm":
        return config_from_mamba_ssm_dict(config_dict, source), layout, {}
    config, extras = config_from_transformers_dict(config_dict, source)
    return config, layout, extras


def config_to_mamba_ssm_dict(config) -> dict:
    """MambaConfig -> upstream's config.json fields."""
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    known = _mamba_config_fields()
    return {k: v for k, v in vars(config).items() if k in known}


def _padded_vocab_size(config) -> int:
    vocab, mult = config.vocab_size, config.pad_vocab_size_multiple
    return vocab if vocab % mult == 0 else vocab + mult - vocab % mult


def config_to_transformers_dict(config, vocab_rows=None, norm_epsilon=_DEFAULT_NORM_EPS, dtype=None,
                                token_ids=None) -> dict:
    """MambaConfig -> transformers' MambaConfig dict (what MambaForCausalLM.from_pretrained reads).

    vocab_rows: the embedding's row count (padded vocabulary); transformers builds exactly vocab_size rows.
    """
    if config.d_intermediate:
        raise CheckpointError("transformers' MambaForCausalLM has no MLP: cannot write d_intermediate "
                              f"{config.d_intermediate} in the transformers layout")
    if config.attn_layer_idx:
        raise CheckpointError("transformers' MambaForCausalLM has no attention layers: cannot write "
                              f"attn_layer_idx {config.attn_layer_idx} in the transformers layout")
    if not config.rms_norm:
        raise CheckpointError("transformers' MambaForCausalLM uses RMSNorm: cannot write rms_norm=False "
                              "in the transformers layout")
    ssm = dict(_MIXER_DEFAULTS)
    ssm_cfg = dict(config.ssm_cfg or {})
    layer = ssm_cfg.pop("layer", "Mamba1")
    if layer == "Mamba2":
        return config_to_transformers_mamba2_dict(config, ssm_cfg, vocab_rows, norm_epsilon, dtype, token_ids)
    if layer != "Mamba1":
        raise CheckpointError(f"ssm_cfg layer {layer!r} cannot be written as transformers' MambaForCausalLM")
    mixer_rms_eps = ssm_cfg.pop("b_c_dt_rms_eps", None)   # set: FalconMambaForCausalLM
    _merge_ssm_cfg(ssm, ssm_cfg, set(ssm) | {"use_fast_path"})
    expand = _integer_expand(ssm["expand"], "MambaConfig")
    dt_rank = math.ceil(config.d_model / 16) if ssm["dt_rank"] == "auto" else int(ssm["dt_rank"])
    out = {
        "architectures": ["MambaForCausalLM"],
        "model_type": "mamba",
        "vocab_size": int(vocab_rows if vocab_rows is not None else _padded_vocab_size(config)),
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layer,
        "state_size": ssm["d_state"],
        "expand": expand,
        "intermediate_size": int(expand * config.d_model),
        "conv_kernel": ssm["d_conv"],
        "time_step_rank": dt_rank,
        "use_bias": bool(ssm["bias"]),
        "use_conv_bias": bool(ssm["conv_bias"]),
        "hidden_act": "silu",
        "layer_norm_epsilon": float(norm_epsilon),
        "residual_in_fp32": bool(config.residual_in_fp32),
        "tie_word_embeddings": bool(config.tie_embeddings),
        "time_step_scale": float(ssm["dt_scale"]),
        "time_step_min": float(ssm["dt_min"]),
        "time_step_max": float(ssm["dt_max"]),
        "time_step_init_scheme": ssm["dt_init"],
        "time_step_floor": float(ssm["dt_init_floor"]),
        "rescale_prenorm_residual": False,
        "use_cache": True,
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    if mixer_rms_eps is not None:
        out.update(architectures=["FalconMambaForCausalLM"], model_type="falcon_mamba",
                   mixer_rms_eps=float(mixer_rms_eps))
    out.update(token_ids or {})
    if dtype is not None:
        out["dtype"] = str(dtype).replace("torch.", "")
    return out


# ----------------------------------------------------------------------------------------------------
# state dict key conversion
# ----------------------------------------------------------------------------------------------------

def state_dict_from_transformers(state_dict: dict) -> dict:
    """transformers' MambaForCausalLM (or MambaModel) keys -> ours. Tensors are not copied."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("embeddings.", "layers.", "norm_f.")):      # saved from MambaModel: no prefix
            key = "backbone." + key
        if key.startswith("backbone.embeddings."):
            key = "backbone.embedding." + key[len("backbone.embeddings."):]
        out[key] = value
    return out


def state_dict_to_transformers(state_dict: dict, tied: bool) -> dict:
    """Our keys -> transformers' MambaForCausalLM keys; lm_head.weight left out when tied (as it saves)."""
    out = {}
    for key, value in state_dict.items():
        if tied and key == LM_HEAD_KEY:
            continue
        if key.startswith("backbone.embedding."):
            key = "backbone.embeddings." + key[len("backbone.embedding."):]
        out[key] = value
    return out


# ----------------------------------------------------------------------------------------------------
# locating files: local directory or hub id
# ----------------------------------------------------------------------------------------------------

_HUB_OPTIONS = ("revision", "cache_dir", "token", "local_files_only", "force_download")


def _split_hub_options(kwargs: dict):
    hub = {k: kwargs.pop(k) for k in list(kwargs) if k in _HUB_OPTIONS}
    return hub, kwargs


def looks_like_hub_id(name: str) -> bool:
    """`name` reads as a hub repository id ("owner/name" or "name"), not as a local path."""
    if not name or name.startswith((".", "/", "~", "\\")) or os.path.isabs(name) or name.count("/") > 1:
        return False
    try:
        from huggingface_hub.utils import validate_repo_id
        validate_repo_id(name)
    except Exception:
        return False
    return True


class _Location:
    """Where a checkpoint's files are: a local directory, or a hub repository (files fetched on demand)."""

    def __init__(self, name_or_path, hub_options=None):
        if not isinstance(name_or_path, (str, os.PathLike)):
            raise TypeError(f"expected a directory path or a hub model id, got {type(name_or_path).__name__}")
        self.name = os.fspath(name_or_path)
        self.hub_options = dict(hub_options or {})
        path = os.path.abspath(os.path.expanduser(self.name))
        if os.path.isdir(path):
            self.local_dir = path
        elif os.path.exists(path):
            raise NotADirectoryError(f"{path}: expected a checkpoint directory (holding config.json and the "
                                     f"weights), got a file")
        elif looks_like_hub_id(self.name):
            self.local_dir = None
        else:
            raise FileNotFoundError(f"checkpoint directory not found: {path} (no such file or directory)")
        self._abs = path

    def describe(self, filename=None):
        if self.local_dir is not None:
            return os.path.join(self.local_dir, filename) if filename else self.local_dir
        return f"{self.name}/{filename}" if filename else self.name

    def fetch(self, filename, required=True):
        """Local path of `filename`, downloading it from the hub if needed; None if absent and not required."""
        if self.local_dir is not None:
            path = os.path.join(self.local_dir, filename)
            if os.path.isfile(path):
                return path
            if required:
                raise FileNotFoundError(f"{path}: file not found in checkpoint directory {self.local_dir}")
            return None
        return self._hub_fetch(filename, required)

    def _hub_fetch(self, filename, required):
        try:
            from huggingface_hub import constants, hf_hub_download
            from huggingface_hub.errors import EntryNotFoundError
        except ImportError as e:                                           # pragma: no cover
            raise FileNotFoundError(f"{self._abs} is not a local directory, and huggingface_hub (needed to "
                                    f"download the hub model {self.name!r}) is not installed") from e
        opts = dict(self.hub_options)
        offline = bool(constants.HF_HUB_OFFLINE)
        if offline:
            opts["local_files_only"] = True          # never attempt a connection in offline mode
        try:
            return hf_hub_download(self.name, filename, **opts)
        except EntryNotFoundError as e:
            # Absent from the repository, or (offline / local_files_only) not in the local cache.
            if not required:
                self.last_hub_error = e
                return None
            self._raise_hub(filename, e, offline)
        except Exception as e:                       # network, auth, missing repo, offline mode...
            self._raise_hub(filename, e, offline)

    def _raise_hub(self, filename, err, offline):
        why = f"{type(err).__name__}: {err}".strip()
        if len(why) > 600:
            why = why[:600] + "..."
        hint = (" HF_HUB_OFFLINE is set, so only files already in the local Hugging Face cache can be used."
                if offline else "")
        raise FileNotFoundError(
            f"{self.name!r} is not a local directory ({self._abs} does not exist) and {filename!r} could not be "
            f"fetched from the Hugging Face Hub model {self.name!r}.{hint} Cause: {why}") from err

    def config_path(self):
        return self.fetch(CONFIG_NAME)

    def weight_files(self):
        """(kind, [local paths]) with kind 'safetensors' or 'bin'; safetensors preferred."""
        for candidate in _WEIGHT_CANDIDATES:
            path = self.fetch(candidate, required=False)
            if path is None:
                continue
            kind = "safetensors" if candidate.startswith("model.safetensors") else "bin"
            if not candidate.endswith(".index.json"):
                return kind, [path]
            shards = _read_index(path)
            return kind, [self.fetch(shard) for shard in shards]
        err = getattr(self, "last_hub_error", None)
        cause = f" Last hub error: {type(err).__name__}: {err}" if err is not None else ""
        raise FileNotFoundError(f"{self.describe()}: no weights found (looked for "
                                f"{', '.join(_WEIGHT_CANDIDATES)}).{cause}")


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


def _read_index(path):
    index = _read_json(path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path}: a shard index needs a non-empty 'weight_map' object")
    shards = []
    for shard in weight_map.values():
        if not isinstance(shard, str) or os.path.isabs(shard) or ".." in shard.replace("\\", "/").split("/"):
            raise CheckpointError(f"{path}: bad shard file name {shard!r} in weight_map")
        if shard not in shards:
            shards.append(shard)
    return shards


# ----------------------------------------------------------------------------------------------------
# reading weights (lazily: shapes first, tensors on demand)
# ----------------------------------------------------------------------------------------------------

class _Entry:
    __slots__ = ("shape", "get", "source")

    def __init__(self, shape, get, source):
        self.shape = tuple(shape)
        self.get = get
        self.source = source


def _open_safetensors(path):
    try:
        from safetensors import safe_open
        handle = safe_open(path, framework="pt", device="cpu")
        keys = list(handle.keys())
        shapes = {k: handle.get_slice(k).get_shape() for k in keys}
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read this safetensors file; it is truncated or corrupt "
                              f"({type(e).__name__}: {e})") from e

    def getter(key):
        def get():
            try:
                return handle.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read tensor {key!r}; the file is truncated or corrupt "
                                      f"({type(e).__name__}: {e})") from e
        return get

    return {k: _Entry(shapes[k], getter(k), path) for k in keys}


def _torch_load_safely(path):
    """torch.load with weights_only=True (no arbitrary unpickling), memory-mapped when possible."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e).lower() and "zip" not in str(e).lower():
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)   # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refusing to load: the pickle holds objects other than tensors "
                              f"(only weights_only loading is allowed) ({e})") from e
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read this PyTorch checkpoint; it is truncated or corrupt "
                              f"({type(e).__name__}: {e})") from e
    if isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in ("state_dict", "model") \
            and isinstance(next(iter(obj.values())), dict):
        obj = next(iter(obj.values()))
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(str, bad[:10]))}")
    return obj


def _open_bin(path):
    tensors = _torch_load_safely(path)
    return {k: _Entry(v.shape, (lambda v=v: v), path) for k, v in tensors.items()}


def open_weights(kind, paths):
    """Checkpoint files -> {key: _Entry}; a key present in two shards is an error."""
    entries = {}
    for path in paths:
        part = _open_safetensors(path) if kind == "safetensors" else _open_bin(path)
        for key, entry in part.items():
            if key in entries:
                raise CheckpointError(f"tensor {key!r} appears in both {entries[key].source} and {path}")
            entries[key] = entry
    return entries


def read_state_dict(paths, kind=None):
    """Load checkpoint files fully into {key: tensor} (CPU)."""
    if kind is None:
        kind = "safetensors" if str(paths[0]).endswith(".safetensors") else "bin"
    return {k: e.get() for k, e in open_weights(kind, paths).items()}


# ----------------------------------------------------------------------------------------------------
# building the model and filling it
# ----------------------------------------------------------------------------------------------------

def as_dtype(dtype):
    """None, a torch.dtype, or its name ("bfloat16", "torch.float16") -> torch.dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        candidate = getattr(torch, dtype.replace("torch.", ""), None)
        if isinstance(candidate, torch.dtype):
            return candidate
    raise TypeError(f"dtype must be a torch.dtype or its name, got {dtype!r}")


def _default_device():
    getter = getattr(torch, "get_default_device", None)
    return getter() if getter is not None else torch.device("cpu")


def _materialize(model, device):
    """Replace every meta parameter by an uninitialised one on `device`, keeping ties and attributes."""
    memo = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is None:
                continue
            if id(p) not in memo:
                new = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                memo[id(p)] = new
            module._parameters[name] = memo[id(p)]


# Below this many parameters, a normal (randomly initialised) construction is quicker than the meta-device
# route, whose first use imports much of torch's compiler stack (seconds).
META_INIT_MIN_PARAMS = 50_000_000


def _estimated_params(config):
    try:
        ssm = dict(config.ssm_cfg or {})
        d_inner = ssm.get("expand", 2) * config.d_model
        d_state = ssm.get("d_state", 16)
        per_layer = d_inner * (3 * config.d_model + 2 * d_state + 2 * math.ceil(config.d_model / 16) + d_state)
        per_layer += 3 * config.d_model * config.d_intermediate
        return config.n_layer * per_layer + _padded_vocab_size(config) * config.d_model * \
            (1 if config.tie_embeddings else 2)
    except Exception:
        return 0


def build_model(cls, config, device=None, dtype=None, **model_kwargs):
    """cls(config, device, dtype), for large models without spending time on a random init that the
    checkpoint overwrites.

    Large models are built on the meta device and their parameters allocated empty; every one of them is
    then filled from the checkpoint (load_into checks this). Models with buffers or tensors outside their
    parameters are built normally instead.
    """
    device = torch.device(device) if device is not None else _default_device()
    if _estimated_params(config) >= META_INIT_MIN_PARAMS:
        try:
            with torch.device("meta"):
                model = cls(config, device="meta", dtype=dtype, **model_kwargs)
            ok = not any(True for _ in model.buffers()) and not any(
                isinstance(v, torch.Tensor) for m in model.modules() for v in vars(m).values())
        except Exception:
            ok = False
        if ok:
            _materialize(model, device)
            return model
    return cls(config, device=device, dtype=dtype, **model_kwargs)


def _tie_groups(model):
    """Lists of state-dict keys that name the same tensor (e.g. embedding and tied lm_head)."""
    groups, by_id = [], {}
    for key, value in model.state_dict(keep_vars=True).items():
        ident = id(value)
        if ident in by_id:
            by_id[ident].append(key)
        else:
            by_id[ident] = [key]
            groups.append(by_id[ident])
    return groups


def _shape_error(key, ckpt_shape, model_shape):
    return f"{key}: checkpoint shape {tuple(ckpt_shape)} != model shape {tuple(model_shape)}"


def _shape_hint(model, key):
    """What the config says a Mamba-2 in_proj holds, for a mis-shaped one (else "")."""
    if not key.endswith("mixer.in_proj.weight"):
        return ""
    try:
        mixer = model.get_submodule(key[: -len(".in_proj.weight")])
    except AttributeError:
        return ""
    if not hasattr(mixer, "nheads"):
        return ""
    return (f" (the config's Mamba-2 in_proj has 2*d_inner + 2*ngroups*d_state + nheads = 2*{mixer.d_inner} + "
            f"2*{mixer.ngroups}*{mixer.d_state} + {mixer.nheads} rows: the checkpoint's config contradicts its weights)")


def load_into(model, entries: dict, source: str, vocab_size=None):
    """Copy checkpoint tensors into the model's parameters (cast to their dtypes), checking every key.

    Embedding / lm_head rows: a checkpoint with fewer rows than the model's padded vocabulary (but at least
    `vocab_size`) is zero-padded.
    """
    model_sd = model.state_dict(keep_vars=True)
    groups = _tie_groups(model)
    problems, plan = [], []
    unexpected = sorted(set(entries) - set(model_sd))
    if unexpected:
        problems.append("unexpected tensor(s) not in the model: " + ", ".join(unexpected))
    for group in groups:
        present = [k for k in group if k in entries]
        target = model_sd[group[0]]
        if not present:
            problems.append(f"missing tensor {group[0]} (model shape {tuple(target.shape)})")
            continue
        key = present[0]
        shape, want = entries[key].shape, tuple(target.shape)
        pad = False
        if shape != want:
            vocab_rows = key in (EMBEDDING_KEY, LM_HEAD_KEY) and len(shape) == len(want) and shape[1:] == want[1:] \
                and shape[0] < want[0] and (vocab_size is None or shape[0] >= vocab_size)
            if not vocab_rows:
                problems.append(_shape_error(key, shape, want) + _shape_hint(model, key))
                continue
            pad = True
        plan.append((group, key, present[1:], target, pad))
        for other in present[1:]:
            if entries[other].shape != shape:
                problems.append(_shape_error(other, entries[other].shape, want))
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match the model:\n  " + "\n  ".join(problems))
    with torch.no_grad():
        for group, key, others, target, pad in plan:
            tensor = entries[key].get()
            if pad:
                target[tensor.shape[0]:].zero_()
                target[: tensor.shape[0]].copy_(tensor)
            else:
                target.copy_(tensor)
            for other in others:
                if not torch.equal(entries[other].get().to(tensor.dtype), tensor):
                    warnings.warn(f"{source}: {other} differs from {key} but the model ties them; using {key}",
                                  stacklevel=3)
    return model


def _set_norm_eps(model, eps):
    for module in model.modules():
        if hasattr(module, "eps") and isinstance(getattr(module, "weight", None), torch.Tensor) \
                and ("Norm" in type(module).__name__):
            module.eps = eps


def _norm_eps(model):
    norm_f = getattr(getattr(model, "backbone", None), "norm_f", None)
    return float(getattr(norm_f, "eps", _DEFAULT_NORM_EPS))


def load_pretrained(cls, name_or_path, device=None, dtype=None, **kwargs):
    """MambaLMHeadModel.from_pretrained: a local directory or a hub id, in either layout.

    Hub options (revision, cache_dir, token, local_files_only, force_download) are used to fetch
    files; other kwargs go to the model's constructor, as upstream does.
    """
    hub_options, model_kwargs = _split_hub_options(dict(kwargs))
    dtype = as_dtype(dtype)
    location = _Location(name_or_path, hub_options)
    config_path = location.config_path()
    config, layout, extras = config_from_dict(_read_json(config_path), source=config_path)
    kind, paths = location.weight_files()
    entries = open_weights(kind, paths)
    if layout == "transformers":
        entries = state_dict_from_transformers(entries)
    model = build_model(cls, config, device=device, dtype=dtype, **model_kwargs)
    if extras.get("norm_epsilon", _DEFAULT_NORM_EPS) != _DEFAULT_NORM_EPS:
        _set_norm_eps(model, extras["norm_epsilon"])
    if extras.get("token_ids"):
        model._transformers_token_ids = dict(extras["token_ids"])
    source = paths[0] if len(paths) == 1 else f"{location.describe()} ({len(paths)} shards)"
    load_into(model, entries, source, vocab_size=config.vocab_size)
    return model


# ----------------------------------------------------------------------------------------------------
# saving
# ----------------------------------------------------------------------------------------------------

def _fsync(path):
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:                                                        # pragma: no cover
        pass


def _write_json(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=4, sort_keys=False)
        f.write("\n")


def _unshared_for_safetensors(state_dict):
    """Drop keys that are the very same tensor as an earlier key; clone tensors that merely share storage."""
    out, seen_ids, seen_storage = {}, set(), set()
    for key, value in state_dict.items():
        if id(value) in seen_ids:
            continue
        seen_ids.add(id(value))
        tensor = value.detach()
        ptr = (tensor.device, tensor.untyped_storage().data_ptr())
        if ptr in seen_storage or not tensor.is_contiguous() or \
                tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.contiguous().clone()
        seen_storage.add(ptr)
        out[key] = tensor.cpu()
    return out


def _atomic_write_dir(directory, writers: dict):
    """Write files (name -> fn(path)) so that the directory never looks complete before it is.

    A new directory is built under a temporary name in its parent and renamed. Into an existing directory,
    config.json is removed first, stale weight files are removed, the new weights are moved in and
    config.json is moved in last.
    """
    directory = os.path.abspath(os.path.expanduser(os.fspath(directory)))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory}: exists and is not a directory")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    # Not tempfile.mkdtemp: its 0o700 mode would stick to the renamed checkpoint directory.
    while True:
        tmp = os.path.join(parent, f".{os.path.basename(directory)}.tmp-{uuid.uuid4().hex[:12]}")
        try:
            os.mkdir(tmp)
            break
        except FileExistsError:                                            # pragma: no cover
            continue
    try:
        for name, write in writers.items():
            path = os.path.join(tmp, name)
            write(path)
            _fsync(path)
        if not os.path.exists(directory):
            try:
                os.rename(tmp, directory)
                return directory
            except OSError:
                if not os.path.isdir(directory):
                    raise
        order = sorted(writers, key=lambda n: n == CONFIG_NAME)          # config.json last
        if os.path.exists(os.path.join(directory, CONFIG_NAME)):
            os.remove(os.path.join(directory, CONFIG_NAME))
        for existing in os.listdir(directory):
            if existing not in writers and any(fnmatch.fnmatch(existing, p) for p in _STALE_WEIGHT_PATTERNS):
                os.remove(os.path.join(directory, existing))
        for name in order:
            os.replace(os.path.join(tmp, name), os.path.join(directory, name))
        return directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_pretrained(model, directory, layout="mamba_ssm", safe_serialization=True, **kwargs):
    """Write config.json and the weights.

    layout="mamba_ssm": upstream's config fields; model.safetensors (a tied lm_head is stored once, under
    the embedding's key, and re-tied on load) or, with safe_serialization=False, pytorch_model.bin holding
    every key (as upstream's own save, readable by its torch.load + load_state_dict).
    layout="transformers": what transformers' MambaForCausalLM.from_pretrained reads.
    """
    if kwargs:
        raise TypeError(f"save_pretrained: unexpected argument(s) {', '.join(sorted(kwargs))}")
    if layout not in LAYOUTS:
        raise ValueError(f"save_pretrained: layout must be one of {LAYOUTS}, got {layout!r}")
    config = model.config
    state_dict = model.state_dict(keep_vars=True)
    tied = LM_HEAD_KEY in state_dict and EMBEDDING_KEY in state_dict and \
        state_dict[LM_HEAD_KEY] is state_dict[EMBEDDING_KEY]
    eps = _norm_eps(model)
    if layout == "mamba_ssm":
        if eps != _DEFAULT_NORM_EPS:
            warnings.warn(f"save_pretrained: the norms' eps {eps} cannot be recorded in upstream's config "
                          f"(which always uses {_DEFAULT_NORM_EPS}); use layout='transformers' to keep it",
                          stacklevel=3)
        config_dict = config_to_mamba_ssm_dict(config)
    else:
        embedding = state_dict.get(EMBEDDING_KEY)
        config_dict = config_to_transformers_dict(
            config, vocab_rows=None if embedding is None else embedding.shape[0], norm_epsilon=eps,
            dtype=None if embedding is None else embedding.dtype,
            token_ids=getattr(model, "_transformers_token_ids", None))
        config_dict["tie_word_embeddings"] = tied             # what the weights really are
        state_dict = state_dict_to_transformers(state_dict, tied=tied)
    json.dumps(config_dict)                                  # fail before writing if not serialisable

    writers: dict[str, Callable[[str], None]] = {CONFIG_NAME: lambda p: _write_json(config_dict, p)}
    if safe_serialization:
        from safetensors.torch import save_file

        tensors = _unshared_for_safetensors(state_dict)
        writers[SAFE_WEIGHTS_NAME] = lambda p: save_file(tensors, p, metadata={"format": "pt"})
    else:
        tensors = {k: v.detach().cpu() for k, v in state_dict.items()}
        writers[WEIGHTS_NAME] = lambda p: torch.save(tensors, p)
    return _atomic_write_dir(directory, writers)
