#!/usr/bin/env bash
# Data-parallel check of finetune/ on a 2-GPU machine: the same LoRA run at the same global batch
# (16) on 1 GPU (batch 16) and on 2 GPUs (2 x 8) from the same random 130m-shape base; writes the
# two loss curves, their largest difference and the throughput ratio to $OUT/ddp_check.json; then
# the same for a full fine-tune under FSDP (2 GPUs) against 1 GPU, to $OUT/fsdp_check.json (FSDP=0 skips).
# A second LoRA pair (PACKED=1, the default) packs rows to 2048 tokens, so each GPU has a full
# step's work: $OUT/ddp_check_packed.json. Steps 20-24 of each LoRA run are profiled
# (MAMBAKIT_PROFILE_STEPS) into $OUT/profiles.txt; the runs' logs go to $OUT/runs.log.
# ONE_GPU_ONLY=1 (with FSDP=0) runs the single-GPU baselines alone, e.g. to profile them.
#   device run (kind nvidia-h200-x2): carry .whl and .devdata
set -u
source "$(dirname "$0")/device_lib.sh" /tmp/ddp_out
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# torchrun would set 1 thread per process and the single-GPU run would take all cores: same for both
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} MAMBAKIT_PROFILE_STEPS=${MAMBAKIT_PROFILE_STEPS:-20-25}
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
  --max-examples 4000 --eval-size 16 --max-length 512 --logging-steps 1 --seed 0 \
  --lora-dropout 0 --learning-rate 5e-4 --save-steps 1000 --no-eval-base --no-eval-finetuned --no-progress"
lora_pair() {  # name, extra flags, steps
  CUDA_VISIBLE_DEVICES=0 python3 finetune/finetune.py $common $2 --max-steps $3 --batch-size 16 --output-dir /tmp/$1_1 \
    > /tmp/log_$1_1gpu.txt 2>&1
  stamp "$1 1 GPU rc=$?"
  [ "${ONE_GPU_ONLY:-0}" = 1 ] && return  # a 1-GPU machine: the baselines and their profiles only
  torchrun --nproc_per_node 2 finetune/finetune.py $common $2 --max-steps $3 --batch-size 8 --output-dir /tmp/$1_2 \
    > /tmp/log_$1_2gpu.txt 2>&1
  stamp "$1 2 GPUs rc=$?"
}
lora_pair ddp "--no-packing" ${STEPS:-40}
[ "${ONE_GPU_ONLY:-0}" = 1 ] || python3 benchmarks/compare_loss_curves.py /tmp/ddp_1 /tmp/ddp_2 --out "$OUT/ddp_check.json" --label "LoRA, DDP 2 GPUs vs 1" \
  --meta '{"global_batch": 16, "seqlen_max": 512, "shape": "130m (random weights)", "lora": "r 16, dropout 0, in_proj/x_proj/dt_proj/out_proj"}'
if [ "${PACKED:-1}" = 1 ]; then
  lora_pair packed "--packing --max-length 2048" ${PACKED_STEPS:-30}
  [ "${ONE_GPU_ONLY:-0}" = 1 ] || python3 benchmarks/compare_loss_curves.py /tmp/packed_1 /tmp/packed_2 --out "$OUT/ddp_check_packed.json" \
    --label "LoRA, DDP 2 GPUs vs 1, rows packed to 2048 tokens" \
    --meta '{"global_batch": 16, "seqlen": 2048, "tokens_per_step": 32768, "shape": "130m (random weights)", "lora": "r 16, dropout 0, in_proj/x_proj/dt_proj/out_proj"}'
fi

# FSDP (full fine-tune, Blocks sharded) on 2 GPUs against a plain full fine-tune on 1 GPU.
if [ "${FSDP:-1}" = 1 ]; then
  full="$common --full-finetune --learning-rate 2e-5"
  full=${full/--learning-rate 5e-4 /}
  CUDA_VISIBLE_DEVICES=0 python3 finetune/finetune.py $full --max-steps ${FSDP_STEPS:-30} --batch-size 16 \
    --output-dir /tmp/full_1 > /tmp/log_full_1gpu.txt 2>&1
  stamp "full 1 GPU rc=$?"
  timeout 300 torchrun --nproc_per_node 2 finetune/finetune.py $full --max-steps ${FSDP_STEPS:-30} --fsdp --batch-size 8 \
    --output-dir /tmp/fsdp_2 > /tmp/log_fsdp_2gpu.txt 2>&1
  stamp "FSDP 2 GPUs rc=$?"
  python3 benchmarks/compare_loss_curves.py /tmp/full_1 /tmp/fsdp_2 --out "$OUT/fsdp_check.json" \
    --label "full fine-tune, FSDP 2 GPUs vs 1 GPU" --meta '{"global_batch": 16, "seqlen_max": 512, "shape": "130m (random weights)"}'
  python3 -c "from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel as M; M.from_pretrained('/tmp/fsdp_2/model'); print('FSDP model loads')" \
    >> "$OUT/job.log" 2>&1
fi
for f in /tmp/log_*.txt; do echo "=== $f"; cat "$f"; done > "$OUT/runs.log"
for f in /tmp/*_[12]/profile_rank*.txt; do echo "=== $f"; cat "$f"; done > "$OUT/profiles.txt" 2>/dev/null
stamp "end"
