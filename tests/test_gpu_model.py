"""The whole model on a GPU: same numbers as on the CPU, CUDA-graph decoding equal to eager
decoding, gradients on the fused path equal to the module path. Skipped without CUDA."""
import pytest
import torch

from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
from tiny_models import loud_model

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


def test_cuda_graphs_one_per_batch_size_reused_across_calls_and_lengths(monkeypatch):
    import warnings

    from mamba_ssm.utils import cuda_graph

    captures = []

    class Counted(cuda_graph._CapturedStep):
        def __init__(self, model, batch_size, *args):
            captures.append(batch_size)
            super().__init__(model, batch_size, *args)

    monkeypatch.setattr(cuda_graph, "_CapturedStep", Counted)
    model = loud_model(d_model=64, vocab_size=257, d_state=16, seed=4).cuda()
    # (batch, prompt length, new tokens): smaller batches after larger ones and back (upstream 2.3.2
    # fails on a batch-size change), other prompt and generation lengths for a batch size seen before
    runs = [(4, 3, 8), (2, 5, 6), (4, 9, 4), (1, 2, 10), (2, 1, 3), (4, 1, 12)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a capture failure would fall back to eager unseen
        for batch, plen, new in runs:
            prompt = torch.randint(0, 257, (batch, plen), device="cuda")
            eager = model.generate(prompt, max_length=plen + new, cg=False)
            graphed = model.generate(prompt, max_length=plen + new, cg=True)
            assert torch.equal(graphed, eager), (batch, plen, new)
    assert captures == [4, 2, 1]
    assert cuda_graph.cached_graphs(model) == [(b, torch.float32, torch.device("cuda", 0)) for b in (1, 2, 4)]
    # weights moved (there and back): the old graphs read the old memory, so they are captured again
    old = [p.data for p in model.parameters()]  # held, so that the new weights cannot take its place
    model.to(torch.bfloat16).to(torch.float32)
    assert [p.data_ptr() for p in model.parameters()] != [t.data_ptr() for t in old]
    del old
    prompt = torch.randint(0, 257, (2, 4), device="cuda")
    assert torch.equal(model.generate(prompt, max_length=12, cg=True), model.generate(prompt, max_length=12))
    assert captures == [4, 2, 1, 2]
    # another dtype: graphs of its own
    model.to(torch.bfloat16)
    assert torch.equal(model.generate(prompt, max_length=12, cg=True), model.generate(prompt, max_length=12))
    assert (2, torch.bfloat16, torch.device("cuda", 0)) in cuda_graph.cached_graphs(model)


def test_ragged_batch_with_cuda_graph_gives_each_prompt_its_own_tokens():
    import warnings

    from mamba_ssm.utils.generation import DecodingSession, generate_ragged

    model = loud_model(d_model=64, vocab_size=257, d_state=16, seed=5).cuda()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (5, 1, 3, 5, 1, 8)]

    def alone(p, eos=None):
        seq = model.generate(torch.tensor([p], device="cuda"), max_length=len(p) + 12)[0, len(p):].tolist()
        return seq[:seq.index(eos) + 1] if eos in seq else seq

    want = [alone(p) for p in prompts]
    assert len({tuple(w) for w in want}) == len(want)
    # an eos that ends at least two rows early and leaves another unfinished (the GPU's numbers
    # decide which token does that, so it is chosen from the continuations, not fixed)
    candidates = sorted({tok for w in want for tok in w[:-1]})
    eos = next((c for c in candidates if sum(c in w[:-1] for w in want) >= 2 and any(c not in w for w in want)), None)
    assert eos is not None, want
    want_eos = [alone(p, eos) for p in prompts]
    assert sum(w[-1] == eos for w in want_eos) >= 2 and any(eos not in w for w in want)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert generate_ragged(model, prompts, 12, cg=True) == want
        assert generate_ragged(model, prompts, 12, cg=True, eos_token_id=eos) == want_eos
        assert generate_ragged(model, prompts, 12, cg=False, eos_token_id=eos) == want_eos
        session = DecodingSession(model, batch_size=6, max_seqlen=20, cg=True)
        session.prepare_step()  # capture first: the chunks below are prefilled into the graph's cache
        for rows in ([5, 0], [2], [4, 1, 3]):
            session.prefill([prompts[r] for r in rows], rows=rows)
        assert session.generate(12, eos_token_id=eos).to_lists() == want_eos
        assert session.step_kind == "cuda_graph"


def test_two_cuda_graph_sessions_of_one_batch_size_do_not_share_states_silently():
    from mamba_ssm.utils.generation import DecodingSession

    model = loud_model(d_model=64, vocab_size=257, d_state=16, seed=6).cuda()
    first = DecodingSession(model, batch_size=2, max_seqlen=16, cg=True)
    first.prefill([[1, 2, 3], [4]])
    first.step(torch.tensor([5, 6], device="cuda"))
    second = DecodingSession(model, batch_size=2, max_seqlen=16, cg=True)
    second.prefill([[7], [8, 9]])
    second.step(torch.tensor([1, 1], device="cuda"))  # binds the graph's static cache to `second`
    with pytest.raises(RuntimeError, match="not bound to the graph of batch size 2"):
        first.step(torch.tensor([5, 6], device="cuda"))
