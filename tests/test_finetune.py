"""The fine-tuning recipe end to end on a tiny random Mamba and 64 GSM8K problems (CPU).

One 30-step LoRA run (module fixture) is the reference: its loss must fall, only adapter weights
may change, every targeted projection's adapter must get a gradient, and a run stopped by SIGTERM
(the CLI in a subprocess) then resumed must end with the same adapter. The merged model must
reproduce the adapted logits and load with MambaLMHeadModel.from_pretrained. Bad inputs must
fail with a message naming the problem, before any output directory exists.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import GSM8K_DIR as GSM8K, TOKENIZER_DIR as TOKENIZER

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STEPS = 30
TARGETS = ["in_proj", "x_proj", "dt_proj", "out_proj"]


def _tiny_model_dir(path: Path, vocab_size=50277, seed=0) -> Path:
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    torch.manual_seed(seed)
    cfg = MambaConfig(d_model=64, n_layer=2, vocab_size=vocab_size, pad_vocab_size_multiple=8)
    # embeddings (tied to the LM head) at std 0.1 instead of 0.02: with d_model 64 the default
    # leaves logits so flat that no adapter can move the loss far from log(vocab)
    MambaLMHeadModel(cfg, initializer_cfg={"initializer_range": 0.1}).save_pretrained(str(path))
    return path


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the CI machine has 2 cores shared with other jobs: one intra-op thread avoids the
    # oversubscription that makes these small ops 5-20x slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    model = _tiny_model_dir(root / "tiny")
    # the 72 shortest problems of the fixture's 200 (short rows keep the CPU scan cheap): 64 to
    # train, 8 held out
    rows = [json.loads(l) for l in (GSM8K / "train.jsonl").read_text().splitlines()]
    assert len(rows) >= 72
    rows.sort(key=lambda r: len(r["question"]) + len(r["answer"]))
    data = root / "gsm8k-72.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:72]))
    return {"root": root, "model": model, "data": data}


def _cfg(work, out, **kw):
    from mambakit.finetune import FinetuneConfig

    base = dict(model=str(work["model"]), tokenizer=str(TOKENIZER), output_dir=str(out), dataset=str(work["data"]),
                eval_size=8, max_length=64, batch_size=4, max_steps=STEPS, learning_rate=1e-2, warmup_steps=2,
                lora_r=8, lora_alpha=16, lora_dropout=0.05, save_steps=10, save_total_limit=2, logging_steps=1,
                eval_max_new_tokens=6, eval_batch_size=8, progress=False, seed=1)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.fixture(scope="module")
def reference_run(work):
    from mambakit.finetune import run

    out = work["root"] / "ref"
    res = run(_cfg(work, out))
    assert res.status == "completed"
    return out, res


def _adapter_weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def test_loss_falls_and_outputs_complete(reference_run):
    out, res = reference_run
    s = json.loads((out / "summary.json").read_text())
    assert (out / "DONE").exists()
    losses = [json.loads(l)["loss"] for l in (out / "log.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(losses) == STEPS
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.3, f"loss did not fall: first five {losses[:5]}, last five {losses[-5:]}"
    assert s["steps"] == STEPS and s["mode"] == "lora"
    assert s["data"]["packed"] is True  # the default for a model that takes seq_idx
    assert s["data"]["truncated"] > 0 and s["data"]["examples"] == 64
    for key in ("accuracy_base", "accuracy_finetuned"):
        assert 0.0 <= s[key] <= 1.0
    assert s["base"]["n"] == 8 and s["finetuned"]["n"] == 8
    for name in ("log.csv", "loss_curve.png", "adapter/adapter_model.safetensors", "adapter/tokenizer.json"):
        assert (out / name).exists(), name
    assert any((out / "tensorboard").iterdir())
    ckpts = sorted(p.name for p in out.glob("checkpoint-*"))
    assert ckpts == ["checkpoint-20", "checkpoint-30"]  # save_total_limit=2
    assert not list(out.glob(".tmp-*"))


def test_only_adapters_change_and_all_targets_get_gradients(work, reference_run):
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    _, res = reference_run
    model = res.model
    base = MambaLMHeadModel.from_pretrained(str(work["model"])).state_dict()
    trained = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
               for k, v in model.state_dict().items() if "lora_" not in k}
    assert set(trained) == set(base)
    for k, v in base.items():
        assert torch.equal(trained[k].cpu(), v), f"base parameter {k} changed"
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    # one more backward pass on a batch: each targeted projection's A and B get a nonzero gradient
    model.train()
    model.zero_grad()
    x = torch.randint(0, 50000, (2, 24))
    model(input_ids=x, labels=x).loss.backward()
    seen = set()
    for n, p in model.named_parameters():
        if "lora_" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"adapter {n} got no gradient"
            seen.add((n.split(".mixer.")[0], n.split(".mixer.")[1].split(".")[0]))
    assert seen == {(f"base_model.model.backbone.layers.{i}", t) for i in range(2) for t in TARGETS}
    model.zero_grad()


def test_sigterm_then_resume_matches_uninterrupted(work, reference_run, tmp_path):
    from mambakit.finetune import run
    from mambakit.finetune.cli import PREEMPTED_EXIT_CODE

    ref_out, _ = reference_run
    out = tmp_path / "killed"
    cfg = _cfg(work, out, eval_base=False)
    cfg_file = tmp_path / "exp.json"
    cfg_file.write_text(json.dumps({k: v for k, v in cfg.__dict__.items() if k != "output_dir"}))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(REPO / "finetune" / "finetune.py"), "--config", str(cfg_file),
                             "--output-dir", str(out)], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and any(json.loads(l).get("step", 0) >= 3 for l in log.read_text().splitlines() if l):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=240)[0]
    assert proc.returncode == PREEMPTED_EXIT_CODE, text[-3000:]
    assert "SIGTERM" in text
    assert not (out / "DONE").exists() and not (out / "summary.json").exists() and not (out / "adapter").exists()
    stopped = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert stopped and STEPS > stopped[-1] >= 3, stopped

    res = run(_cfg(work, out, eval_base=False, resume=True))
    assert res.status == "completed" and (out / "DONE").exists()
    a, b = _adapter_weights(ref_out / "adapter"), _adapter_weights(out / "adapter")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
    steps = [json.loads(l)["step"] for l in log.read_text().splitlines() if '"loss"' in l]
    assert steps == list(range(1, STEPS + 1))  # records past the checkpoint were replaced, not duplicated
    # real tokens seen (no padding) survive the resume: the same count as the uninterrupted run's
    seen = [[json.loads(l)["num_input_tokens_seen"] for l in (d / "log.jsonl").read_text().splitlines()
             if '"loss"' in l] for d in (ref_out, out)]
    assert seen[0] == seen[1] and seen[0][0] > 0 and all(b > a for a, b in zip(seen[0], seen[0][1:]))


def test_merge_matches_adapted_and_loads(work, reference_run, tmp_path):
    from peft import PeftModel

    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mambakit.finetune.merge import MergeConfig, merge

    ref_out, _ = reference_run
    res = merge(MergeConfig(adapter=str(ref_out / "adapter"), out=str(tmp_path / "merged")))
    assert res["base"] == str(work["model"])  # taken from the adapter's config
    assert res["max_abs_diff"] <= 1e-4
    merged = MambaLMHeadModel.from_pretrained(str(tmp_path / "merged")).eval()
    adapted = PeftModel.from_pretrained(MambaLMHeadModel.from_pretrained(str(work["model"])),
                                        str(ref_out / "adapter")).eval()
    x = torch.randint(0, 50000, (2, 20))
    with torch.no_grad():
        la, lm = adapted(input_ids=x).logits, merged(x).logits
    torch.testing.assert_close(lm, la, rtol=0, atol=1e-4)
    assert (tmp_path / "merged" / "tokenizer.json").exists()
    # the adapter's update really is in the merged weights
    base = MambaLMHeadModel.from_pretrained(str(work["model"]))
    assert not torch.equal(base.backbone.layers[0].mixer.in_proj.weight, merged.backbone.layers[0].mixer.in_proj.weight)
    with pytest.raises(FileExistsError, match="exists"):
        merge(MergeConfig(adapter=str(ref_out / "adapter"), out=str(tmp_path / "merged")))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        merge(MergeConfig(adapter=str(tmp_path / "nowhere"), out=str(tmp_path / "m2")))
    assert not (tmp_path / "m2").exists()
    # above tolerance: an error and no output directory
    with pytest.raises(RuntimeError, match="differ from the adapted model's"):
        merge(MergeConfig(adapter=str(ref_out / "adapter"), out=str(tmp_path / "m3"), tolerance=1e-12))
    assert not (tmp_path / "m3").exists() and not list(tmp_path.glob(".tmp-*"))
    # transformers' layout, read back by transformers' MambaForCausalLM
    from transformers import MambaForCausalLM

    merge(MergeConfig(adapter=str(ref_out / "adapter"), out=str(tmp_path / "m4"), layout="transformers"))
    hf = MambaForCausalLM.from_pretrained(str(tmp_path / "m4")).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits[..., :la.shape[-1]], la, rtol=0, atol=1e-4)


def test_full_finetune_checkpoints_tied_weights(work, tmp_path):
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mambakit.finetune import run

    out = tmp_path / "full"
    res = run(_cfg(work, out, full_finetune=True, max_steps=3, save_steps=2, learning_rate=1e-3, eval_base=False,
                   eval_finetuned=False, max_examples=12, eval_size=4))
    assert res.status == "completed" and (out / "DONE").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    m = MambaLMHeadModel.from_pretrained(str(out / "model"))
    base = MambaLMHeadModel.from_pretrained(str(work["model"]))
    assert not torch.equal(m.backbone.embedding.weight, base.backbone.embedding.weight)
    assert m.lm_head.weight.data_ptr() == m.backbone.embedding.weight.data_ptr()
    # A_log and D stay out of weight decay; so do norms and biases
    from mambakit.finetune.lora import no_decay_parameter

    names = {n for n, p in m.named_parameters() if no_decay_parameter(n, p)}
    assert "backbone.layers.0.mixer.A_log" in names and "backbone.layers.0.mixer.D" in names
    assert "backbone.norm_f.weight" in names and "backbone.layers.0.mixer.dt_proj.bias" in names
    assert "backbone.layers.0.mixer.in_proj.weight" not in names


# ---------------------------------------------------------------------------------------------
# bad input: a clear error, and no output directory


def _fails(work, tmp_path, exc, match, **kw):
    from mambakit.finetune import run

    out = tmp_path / "out"
    with pytest.raises(exc, match=match):
        run(_cfg(work, out, **kw))
    assert not out.exists(), "a failed run left an output directory"


def test_missing_field(work, tmp_path):
    _fails(work, tmp_path, KeyError, r"field 'instruction' not found; fields present: \['question', 'answer'\]",
           preset="mathinstruct")
    _fails(work, tmp_path, KeyError, "'solution' not found", preset=None, prompt_field="question",
           response_field="solution")


def test_empty_file(work, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    _fails(work, tmp_path, ValueError, "empty", dataset=str(empty))


def test_unknown_target_module(work, tmp_path):
    _fails(work, tmp_path, ValueError, r"target module 'q_proj' matches no module.*in_proj",
           target_modules=["in_proj", "q_proj"])


def test_wrong_model_path(work, tmp_path):
    _fails(work, tmp_path, FileNotFoundError, "no_such_model", model=str(tmp_path / "no_such_model"))


def test_tokenizer_larger_than_model_vocab(work, tmp_path):
    small = _tiny_model_dir(tmp_path / "small-vocab", vocab_size=1000)
    _fails(work, tmp_path, ValueError, r"50277 tokens but the model .* embeds only 1000", model=str(small))


def test_finished_or_foreign_output_dir_is_refused(work, reference_run):
    from mambakit.finetune import run

    ref_out, _ = reference_run
    with pytest.raises(FileExistsError, match="finished run"):
        run(_cfg(work, ref_out))
    # --resume on a finished run does nothing and returns its summary
    res = run(_cfg(work, ref_out, resume=True))
    assert res.status == "completed" and res.summary["steps"] == STEPS


def test_cli_reports_errors_without_traceback(work, tmp_path):
    from mambakit.finetune import main

    code = main(["--model", str(work["model"]), "--tokenizer", str(TOKENIZER), "--dataset", str(work["data"]),
                 "--output-dir", str(tmp_path / "o"), "--target-modules", "in_proj", "nope", "--no-progress"])
    assert code == 1 and not (tmp_path / "o").exists()


def test_config_file_and_flags(tmp_path):
    from mambakit.finetune.cli import config_from_cli

    f = tmp_path / "exp.yaml"
    f.write_text("model: some/model\nlora-r: 64\ntarget_modules: [in_proj, out_proj]\npreset: none\n"
                 "prompt_field: q\nresponse_field: a\n")
    cfg = config_from_cli(["--config", str(f), "--lora-r", "32", "--max-examples", "none", "--packing"])
    assert cfg.model == "some/model" and cfg.lora_r == 32 and cfg.target_modules == ["in_proj", "out_proj"]
    assert cfg.preset is None and cfg.max_examples is None and cfg.packing is True
    f.write_text("lora_rank: 8\n")
    with pytest.raises(ValueError, match="lora_rank"):
        config_from_cli(["--config", str(f)])


def test_resume_after_last_step_takes_no_extra_step(work, reference_run, tmp_path):
    """Killed after training but before DONE (e.g. during the final evaluation): resuming
    loads the last checkpoint and finishes without another optimizer step."""
    import shutil

    from mambakit.finetune import run

    ref_out, _ = reference_run
    out = tmp_path / "after-last"
    shutil.copytree(ref_out, out)
    for name in ("DONE", "summary.json", "adapter", "eval_finetuned.json"):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    res = run(_cfg(work, out, resume=True))
    assert res.status == "completed" and res.summary["steps"] == STEPS
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]
    a, b = _adapter_weights(ref_out / "adapter"), _adapter_weights(out / "adapter")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_sigusr1_and_sigterm_set_the_stop_flag():
    from mambakit.finetune.callbacks import PreemptionCallback

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        pc = PreemptionCallback()
        before = signal.getsignal(sig)
        pc.install()
        try:
            os.kill(os.getpid(), sig)
            for _ in range(100):
                if pc.received is not None:
                    break
                time.sleep(0.01)
            assert pc.received == sig
        finally:
            pc.uninstall()
        assert signal.getsignal(sig) == before


def test_resume_with_different_settings_is_refused(work, tmp_path):
    from mambakit.finetune.outputs import prepare_output_dir

    out = tmp_path / "o"
    prepare_output_dir(_cfg(work, out))
    prepare_output_dir(_cfg(work, out, resume=True, logging_steps=5))  # logging may change
    with pytest.raises(ValueError, match=r"lora_r: 8 then, 16 now"):
        prepare_output_dir(_cfg(work, out, resume=True, lora_r=16))


@pytest.mark.parametrize("full_finetune", [True, False])
def test_every_rank_meets_the_same_barriers_when_saving(monkeypatch, tmp_path, full_finetune):
    """Under torchrun each barrier pairs across ranks: rank 0 (which writes) and the others must
    call barrier equally often, or rank 0 waits forever at exit (the first FSDP run on 2 GPUs hung so)."""
    import types

    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mambakit.finetune import distributed, outputs, trainer as ft_trainer
    from mambakit.finetune.config import FinetuneConfig

    model = MambaLMHeadModel(MambaConfig(d_model=16, n_layer=1, vocab_size=32, pad_vocab_size_multiple=8))
    trainer = types.SimpleNamespace(model=model, accelerator=types.SimpleNamespace(get_state_dict=lambda m: m.state_dict()))
    tokenizer = types.SimpleNamespace(save_pretrained=lambda d: None)
    adapter = types.SimpleNamespace(save_pretrained=lambda d, **kw: Path(d, "adapter_model.safetensors").touch())
    counts = {}
    for rank in (0, 1):
        calls = []
        monkeypatch.setattr(distributed, "is_main", lambda rank=rank: rank == 0)
        monkeypatch.setattr(distributed, "barrier", lambda calls=calls: calls.append(1))
        cfg = FinetuneConfig(model="unused", output_dir=str(tmp_path / f"rank{rank}"), full_finetune=full_finetune)
        if full_finetune:
            ft_trainer.save_fsdp_final(cfg, trainer, model, tokenizer)
        else:
            outputs.save_final(cfg, adapter, tokenizer)
        counts[rank] = len(calls)
    assert counts[0] == counts[1] >= 1
    assert (tmp_path / "rank0" / ("model" if full_finetune else "adapter")).is_dir()
    assert not (tmp_path / "rank1").exists()


def test_profile_steps_writes_a_table(work, tmp_path, monkeypatch):
    from mambakit.finetune import run
    from mambakit.finetune.callbacks import ProfileCallback

    monkeypatch.setenv("MAMBAKIT_PROFILE_STEPS", "1-3")
    out = tmp_path / "prof"
    res = run(_cfg(work, out, max_steps=4, save_steps=10, eval_base=False, eval_finetuned=False, max_examples=12,
                   eval_size=4))
    assert res.status == "completed"
    text = (out / "profile_rank0.txt").read_text()
    assert text.startswith("steps 1..2:") and "aten::" in text
    with pytest.raises(ValueError, match="MAMBAKIT_PROFILE_STEPS='3-1'"):
        ProfileCallback.parse("3-1")


def _cli_run(work, out, nproc, batch_size, steps=6, extra=()):
    args = ["--model", str(work["model"]), "--tokenizer", str(TOKENIZER), "--dataset", str(work["data"]),
            "--output-dir", str(out), "--eval-size", "8", "--max-length", "64", "--batch-size", str(batch_size),
            "--max-steps", str(steps), "--learning-rate", "1e-2", "--warmup-steps", "2", "--lora-r", "8",
            "--lora-alpha", "16", "--lora-dropout", "0", "--save-steps", "100", "--logging-steps", "1", "--seed", "1",
            "--no-eval-base", "--no-eval-finetuned", "--no-progress", *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
                str(29500 + os.getpid() % 1000)] if nproc > 1 else [sys.executable]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*launcher, str(REPO / "finetune" / "finetune.py"), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines() if l.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_two_processes_follow_the_one_process_loss_curve(work, tmp_path):
    """DDP on CPU (gloo): 2 processes x 2 rows per step follow 1 process x 4 rows, step by step, and
    leave one complete output (the same global batch, the same data order)."""
    one = _cli_run(work, tmp_path / "one", nproc=1, batch_size=4)
    two = _cli_run(work, tmp_path / "two", nproc=2, batch_size=2)
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert abs(one[step] - two[step]) <= 1e-4 * abs(one[step]), (step, one[step], two[step])
    assert (tmp_path / "two" / "DONE").exists()
    # the gradients were averaged across the processes: the adapters end where one process's do
    # (apart they would differ by about the learning rate; the lora_B entries reach ~0.03 here)
    a, b = _adapter_weights(tmp_path / "one" / "adapter"), _adapter_weights(tmp_path / "two" / "adapter")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
