#!/usr/bin/env bash
# One device call for issue 3: build ours and upstream (in parallel), GPU tests, compute-sanitizer
# (inside the tests), benchmark. Logs and the JSON go to $OUT.
#   run: bash tools/device/device_scan_job.sh      (carry .upstream)
# Knobs (environment): SKIP_UPSTREAM=1, SKIP_TESTS=1, TEST_TIMEOUT, BENCH_TIMEOUT, BENCH_ARGS (e.g.
# "--no-ref --variants name:VAR=v,VAR=v;..."), NCU=0 (no profile), NCU_SHAPE="1 4096 16384 16"
# (the profiled shape), NCU_ENV="MAMBA_SSM_SCAN_FWD_TP=1" (settings for the profiled run only),
# NCU_KERNELS (a regex, default scan_), NCU_METRICS (more metrics, e.g. the stall reasons:
# "regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio"), NCU_SOURCE=1 (also ncu's
# source counters: where the warp-stall samples fall, and ncu_source.csv.gz, the counters of every SASS
# instruction), NCU_SECTIONS (more ncu sections, e.g. "InstructionStats MemoryWorkloadAnalysis"),
# RETURN_UPSTREAM_SO=1 (hand upstream's built extension back, gzipped, to carry as
# .upstream/selective_scan_cuda*.so.gz: PREBUILT_SO skips its build).
# A profile with little else: SKIP_UPSTREAM=1 SKIP_TESTS=1 NCU_SOURCE=1 NCU_SHAPE="8 4096 2048 16".
# A baseline of ours: .upstream/baseline_tree.tar.gz (`git archive` of an earlier commit's setup.py,
# csrc and mamba_ssm) is built beside ours and benchmarked as the variant "base".
set -u
source "$(dirname "$0")/device_lib.sh" /tmp/scan_out
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; nvcc --version | tail -1; } > "$OUT/env.txt" 2>&1
stamp "start"

UP_SDIST=.upstream/mamba_ssm-2.3.2.post1.tar.gz
if [ -f "$UP_SDIST" ] && [ "${SKIP_UPSTREAM:-0}" != 1 ]; then
  PREBUILT=$(ls .upstream/selective_scan_cuda*.so.gz 2>/dev/null | head -1)
  ( PREBUILT_SO=$PREBUILT MAX_JOBS=10 bash tools/device/build_upstream.sh "$UP_SDIST" /tmp/upstream_build > "$OUT/upstream_build.log" 2>&1; echo $? > /tmp/upstream_rc ) &
  UP_PID=$!
fi

export TORCH_CUDA_ARCH_LIST=9.0
BASE_TREE=.upstream/baseline_tree.tar.gz
if [ -f "$BASE_TREE" ]; then
  rm -rf /tmp/base_tree && mkdir -p /tmp/base_tree && tar xzf "$BASE_TREE" -C /tmp/base_tree
  ( cd /tmp/base_tree && MAX_JOBS=4 python3 setup.py build_ext --inplace > "$OUT/base_build.log" 2>&1; echo $? > /tmp/base_rc ) &
  BASE_PID=$!
fi
MAX_JOBS=6 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
stamp "our build rc=$? ($(ls mamba_ssm/_selective_scan_cuda*.so 2>/dev/null))"

TRC=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m cuda tests/test_selective_scan_cuda.py -q -rf -p no:cacheprovider --durations=8 \
  > "$OUT/tests.log" 2>&1
TRC=$?
fi
stamp "tests rc=$TRC: $(tail -1 "$OUT/tests.log")"
if [ $TRC != 0 ] && [ "${FALLBACK_ENV:-}" != "" ]; then
  # the default failed: test the fallback setting too, and benchmark that one
  export $FALLBACK_ENV
  echo "=== fallback: $FALLBACK_ENV ===" >> "$OUT/tests.log"
  timeout ${TEST_TIMEOUT:-300} python3 -m pytest -m cuda tests/test_selective_scan_cuda.py -q -rf -p no:cacheprovider \
    -k "not sanitizer" >> "$OUT/tests.log" 2>&1
  stamp "fallback ($FALLBACK_ENV) tests rc=$?: $(tail -1 "$OUT/tests.log")"
