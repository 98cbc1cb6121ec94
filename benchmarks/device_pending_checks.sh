#!/usr/bin/env bash
# End-of-session GPU checks in one device call (one H200, about 5 minutes; carry .upstream).
# Writes logs and JSON to $OUT (at most 8 files come back):
#   1. build ours, and upstream's scan from .upstream/ in the background;
#   2. the whole GPU test suite (`pytest -m cuda tests`);
#   3. the scan benchmark against upstream in the same run, with two more runs of ours: `nofull`
#      (MAMBA_SSM_SCAN_FWD_FULL=0: the forward with bounds checks) and `old` (all of this
#      session's switches off: no forward fast instantiation, select-based dB/dC sum, y
#      recomputed, no prefetch);
#   4. the LoRA step of the study's 1.4b shape (batch 4 x 2048, r 64) with the default kernels
#      and with the same `old` switches, their steps alternating in one process
#      (benchmark_finetune.py --ab-env): the end-to-end effect, each one's peak memory included
#      (the saved y costs one activation per layer). (The fifth session's figures came from the
#      version at e11c39c, one process per setting.)
#   device run: bash benchmarks/device_pending_checks.sh
set -u
source "$(dirname "$0")/device_lib.sh" /tmp/pending_out
export PYTHONPATH=$PWD
UP_SDIST=.upstream/mamba_ssm-2.3.2.post1.tar.gz
if [ -f "$UP_SDIST" ]; then
  ( MAX_JOBS=8 bash benchmarks/build_upstream.sh "$UP_SDIST" /tmp/upstream_build > /tmp/upstream_build.log 2>&1
    echo $? > /tmp/upstream_rc ) &
  UP_PID=$!
fi
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=8 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1
rc=$?; stamp "build rc=$rc"; [ $rc != 0 ] && tail -30 /tmp/build.log >> "$OUT/job.log"
timeout ${SUITE_TIMEOUT:-300} python3 -m pytest -m cuda -q -rfs -p no:cacheprovider --durations=5 tests > "$OUT/gpu_tests.log" 2>&1
stamp "GPU suite rc=$?: $(tail -1 "$OUT/gpu_tests.log")"
grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | cut -c1-300 | head -20

OLD="MAMBA_SSM_SCAN_FWD_FULL=0,MAMBA_SSM_SCAN_BWD_PERM=0,MAMBA_SSM_SCAN_SAVE_Y=0,MAMBA_SSM_SCAN_BWD_PREFETCH=0"
UP_ARG=""
if [ -n "${UP_PID:-}" ]; then
  wait $UP_PID; stamp "upstream build rc=$(cat /tmp/upstream_rc)"
  [ "$(cat /tmp/upstream_rc)" = 0 ] && UP_ARG="--upstream-path /tmp/upstream_build/mamba_ssm-2.3.2.post1"
fi
timeout 240 python3 benchmarks/benchmark_selective_scan.py $UP_ARG --no-ref --out-dir "$OUT" \
  --variants "nofull:MAMBA_SSM_SCAN_FWD_FULL=0;old:$OLD" > "$OUT/scan_bench.log" 2>&1
stamp "scan benchmark rc=$?"

timeout 240 python3 benchmarks/benchmark_finetune.py --shape 1.4b --batch-size 4 --seqlen 2048 --rank 64 \
  --steps 12 --warmup 2 --ab-env "old:$OLD" --out "$OUT/lora_1.4b_ab_old.json" 2>&1 | grep -E "step .* tok/s" \
  | tee -a "$OUT/job.log"
stamp "LoRA 1.4b A/B rc=${PIPESTATUS[0]}"
tail -22 "$OUT/scan_bench.log" | tee -a "$OUT/job.log"
stamp "end"
