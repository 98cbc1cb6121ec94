#!/usr/bin/env bash
#SBATCH --job-name=mamba-math-study
#SBATCH --time=08:00:00
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --output=%x-%j.out
#SBATCH --error=%x-%j.err
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#
# The Mamba math study, end to end: fine-tune -> merge -> evaluate base and fine-tuned (lm-eval)
# -> generation benchmark (Mamba against a same-size transformer) -> report (markdown + charts).
#
#   bash run.sh                 # the embedded default: tiny base + synthetic word problems, CPU, offline, < 10 min
#   bash run.sh --quick         # (or QUICK=1) the shortened study CI runs (~2-3 min)
#   sbatch run.sh               # the same on a SLURM GPU node (job logs: mamba-math-study-<jobid>.out/.err)
#   sbatch run.sh --requeue     # a preempted job (SIGUSR1/SIGTERM) checkpoints, requeues itself and resumes
#   BASE_MODEL=state-spaces/mamba-1.4b TOKENIZER=../shared/tokenizers/gpt-neox-20b DATASET=openai/gsm8k \
#     HUB_CONFIG=main TASKS=gsm8k OUT_DIR=outputs/mamba-1.4b-gsm8k sbatch run.sh
#
# Every choice is an environment variable (below, with its default) or the matching flag
# (--out-dir DIR, --base-model M, --steps N, ...: the variable's name in lower case with dashes).
# Re-running skips the steps whose marker ($OUT_DIR/.done/<step>) exists and resumes a cut
# fine-tune from its newest checkpoint. Each step logs to $OUT_DIR/logs/<step>.log. A failing
# step stops the run with a non-zero status and its name. --force STEP (or FORCE=step1,step2)
# reruns named steps; --clean starts the whole study over.
set -uo pipefail

