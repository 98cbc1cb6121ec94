# Shared start of the tools/device/device_*.sh scripts (sourced, not run):
#   source "$(dirname "$0")/device_lib.sh" /tmp/default_out_dir
# sets OUT (the device tool's $OUT, else the default), creates it, unbuffers Python's output, and
# defines `stamp MESSAGE`: the message with the seconds since the start, also appended to
# $OUT/job.log.
OUT=${OUT:-$1}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/job.log"; }
