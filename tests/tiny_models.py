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


def hybrid_model(seed=0, d_model=32, n_layer=4, vocab_size=101, attn_layer_idx=(1, 3), d_intermediate=48,
                 **attn_cfg):
    """Mamba blocks with attention at attn_layer_idx (grouped kv heads, rotary, a conv on qkv), MLPs in every
    block and tied embeddings, loudly initialised (see loud_model)."""
    torch.manual_seed(seed)
    attn_cfg = {"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 8, "causal": True, "d_conv": 4, **attn_cfg}
    model = MambaLMHeadModel(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=vocab_size,
                                         d_intermediate=d_intermediate, ssm_cfg={"d_state": 8},
                                         attn_layer_idx=list(attn_layer_idx), attn_cfg=attn_cfg,
                                         tie_embeddings=True),
                             initializer_cfg={"initializer_range": 0.5})
    with torch.no_grad():  # with tied embeddings, weaker layers leave greedy decoding repeating a token
        for name, p in model.backbone.layers.named_parameters():
            if name.endswith(("out_proj.weight", "fc2.weight")):
                p.mul_(30.0)
            elif name.endswith(("in_proj.weight", "x_proj.weight", "fc1.weight")):
                p.mul_(2.0)
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
