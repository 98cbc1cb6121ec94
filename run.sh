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
#   bash run.sh                 # the embedded default (configs/study_tiny.yaml): tiny base model,
#                               # synthetic word problems, CPU, offline, < 10 min
#   bash run.sh --quick         # (or QUICK=1) the shortened study CI runs (~2-3 min)
#   sbatch run.sh               # the same on a SLURM GPU node (job logs: mamba-math-study-<jobid>.out/.err)
#   sbatch run.sh --requeue     # a preempted job (SIGUSR1/SIGTERM) checkpoints, requeues itself and resumes
#   CONFIG=configs/mamba-1.4b-gsm8k.yaml TASKS=gsm8k OUT_DIR=outputs/mamba-1.4b-gsm8k sbatch run.sh
#
# The fine-tune is set by CONFIG, a file of FinetuneConfig's fields from which every step also
# takes the model and the data, and by FT_ARGS, finetune/finetune.py flags over it (for example
# FT_ARGS="--max-steps 50 --learning-rate 1e-3"). The variables below (or the matching flag:
# --out-dir DIR, --tasks T, ...) choose the evaluation, the benchmark and the steps.
# Re-running skips the steps whose marker ($OUT_DIR/.done/<step>) exists and resumes a cut
# fine-tune from its newest checkpoint. Each step logs to $OUT_DIR/logs/<step>.log. A failing
# step stops the run with a non-zero status and its name. --force STEP (or FORCE=step1,step2)
# reruns named steps; --clean starts the whole study over.
set -uo pipefail

