#!/usr/bin/env bash
# End-of-session GPU checks in one device call (one H200, about 6 minutes; carry nothing). Writes
# logs and JSON to $OUT (at most 8 files come back):
#   1. build, then the whole GPU test suite (`pytest -m cuda tests`);
#   2. benchmark_causal_conv1d.py: the Triton conv against the PyTorch path;
#   3. the LoRA step of the study's shapes at this commit: 1.4b (batch 4 x 2048, r 64) with the
#      default kernels and with MAMBA_SSM_SCAN_EXACT_SOFTPLUS=1 (the scan's log1pf softplus), same
#      call; 1.4b with the recipe's dropout 0.05; 130m (batch 16 x 2048, r 16);
#   4. the scan at batch 1 (1,4096,16384,16) with the sequence split forced to several group
#      counts (MAMBA_SSM_SCAN_SPLIT), against the automatic choice, same call.
#   device run: OUT=$OUT bash benchmarks/device_pending_checks.sh
set -u
source "$(dirname "$0")/device_lib.sh" /tmp/pending_out
export PYTHONPATH=$PWD
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1
rc=$?; stamp "build rc=$rc"; [ $rc != 0 ] && tail -30 /tmp/build.log >> "$OUT/job.log"
timeout ${SUITE_TIMEOUT:-300} python3 -m pytest -m cuda -q -rfs -p no:cacheprovider --durations=5 tests > "$OUT/gpu_tests.log" 2>&1
stamp "GPU suite rc=$?: $(tail -1 "$OUT/gpu_tests.log")"
timeout 90 python3 benchmarks/benchmark_causal_conv1d.py --out "$OUT/causal_conv1d.json" > /tmp/conv_bench.log 2>&1
stamp "conv benchmark rc=$?"
lora() {  # name shape batch rank [extra args]
  local name=$1 shape=$2 bs=$3 rank=$4; shift 4
  timeout 120 python3 benchmarks/benchmark_finetune.py --shape "$shape" --batch-size "$bs" --seqlen 2048 --rank "$rank" \
    --steps 6 --warmup 2 --out "$OUT/lora_${shape}_$name.json" "$@" > /dev/null 2>&1
  stamp "LoRA $shape $name rc=$?"
}
lora default 1.4b 4 64
MAMBA_SSM_SCAN_EXACT_SOFTPLUS=1 lora exactsp 1.4b 4 64
lora dropout 1.4b 4 64 --lora-dropout 0.05
lora default 130m 16 16
V=""
for n in 1 2 3 4 5 6 12 16; do V="$V${V:+;}s$n:MAMBA_SSM_SCAN_SPLIT=$n"; done
timeout 150 python3 benchmarks/benchmark_selective_scan.py --no-ref --no-accuracy --out-dir "$OUT" \
  --shapes '[[1,4096,16384,16]]' --variants "$V" > /tmp/scan_bench.log 2>&1
stamp "scan split sweep rc=$?"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | cut -c1-300 | head -20
grep -v "^wrote" /tmp/conv_bench.log | tee -a "$OUT/job.log"
for f in "$OUT"/lora_*.json; do
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], round(d['train_step_tok_per_s'] or 0), 'tok/s', round(d['peak_mem_GB'], 1), 'GB', d.get('final_loss'))" "$f" 2>/dev/null | tee -a "$OUT/job.log"
done
grep -E "ours|speedup" /tmp/scan_bench.log | tee -a "$OUT/job.log"
stamp "end"
