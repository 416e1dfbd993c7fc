#!/usr/bin/env bash
# One prepared GPU benchmark run (issue 14 item 5), <= 8 minutes on one H100/H200, from the repository root:
#
#     bash scripts/bench/gpu.sh            # CUDA: the full run; no CUDA: tiny versions of every part (< 2 min)
#
# Parts, each in its own process with its own time limit (the run stops starting parts when BUDGET_S is spent):
#   (a) pretraining MFU: mfu.py, our LlmModel + chunked loss + our AdamW, bf16 autocast, 125M at 2k context, then
#       350M at 2k, 125M at 1k, 125M through our Trainer, 125M/350M with torch.compile as time allows;
#   (b) SFT tokens/s with packing, ours vs trl SFTTrainer(packing=True) on the same 125M folder (scale.py);
#   (c) generation tokens/s: greedy generate (default, static cache, compiled: generate.py --static --compile) of a
#       125M model vs transformers.generate, and GRPO-style sampled rollouts (rollout.py) vs transformers.generate;
#   (d) peak GPU memory of every part (max_memory_allocated; for (c) what each variant allocates above the weights);
#   (e) if time is left: packed_attention.py --device cuda --flex --lengths 8192 16384 32768.
# Prints one summary table (gpu_report.py); with $OUT set, writes summary.md, results.json and log.txt there.
#
# Offline install. A GPU box may have no network; put wheels in scripts/bench/wheels/ (git-ignored) beforehand:
#     python3 -m pip wheel --no-deps -w scripts/bench/wheels .           # llm_trainer itself
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d scripts/bench/wheels \
#         trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
# (the lent GPU image has torch, transformers, peft, accelerate, pyarrow, pandas, tokenizers, safetensors; trl and
# datasets, with datasets' dill and multiprocess, are what it lacks). Every *.whl there is installed with --no-deps
# into a private folder put first on PYTHONPATH; the benchmarks then import trl from it and llm_trainer from this
# checkout (the same source as the wheel, whose import is checked). With the device tool: name
# scripts/bench/wheels in `carry`. Without wheels the environment's packages are used.
#
# Environment: WHEELS (wheel folder), BUDGET_S (default 480), PYTHON (default python3), OUT (results folder).
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
WHEELS="${WHEELS:-$HERE/wheels}"
BUDGET_S="${BUDGET_S:-480}"
PY="${PYTHON:-python3}"
START=$(date +%s)
RES="$(mktemp -d "${TMPDIR:-/tmp}/gpu_bench.XXXXXX")"
LOG="$RES/log.txt"
STATUS="$RES/status.txt"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT" || exit 1

elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "[gpu.sh $(elapsed)s] $*" | tee -a "$LOG"; }

# part NAME LIMIT_S CMD...: run CMD under `timeout`, at most LIMIT_S and never past the budget (less 15 s kept for
# the report); its output goes to the terminal and the log; one line per part in status.txt.
part() {
    local name=$1 limit=$2 left rc
    shift 2
    left=$(( BUDGET_S - $(elapsed) - 15 ))
    if (( left < 20 )); then
        say "skip $name: the ${BUDGET_S}s budget is spent"
        echo "$name: skipped (budget spent)" >> "$STATUS"
        return 0
    fi
    (( limit > left )) && limit=$left
    say "start $name (limit ${limit}s): $*"
    local t0
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    local took=$(( $(date +%s) - t0 ))
    case $rc in
        0) echo "$name: ok (${took}s)" >> "$STATUS" ;;
        124|137) echo "$name: TIMED OUT after ${limit}s" >> "$STATUS" ;;
        *) echo "$name: FAILED, exit $rc (${took}s)" >> "$STATUS" ;;
    esac
    say "end $name: exit $rc after ${took}s"
}

# ---------------------------------------------------------------------------------------------------- install
if compgen -G "$WHEELS/*.whl" > /dev/null; then
    SITE="$RES/site"
    say "installing $(ls "$WHEELS"/*.whl | wc -l) wheel(s) from $WHEELS into $SITE"
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl >> "$LOG" 2>&1; then
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        if compgen -G "$WHEELS/llm_trainer-*.whl" > /dev/null; then      # the wheel itself imports
            (cd "$RES" && PYTHONPATH="$SITE" "$PY" -c \
                "import llm_trainer; print('llm_trainer wheel:', llm_trainer.__file__)") 2>&1 | tee -a "$LOG"
        fi
    else
        say "wheel install FAILED (see $LOG); using the environment's packages"
        echo "install: FAILED" >> "$STATUS"
    fi
