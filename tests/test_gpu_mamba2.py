"""Mamba-2 on a GPU (cuda marker; the lead runs these on a lent GPU): the PyTorch SSD path on CUDA against
the CPU, bf16, CUDA-graph decoding against eager, packed prefill of prompts of different lengths."""
import pytest
import torch

from mamba_ssm.utils.generation import generate_ragged
from tiny_models import loud_mamba2_model

pytestmark = pytest.mark.cuda


def test_cuda_forward_and_backward_match_cpu_fp32():
    model = loud_mamba2_model(d_model=64, vocab_size=257, d_state=16, headdim=16, chunk_size=16).train()
    ids = torch.randint(0, 257, (2, 70))
    cpu = model(ids, labels=ids)
    cpu.loss.backward()
    cpu_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    gpu_model = model.cuda()
    gpu = gpu_model(ids.cuda(), labels=ids.cuda())
    gpu.loss.backward()
    # relative norms: cuDNN may run a convolution in TF32
    rel = lambda a, b: ((a.cpu().double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
    assert rel(gpu.logits.detach(), cpu.logits.detach()) < 1e-3
    for n, p in gpu_model.named_parameters():
        assert rel(p.grad, cpu_grads[n]) < 3e-3, n


def test_bf16_forward_is_close_to_fp32():
    model = loud_mamba2_model(d_model=64, vocab_size=257, d_state=16, headdim=16, chunk_size=32).cuda()
    ids = torch.randint(0, 257, (2, 100), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits.float()
        out = model.to(torch.bfloat16)(ids).logits.float()
    assert torch.isfinite(out).all()
    assert (out - ref).norm() / ref.norm() < 3e-2


@pytest.mark.parametrize("prompt_len,batch", [(1, 1), (1, 3), (9, 2)])
def test_cuda_graph_decoding_equals_eager(prompt_len, batch):
    model = loud_mamba2_model(seed=1, vocab_size=257).cuda()
    prompt = torch.randint(0, 257, (batch, prompt_len), device="cuda")
    eager = model.generate(prompt, max_length=prompt_len + 12, cg=False)
    graphed = model.generate(prompt, max_length=prompt_len + 12, cg=True)
    assert torch.equal(eager, graphed)
    with torch.no_grad():
        logits = model(eager).logits
    assert torch.equal(logits[:, prompt_len - 1:-1].argmax(-1), eager[:, prompt_len:])


@pytest.mark.parametrize("cg", [False, True])
def test_packed_ragged_prompts_on_cuda_equal_each_alone(cg):
    model = loud_mamba2_model(seed=2, vocab_size=257).cuda()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (7, 1, 3, 12)]
    want = [model.generate(torch.tensor([p], device="cuda"), max_length=len(p) + 8)[0, len(p):].tolist()
            for p in prompts]
    assert generate_ragged(model, prompts, 8, cg=cg) == want
