"""Packed against padded LoRA fine-tuning on GSM8K's own lengths: real tokens per second, one run
(mambakit/bench/packing.py). Writes benchmarks/results/finetune_packing_<shape>_<card>.json.

    # on one GPU, the full GSM8K train file (the default is the test fixture's 200 problems)
    python benchmarks/benchmark_packing.py --shape 1.4b --data .devdata/gsm8k/train.jsonl --examples 1024
    # smoke test on a CPU
    python benchmarks/benchmark_packing.py --shape tiny --examples 16 --batch-size 4 --pack-length 512 \\
        --precision fp32 --base-dtype fp32 --passes 1
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mambakit.bench.packing import load_examples, measure_packing  # noqa: E402
from mambakit.bench.results import card_tag, results_path  # noqa: E402

_spec = importlib.util.spec_from_file_location("benchmark_finetune", ROOT / "benchmarks" / "benchmark_finetune.py")
_bf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bf)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1.4b", choices=sorted(_bf.SHAPES))
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--data", default=str(ROOT / "tests" / "fixtures" / "gsm8k" / "train.jsonl"),
                   help="GSM8K-style jsonl ({question, answer} rows)")
    p.add_argument("--tokenizer", default=str(ROOT / "tests" / "fixtures" / "gpt-neox-20b"))
    p.add_argument("--examples", type=int, default=None, help="the first N rows (default: all)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per padded step")
    p.add_argument("--pack-length", type=int, default=2048, help="tokens per packed row")
    p.add_argument("--rows-per-step", type=int, default=1, help="packed rows per step")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--base-dtype", choices=sorted(_bf._DTYPES), default="bf16")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/finetune_packing_<shape>_<card>.json)")
    a = p.parse_args(argv)
    from mambakit.tokenizer import load_tokenizer

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    ids, labels = load_examples(a.data, load_tokenizer(a.tokenizer), a.examples)
    model = _bf.build(a.shape, a.rank, _bf._DTYPES[a.base_dtype], device)
    res = measure_packing(model, ids, labels, a.batch_size, a.pack_length, a.rows_per_step, a.passes, a.precision,
                          device)
    res.update(shape=a.shape, lora_rank=a.rank, base_dtype=a.base_dtype, data=Path(a.data).name,
               device=torch.cuda.get_device_name() if device.startswith("cuda") else platform.machine(),
               torch=torch.__version__, timestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
    out = Path(a.out) if a.out else results_path("finetune_packing", a.shape, card_tag(device))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"padded {res['padded']['real_tok_per_s']:.0f} real tok/s, packed {res['packed']['real_tok_per_s']:.0f} "
          f"real tok/s: {res['speedup']:.2f}x; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
