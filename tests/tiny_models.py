"""Small models the tests share."""
import torch

from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel


def loud_model(seed=0, d_model=32, n_layer=2, vocab_size=101, d_state=8):
    """Untied and loudly initialised: greedy continuations that depend on the whole prompt and differ
    from row to row (a tied, quietly initialised model repeats its last token, which would hide rows
    being mixed up)."""
    torch.manual_seed(seed)
    model = MambaLMHeadModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size,
                                         ssm_cfg={"d_state": d_state}, tie_embeddings=False),
                             initializer_cfg={"initializer_range": 0.5})
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.out_proj.weight.mul_(3.0)
    return model.eval()


def loud_mamba2_model(seed=0, d_model=32, n_layer=2, vocab_size=101, d_state=8, headdim=8, ngroups=2, chunk_size=4,
                      dtype=None):
    """loud_model's Mamba-2 counterpart: untied, loudly initialised, small chunks (prompts span several)."""
    torch.manual_seed(seed)
    model = MambaLMHeadModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size,
                                         ssm_cfg={"layer": "Mamba2", "d_state": d_state, "headdim": headdim,
                                                  "ngroups": ngroups, "chunk_size": chunk_size},
                                         tie_embeddings=False),
                             initializer_cfg={"initializer_range": 0.5}, dtype=dtype)
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.out_proj.weight.mul_(3.0)
    return model.eval()
