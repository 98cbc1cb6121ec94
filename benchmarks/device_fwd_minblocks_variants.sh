#!/usr/bin/env bash
# One-off experiment (run 7 in csrc/selective_scan/NOTES.md): the forward built with
# SSM_FWD2_MIN_BLOCKS = 8 (the default, 128 registers), 10 (96) and 12 (80), each timed against
# upstream built in the same call. Results: benchmarks/results/scan_fwd_minblocks_h200_2026-11-28/.
#   device run (carry .upstream): OUT=... bash benchmarks/device_fwd_minblocks_variants.sh
set -u
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1
( PREBUILT_SO= MAX_JOBS=6 bash benchmarks/build_upstream.sh .upstream/mamba_ssm-2.3.2.post1.tar.gz /tmp/upstream_build > /tmp/up.log 2>&1; echo "upstream rc=$?" ) &
for mb in 8 10 12; do
  dst=/tmp/fvar_$mb; rm -rf $dst; mkdir -p $dst
  tar --exclude=.git --exclude=.whl --exclude=.devdata -cf - . | tar -xf - -C $dst
  ( cd $dst && MAMBA_SSM_NVCC_EXTRA="-DSSM_FWD2_MIN_BLOCKS=$mb" MAX_JOBS=3 python3 setup.py build_ext --inplace > /tmp/b_$mb.log 2>&1; echo "fwd mb $mb build rc=$?" ) &
done
wait
for mb in 8 10 12; do
  [ $mb != 8 ] && ( cd /tmp/fvar_$mb && timeout 100 python3 -m pytest -m cuda tests/test_selective_scan_cuda.py -q -p no:cacheprovider -x -k "d64 or d32 or split" 2>&1 | tail -1 )
  ( cd /tmp/fvar_$mb && timeout 150 python3 benchmarks/benchmark_selective_scan.py --no-ref --no-accuracy --upstream-path /tmp/upstream_build/mamba_ssm-2.3.2.post1 --out-dir $OUT/mb$mb > /tmp/bench_$mb.log 2>&1; grep -E "ours|upstream|speedup" /tmp/bench_$mb.log | sed "s/^/mb$mb /" )
done
