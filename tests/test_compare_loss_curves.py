"""benchmarks/compare_loss_curves.py: the multi-GPU checks' comparison of two runs' loss curves."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_loss_curves.py"
spec = importlib.util.spec_from_file_location("compare_loss_curves", SCRIPT)
clc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(clc)


def _write_log(d, rows):
    d.mkdir(parents=True)
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compares_common_steps_and_throughput(tmp_path):
    # run a: 1 step/s; run b: 2 steps/s, one step missing, losses 1% apart
    a = [{"step": s, "time": 100.0 + s, "loss": 10.0 - 0.1 * s} for s in range(1, 31)]
    b = [{"step": s, "time": 50.0 + s / 2, "loss": (10.0 - 0.1 * s) * 1.01} for s in range(1, 31) if s != 5]
    b.append({"step": 30, "train_runtime": 15.0})  # summary rows without a loss are ignored
    _write_log(tmp_path / "a", a)
    _write_log(tmp_path / "b", b)
    out = tmp_path / "check.json"
    res = clc.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--label", "t",
                    "--meta", '{"global_batch": 16}'])
    assert res["steps_compared"] == 29 and 5 not in res["steps"]
    assert res["max_rel_loss_diff"] == pytest.approx(0.01)
    assert res["max_abs_loss_diff"] == pytest.approx(0.099)
    assert res["throughput_ratio_b_over_a"] == pytest.approx(2.0)
    saved = json.loads(out.read_text())
    assert saved["global_batch"] == 16 and saved["label"] == "t"


def test_missing_log_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no log.jsonl in"):
        clc.read_log(tmp_path / "nowhere")
