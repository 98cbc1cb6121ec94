#!/usr/bin/env bash
# LoRA training-step throughput, this tree against an earlier commit, in one device call (one H200,
# about 4 minutes). Put the earlier commit in .baseline first and carry it:
#   rm -rf .baseline && mkdir .baseline && git archive <commit> | tar -x -C .baseline
#   device run (carry .baseline): OUT=$OUT bash tools/device/device_lora_ab.sh
# The CUDA extension is built once, here; the baseline must have the same csrc/ (it gets a copy).
# Also runs the GPU tests named in $TESTS, and profiles the 1.4b step of this tree (PROFILE=0: not).
# EXTRA_ARGS go to every benchmark_finetune.py run (e.g. "--lora-dropout 0.05"; the baseline tree
# must know them: copy the newer benchmarks/benchmark_finetune.py into .baseline).
set -u
source "$(dirname "$0")/device_lib.sh" /tmp/lora_ab_out
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py build_ext --inplace > /tmp/build.log 2>&1
rc=$?; stamp "build rc=$rc"; [ $rc != 0 ] && tail -30 /tmp/build.log >> "$OUT/job.log"  # (at most 8 files come back)
if ! diff -rq csrc .baseline/csrc > /dev/null; then stamp "WARNING: .baseline has other kernels; its timing uses ours"; fi
cp mamba_ssm/_selective_scan_cuda*.so .baseline/mamba_ssm/
TESTS=${TESTS:-tests/test_channel_first.py tests/test_causal_conv1d_triton.py tests/test_layer_norm.py tests/test_gpu_model.py}
PYTHONPATH=$PWD timeout ${TEST_TIMEOUT:-200} python3 -m pytest -m cuda -q -p no:cacheprovider $TESTS > "$OUT/tests.log" 2>&1
stamp "GPU tests rc=$?: $(tail -1 "$OUT/tests.log")"
run() {  # name dir shape batch rank [extra args]
  local name=$1 dir=$2 shape=$3 bs=$4 rank=$5; shift 5
  local out="$OUT/lora_${shape}_$name.json"
  [ "$name" = new_profiled ] && out=/tmp/lora_profiled.json  # (8 files come back)
  (cd "$dir" && PYTHONPATH=$PWD timeout 120 python3 benchmarks/benchmark_finetune.py --shape "$shape" --batch-size "$bs" \
     --seqlen 2048 --rank "$rank" --steps 6 --warmup 2 --out "$out" ${EXTRA_ARGS:-} "$@" > /dev/null 2>&1)
  stamp "LoRA $shape $name rc=$?"
}
run baseline .baseline 1.4b 4 64
run new . 1.4b 4 64
run baseline .baseline 130m 16 16
run new . 130m 16 16
[ "${PROFILE:-1}" = 1 ] && run new_profiled . 1.4b 4 64 --profile "$OUT/profile_1.4b.txt"
if [ "${CONV_BENCH:-1}" = 1 ]; then
  timeout 90 python3 benchmarks/benchmark_causal_conv1d.py --out "$OUT/causal_conv1d.json" 2>&1 | grep -v '^wrote' | tee -a "$OUT/job.log"
fi
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | cut -c1-300 | head -20
for f in "$OUT"/lora_*.json; do
  python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], round(d['train_step_tok_per_s'] or 0), 'tok/s', round(d['peak_mem_GB'], 1), 'GB', d.get('final_loss'))" "$f" 2>/dev/null
done
[ "${PROFILE:-1}" = 1 ] && head -40 "$OUT/profile_1.4b.txt" 2>/dev/null | cut -c1-100,150-200
stamp end
