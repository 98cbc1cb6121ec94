#!/usr/bin/env bash
# One device call for the study's GPU figures: build our kernels, GPU tests, then the 1.4b
# measurements of issues 4-6 (generation vs a same-size transformer, LoRA fine-tune throughput,
# lm-eval requests/s vs transformers' MambaForCausalLM). Each step gets what is left of BUDGET_S.
#   device run: carry .whl (lm-eval, datasets and their deps) and .devdata (tokenizer, GSM8K)
set -u
source "$(dirname "$0")/device_lib.sh" /tmp/study_out
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
BUDGET_S=${BUDGET_S:-560}
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
cap() { local l; l=$(left); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    >> "$OUT/job.log" 2>&1
  export PYTHONPATH=$PWD:/tmp/site
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  python3 -c "import pyarrow, lm_eval, datasets; print('pyarrow', pyarrow.__version__, 'lm_eval', lm_eval.__version__, 'datasets', datasets.__version__)"
} >> "$OUT/job.log" 2>&1
# the card in result names (h100, h200, ...), as the benchmarks name their default files
CARD=$(python3 -c "from mambakit.bench.results import card_tag; print(card_tag('cuda'))" 2>/dev/null || echo gpu)
stamp "start ($CARD)"

TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout "$(cap 240)" python3 setup.py build_ext --inplace > /tmp/build.log 2>&1
stamp "build rc=$? $(ls mamba_ssm/_selective_scan_cuda*.so 2>/dev/null)"
tail -3 /tmp/build.log >> "$OUT/job.log"

timeout "$(cap ${TEST_S:-110})" python3 -m pytest -m cuda -q -rf -p no:cacheprovider \
  tests/test_gpu_model.py tests/test_state_update_triton.py tests/test_selective_scan_cuda.py -k "not sanitizer" \
  > "$OUT/tests.log" 2>&1
stamp "gpu tests rc=$?: $(tail -1 "$OUT/tests.log")"

timeout "$(cap ${GEN_S:-170})" python3 benchmarks/benchmark_generation_mamba_simple.py --model-name 1.4b \
  --promptlen 2048 --genlen 128 --batch 1 16 64 --repeats 2 --cg --tokenizer .devdata/gpt-neox-20b \
  --out-json "$OUT/generation_1.4b_$CARD.json" --out-png "$OUT/generation_1.4b_$CARD.png" > /tmp/gen.log 2>&1
stamp "generation rc=$?"; grep -E "tokens/s|Prompt length|Error|error" /tmp/gen.log | tail -12 | tee -a "$OUT/job.log"

timeout "$(cap ${FT_S:-70})" python3 benchmarks/benchmark_finetune.py --shape 1.4b --batch-size 4 --seqlen 2048 \
  --rank 64 --steps 6 --warmup 2 --device cuda --out "$OUT/finetune_lora_1.4b_$CARD.json" > /tmp/ft.log 2>&1
stamp "finetune rc=$?"; tail -6 /tmp/ft.log | tee -a "$OUT/job.log"

timeout "$(cap 400)" python3 benchmarks/benchmark_lm_eval.py --shape 1.4b --device cuda --batch_size 32 \
  --max_gen_toks ${LM_GEN_TOKS:-64} --tokenizer .devdata/gpt-neox-20b --gsm8k_dir .devdata/gsm8k \
  --out "$OUT" > /tmp/lm.log 2>&1
stamp "lm-eval rc=$?"; tail -12 /tmp/lm.log | tee -a "$OUT/job.log"
cat /tmp/gen.log /tmp/ft.log /tmp/lm.log > "$OUT/bench_logs.txt" 2>/dev/null
stamp "end"
