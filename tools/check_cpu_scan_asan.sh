#!/usr/bin/env bash
# The CPU scan's C source under AddressSanitizer: builds it with -fsanitize=address and runs the tests
# that reach it (the C forward and backward, packed and grouped) with that library loaded.
#   bash tools/check_cpu_scan_asan.sh      (gcc; exit 0 and no report in $DIR/asan.log* when clean)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$(mktemp -d)
gcc -O1 -g -fsanitize=address -fno-omit-frame-pointer -march=native -ffp-contract=fast -fno-math-errno \
    -shared -fPIC -std=gnu11 mamba_ssm/ops/selective_scan_cpu.c -o "$DIR/scan_asan.so"
cat > "$DIR/asan_plugin.py" <<PY
def pytest_configure(config):
    from mamba_ssm.ops import selective_scan_cpu as cpu
    cpu._lib = cpu._load("$DIR/scan_asan.so")
PY
# libstdc++ preloaded with ASan, so that ASan can intercept the C++ exceptions torch throws
LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)" \
ASAN_OPTIONS=detect_leaks=0:log_path="$DIR/asan.log" PYTHONPATH="$DIR:$PWD" \
    python -m pytest -q -p asan_plugin tests/test_selective_scan_cpu.py tests/test_selective_scan.py \
    tests/test_packing.py tests/test_packed_model.py tests/test_recompute.py
if ls "$DIR"/asan.log* >/dev/null 2>&1; then
    echo "AddressSanitizer reports:"; cat "$DIR"/asan.log*; exit 1
fi
echo "clean (AddressSanitizer), $DIR"
