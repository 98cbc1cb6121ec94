"""The packed-against-padded training benchmark (mambakit/bench/packing.py), on CPU with a tiny model."""
import pytest
import torch

from mambakit.bench.packing import make_steps, measure_packing


def _examples(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        length, prompt = int(torch.randint(4, 20, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        x = torch.randint(1, 60, (length,), generator=g).tolist()
        ids.append(x)
        labels.append([-100] * prompt + x[prompt:])
    return ids, labels


def test_steps_hold_the_same_real_tokens():
    ids, labels = _examples()
    padded = make_steps(ids, labels, "padded", batch_size=3, pack_length=40, rows_per_step=2)
    packed = make_steps(ids, labels, "packed", batch_size=3, pack_length=40, rows_per_step=2)
    real = sum(len(x) for x in ids)
    assert sum(int(b["attention_mask"].sum()) for b in padded) == real == sum(int(b["attention_mask"].sum())
                                                                               for b in packed)
    assert len(padded) == 4 and all("seq_idx" in b for b in packed) and not any("seq_idx" in b for b in padded)
    assert sum(b["input_ids"].numel() for b in packed) < sum(b["input_ids"].numel() for b in padded)
    with pytest.raises(ValueError, match="mode must be 'padded' or 'packed'"):
        make_steps(ids, labels, "both", 3, 40, 1)


def test_measure_packing_on_cpu():
    peft = pytest.importorskip("peft")
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(0)
    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=64, pad_vocab_size_multiple=1))
    model = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["in_proj", "out_proj"]))
    ids, labels = _examples()
    res = measure_packing(model, ids, labels, batch_size=3, pack_length=40, passes=1, precision="fp32", device="cpu")
    assert res["real_tokens"] == sum(len(x) for x in ids) == res["packed"]["tokens_computed"]
    assert res["padded"]["tokens_computed"] > res["real_tokens"]
    assert res["speedup"] > 0 and len(res["padded"]["pass_times_s"]) == 1
