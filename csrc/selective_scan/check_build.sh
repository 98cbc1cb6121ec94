#!/usr/bin/env bash
# Build check of the scan kernels without a GPU or a CUDA build of torch (only nvcc): compiles the
# six kernel translation units (scan_{fwd,bwd}_{f32,f16,bf16}.cu) for sm_90 with the extension's
# flags, links them into one shared object (catches symbols defined in several units, which a
# single-unit compile does not), writes ptxas's registers and spills of every kernel to
# $OUT/ptxas.txt (diff two of them to check that a change left the kernels alone) and prints the
# bf16 ones; then a syntax check of the binding. Run it before spending device time.
#   bash csrc/selective_scan/check_build.sh [out_dir]
set -euo pipefail
cd "$(dirname "$0")"
OUT=${1:-/tmp/scan_check_build}
mkdir -p "$OUT"
FLAGS="-O3 -std=c++17 --use_fast_math --expt-relaxed-constexpr -U__CUDA_NO_HALF_OPERATORS__ \
  -U__CUDA_NO_HALF_CONVERSIONS__ -U__CUDA_NO_BFLOAT16_OPERATORS__ -U__CUDA_NO_BFLOAT16_CONVERSIONS__ \
  -arch=sm_90 ${MAMBA_SSM_NVCC_EXTRA:-}"
pids=()
for tu in scan_fwd_f32 scan_fwd_f16 scan_fwd_bf16 scan_bwd_f32 scan_bwd_f16 scan_bwd_bf16; do
  nvcc -c -Xcompiler -fPIC -Xptxas -v $FLAGS -o "$OUT/$tu.o" "$tu.cu" > "$OUT/$tu.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
if [ $rc != 0 ]; then grep -h -B2 -A5 "error" "$OUT"/*.log | head -40; echo "compile FAILED"; exit 1; fi
# (a shared object may leave the CUDA runtime's symbols undefined: only clashes matter here)
g++ -shared -o "$OUT/kernels.so" "$OUT"/*.o || { echo "link FAILED"; exit 1; }
# one line per kernel: unit, mangled name, stack/spills, registers/barriers/shared memory
for log in "$OUT"/scan_*.log; do
  awk -v unit="$(basename "$log" .log)" '
    /Compiling entry function/ { match($0, /function .[^'"'"']+/); name = substr($0, RSTART + 10, RLENGTH - 10); next }
    /Function properties for/ { props = $NF; next }
    /bytes stack frame/ && props == name { sub(/^ +/, ""); stack = $0; next }
    /Used [0-9]+ registers/ && name != "" { sub(/.*Used/, "Used"); print unit, name, "|", stack, "|", $0; name = "" }
  ' "$log"
done | sort > "$OUT/ptxas.txt"
grep "^scan_.*_bf16 " "$OUT/ptxas.txt" | sed -E 's/^[^ ]+ _ZN3ssm[0-9]+//'
echo "compile and link OK ($OUT/kernels.so)"
# The torch binding, syntax and types only, where a torch is importable (a CPU build ships the
# c10/cuda headers but not its generated cuda_cmake_macros.h, stubbed here).
if TI=$(python3 -c "import torch, os; print(os.path.join(os.path.dirname(torch.__file__), 'include'))" 2>/dev/null); then
  mkdir -p "$OUT/stub/c10/cuda/impl" && echo "#pragma once" > "$OUT/stub/c10/cuda/impl/cuda_cmake_macros.h"
  PYI=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
  CUI=${CUDA_HOME:-/usr/local/cuda}/include
  g++ -std=c++17 -w -fsyntax-only -I"$OUT/stub" -I"$TI" -I"$TI/torch/csrc/api/include" -I"$PYI" -I"$CUI" -I. scan_binding.cpp \
    && echo "binding syntax OK" || { echo "binding FAILED"; exit 1; }
fi
