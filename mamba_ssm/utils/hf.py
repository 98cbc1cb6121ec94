"""Upstream's hub helpers, for local directories and hub ids, in either checkpoint layout.

`load_config_hf(name)` returns upstream's config dict (``MambaConfig(**load_config_hf(name))`` works; a
transformers-layout config.json is converted). `load_state_dict_hf(name)` returns the weights under this
package's keys (``model.load_state_dict(...)`` works; a transformers-layout checkpoint is renamed and a tied
``lm_head.weight`` added). Pickled files are only read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

from mamba_ssm.models import checkpoint as _ckpt


def _hub_options(options):
    hub, rest = _ckpt._split_hub_options(dict(options))
    if rest:
        raise TypeError(f"unexpected argument(s) {', '.join(sorted(rest))}; hub options are "
                        f"{', '.join(_ckpt._HUB_OPTIONS)}")
    return hub


def load_config_hf(model_name, **hub_options):
    """config.json of a local directory or hub id, as upstream's dict (d_model, n_layer, vocab_size, ...)."""
    location = _ckpt._Location(model_name, _hub_options(hub_options))
    path = location.config_path()
    raw = _ckpt._read_json(path)
    config, layout, _ = _ckpt.config_from_dict(raw, source=path)
    if layout == "mamba_ssm":
        return raw
    return _ckpt.config_to_mamba_ssm_dict(config)


def load_state_dict_hf(model_name, device=None, dtype=None, **hub_options):
    """The checkpoint's tensors {key: tensor} under this package's (and upstream's) key names.

    Floating-point tensors are cast to `dtype` when given (as upstream does); all are moved to `device`.
    """
    dtype = _ckpt.as_dtype(dtype)
    location = _ckpt._Location(model_name, _hub_options(hub_options))
    config_path = location.config_path()
    config, layout, _ = _ckpt.config_from_dict(_ckpt._read_json(config_path), source=config_path)
    kind, paths = location.weight_files()
    state_dict = _ckpt.read_state_dict(paths, kind)
    if layout == "transformers":
        state_dict = _ckpt.state_dict_from_transformers(state_dict)
    if config.tie_embeddings and _ckpt.LM_HEAD_KEY not in state_dict and _ckpt.EMBEDDING_KEY in state_dict:
        state_dict[_ckpt.LM_HEAD_KEY] = state_dict[_ckpt.EMBEDDING_KEY]
    out, converted = {}, {}
    for key, tensor in state_dict.items():
        if id(tensor) not in converted:         # keep tied entries one tensor
            t = tensor
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype=dtype)
            if device is not None:
                t = t.to(device=device)
            converted[id(tensor)] = t
        out[key] = converted[id(tensor)]
    return out


__all__ = ["load_config_hf", "load_state_dict_hf"]