fi

if [ -n "${UP_PID:-}" ]; then wait $UP_PID; stamp "upstream build rc=$(cat /tmp/upstream_rc)"; fi
if [ -z "${PREBUILT:-}" ] && [ "${RETURN_UPSTREAM_SO:-0}" = 1 ]; then  # hand the built extension back, to carry into later calls
  for so in /tmp/upstream_build/mamba_ssm-2.3.2.post1/selective_scan_cuda*.so; do
    [ -f "$so" ] && gzip -c "$so" > "$OUT/$(basename "$so").gz"
  done
fi
if [ -n "${BASE_PID:-}" ]; then
  wait $BASE_PID; stamp "baseline build rc=$(cat /tmp/base_rc)"
  [ "$(cat /tmp/base_rc)" = 0 ] && BENCH_ARGS="${BENCH_ARGS:-} --variants base:PYTHONPATH=/tmp/base_tree${BENCH_VARIANTS:+;$BENCH_VARIANTS}"
elif [ -n "${BENCH_VARIANTS:-}" ]; then
  BENCH_ARGS="${BENCH_ARGS:-} --variants $BENCH_VARIANTS"
fi
UP_ARG=""
[ -f /tmp/upstream_rc ] && [ "$(cat /tmp/upstream_rc)" = 0 ] && UP_ARG="--upstream-path /tmp/upstream_build/mamba_ssm-2.3.2.post1"
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/benchmark_selective_scan.py $UP_ARG --out-dir "$OUT" ${BENCH_ARGS:-} \
  > "$OUT/bench.log" 2>&1
stamp "bench rc=$?"
NCU_BIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ "${NCU:-1}" = 1 ] && [ -n "$NCU_BIN" ]; then
  env PYTHONPATH=$PWD ${NCU_ENV:-} timeout ${NCU_TIMEOUT:-90} "$NCU_BIN" --clock-control none -k regex:${NCU_KERNELS:-scan_} \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section ComputeWorkloadAnalysis \
    ${NCU_METRICS:+--metrics $NCU_METRICS} ${NCU_SOURCE:+--section SourceCounters -o /tmp/scan_job_prof -f} \
    $(for s in ${NCU_SECTIONS:-}; do printf -- '--section %s ' "$s"; done) \
    python3 tools/device/profile_scan_once.py ${NCU_SHAPE:-8 1536 2048 16} > "$OUT/ncu.txt" 2>&1
  stamp "ncu rc=$?"
  if [ -n "${NCU_SOURCE:-}" ]; then  # (a report was saved: its details, and the counters per SASS instruction)
    "$NCU_BIN" --import /tmp/scan_job_prof.ncu-rep --page details >> "$OUT/ncu.txt" 2>&1
    "$NCU_BIN" --import /tmp/scan_job_prof.ncu-rep --page source --print-source sass --csv 2> "$OUT/ncu_source.err" \
      | gzip > "$OUT/ncu_source.csv.gz"
    stamp "ncu source page ($(stat -c %s "$OUT/ncu_source.csv.gz") bytes gzipped)"
  fi
fi
grep -E "passed|failed|error" "$OUT/tests.log" | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-400 | head -40
tail -25 "$OUT/bench.log"
[ -f "$OUT/ncu.txt" ] && grep -E "scan_(fwd|bwd)(2|_tp)?_kernel|^ +(Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Issue Slots Busy|Issued Ipc Active|Warp Cycles Per Issued Instruction|Block Limit (Registers|Shared Mem)|smsp__average_warps_issue_stalled)" "$OUT/ncu.txt" | cut -c1-110 | head -70
# (the device tool returns at most 8 files: the build logs go back as one archive)
tar czf "$OUT/build_logs.tar.gz" -C "$OUT" --remove-files $(cd "$OUT" && ls env.txt build.log base_build.log upstream_build.log ncu_source.err 2>/dev/null)
stamp "end"