usage() { sed -n '/^# The Mamba math study/,/^set -uo/p' "$0" | grep -v '^set -uo' | sed 's/^# \{0,1\}//'; cat <<'EOF'
Variables (flag form: --lower-case-with-dashes VALUE):
  OUT_DIR        outputs/study (quick: outputs/study-quick)
  BASE_MODEL     mambakit/assets/tiny-mamba-arith      hub id or directory
  TOKENIZER      (the model's)                          directory or tokenizer.json
  DATASET        mambakit/assets/math-word-problems     hub id, file or directory (train/test)
  HUB_CONFIG     (none)     dataset configuration (e.g. main for openai/gsm8k)
  PRESET         gsm8k      field preset of the fine-tune data
  EVAL_SPLIT     test       held-out split for the fine-tune's own before/after exact match
  TASKS          synthetic_math   lm-eval tasks, comma-separated (synthetic_math: DATASET's test split, zero-shot)
  EVAL_LIMIT     (all)      lm-eval --limit
  EVAL_BATCH     auto       lm-eval --batch_size
  NUM_FEWSHOT    (task's)   lm-eval --num_fewshot
  EVAL_INCLUDE_PATH         lm-eval --include_path (default: $OUT_DIR/tasks when TASKS names synthetic_math)
  DEVICE         cuda if visible, else cpu
  DTYPE          auto       lm-eval/benchmark dtype (bf16 on GPU, fp32 on CPU)
  FT_MODE        lora       lora | full
  LORA_R 8  LORA_ALPHA 16  LORA_DROPOUT 0.0  TARGET_MODULES "in_proj x_proj dt_proj out_proj"
  STEPS 600 (quick 150)  LR 3e-3  BATCH 32  GRAD_ACCUM 1  MAX_LENGTH 128  WARMUP_RATIO 0.05  SCHEDULER cosine
  SAVE_STEPS 100  SEED 0  FT_EVAL_MAX 200 (held-out examples the fine-tune scores)  FT_EVAL_TOKENS 48
  FT_ARGS (extra finetune/finetune.py flags)
  BENCH_MODEL    (BASE_MODEL)   model timed by the generation benchmark (a size such as 1.4b: random weights)
  BENCH_BATCHES  "1 4 16"  BENCH_PROMPTLEN 64  BENCH_GENLEN 32  BENCH_REPEATS 2  BENCH_ARGS (extra, e.g. --cg)
  THREADS        torch CPU threads (default: all cores)
  STEPS_TO_RUN   finetune,merge,eval_base,eval_finetuned,bench,report
  QUICK          0          1: the shortened study
  REQUEUE        0          1: on SIGUSR1/SIGTERM, checkpoint and `scontrol requeue` the job
  FORCE          steps to rerun even if done; --clean removes OUT_DIR first
EOF
}

# ---------------------------------------------------------------------------- arguments
CLEAN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --quick) QUICK=1; shift ;;
    --requeue) REQUEUE=1; shift ;;
    --clean) CLEAN=1; shift ;;
    --force) FORCE="${FORCE:+$FORCE,}$2"; shift 2 ;;
    --*=*) k="${1%%=*}"; k="${k#--}"; k="${k//-/_}"; printf -v "${k^^}" '%s' "${1#*=}"; export "${k^^}"; shift ;;
    --*) [[ $# -ge 2 ]] || { echo "run.sh: $1 needs a value" >&2; exit 2; }
         k="${1#--}"; k="${k//-/_}"; printf -v "${k^^}" '%s' "$2"; export "${k^^}"; shift 2 ;;
    *) echo "run.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# The repository: where this file is (sbatch copies the script, so prefer the submit directory).
if [[ -n "${SLURM_SUBMIT_DIR:-}" && -f "${SLURM_SUBMIT_DIR}/run.sh" ]]; then ROOT="$SLURM_SUBMIT_DIR"
else ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"; fi
cd "$ROOT" || exit 1
PY="${PYTHON:-python}"

QUICK="${QUICK:-0}"
REQUEUE="${REQUEUE:-0}"
if [[ -z "${DEVICE:-}" ]]; then
  if "$PY" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then DEVICE=cuda; else DEVICE=cpu; fi
fi
if [[ "$QUICK" == 1 ]]; then
  : "${OUT_DIR:=outputs/study-quick}" "${STEPS:=150}" "${FT_EVAL_MAX:=40}" "${EVAL_LIMIT:=40}" "${BENCH_BATCHES:=1 4}"
  : "${BENCH_PROMPTLEN:=32}" "${BENCH_GENLEN:=16}" "${BENCH_REPEATS:=1}" "${SAVE_STEPS:=50}"
fi
: "${OUT_DIR:=outputs/study}"
: "${BASE_MODEL:=mambakit/assets/tiny-mamba-arith}"
: "${TOKENIZER:=}"
: "${DATASET:=mambakit/assets/math-word-problems}"
: "${HUB_CONFIG:=}" "${PRESET:=gsm8k}" "${EVAL_SPLIT:=test}"
: "${TASKS:=synthetic_math}" "${EVAL_LIMIT:=}" "${EVAL_BATCH:=auto}" "${NUM_FEWSHOT:=}" "${EVAL_INCLUDE_PATH:=}"
: "${DTYPE:=auto}" "${FT_MODE:=lora}"
: "${LORA_R:=8}" "${LORA_ALPHA:=16}" "${LORA_DROPOUT:=0.0}" "${TARGET_MODULES:=in_proj x_proj dt_proj out_proj}"
: "${STEPS:=600}" "${LR:=3e-3}" "${BATCH:=32}" "${GRAD_ACCUM:=1}" "${MAX_LENGTH:=128}" "${WARMUP_RATIO:=0.05}"
: "${SCHEDULER:=cosine}" "${SAVE_STEPS:=100}" "${SEED:=0}" "${FT_EVAL_MAX:=200}" "${FT_EVAL_TOKENS:=48}" "${FT_ARGS:=}"
: "${BENCH_MODEL:=$BASE_MODEL}" "${BENCH_BATCHES:=1 4 16}" "${BENCH_PROMPTLEN:=64}" "${BENCH_GENLEN:=32}"
: "${BENCH_REPEATS:=2}" "${BENCH_ARGS:=}" "${THREADS:=}"
: "${STEPS_TO_RUN:=finetune,merge,eval_base,eval_finetuned,bench,report}" "${FORCE:=}"
# Offline by default for the embedded study (everything it needs ships with the repository).
if [[ "$BASE_MODEL" == mambakit/assets/* && "$DATASET" == mambakit/assets/* ]]; then
  export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
fi
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
[[ -n "$THREADS" ]] && export OMP_NUM_THREADS="$THREADS"

if [[ "$CLEAN" == 1 && -d "$OUT_DIR" ]]; then rm -rf -- "$OUT_DIR"; fi
MARK="$OUT_DIR/.done"; LOGS="$OUT_DIR/logs"
mkdir -p "$MARK" "$LOGS" || { echo "run.sh: cannot create $OUT_DIR" >&2; exit 1; }
RUN_LOG="$LOGS/run.log"
T0=$SECONDS

say() { printf '[run.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$RUN_LOG"; }
fail() { say "FAILED at step '$1': $2 (log: $LOGS/$1.log)"; exit "${3:-1}"; }

# ---------------------------------------------------------------------------- signals / requeue
CHILD=""; CURRENT=""
on_signal() {
  local sig="$1"
  say "received SIG$sig during step '${CURRENT:-none}'"
  if [[ -n "$CHILD" ]] && kill -0 "$CHILD" 2>/dev/null; then
    # The fine-tune writes a checkpoint on SIGTERM/SIGUSR1 and exits (status 3). Background children
    # of a script ignore SIGINT, so Ctrl-C is passed on as SIGTERM.
    kill -s "$([[ $sig == INT ]] && echo TERM || echo "$sig")" "$CHILD" 2>/dev/null
    wait "$CHILD" 2>/dev/null
  fi
  if [[ "$REQUEUE" == 1 && -n "${SLURM_JOB_ID:-}" ]]; then
    say "requeueing job $SLURM_JOB_ID; the next run resumes from $OUT_DIR"
    scontrol requeue "$SLURM_JOB_ID" || say "scontrol requeue failed"
  fi
  say "stopped during step '${CURRENT:-none}'; run again to resume"
  exit 3
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT

want() { [[ ",$STEPS_TO_RUN," == *",$1,"* ]]; }
forced() { [[ ",$FORCE," == *",$1,"* ]]; }

# run_step NAME CMD...: skip when done; else run CMD with its output in $LOGS/NAME.log (and on the
# terminal), in the background so a signal reaches the trap at once; write the marker on success.
run_step() {
  local name="$1"; shift
  if ! want "$name"; then return 0; fi
  if [[ -f "$MARK/$name" ]] && ! forced "$name"; then say "step $name: done already (marker $MARK/$name), skipped"; return 0; fi
  rm -f "$MARK/$name"
  CURRENT="$name"
  local log="$LOGS/$name.log" t=$SECONDS rc
  say "step $name: start (log $log)"
  { echo "### $(date -u +%FT%TZ) $*"; } >>"$log"
  "$@" >>"$log" 2>&1 &
  CHILD=$!
  tail -n +2 -f "$log" --pid="$CHILD" 2>/dev/null &
  local tailer=$!
  wait "$CHILD"; rc=$?
  CHILD=""
  wait "$tailer" 2>/dev/null
  if [[ $rc -ne 0 ]]; then
    tail -n 20 "$log" | sed 's/^/    /'
    fail "$name" "exit status $rc after $((SECONDS - t)) s" "$rc"
  fi
  date -u +%FT%TZ >"$MARK/$name"
  echo "$((SECONDS - t))" >"$MARK/$name.seconds"
  say "step $name: done in $((SECONDS - t)) s"
  CURRENT=""
}

say "study in $OUT_DIR: base $BASE_MODEL, data $DATASET, tasks $TASKS, device $DEVICE, quick=$QUICK"
{ echo "date=$(date -u +%FT%TZ) host=$(hostname) git=$(git rev-parse --short HEAD 2>/dev/null)"
  for v in QUICK BASE_MODEL TOKENIZER DATASET HUB_CONFIG PRESET EVAL_SPLIT TASKS EVAL_LIMIT EVAL_BATCH NUM_FEWSHOT DEVICE \
           DTYPE FT_MODE LORA_R LORA_ALPHA LORA_DROPOUT TARGET_MODULES STEPS LR BATCH GRAD_ACCUM MAX_LENGTH WARMUP_RATIO \
           SCHEDULER SAVE_STEPS SEED FT_EVAL_MAX FT_EVAL_TOKENS FT_ARGS BENCH_MODEL BENCH_BATCHES BENCH_PROMPTLEN BENCH_GENLEN \
           BENCH_REPEATS BENCH_ARGS THREADS; do printf '%s=%q\n' "$v" "${!v}"; done; } >"$OUT_DIR/settings.env"

# ---------------------------------------------------------------------------- inputs
if [[ "$BASE_MODEL" == mambakit/assets/* && ! -f "$BASE_MODEL/config.json" ]]; then
  fail setup "the embedded base model $BASE_MODEL is missing (make it with: python finetune/pretrain_tiny.py)"
fi
FT="$OUT_DIR/finetune"; MERGED="$OUT_DIR/merged"; EVAL="$OUT_DIR/eval"; BENCH="$OUT_DIR/bench"; REPORT="$OUT_DIR/report"
TOK_ARG=(); [[ -n "$TOKENIZER" ]] && TOK_ARG=(--tokenizer "$TOKENIZER")
MA_TOK=""; [[ -n "$TOKENIZER" ]] && MA_TOK=",tokenizer=$TOKENIZER"

# The local lm-eval task over DATASET's splits (absolute paths, so it runs from anywhere).
if [[ ",$TASKS," == *",synthetic_math,"* && -z "$EVAL_INCLUDE_PATH" ]]; then
  EVAL_INCLUDE_PATH="$OUT_DIR/tasks"
  "$PY" -c 'import sys; from mambakit.data.synthetic import write_lm_eval_task as w; w(sys.argv[1], sys.argv[2])' \
    "$EVAL_INCLUDE_PATH" "$DATASET" >>"$LOGS/setup.log" 2>&1 \
    || fail setup "could not write the synthetic_math task from $DATASET (train.jsonl and test.jsonl needed)"
fi

# ---------------------------------------------------------------------------- 1. fine-tune
FT_FLAGS=(--model "$BASE_MODEL" "${TOK_ARG[@]}" --dataset "$DATASET" --output-dir "$FT" --resume
          --preset "$PRESET" --max-steps "$STEPS" --learning-rate "$LR" --batch-size "$BATCH"
          --grad-accum "$GRAD_ACCUM" --max-length "$MAX_LENGTH" --warmup-ratio "$WARMUP_RATIO"
          --lr-scheduler "$SCHEDULER" --save-steps "$SAVE_STEPS" --seed "$SEED" --no-progress
          --eval-max-examples "$FT_EVAL_MAX" --eval-max-new-tokens "$FT_EVAL_TOKENS")
[[ -n "$HUB_CONFIG" ]] && FT_FLAGS+=(--hub-config "$HUB_CONFIG")
[[ -n "$EVAL_SPLIT" ]] && FT_FLAGS+=(--eval-split "$EVAL_SPLIT")
if [[ "$FT_MODE" == full ]]; then FT_FLAGS+=(--full-finetune)
else
  # shellcheck disable=SC2206
  FT_FLAGS+=(--lora-r "$LORA_R" --lora-alpha "$LORA_ALPHA" --lora-dropout "$LORA_DROPOUT" --target-modules $TARGET_MODULES)
fi
# shellcheck disable=SC2206
FT_FLAGS+=($FT_ARGS)
run_step finetune "$PY" finetune/finetune.py "${FT_FLAGS[@]}"

# ---------------------------------------------------------------------------- 2. merge
if [[ "$FT_MODE" == full ]]; then TUNED="$FT/model"; else TUNED="$MERGED"; fi
if [[ "$FT_MODE" != full ]]; then
  run_step merge "$PY" finetune/merge.py --base "$BASE_MODEL" --adapter "$FT/adapter" --out "$MERGED" --overwrite "${TOK_ARG[@]}"
fi

# ---------------------------------------------------------------------------- 3. evaluate
eval_model() {  # eval_model NAME MODEL_DIR
  local args=(--model mamba --model_args "pretrained=$2$MA_TOK,dtype=$DTYPE" --tasks "$TASKS" --device "$DEVICE"
              --batch_size "$EVAL_BATCH" --output_path "$EVAL/$1" --seed "$SEED")
  [[ -n "$EVAL_LIMIT" ]] && args+=(--limit "$EVAL_LIMIT")
  [[ -n "$NUM_FEWSHOT" ]] && args+=(--num_fewshot "$NUM_FEWSHOT")
  [[ -n "$EVAL_INCLUDE_PATH" ]] && args+=(--include_path "$EVAL_INCLUDE_PATH")
  rm -rf -- "${EVAL:?}/$1"
  "$PY" evals/lm_harness_eval.py "${args[@]}"
}
run_step eval_base eval_model base "$BASE_MODEL"
run_step eval_finetuned eval_model finetuned "$TUNED"

# ---------------------------------------------------------------------------- 4. generation benchmark
bench() {
  local dt=()
  [[ "$DTYPE" != auto ]] && dt=(--dtype "$DTYPE")
  # shellcheck disable=SC2086,SC2206
  "$PY" benchmarks/benchmark_generation_mamba_simple.py --model-name "$BENCH_MODEL" --promptlen "$BENCH_PROMPTLEN" \
    --genlen "$BENCH_GENLEN" --batch $BENCH_BATCHES --repeats "$BENCH_REPEATS" --device "$DEVICE" "${dt[@]}" \
    --seed "$SEED" ${THREADS:+--threads "$THREADS"} --out-json "$BENCH/generation.json" --out-png "$BENCH/throughput.png" $BENCH_ARGS
}
run_step bench bench

# ---------------------------------------------------------------------------- 5. report
report() {
  local args=(--out "$REPORT" --title "Mamba math study: $(basename "$BASE_MODEL") on $(basename "$DATASET")")
  [[ -f "$MARK/eval_base" ]] && args+=(--eval "base=$EVAL/base")
  [[ -f "$MARK/eval_finetuned" ]] && args+=(--eval "finetuned=$EVAL/finetuned")
  [[ -f "$FT/summary.json" ]] && args+=(--finetune-summary "$FT/summary.json")
  [[ -f "$BENCH/generation.json" ]] && args+=(--generation "$BENCH/generation.json")
  [[ -f "$BASE_MODEL/pretrain_summary.json" ]] && args+=(--extra "base model pretraining=$BASE_MODEL/pretrain_summary.json")
  [[ -f "$MERGED/merge_info.json" ]] && args+=(--extra "merge check=$MERGED/merge_info.json")
  args+=(--note "Settings: \`$OUT_DIR/settings.env\`; step logs: \`$LOGS/\`; step times (s): $(
    for s in finetune merge eval_base eval_finetuned bench; do [[ -f "$MARK/$s.seconds" ]] && printf '%s %s; ' "$s" "$(cat "$MARK/$s.seconds")"; done)")
  "$PY" -m mambakit.report "${args[@]}"
}
run_step report report

say "study finished in $((SECONDS - T0)) s: $REPORT/report.md"
if [[ -f "$FT/summary.json" ]]; then
  "$PY" - "$FT/summary.json" <<'EOF' | tee -a "$RUN_LOG"
import json, sys
s = json.load(open(sys.argv[1]))
print(f"held-out exact match: base {s.get('accuracy_base')}, fine-tuned {s.get('accuracy_finetuned')} (source {sys.argv[1]})")
EOF
fi
exit 0
