#!/usr/bin/env bash
# One device call for the fused decoding step: build ours (the prefill's scan) and upstream, GPU tests,
# the decode benchmark of the 1.4b shape (ours fused / gemv / eager, upstream; batch-major), then the
# dispatch rule's run (the partials and gemm paths forced, batch 1 4 16). Logs and JSONs go to $OUT.
#   run: bash benchmarks/device_decode_job.sh        (carry .upstream; ~8-9 minutes)
# Inputs in .upstream/ (not committed): mamba_ssm-2.3.2.post1.tar.gz (upstream's sdist, built beside;
# a selective_scan_cuda*.so.gz there skips its ~2.5 minute build), decode_base_tree.tar.gz (`git archive`
# of an earlier commit's setup.py csrc mamba_ssm: the variant "base", with BASE=1).
# Knobs (environment): SHAPE (1.4b), SKIP_TESTS=1, BASE=1, RULE=0 (no rule run), DEADLINE (seconds from the
# start by which the benchmarks stop starting children, 540), BENCH_ARGS (more benchmark_decode.py
# arguments), RETURN_UPSTREAM_SO=1 (hand upstream's built extension back, gzipped, to carry next time).
set -u
source "$(dirname "$0")/device_lib.sh" /tmp/decode_out
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
  > "$OUT/env.txt" 2>&1
stamp "start"
SHAPE=${SHAPE:-1.4b}
DEADLINE=${DEADLINE:-540}
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }   # seconds to the deadline
atleast() { [ "$2" -gt "$1" ] && echo "$2" || echo "$1"; }  # atleast MIN VALUE

UP_SDIST=.upstream/mamba_ssm-2.3.2.post1.tar.gz
if [ -f "$UP_SDIST" ]; then
  PREBUILT=$(ls .upstream/selective_scan_cuda*.so.gz 2>/dev/null | head -1)
  ( PREBUILT_SO=$PREBUILT MAX_JOBS=6 bash benchmarks/build_upstream.sh "$UP_SDIST" /tmp/upstream_build \
      > "$OUT/upstream_build.log" 2>&1; echo $? > /tmp/upstream_rc ) &
  UP_PID=$!
fi
export TORCH_CUDA_ARCH_LIST=9.0
if [ "${BASE:-0}" = 1 ] && [ -f .upstream/decode_base_tree.tar.gz ]; then
  rm -rf /tmp/base_tree && mkdir -p /tmp/base_tree && tar xzf .upstream/decode_base_tree.tar.gz -C /tmp/base_tree
  ( cd /tmp/base_tree && MAX_JOBS=4 python3 setup.py build_ext --inplace > "$OUT/base_build.log" 2>&1; echo $? > /tmp/base_rc ) &
  BASE_PID=$!
fi
( MAX_JOBS=6 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1; echo $? > /tmp/our_rc ) &
OUR_PID=$!

# the kernel tests need no extension: they run during the builds
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  timeout 240 python3 -m pytest -m cuda tests/test_decode_step.py tests/test_state_update_triton.py \
    tests/test_layer_norm.py -q -rf -p no:cacheprovider --durations=5 > "$OUT/tests.log" 2>&1
  stamp "decode-step tests rc=$?: $(tail -1 "$OUT/tests.log")"
fi
wait $OUR_PID; stamp "our build rc=$(cat /tmp/our_rc) ($(ls mamba_ssm/_selective_scan_cuda*.so 2>/dev/null))"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "=== tests/test_gpu_model.py ===" >> "$OUT/tests.log"
  timeout 120 python3 -m pytest -m cuda tests/test_gpu_model.py -q -rf -p no:cacheprovider >> "$OUT/tests.log" 2>&1
  stamp "model GPU tests rc=$?: $(tail -1 "$OUT/tests.log")"
fi

VARIANTS="fused:MAMBA_SSM_FUSED_STEP=1 gemv:MAMBA_SSM_FUSED_STEP=2 eager:MAMBA_SSM_FUSED_STEP=0"
if [ -n "${BASE_PID:-}" ]; then
  wait $BASE_PID; stamp "base build rc=$(cat /tmp/base_rc)"
  [ "$(cat /tmp/base_rc)" = 0 ] && VARIANTS="$VARIANTS base:PYTHONPATH=/tmp/base_tree"
fi
UP_ARG=""
if [ -n "${UP_PID:-}" ]; then
  wait $UP_PID; stamp "upstream build rc=$(cat /tmp/upstream_rc)"
  [ "$(cat /tmp/upstream_rc)" = 0 ] && UP_ARG="--upstream-path /tmp/upstream_build/mamba_ssm-2.3.2.post1"
  if [ -z "${PREBUILT:-}" ] && [ "${RETURN_UPSTREAM_SO:-0}" = 1 ]; then
    for so in /tmp/upstream_build/mamba_ssm-2.3.2.post1/selective_scan_cuda*.so; do
      [ -f "$so" ] && gzip -c "$so" > "$OUT/$(basename "$so").gz"
    done
  fi
fi

# the main run: about 60 s a batch size and variant set at 1.4b; stops starting children by DEADLINE - 90
timeout $(atleast 60 $(( $(left) + 60 ))) python3 benchmarks/benchmark_decode.py --shape "$SHAPE" --batch 1 16 64 \
  --gen-batch 1 16 64 128 --variants $VARIANTS $UP_ARG --budget-s $(atleast 1 $(( $(left) - 90 ))) \
  --child-timeout 150 --out-dir "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
stamp "bench rc=$?"
if [ "${RULE:-1}" = 1 ] && [ "$(left)" -gt 20 ]; then
  timeout $(( $(left) + 40 )) python3 benchmarks/benchmark_decode.py --shape "$SHAPE" --batch 1 4 16 --no-generation \
    --new-tokens 256 --variants partials:MAMBA_SSM_FUSED_STEP=partials gemm:MAMBA_SSM_FUSED_STEP=gemm \
    --budget-s "$(left)" --child-timeout 90 --results-dir /tmp/decode_rule --out-dir "$OUT/rule" > "$OUT/bench_rule.log" 2>&1
  stamp "rule bench rc=$?"
fi
grep -E "passed|failed|error" "$OUT/tests.log" 2>/dev/null | tail -3
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" 2>/dev/null | cut -c1-400 | head -30
tail -30 "$OUT/bench.log"
[ -f "$OUT/bench_rule.log" ] && tail -10 "$OUT/bench_rule.log"
# (the device tool returns a few files: the build logs go back as one archive)
tar czf "$OUT/build_logs.tar.gz" -C "$OUT" --remove-files $(cd "$OUT" && ls env.txt build.log base_build.log \
  upstream_build.log 2>/dev/null)
stamp "end"
