#!/usr/bin/env bash
# Build upstream mamba-ssm or causal-conv1d (PyPI sdists) in place, for sm_90 only, for side-by-side benchmarks.
#   bash tools/device/build_upstream.sh .upstream/mamba_ssm-2.3.2.post1.tar.gz /tmp/upstream_build
# Result: /tmp/upstream_build/mamba_ssm-2.3.2.post1 holds upstream's `mamba_ssm` package and its
# `selective_scan_cuda` extension; put that directory (alone) on PYTHONPATH to use it.
# Upstream's setup.py hard-codes many GPU architectures and tries to download a prebuilt
# wheel: MAMBA_FORCE_BUILD=TRUE stops the download, and the sed below keeps only sm_90.
# Nothing of upstream is committed to this repository.
set -euo pipefail
SDIST=${1:?sdist tarball}
DEST=${2:?build directory}
mkdir -p "$DEST"
tar xzf "$SDIST" -C "$DEST"
SRC="$DEST/$(basename "$SDIST" .tar.gz)"
cd "$SRC"
sed -i -E \
  -e 's/cc_flag\.append\("-gencode"\)/pass/' \
  -e 's/cc_flag\.append\("arch=compute_90,code=sm_90"\)/cc_flag += ["-gencode", "arch=compute_90,code=sm_90"]/' \
  -e 's/cc_flag\.append\("arch=compute_[0-9]+,code=sm_[0-9]+"\)/pass/' \
  setup.py
grep -n 'compute_' setup.py
# A selective_scan_cuda*.so built earlier by this script (same sdist, same torch) can be reused:
# PREBUILT_SO=path skips the ~2 minute build.
if [ -n "${PREBUILT_SO:-}" ] && [ -f "$PREBUILT_SO" ]; then
  case "$PREBUILT_SO" in
    *.gz) gunzip -c "$PREBUILT_SO" > "$SRC/$(basename "$PREBUILT_SO" .gz)" ;;
    *) cp "$PREBUILT_SO" "$SRC/" ;;
  esac
  ls "$SRC"/*.so
  exit 0
fi
export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
export TORCH_CUDA_ARCH_LIST=9.0
export MAX_JOBS=${MAX_JOBS:-8}
time python3 setup.py build_ext --inplace
ls "$SRC"/*.so
