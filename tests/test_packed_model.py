"""Packed sequences through the model: Mamba.forward(seq_idx=, cu_seqlens=), MixerModel and
MambaLMHeadModel passing them on, LoRA adapters on the packed path, the loss of packed rows, and a
packed prefill's cache. Each packed result is compared with every sequence run alone."""
import pytest
import torch

import mambakit  # noqa: F401  (registers PEFT's LoRA with mamba_ssm.ops.adapters)
from mamba_ssm.modules.mamba_simple import Mamba
from mamba_ssm.ops import packing
from mamba_ssm.utils.inference_params import InferenceParams
from tests.tiny_models import loud_model

LENGTHS = [5, 1, 9, 3, 1]


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _alone(fn, x, cu, dim=1):
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    return torch.cat([fn(x.narrow(dim, a, e - a)) for a, e in bounds], dim=dim)


def _assert_grads_equal(params, out, ref, tol=1e-5):
    gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad((out * gout).sum(), params, allow_unused=True)
    refs = torch.autograd.grad((ref * gout).sum(), params, allow_unused=True)
    for a, r in zip(grads, refs):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol * (r.abs().max().item() + 1))


@pytest.mark.parametrize("fast_path", [True, False])
def test_mamba_layer_packed_equals_alone(fast_path):
    torch.manual_seed(0)
    layer = Mamba(16, d_state=4, use_fast_path=fast_path, layer_idx=0)
    cu = _cu(LENGTHS)
    x = torch.randn(1, int(cu[-1]), 16, requires_grad=True)
    for packed in ({"cu_seqlens": cu}, {"seq_idx": packing.seq_idx_from_cu_seqlens(cu, int(cu[-1]))}):
        out = layer(x, **packed)
        ref = _alone(layer, x, cu)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        _assert_grads_equal([x] + list(layer.parameters()), out, ref)


def test_lm_rows_and_loss():
    """Two packed rows through MambaLMHeadModel: logits as each sequence alone; the loss over real
    response tokens only, none across a boundary, as the token-weighted mean of the sequences' losses."""
    model = loud_model(seed=1).train()
    seq_idx = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 3, 3, 3]], dtype=torch.int32)
    ids = torch.randint(0, 101, seq_idx.shape, generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, :2] = -100  # a masked prompt
    out = model(ids, labels=labels, seq_idx=seq_idx)
    losses, count = [], 0
    for r, a, e in packing.segments(seq_idx):
        logits = model(ids[r:r + 1, a:e]).logits
        torch.testing.assert_close(out.logits[r:r + 1, a:e], logits, rtol=1e-4, atol=1e-4)
        lab = labels[r, a + 1:e]
        keep = lab != -100
        if keep.any():
            losses.append(torch.nn.functional.cross_entropy(logits[0, :-1][keep], lab[keep], reduction="sum"))
            count += int(keep.sum())
    ref = torch.stack(losses).sum() / count
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    # cu_seqlens on a single row: the same
    row = model(ids[:1], labels=labels[:1], cu_seqlens=torch.tensor([0, 4, 7, 10], dtype=torch.int32))
    torch.testing.assert_close(row.logits, out.logits[:1], rtol=1e-5, atol=1e-5)


def test_lora_stays_live_on_the_packed_path():
    """PEFT LoRA on in_proj, x_proj, out_proj: packed rows equal each sequence alone, with the adapters'
    updates applied (outputs differ from the base model's) and their gradients equal."""
    peft = pytest.importorskip("peft")
    model = loud_model(seed=2)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["in_proj", "x_proj", "out_proj"], bias="none")
    lora = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    cu = _cu(LENGTHS)
    ids = torch.randint(0, 101, (1, int(cu[-1])), generator=torch.Generator().manual_seed(1))
    out = lora(input_ids=ids, cu_seqlens=cu).logits
    ref = _alone(lambda t: lora(input_ids=t).logits, ids, cu)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    with lora.disable_adapter():
        base = lora(input_ids=ids, cu_seqlens=cu).logits
    assert (base - out).abs().max() > 1e-2
    params = [p for n, p in lora.named_parameters() if p.requires_grad]
    assert params and all("lora_" in n for n, p in lora.named_parameters() if p.requires_grad)
    _assert_grads_equal(params, out, ref, tol=1e-4)


def test_packed_prefill_fills_one_cache_row_per_sequence():
    """A prefill of prompts of different lengths as one packed row (cu_seqlens) leaves the cache that
    each prompt's own prefill leaves; the next decoding step then agrees row by row."""
    model = loud_model(seed=3)
    lengths = [6, 1, 3, 2]
    cu = _cu(lengths)
    ids = torch.randint(0, 101, (1, int(cu[-1])), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        params = InferenceParams(max_seqlen=32, max_batch_size=len(lengths))
        logits = model(ids, inference_params=params, cu_seqlens=cu).logits
        for i, (a, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            alone = InferenceParams(max_seqlen=32, max_batch_size=1)
            ref = model(ids[:, a:e], inference_params=alone).logits
            torch.testing.assert_close(logits[:, a:e], ref, rtol=1e-5, atol=1e-5)
            for layer_idx, (conv, ssm) in alone.key_value_memory_dict.items():
                pconv, pssm = params.key_value_memory_dict[layer_idx]
                torch.testing.assert_close(pconv[i], conv[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(pssm[i], ssm[0], rtol=1e-5, atol=1e-5)


def test_packed_errors():
    layer = Mamba(8, d_state=4, layer_idx=0)
    x = torch.randn(1, 6, 8)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1, 2]], dtype=torch.int32)
    with pytest.raises(ValueError, match="a packed forward with inference_params is a prefill .* needs cu_seqlens"):
        layer(x, inference_params=InferenceParams(max_seqlen=8, max_batch_size=1), seq_idx=seq_idx)
    with pytest.raises(ValueError, match=r"Mamba: seq_idx must be \(batch, seqlen\) = \(1, 6\), got \(1, 5\)"):
        layer(x, seq_idx=seq_idx[:, :5])
    layer.conv1d = torch.nn.Sequential(layer.conv1d)
    with pytest.raises(ValueError, match="packed sequences need conv1d to be a plain nn.Conv1d"):
        layer(x, seq_idx=seq_idx)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_model_on_gpu(dtype):
    """On the GPU's kernels (the Triton conv and the CUDA scan, both with seq_idx): LoRA
    logits and gradients of a packed row equal each sequence alone, and a packed prefill equals one
    forward per prompt; 70 sequences in the row."""
    import warnings

    peft = pytest.importorskip("peft")
    from mamba_ssm.utils.generation import DecodingSession

    model = loud_model(seed=4).cuda()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["in_proj", "out_proj"]))
    lengths = torch.randint(1, 12, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    cu = _cu(lengths).cuda()
    ids = torch.randint(0, 101, (1, int(cu[-1])), generator=torch.Generator().manual_seed(1)).cuda()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    with warnings.catch_warnings(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        warnings.simplefilter("ignore")
        out = lora(input_ids=ids, cu_seqlens=cu).logits.float()
        ref = _alone(lambda t: lora(input_ids=t).logits.float(), ids, cu)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        params = [p for p in lora.parameters() if p.requires_grad]
        _assert_grads_equal(params, out, ref, tol=tol)
        prompts = [ids[0, a:e].tolist() for a, e in zip(cu[:-1].tolist(), cu[1:].tolist())][:8]
        sessions = [DecodingSession(model.eval(), 8, 32, packed_prefill=p) for p in (True, False)]
        with torch.no_grad():
            a, b = (s.prefill(prompts) for s in sessions)
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
