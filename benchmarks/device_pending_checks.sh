#!/usr/bin/env bash
# The GPU checks left pending at the end of the 2026-11-29 session, in one device call (one H200,
# about 6 minutes; carry nothing). Writes logs and JSON to $OUT:
#   1. build, then every GPU test (the final wave-balancing split rule and the experimental
#      Triton causal conv have not run on a GPU yet);
#   2. benchmark_causal_conv1d.py: the Triton conv against the PyTorch path;
#   3. the LoRA 1.4b step (batch 4 x 2048, r 64) with and without MAMBA_SSM_TRITON_CONV=1, same call;
#   4. the scan at the LoRA shape (4,4096,2048,16) and the issue's shapes, split rule on and off.
# If the conv wins and its tests pass, make it the default (drop the opt-in in
# mamba_ssm/ops/causal_conv1d.py and mamba_ssm/ops/triton/causal_conv1d.py).
#   device run: OUT=$OUT bash benchmarks/device_pending_checks.sh
set -u
OUT=${OUT:-/tmp/pending_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/job.log"; }
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
stamp "build rc=$?"
timeout 240 python3 -m pytest -m cuda -q -p no:cacheprovider tests/test_selective_scan_cuda.py tests/test_gpu_model.py \
  tests/test_state_update_triton.py tests/test_compiled_step.py tests/test_causal_conv1d_triton.py > "$OUT/tests.log" 2>&1
stamp "GPU tests rc=$?: $(tail -1 "$OUT/tests.log")"
timeout 90 python3 benchmarks/benchmark_causal_conv1d.py --out "$OUT/causal_conv1d.json" > "$OUT/conv_bench.log" 2>&1
stamp "conv benchmark rc=$?"
for conv in 0 1; do
  MAMBA_SSM_TRITON_CONV=$conv timeout 100 python3 benchmarks/benchmark_finetune.py --shape 1.4b --batch-size 4 \
    --seqlen 2048 --rank 64 --steps 6 --warmup 2 --out "$OUT/lora_1.4b_tritonconv$conv.json" > /dev/null 2>&1
  stamp "LoRA 1.4b, MAMBA_SSM_TRITON_CONV=$conv rc=$?"
done
timeout 120 python3 benchmarks/benchmark_selective_scan.py --no-ref --no-accuracy --out-dir "$OUT" \
  --shapes '[[4,4096,2048,16],[8,4096,2048,16],[1,4096,16384,16],[8,1536,2048,16]]' \
  --variants "nosplit:MAMBA_SSM_SCAN_SPLIT=1" > "$OUT/scan_bench.log" 2>&1
stamp "scan benchmark rc=$?"
grep -E "passed|failed" "$OUT/tests.log" | tail -2
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-300 | head -20
cat "$OUT/conv_bench.log" | grep -v "^wrote"
for conv in 0 1; do
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], round(d['train_step_tok_per_s']), 'tok/s', round(d['peak_mem_GB'], 1), 'GB', d['final_loss'])" \
    "$OUT/lora_1.4b_tritonconv$conv.json" 2>/dev/null
done
tail -9 "$OUT/scan_bench.log"
stamp "end"
