#!/usr/bin/env bash
# One device call that checks this tree on a GPU, in phases (PHASES, in this order):
#   build   ours (in place), an earlier tree of ours ("base": .upstream/baseline_tree.tar.gz, a `git archive`
#           of it) and upstream mamba-ssm + causal-conv1d (.upstream/*.tar.gz) in the background;
#           a phase that needs one waits for its build. Builds already there (a warm machine) are kept.
#   tests   the whole GPU suite: pytest -m cuda tests
#   scan    benchmarks/benchmark_selective_scan.py: ours, base and upstream, same shapes, same call
#   lora    benchmarks/benchmark_finetune.py at the 1.4b shape (batch 4 x 2048, r 64): base and ours
#           alternating, LORA_REPEATS each (the recipe's setup: fp32 adapters under bf16 autocast)
#   decode  benchmarks/benchmark_decode.py ms/token at DECODE_BATCHES: DECODE_VARIANTS and upstream
#   gen     benchmarks/benchmark_decode.py generation tokens/s and prefill at GEN_BATCHES, same variants
#   rule    the fused step's batch rule: the rule and its partials and gemm paths forced, ms/token at batch 1 2 4 8 16
#           (tools/device/decode_step_sweep.py, one process)
#   run: PHASES="build tests scan" bash tools/device/device_check_job.sh   (carry .upstream and .whl)
# Everything lands in $OUT (at most 8 files come back: logs are tarred at the end).
set -u
source "$(dirname "$0")/device_lib.sh" /tmp/check_out
PHASES=${PHASES:-"build tests scan lora decode"}
has() { [[ " $PHASES " == *" $1 "* ]]; }
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONPATH=$PWD
LOGS=/tmp/check_logs; mkdir -p $LOGS
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } > $LOGS/env.txt 2>&1
if ! python3 -c "import peft" 2>/dev/null && ls .whl/*.whl > /dev/null 2>&1; then  # the LoRA benchmark's PEFT
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export SITE=/tmp/site
  export PYTHONPATH=$PWD:$SITE
fi
stamp "start: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); phases: $PHASES"

UPB=/tmp/upstream_build; UP=$UPB/mamba_ssm-2.3.2.post1; BASE=/tmp/base_tree
build_upstream() {  # mamba-ssm and causal-conv1d, the latter's package copied beside the former
  [ -f $UP/.built ] && return 0
  MAX_JOBS=6 bash tools/device/build_upstream.sh .upstream/causal_conv1d-1.7.0.tar.gz $UPB > $LOGS/cc_build.log 2>&1 &
  MAX_JOBS=8 bash tools/device/build_upstream.sh .upstream/mamba_ssm-2.3.2.post1.tar.gz $UPB > $LOGS/upstream_build.log 2>&1
  local rc=$?; wait
  cp -r $UPB/causal_conv1d-1.7.0/causal_conv1d $UPB/causal_conv1d-1.7.0/causal_conv1d_cuda*.so $UP/ 2>>$LOGS/cc_build.log
  [ $rc = 0 ] && touch $UP/.built
}
build_base() {
  [ -f $BASE/.built ] && return 0
  rm -rf $BASE && mkdir -p $BASE && tar xzf .upstream/baseline_tree.tar.gz -C $BASE
  (cd $BASE && MAX_JOBS=4 python3 setup.py build_ext --inplace > $LOGS/base_build.log 2>&1) && touch $BASE/.built
}
if has build; then
  [ -f .upstream/mamba_ssm-2.3.2.post1.tar.gz ] && { build_upstream; echo $? > /tmp/up_rc; } &
  [ -f .upstream/baseline_tree.tar.gz ] && { build_base; echo $? > /tmp/base_rc; } &
  if ! ls mamba_ssm/_selective_scan_cuda*.so > /dev/null 2>&1; then
    MAX_JOBS=6 python3 setup.py build_ext --inplace > $LOGS/build.log 2>&1
  fi
  stamp "our build: $(ls mamba_ssm/_selective_scan_cuda*.so 2>/dev/null || echo FAILED)"
fi
wait_builds() { wait; stamp "base built: $([ -f $BASE/.built ] && echo yes || echo no); upstream built: $([ -f $UP/.built ] && echo yes || echo no)"; }

if has tests; then
  timeout ${TEST_TIMEOUT:-330} python3 -m pytest -m cuda tests -q -rfs -p no:cacheprovider --durations=10 > $OUT/tests.log 2>&1
  stamp "GPU suite rc=$?: $(tail -1 $OUT/tests.log)"
fi
wait_builds
UP_ARG=""; [ -f $UP/.built ] && UP_ARG="--upstream-path $UP"
if has scan; then
  VAR=""; [ -f $BASE/.built ] && VAR="--variants base:PYTHONPATH=$BASE"
  timeout ${SCAN_TIMEOUT:-200} python3 benchmarks/benchmark_selective_scan.py $UP_ARG $VAR --no-ref --out-dir $OUT > $LOGS/scan.log 2>&1
  stamp "scan benchmark rc=$?"; tail -22 $LOGS/scan.log
fi
if has lora; then
  lora() {  # name tree repeat
    (cd $2 && PYTHONPATH=$2${SITE:+:$SITE} timeout 150 python3 benchmarks/benchmark_finetune.py --shape 1.4b --batch-size 4 \
      --seqlen 2048 --rank 64 --steps ${LORA_STEPS:-10} --warmup 3 --out /tmp/lora_$1_$3.json > $LOGS/lora_$1_$3.log 2>&1)
    stamp "LoRA 1.4b $1 #$3 rc=$?"
  }
  for i in $(seq 1 ${LORA_REPEATS:-2}); do
    [ -f $BASE/.built ] && lora base $BASE $i
    lora ours $PWD $i
  done
  python3 - $OUT/lora_ab_1.4b.json /tmp/lora_*.json <<'EOF'
import json, sys
out, runs = sys.argv[1], {}
for p in sys.argv[2:]:
    runs[p.split("/")[-1][5:-5]] = json.load(open(p))
json.dump(runs, open(out, "w"), indent=1)
for k, d in sorted(runs.items()):
    print(f"{k:10s} step {d.get('train_step_tok_per_s') or 0:9.0f} tok/s  best {d.get('train_step_tok_per_s_best') or 0:9.0f}"
          f"  fwd+bwd {d.get('fwdbwd_tok_per_s') or 0:9.0f}  peak {d.get('peak_mem_GB') or 0:5.1f} GB")
EOF
fi
DECODE_VARIANTS=${DECODE_VARIANTS:-"fused:MAMBA_SSM_FUSED_STEP=1 eager:MAMBA_SSM_FUSED_STEP=0"}
if has decode; then
  # shellcheck disable=SC2086
  timeout ${DECODE_TIMEOUT:-330} python3 benchmarks/benchmark_decode.py --shape 1.4b --variants $DECODE_VARIANTS $UP_ARG \
    --batch ${DECODE_BATCHES:-1 16 64} --no-generation --budget-s ${DECODE_BUDGET:-270} --out-dir $OUT > $LOGS/decode.log 2>&1
  stamp "decode benchmark rc=$?"; tail -25 $LOGS/decode.log
fi
if has gen; then
  # shellcheck disable=SC2086
  timeout ${GEN_TIMEOUT:-330} python3 benchmarks/benchmark_decode.py --shape 1.4b --variants $DECODE_VARIANTS $UP_ARG \
    --gen-batch ${GEN_BATCHES:-1 16 64 128} --no-decode --budget-s ${GEN_BUDGET:-270} --out-dir $OUT > $LOGS/gen.log 2>&1
  stamp "generation benchmark rc=$?"; tail -25 $LOGS/gen.log
fi
if has rule; then
  timeout ${RULE_TIMEOUT:-150} python3 tools/device/decode_step_sweep.py --batch 1 2 4 8 16 --out $OUT/decode_rule.json \
    --configs '{"MODE": "1"}' '{"MODE": "partials"}' '{"MODE": "gemm"}' > $LOGS/rule.log 2>&1
  stamp "rule benchmark rc=$?"; tail -12 $LOGS/rule.log
fi
grep -E "^(FAILED|ERROR)" $OUT/tests.log 2>/dev/null | cut -c1-300 | head -30
tar czf $OUT/logs.tar.gz -C $LOGS . 2>/dev/null
stamp end