fi
"$PY" - <<'EOF' 2>&1 | tee -a "$LOG" "$RES/device.txt"
from importlib import metadata
import torch
dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA (CPU fallback: tiny versions)"
print(f"device: {dev}; torch {torch.__version__}")
for name in ("transformers", "trl", "peft", "datasets", "accelerate", "llm_trainer"):
    try:
        print(f"  {name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"  {name}: NOT installed (the parts that need it will fail)")
EOF
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
B="scripts/bench"

# ------------------------------------------------------------------------------------------------------ parts
if [[ "$CUDA" == "1" ]]; then
    SHAPE125=(--vocab 32768 --hidden 768 --intermediate 2816 --layers 12 --heads 12 --kv-heads 4 --tie)
    # in priority order: one part of each of (a), (b), (c) first (worst case 405 s), then the rest as time allows
    part a_mfu_125M_2k 75 "$PY" $B/mfu.py --size 125M --seq 2048 --json "$RES/a_125M_2048.json"
    part b_sft_packed 150 "$PY" $B/scale.py --tasks sft_packed --sizes 125M --seqs 2048 --batch 8 --dtype bf16 \
        --repeats 2 --steps 8 --threads 8 --timeout 70 --dir "$RES/scale"
    part c_generate_b8 120 "$PY" $B/generate.py --device cuda --dtype bf16 --static --compile --batch 8 \
        --prompt-len 128 --new-tokens 128 --repeats 3 "${SHAPE125[@]}" --json "$RES/c_generate_b8.json"
    part c_rollout 60 "$PY" $B/rollout.py --device cuda --prompts 8 --group 8 --prompt-len 256 --new-tokens 128 \
        --repeats 3 --skip-single --skip-grpo --json "$RES/c_rollout.json"
    part a_mfu_350M_2k 90 "$PY" $B/mfu.py --size 350M --seq 2048 --batch 8 --json "$RES/a_350M_2048.json"
    part c_generate_b1 90 "$PY" $B/generate.py --device cuda --dtype bf16 --static --compile --batch 1 \
        --prompt-len 128 --new-tokens 128 --repeats 3 "${SHAPE125[@]}" --json "$RES/c_generate_b1.json"
    part a_mfu_125M_1k 75 "$PY" $B/mfu.py --size 125M --seq 1024 --json "$RES/a_125M_1024.json"
    part a_mfu_125M_trainer 75 "$PY" $B/mfu.py --size 125M --seq 2048 --mode trainer \
        --json "$RES/a_125M_2048_trainer.json"
    part a_mfu_125M_2k_compiled 100 "$PY" $B/mfu.py --size 125M --seq 2048 --compile \
        --json "$RES/a_125M_2048_compiled.json"
    part a_mfu_350M_2k_compiled 110 "$PY" $B/mfu.py --size 350M --seq 2048 --batch 8 --compile \
        --json "$RES/a_350M_2048_compiled.json"
    part e_packed_attention_flex 150 "$PY" $B/packed_attention.py --device cuda --flex --lengths 8192 16384 32768 \
        --repeats 1
else
    TINY=(--vocab 512 --hidden 64 --intermediate 128 --layers 1 --heads 2 --kv-heads 1)
    part a_mfu_tiny 40 "$PY" $B/mfu.py --size tiny --seq 128 --batch 4 --steps 3 --warmup 1 --json "$RES/a_tiny.json"
    part a_mfu_tiny_trainer 40 "$PY" $B/mfu.py --size tiny --seq 128 --batch 4 --steps 3 --warmup 1 --mode trainer \
        --json "$RES/a_tiny_trainer.json"
    part b_sft_packed 90 "$PY" $B/scale.py --tasks sft_packed --sizes tiny --seqs 128 --batch 2 --repeats 1 \
        --steps 2 --timeout 80 --dir "$RES/scale"
    part c_generate 40 "$PY" $B/generate.py --static --batch 2 --prompt-len 8 --new-tokens 8 --repeats 1 "${TINY[@]}" \
        --json "$RES/c_generate.json"
    part c_rollout 50 "$PY" $B/rollout.py --device cpu --threads 1 --prompts 2 --group 2 --prompt-len 16 \
        --new-tokens 8 --repeats 1 --skip-single --skip-grpo --json "$RES/c_rollout.json"
    part e_packed_attention 40 "$PY" $B/packed_attention.py --lengths 256 --min-doc 16 --max-doc 64 --repeats 1
fi

# ----------------------------------------------------------------------------------------------------- report
say "report"
"$PY" $B/gpu_report.py "$RES" --out "${OUT:-$RES}" 2>&1 | tee -a "$LOG"
if [[ -n "${OUT:-}" ]]; then
    cp "$LOG" "$OUT/log.txt"
fi
say "done in $(elapsed)s; results in ${OUT:-$RES}"
grep -q -E "FAILED|TIMED OUT" "$STATUS" && exit 1
exit 0
