#!/usr/bin/env bash
# Data-parallel check of finetune/ on a 2-GPU machine: the same LoRA run at the same global batch
# (16) on 1 GPU (batch 16) and on 2 GPUs (2 x 8) from the same random 130m-shape base; writes the
# two loss curves, their largest difference and the throughput ratio to $OUT/ddp_check.json.
#   device run (kind nvidia-h200-x2): carry .whl and .devdata
set -u
OUT=${OUT:-/tmp/ddp_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/job.log"; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >> "$OUT/job.log" 2>&1
export PYTHONPATH=$PWD:/tmp/site
nvidia-smi -L >> "$OUT/job.log"
[ "${BUILD:-1}" = 1 ] && TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=32 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1
stamp "build rc=$?"
python3 - <<'PY'
import torch
from mamba_ssm.models.config_mamba import MambaConfig
from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
torch.manual_seed(0)
MambaLMHeadModel(MambaConfig(d_model=768, n_layer=24, vocab_size=50277)).save_pretrained("/tmp/base130m")
PY
stamp "base model saved"
common="--model /tmp/base130m --tokenizer .devdata/gpt-neox-20b --dataset .devdata/gsm8k --preset gsm8k \
  --max-examples 4000 --eval-size 16 --max-length 512 --max-steps ${STEPS:-40} --logging-steps 1 --seed 0 \
  --lora-dropout 0 --learning-rate 5e-4 --save-steps 1000 --no-eval-base --no-eval-finetuned --no-progress"
CUDA_VISIBLE_DEVICES=0 python3 finetune/finetune.py $common --batch-size 16 --output-dir /tmp/ddp1 > "$OUT/run_1gpu.log" 2>&1
stamp "1 GPU rc=$?"
torchrun --nproc_per_node 2 finetune/finetune.py $common --batch-size 8 --output-dir /tmp/ddp2 > "$OUT/run_2gpu.log" 2>&1
stamp "2 GPUs rc=$?"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
def curve(d):
    rows = [json.loads(l) for l in Path(d, "log.jsonl").read_text().splitlines() if l.strip()]
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}
    tput = [r for r in rows if "train_samples_per_second" in r or "train_runtime" in r]
    return loss, tput, rows
l1, t1, r1 = curve("/tmp/ddp1"); l2, t2, r2 = curve("/tmp/ddp2")
steps = sorted(set(l1) & set(l2))
diffs = [abs(l1[s] - l2[s]) for s in steps]
res = {"steps_compared": len(steps), "loss_1gpu": [l1[s] for s in steps], "loss_2gpu": [l2[s] for s in steps],
       "max_abs_loss_diff": max(diffs) if diffs else None,
       "max_rel_loss_diff": max(d / abs(l1[s]) for d, s in zip(diffs, steps)) if diffs else None,
       "final_1gpu_tail": t1[-1:] , "final_2gpu_tail": t2[-1:],
       "global_batch": 16, "seqlen_max": 512, "shape": "130m (random weights)", "lora": "r 16 (default), alpha default, dropout 0, in_proj/x_proj/dt_proj/out_proj"}
def steady_steps_per_s(rows):
    """Optimizer steps per second between the 10th and the last logged step (start-up excluded)."""
    pts = [(r["step"], r["time"]) for r in rows if "loss" in r and "time" in r and r["step"] >= 10]
    return (pts[-1][0] - pts[0][0]) / (pts[-1][1] - pts[0][1]) if len(pts) > 1 else None
s1, s2 = steady_steps_per_s(r1), steady_steps_per_s(r2)
res["steady_steps_per_s_1gpu"], res["steady_steps_per_s_2gpu"] = s1, s2
if s1 and s2:
    res["throughput_ratio_2gpu_over_1gpu"] = s2 / s1  # same global batch per step
Path(sys.argv[1], "ddp_check.json").write_text(json.dumps(res, indent=1))
print(json.dumps({k: v for k, v in res.items() if not k.startswith("loss_")}, indent=1))
PY
stamp "end"
