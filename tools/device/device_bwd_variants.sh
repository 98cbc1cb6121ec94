#!/usr/bin/env bash
# Kernel design experiment in one device call: build the extension once per compile-time variant
# (csrc/selective_scan/scan_params.h switches), in parallel copies under /tmp, then check each
# against float64 on a few cases and time it. Ours only; upstream's figures come from the full job.
#   VARIANTS="name:-DX=1 -DY=2;name2:..." OUT=... bash tools/device/device_bwd_variants.sh
set -u
OUT=${OUT:-/tmp/variants_out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
IFS=';' read -ra VS <<< "${VARIANTS:?VARIANTS=name:flags;...}"
for v in "${VS[@]}"; do
  name=${v%%:*}; flags=${v#*:}
  dst=/tmp/var_$name; rm -rf "$dst"; mkdir -p "$dst"
  tar --exclude=.git --exclude=.whl --exclude=.devdata -cf - . | tar -xf - -C "$dst"
  ( cd "$dst" && MAMBA_SSM_NVCC_EXTRA="$flags" MAX_JOBS=4 python3 setup.py build_ext --inplace > "$OUT/build_$name.log" 2>&1; echo "$name build rc=$?" ) &
done
wait
for v in "${VS[@]}"; do
  name=${v%%:*}
  ( cd /tmp/var_$name && grep -E "bwd2.*registers|spill" "$OUT/build_$name.log" | head -2
    timeout 200 python3 -m pytest -m cuda tests/test_selective_scan_cuda.py -q -p no:cacheprovider -x \
      -k "${TEST_K:-d32 or d64 or d48 or d16 or deterministic}" > "$OUT/tests_$name.log" 2>&1
    echo "$name tests: $(tail -1 "$OUT/tests_$name.log")"
    timeout 200 python3 benchmarks/benchmark_selective_scan.py --no-ref --no-accuracy --out-dir "$OUT/bench_$name" \
      > "$OUT/bench_$name.log" 2>&1
    grep -E "ours" "$OUT/bench_$name.log" | sed "s/^/$name /" )
done
