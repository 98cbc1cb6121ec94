"""The study: synthetic data, the report builder, the generation benchmark and run.sh (quick mode)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mambakit.data import synthetic

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------ synthetic data

def test_word_problems_are_deterministic_and_correct():
    a_train, a_test = synthetic.word_problems(n_train=200, n_test=50, seed=3)
    b_train, b_test = synthetic.word_problems(n_train=200, n_test=50, seed=3)
    assert a_train == b_train and a_test == b_test
    c_train, _ = synthetic.word_problems(n_train=200, n_test=50, seed=4)
    assert c_train != a_train
    for p in a_train + a_test:
        assert synthetic.check_problem(p), p
        expected = p["a"] + p["b"] if p["op"] == "+" else p["a"] - p["b"]
        assert expected >= 0
        assert p["answer"].endswith(f"\n#### {expected}")
        assert synthetic.extract_answer(p["answer"]) == str(expected)
    # held-out: no (a, b, op) and no question of the test split is in the train split
    assert not {(p["a"], p["b"], p["op"]) for p in a_train} & {(p["a"], p["b"], p["op"]) for p in a_test}
    assert not {p["question"] for p in a_train} & {p["question"] for p in a_test}
    assert {p["op"] for p in a_test} == {"+", "-"}


def test_word_problems_errors():
    with pytest.raises(ValueError, match="distinct"):
        synthetic.word_problems(n_train=10**6, n_test=10)
    with pytest.raises(ValueError):
        synthetic.word_problems(cfg=synthetic.SyntheticConfig(min_operand=10, max_operand=5))
    with pytest.raises(ValueError, match="negative"):
        synthetic.equation(3, 5, "-")


def test_extract_answer():
    assert synthetic.extract_answer("x = 4\n#### 1,234") == "1234"
    assert synthetic.extract_answer("#### -7") == "-7"
    assert synthetic.extract_answer("no marker 12") is None


def test_corpus_has_arithmetic_but_no_question_answer_format():
    corpus = synthetic.pretraining_corpus(seed=0)
    assert corpus == synthetic.pretraining_corpus(seed=0)
    text = "\n".join(corpus)
    assert "Question" not in text and "Answer" not in text and "How many" not in text
    eqs = [d for d in corpus if "=" in d]
    assert "12 + 8 = 20" in text and "20 - 0 = 20" in text
    for d in eqs:
        lhs, rhs = d.split("\n")[0].split(" = ")
        assert eval(lhs) == int(rhs)  # noqa: S307  (digits and + or - only)


def test_write_dataset_and_task(tmp_path):
    train, test = synthetic.write_dataset(tmp_path / "data", n_train=40, n_test=10, seed=1)
    rows = synthetic.read_jsonl(train)
    assert len(rows) == 40 and set(rows[0]) == {"question", "answer"}
    assert len(synthetic.read_jsonl(test)) == 10
    task = synthetic.write_lm_eval_task(tmp_path / "tasks", tmp_path / "data")
    text = task.read_text()
    assert "task: synthetic_math" in text and str((tmp_path / "data" / "test.jsonl").resolve()) in text
    import yaml

    cfg = yaml.safe_load(text)
    assert cfg["doc_to_text"] == "Question: {{question}}\nAnswer:"
    assert cfg["generation_kwargs"]["until"] == ["\n\n", "Question:"]
    with pytest.raises(FileNotFoundError):
        synthetic.write_lm_eval_task(tmp_path / "t2", tmp_path / "missing")


def test_tokenizer_round_trip_and_eos():
    corpus = synthetic.pretraining_corpus(seed=0)[:2000]
    train, _ = synthetic.word_problems(n_train=200, n_test=10)
    texts = corpus + [synthetic.PROMPT_TEMPLATE.format(question=p["question"]) + " " + p["answer"] for p in train]
    tok = synthetic.train_tokenizer(texts, vocab_size=300)
    assert tok.token_to_id("<|endoftext|>") == 0
    for t in texts[:50] + texts[-50:]:
        assert tok.decode(tok.encode(t).ids) == t
    # digits are single tokens: numbers are spelled digit by digit
    ids = tok.encode("123").ids
    assert [tok.id_to_token(i) for i in ids] == ["1", "2", "3"]


def test_committed_assets():
    model_dir = ROOT / "mambakit" / "assets" / "tiny-mamba-arith"
    data_dir = ROOT / "mambakit" / "assets" / "math-word-problems"
    if not (model_dir / "config.json").exists():
        pytest.skip("tiny model asset not built yet")
    size = sum(f.stat().st_size for f in model_dir.iterdir() if f.is_file())
    assert size < 2 * 2**20
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (model_dir / name).is_file(), name
    for split in ("train", "test"):
        rows = synthetic.read_jsonl(data_dir / f"{split}.jsonl")
        assert rows and all(synthetic.extract_answer(r["answer"]) is not None for r in rows)
    from mambakit.tokenizer import load_tokenizer

    tok = load_tokenizer(model_dir)
    assert tok.eos_token == "<|endoftext|>"
    q = "Question: Mia has 12 apples.\nAnswer: Mia has 12 + 3 = 15 apples now.\n#### 15"
    assert tok.decode(tok(q).input_ids) == q


# ------------------------------------------------------------------------------ report

def _fake_results(tmp_path):
    def lm_eval_json(path, strict, flex):
        path.mkdir(parents=True)
        data = {"results": {"synthetic_math": {"alias": "synthetic_math", "exact_match,strict-match": strict,
                                               "exact_match_stderr,strict-match": 0.01,
                                               "exact_match,flexible-extract": flex,
                                               "exact_match_stderr,flexible-extract": 0.02}},
                "config": {"model": "mamba"}}
        (path / "results_2026-01-01T00-00-00.json").write_text(json.dumps(data))

    lm_eval_json(tmp_path / "eval" / "base", 0.0125, 0.0375)
    lm_eval_json(tmp_path / "eval" / "finetuned", 0.8125, 0.8250)
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "summary.json").write_text(json.dumps({
        "accuracy_base": 0.015, "accuracy_finetuned": 0.785, "steps": 300, "first_loss": 2.5, "last_loss": 0.3125,
        "seconds": 120.5, "mode": "lora", "base": {"n": 200}, "finetuned": {"n": 200}}))
    gen = {"kind": "generation_benchmark", "date": "2026-01-01T00:00:00Z",
           "machine": {"processor": "x86_64", "torch": "2.x", "transformers": "5.x"},
           "inputs": {"device": "cpu", "dtype": "float32", "genlen": 16, "repeats": 2, "model_name": "tiny"},
           "models": {"mamba": {"size": "tiny", "n_params": 1000, "weights": "random"},
                      "transformer": {"shape": "tiny", "n_params": 1200, "weights": "random"}},
           "sample": {"prompt_length": 32, "generation_length": 16, "text": None},
           "runs": [{"model": m, "batch": b, "total_ms_mean": 100.0 / b, "prefill_ms_mean": 10.0, "decode_ms_mean": 90.0,
                     "tokens_per_s": 160.0 * b * (1.5 if m == "mamba" else 1.0)}
                    for m in ("mamba", "transformer") for b in (1, 4)]}
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "generation.json").write_text(json.dumps(gen))


def test_report_from_fake_results(tmp_path):
    from mambakit.report import build_report

    _fake_results(tmp_path)
    path = build_report(tmp_path / "report", evals={"base": tmp_path / "eval" / "base",
                                                    "finetuned": tmp_path / "eval" / "finetuned"},
                        finetune_summary=tmp_path / "ft" / "summary.json",
                        generation=[tmp_path / "bench" / "generation.json"])
    md = path.read_text()
    # numbers from each file, and the file they came from
    for number in ("0.0125", "0.8125", "0.0150", "0.7850", "0.3125", "240.0", "640.0"):
        assert number in md, number
    for src in ("../eval/base/results_2026-01-01T00-00-00.json", "../eval/finetuned/results_2026-01-01T00-00-00.json",
                "../ft/summary.json", "../bench/generation.json"):
        assert src in md, src
    assert (tmp_path / "report" / "accuracy.png").stat().st_size > 1000
    assert (tmp_path / "report" / "throughput.png").stat().st_size > 1000
    assert "accuracy.png" in md and "throughput.png" in md


def test_report_cli_and_missing_inputs(tmp_path):
    _fake_results(tmp_path)
    r = subprocess.run([sys.executable, "-m", "mambakit.report", "--out", str(tmp_path / "r"),
                        "--finetune-summary", str(tmp_path / "nope.json"),
                        "--generation", str(tmp_path / "bench" / "generation.json")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    md = (tmp_path / "r" / "report.md").read_text()
    assert "did not finish" in md and "throughput.png" in md
    r = subprocess.run([sys.executable, "-m", "mambakit.report", "--out", str(tmp_path / "r2"), "--eval", "nopath"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "NAME=PATH" in r.stderr


# ------------------------------------------------------------------------------ generation benchmark

def test_size_names():
    from mambakit.bench.generation import PYTHIA_SIZES, MAMBA_SIZES, size_of

    assert size_of("state-spaces/mamba-1.4b") == "1.4b"
    assert size_of("state-spaces/mamba-130m-hf") == "130m"
    assert size_of("2.8b") == "2.8b" and size_of("tiny") == "tiny"
    assert size_of("/models/my-mamba") is None
    assert MAMBA_SIZES["1.4b"] == (2048, 48) and PYTHIA_SIZES["1.4b"][:3] == (2048, 24, 16)


def test_generation_benchmark_cpu_smoke(tmp_path):
    from mambakit.bench.generation import BenchConfig, run_benchmark, write_results

    cfg = BenchConfig(model_name="tiny", promptlen=8, genlen=4, batch=[1, 2], repeats=1, device="cpu", threads=1)
    res = run_benchmark(cfg, log=lambda *a: None)
    assert res["models"]["mamba"]["weights"] == "random"
    assert res["models"]["transformer"]["attn_implementation"] == "sdpa"
    assert res["sample"]["prompt_length"] == 8 and res["sample"]["generation_length"] == 4
    runs = res["runs"]
    assert sorted((r["model"], r["batch"]) for r in runs) == [("mamba", 1), ("mamba", 2), ("transformer", 1),
                                                              ("transformer", 2)]
    for r in runs:
        assert r["tokens_per_s"] > 0 and r["total_ms_mean"] > 0 and len(r["total_ms"]) == 1
    j, p = write_results(res, tmp_path / "g.json", tmp_path / "g.png")
    assert json.loads(j.read_text())["runs"] == runs and p.stat().st_size > 1000


def test_generation_benchmark_cli_checkpoint_and_errors(tmp_path):
    """The CLI on a local checkpoint with a tokenizer and a text prompt prints the decoded text."""
    model_dir = ROOT / "mambakit" / "assets" / "tiny-mamba-arith"
    if not (model_dir / "config.json").exists():
        pytest.skip("tiny model asset not built yet")
    r = subprocess.run([sys.executable, "benchmarks/benchmark_generation_mamba_simple.py", "--model-name", str(model_dir),
                        "--prompt", "12 + 30 =", "--genlen", "4", "--batch", "1", "--repeats", "1", "--threads", "1",
                        "--out-json", str(tmp_path / "b.json")], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "12 + 30 =" in r.stdout and "Prompt length:" in r.stdout and "decoding time" in r.stdout
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["models"]["mamba"]["weights"] == "checkpoint"
    assert res["models"]["transformer"]["hidden_size"] == res["models"]["mamba"]["d_model"]
    assert (tmp_path / "b.png").exists()
    r = subprocess.run([sys.executable, "benchmarks/benchmark_generation_mamba_simple.py", "--model-name",
                        str(tmp_path / "no-such-model"), "--genlen", "1"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "genlen must be >= 2" in r.stderr


# ------------------------------------------------------------------------------ run.sh

def test_run_sh_help_and_bad_argument():
    r = subprocess.run(["bash", "run.sh", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "CONFIG" in r.stdout and "FT_ARGS" in r.stdout and "--quick" in r.stdout
    r = subprocess.run(["bash", "run.sh", "extra"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown argument" in r.stderr
    head = (ROOT / "run.sh").read_text().splitlines()[:15]
    assert any(line.startswith("#SBATCH --gres=gpu:1") for line in head)
    assert any(line.startswith("#SBATCH --requeue") for line in head)


def test_run_sh_failure_names_step(tmp_path):
    env = dict(os.environ, OUT_DIR=str(tmp_path / "out"), FT_ARGS=f"--model {tmp_path / 'no-model'}",
               STEPS_TO_RUN="finetune", HF_HUB_OFFLINE="1", TASKS="none")
    r = subprocess.run(["bash", "run.sh"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode != 0
    assert "FAILED at step 'finetune'" in r.stdout
    assert (tmp_path / "out" / "logs" / "finetune.log").is_file()
    # a configuration that does not validate stops before any step, naming the settings
    env["FT_ARGS"] = "--lora-r 0"
    r = subprocess.run(["bash", "run.sh"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode != 0 and "FAILED at step 'setup'" in r.stdout and "--lora-r 0" in r.stdout


_CLIS = [ROOT / "finetune" / "finetune.py", ROOT / "finetune" / "merge.py", ROOT / "evals" / "lm_harness_eval.py"]


@pytest.mark.slow
@pytest.mark.skipif(not all(p.exists() for p in _CLIS), reason="finetune/eval command lines not in the tree yet")
def test_run_sh_quick_end_to_end(tmp_path):
    out = tmp_path / "study"
    env = dict(os.environ, OUT_DIR=str(out), THREADS="2")
    r = subprocess.run(["bash", "run.sh", "--quick"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    md = (out / "report" / "report.md").read_text()
    assert "Held-out accuracy" in md and "lm-eval tasks" in md and "Generation throughput" in md
    for step in ("finetune", "merge", "eval_base", "eval_finetuned", "bench", "report"):
        assert (out / ".done" / step).is_file(), step
        assert (out / "logs" / f"{step}.log").is_file(), step
    s = json.loads((out / "finetune" / "summary.json").read_text())
    assert s["accuracy_base"] is not None and s["accuracy_finetuned"] is not None
    # a second run skips every finished step
    r = subprocess.run(["bash", "run.sh", "--quick"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.count("done already") == 6


def test_pretrain_tiny_writes_a_loadable_model(tmp_path):
    from mambakit.finetune.pretrain_tiny import PretrainConfig, pretrain

    cfg = PretrainConfig(out_dir=str(tmp_path / "m"), data_dir=str(tmp_path / "d"), steps=3, d_model=32, n_layer=1,
                         seq_len=32, batch_size=4, n_train=20, n_test=5, eval_equations=4, eval_problems=2, threads=1)
    s = pretrain(cfg, log=lambda *a: None)
    assert s["steps_done"] == 3 and len(s["losses"]) == 3
    assert 0.0 <= s["arithmetic_accuracy"] <= 1.0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "pretrain_summary.json"):
        assert (tmp_path / "m" / name).is_file(), name
    assert len(synthetic.read_jsonl(tmp_path / "d" / "train.jsonl")) == 20
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mambakit.tokenizer import load_tokenizer

    model = MambaLMHeadModel.from_pretrained(str(tmp_path / "m"))
    tok = load_tokenizer(tmp_path / "m")
    assert tok.eos_token_id == 0 and model.config.vocab_size >= len(tok)
    assert not (tmp_path / "m.tmp").exists()


def test_load_tokenizer_tells_hub_ids_from_paths(tmp_path, monkeypatch):
    """A hub id (owner/name) goes to the hub; a missing path is a clear error, not a hub lookup."""
    import mambakit.tokenizer as mt

    asked = []
    real = mt.load_tokenizer(ROOT / "mambakit" / "assets" / "tiny-mamba-arith")

    class FakeAuto:
        @staticmethod
        def from_pretrained(name):
            asked.append(name)
            return real

    import transformers

    monkeypatch.setattr(transformers, "AutoTokenizer", FakeAuto)
    tok = mt.load_tokenizer("EleutherAI/gpt-neox-20b")
    assert asked == ["EleutherAI/gpt-neox-20b"] and tok.eos_token is not None
    for missing in (tmp_path / "no-tokenizer", "./no-tokenizer", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such file or directory, and not a hub id"):
            mt.load_tokenizer(missing)
    assert asked == ["EleutherAI/gpt-neox-20b"]