usage() { sed -n '/^# The Mamba math study/,/^set -uo/p' "$0" | grep -v '^set -uo' | sed 's/^# \{0,1\}//'; cat <<'EOF'
Variables (flag form: --lower-case-with-dashes VALUE):
  CONFIG         configs/study_tiny.yaml   the fine-tune's config (FinetuneConfig fields)
  FT_ARGS        (none)     finetune/finetune.py flags over CONFIG (finetune/finetune.py --help)
  OUT_DIR        outputs/study (quick: outputs/study-quick)
  TASKS          synthetic_math   lm-eval tasks, comma-separated (synthetic_math: the data set's test split, zero-shot)
  EVAL_LIMIT     (all)      lm-eval --limit
  EVAL_BATCH     auto       lm-eval --batch_size
  NUM_FEWSHOT    (task's)   lm-eval --num_fewshot
  EVAL_INCLUDE_PATH         lm-eval --include_path (default: $OUT_DIR/tasks when TASKS names synthetic_math)
  DEVICE         cuda if visible, else cpu
  DTYPE          auto       lm-eval/benchmark dtype (bf16 on GPU, fp32 on CPU)
  BENCH_MODEL    (the config's model)   model the generation benchmark times (a size such as 1.4b: random weights)
  BENCH_BATCHES  "1 4 16"  BENCH_PROMPTLEN 64  BENCH_GENLEN 32  BENCH_REPEATS 2  BENCH_ARGS (extra, e.g. --cg)
  THREADS        torch CPU threads (default: all cores)
  STEPS_TO_RUN   finetune,merge,eval_base,eval_finetuned,bench,report
  QUICK          0          1: the shortened study (FT_ARGS gains --max-steps 150 --eval-max-examples 40 --save-steps 50)
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
: "${CONFIG:=configs/study_tiny.yaml}" "${FT_ARGS:=}"
if [[ "$QUICK" == 1 ]]; then
  : "${OUT_DIR:=outputs/study-quick}" "${EVAL_LIMIT:=40}" "${BENCH_BATCHES:=1 4}"
  : "${BENCH_PROMPTLEN:=32}" "${BENCH_GENLEN:=16}" "${BENCH_REPEATS:=1}"
  FT_ARGS="--max-steps 150 --eval-max-examples 40 --save-steps 50 $FT_ARGS"
fi
: "${OUT_DIR:=outputs/study}"
: "${TASKS:=synthetic_math}" "${EVAL_LIMIT:=}" "${EVAL_BATCH:=auto}" "${NUM_FEWSHOT:=}" "${EVAL_INCLUDE_PATH:=}"
: "${DTYPE:=auto}" "${BENCH_MODEL:=}" "${BENCH_BATCHES:=1 4 16}" "${BENCH_PROMPTLEN:=64}" "${BENCH_GENLEN:=32}"
: "${BENCH_REPEATS:=2}" "${BENCH_ARGS:=}" "${THREADS:=}"
: "${STEPS_TO_RUN:=finetune,merge,eval_base,eval_finetuned,bench,report}" "${FORCE:=}"
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

# ---------------------------------------------------------------------------- the fine-tune's settings
FT="$OUT_DIR/finetune"; MERGED="$OUT_DIR/merged"; EVAL="$OUT_DIR/eval"; BENCH="$OUT_DIR/bench"; REPORT="$OUT_DIR/report"
# shellcheck disable=SC2206
FT_CMD=("$PY" finetune/finetune.py --config "$CONFIG" $FT_ARGS --output-dir "$FT" --resume)
# The resolved config (CONFIG, then FT_ARGS) names the model and the data for every step.
if ! SETTINGS=$("${FT_CMD[@]}" --print-config 2>>"$LOGS/setup.log" | "$PY" -c '
import json, shlex, sys
c = json.load(sys.stdin)
for var, key in (("BASE_MODEL", "model"), ("TOKENIZER", "tokenizer"), ("DATASET", "dataset"),
                 ("FULL_FINETUNE", "full_finetune"), ("SEED", "seed")):
    v = c[key]
    v = int(v) if isinstance(v, bool) else ("" if v is None else v)
    print(var + "=" + shlex.quote(str(v)))
' 2>>"$LOGS/setup.log"); then
  fail setup "CONFIG=$CONFIG with FT_ARGS='$FT_ARGS' is not a valid fine-tune configuration"
fi
eval "$SETTINGS"
: "${BENCH_MODEL:=$BASE_MODEL}"
# Offline by default for the embedded study (everything it needs ships with the repository).
if [[ "$BASE_MODEL" == mambakit/assets/* && "$DATASET" == mambakit/assets/* ]]; then
  export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
fi

say "study in $OUT_DIR: config $CONFIG${FT_ARGS:+ with $FT_ARGS}, base $BASE_MODEL, data $DATASET, tasks $TASKS, device $DEVICE, quick=$QUICK"
{ echo "date=$(date -u +%FT%TZ) host=$(hostname) git=$(git rev-parse --short HEAD 2>/dev/null)"
  for v in CONFIG FT_ARGS QUICK TASKS EVAL_LIMIT EVAL_BATCH NUM_FEWSHOT DEVICE DTYPE BENCH_MODEL BENCH_BATCHES \
           BENCH_PROMPTLEN BENCH_GENLEN BENCH_REPEATS BENCH_ARGS THREADS; do printf '%s=%q\n' "$v" "${!v}"; done
  echo "# the fine-tune's resolved config: $FT/run_config.json"; } >"$OUT_DIR/settings.env"

# ---------------------------------------------------------------------------- inputs
if [[ "$BASE_MODEL" == mambakit/assets/* && ! -f "$BASE_MODEL/config.json" ]]; then
  fail setup "the embedded base model $BASE_MODEL is missing (make it with: python finetune/pretrain_tiny.py)"
fi
TOK_ARG=(); [[ -n "$TOKENIZER" ]] && TOK_ARG=(--tokenizer "$TOKENIZER")
MA_TOK=""; [[ -n "$TOKENIZER" ]] && MA_TOK=",tokenizer=$TOKENIZER"

# The local lm-eval task over the data set's splits (absolute paths, so it runs from anywhere).
if [[ ",$TASKS," == *",synthetic_math,"* && -z "$EVAL_INCLUDE_PATH" ]]; then
  EVAL_INCLUDE_PATH="$OUT_DIR/tasks"
  "$PY" -c 'import sys; from mambakit.data.synthetic import write_lm_eval_task as w; w(sys.argv[1], sys.argv[2])' \
    "$EVAL_INCLUDE_PATH" "$DATASET" >>"$LOGS/setup.log" 2>&1 \
    || fail setup "could not write the synthetic_math task from $DATASET (train.jsonl and test.jsonl needed)"
fi

# ---------------------------------------------------------------------------- 1. fine-tune
run_step finetune "${FT_CMD[@]}"

# ---------------------------------------------------------------------------- 2. merge
if [[ "$FULL_FINETUNE" == 1 ]]; then TUNED="$FT/model"; else TUNED="$MERGED"; fi
if [[ "$FULL_FINETUNE" != 1 ]]; then
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
  args+=(--note "Settings: \`$OUT_DIR/settings.env\` and \`$FT/run_config.json\`; step logs: \`$LOGS/\`; step times (s): $(
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
