#!/usr/bin/env bash
# Data-parallel check of finetune/ on a 2-GPU machine: the same LoRA run at the same global batch
# (16) on 1 GPU (batch 16) and on 2 GPUs (2 x 8) from the same random 130m-shape base; writes the
# two loss curves, their largest difference and the throughput ratio to $OUT/ddp_check.json; then
# the same for a full fine-tune under FSDP (2 GPUs) against 1 GPU, to $OUT/fsdp_check.json (FSDP=0 skips).
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
python3 benchmarks/compare_loss_curves.py /tmp/ddp1 /tmp/ddp2 --out "$OUT/ddp_check.json" --label "LoRA, DDP 2 GPUs vs 1" \
  --meta '{"global_batch": 16, "seqlen_max": 512, "shape": "130m (random weights)", "lora": "r 16, dropout 0, in_proj/x_proj/dt_proj/out_proj"}'

# FSDP (full fine-tune, Blocks sharded) on 2 GPUs against a plain full fine-tune on 1 GPU.
if [ "${FSDP:-1}" = 1 ]; then
  full="$common --full-finetune --learning-rate 2e-5 --max-steps ${FSDP_STEPS:-30}"
  full=${full/--learning-rate 5e-4 /}
  CUDA_VISIBLE_DEVICES=0 python3 finetune/finetune.py $full --batch-size 16 --output-dir /tmp/full1 > "$OUT/run_full_1gpu.log" 2>&1
  stamp "full 1 GPU rc=$?"
  torchrun --nproc_per_node 2 finetune/finetune.py $full --fsdp --batch-size 8 --output-dir /tmp/fsdp2 > "$OUT/run_fsdp_2gpu.log" 2>&1
  stamp "FSDP 2 GPUs rc=$?"
  python3 benchmarks/compare_loss_curves.py /tmp/full1 /tmp/fsdp2 --out "$OUT/fsdp_check.json" \
    --label "full fine-tune, FSDP 2 GPUs vs 1 GPU" --meta '{"global_batch": 16, "seqlen_max": 512, "shape": "130m (random weights)"}'
  python3 -c "from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as M; M.from_pretrained('/tmp/fsdp2/model'); print('FSDP model loads')" \
    >> "$OUT/job.log" 2>&1
fi
stamp "end"
