"""The whole model on a GPU: same numbers as on the CPU, CUDA-graph decoding equal to eager
decoding, gradients on the fused path equal to the module path. Skipped without CUDA."""
import pytest
import torch

from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

pytestmark = pytest.mark.cuda


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return MambaLMHeadModel(MambaConfig(d_model=64, n_layer=2, vocab_size=257, ssm_cfg={"d_state": 16}, **kw)).eval()


def test_cuda_forward_matches_cpu_fp32():
    model = tiny()
    ids = torch.randint(0, 257, (2, 37))
    cpu = model(ids).logits
    gpu = model.cuda()(ids.cuda()).logits.cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-3)


def test_bf16_forward_is_close_to_fp32():
    model = tiny().cuda()
    ids = torch.randint(0, 257, (2, 64), device="cuda")
    ref = model(ids).logits.float()
    out = model.to(torch.bfloat16)(ids).logits.float()
    assert torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 3e-2


@pytest.mark.parametrize("prompt_len,batch", [(1, 1), (1, 3), (9, 2)])
def test_cuda_graph_decoding_equals_eager(prompt_len, batch):
    model = tiny(seed=1).cuda()
    prompt = torch.randint(0, 257, (batch, prompt_len), device="cuda")
    eager = model.generate(prompt, max_length=prompt_len + 12, cg=False)
    graphed = model.generate(prompt, max_length=prompt_len + 12, cg=True)
    assert torch.equal(eager, graphed)
    again = model.generate(prompt, max_length=prompt_len + 12, cg=True)  # the captured graph is reused
    assert torch.equal(again, graphed)
    logits = model(eager).logits
    assert torch.equal(logits[:, prompt_len - 1:-1].argmax(-1), eager[:, prompt_len:])


def test_fused_and_module_paths_agree_in_training_on_cuda():
    model = tiny(seed=2).cuda().train()
    ids = torch.randint(0, 257, (2, 50), device="cuda")
    grads = []
    for fast in (True, False):
        for layer in model.backbone.layers:
            layer.mixer.use_fast_path = fast
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-3, atol=1e-4, msg=name)


def test_lora_adapters_on_the_fast_path_match_peft_on_cuda():
    """LoRA on every projection, channel-first fast path (mambakit's PEFT resolver) against PEFT's
    own forward (resolver removed): loss and the gradients of lora_A and lora_B (non-zero B)."""
    peft = pytest.importorskip("peft")
    from mamba_ssm.ops.adapters import register_adapter_resolver, unregister_adapter_resolver
    from mambakit.peft_lora import describe_peft_lora

    model = tiny(seed=3).cuda().train()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["in_proj", "x_proj", "dt_proj", "out_proj"])
    model = peft.get_peft_model(model, cfg)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    ids = torch.randint(0, 257, (2, 33), device="cuda")
    results = []
    for fast in (True, False):
        if not fast:
            unregister_adapter_resolver(describe_peft_lora)
        try:
            model.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        finally:
            register_adapter_resolver(describe_peft_lora)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
        results.append((loss.detach(), grads))
    (loss_fast, g_fast), (loss_ref, g_ref) = results
    assert len(g_fast) == 16 and g_fast.keys() == g_ref.keys()
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-5)
    for name in g_ref:
        assert g_fast[name].abs().sum() > 0, name
        torch.testing.assert_close(g_fast[name], g_ref[name], rtol=1e-3, atol=1e-5, msg=name)
