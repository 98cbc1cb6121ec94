#!/usr/bin/env bash
# One device call: build our scan, run the whole GPU test suite (`pytest -m cuda tests`), then
# profile one forward and one backward of the scan with ncu, stall reasons per SASS instruction
# included (SourceCounters), to see where the kernels' cycles go. Everything goes to $OUT.
#   run: bash benchmarks/device_scan_ncu.sh      env: SHAPE="8 4096 2048 16", SKIP_SUITE=1
set -u
source "$(dirname "$0")/device_lib.sh" /tmp/scan_ncu_out
export TORCH_CUDA_ARCH_LIST=9.0
MAX_JOBS=8 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
stamp "build rc=$?"
if [ "${SKIP_SUITE:-0}" != 1 ]; then
  timeout ${SUITE_TIMEOUT:-300} python3 -m pytest -m cuda tests -q -rfs -p no:cacheprovider --durations=5 > "$OUT/gpu_tests.log" 2>&1
  stamp "gpu suite rc=$?: $(tail -1 "$OUT/gpu_tests.log")"
fi
NCU_BIN=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
[ -z "$NCU_BIN" ] && { stamp "no ncu"; exit 0; }
PYTHONPATH=$PWD timeout ${NCU_TIMEOUT:-150} "$NCU_BIN" --clock-control none -k regex:'scan_(fwd|bwd)2_kernel' \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section SourceCounters --section InstructionStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
  -o /tmp/scan_prof -f python3 benchmarks/profile_scan_once.py ${SHAPE:-8 4096 2048 16} > "$OUT/ncu_run.log" 2>&1
stamp "ncu rc=$?"
"$NCU_BIN" --import /tmp/scan_prof.ncu-rep --page details > "$OUT/ncu_details.txt" 2>&1
# per-SASS-instruction counters (executed instructions, stall samples), one CSV per kernel
"$NCU_BIN" --import /tmp/scan_prof.ncu-rep --page source --print-source sass --csv > /tmp/ncu_source.csv 2> "$OUT/ncu_source.err"
stamp "source page rc=$? ($(wc -c < /tmp/ncu_source.csv) bytes)"
gzip -c /tmp/ncu_source.csv > "$OUT/ncu_source.csv.gz"
grep -E "scan_(fwd|bwd)2_kernel|Duration|Registers Per|Achieved Occupancy|Issue Slots Busy|Warp Cycles Per Issued|Stall|Executed Ipc" "$OUT/ncu_details.txt" | head -60
stamp end
