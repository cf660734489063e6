#!/usr/bin/env bash
# results/gpu/: the GPU training path checked end to end on one CUDA device, in at most 8 minutes.
#
#   bash experiments/gpu_check.sh
#   SMOLLM2=/path/to/smollm2-folder GEMMA3=/path/to/gemma3-folder bash experiments/gpu_check.sh
#
# Needs: torch with CUDA and triton, this repository's dependencies (the package is imported from src/),
# the base models (an embedded name whose wheel is installed or whose safetensors copy is under
# $CACHEAUG_HOME, or a local HF folder: SMOLLM2=..., GEMMA3=...) and ../shared/data/english_pd_prose
# (or DATA=...). Nothing is downloaded.
#
# Stages, each under its own time limit (seconds, overridable) so that the whole stays under 8 minutes:
#   1. tests      TESTS_S=60   the gpu-marked tests: flex = block forward and backward in fp32 (1e-4) and
#                              bf16 (2e-2 against fp32), no recompile after the first step, flex's peak
#                              memory below block's
#   2. benchmark  BENCH_S=90   benchmarks/train_step.py --device cuda at the paper's shape (T 2048, 128
#                              points, N_A 16, N_L 16, batch BATCH=4, bf16): flex, block, sdpa for SmolLM2-135M,
#                              then Gemma 3 270M and N_L 64 while the budget lasts (each JSON is written
#                              row by row, so a cut-short run keeps its rows)
#   3. training   TRAIN_S=240  SmolLM2-135M, default recipe (configs/prose-smollm2.yaml: readout token, gates,
#                              two learning rates), N_L 16, N_A 16, 128 points per 2048-token sequence,
#                              bf16, train.attention auto (= flex). STEPS from the benchmark's flex s/step to
#                              fit the budget; at TRAIN_S the run gets SIGINT, saves a checkpoint and stops
#   4. perplexity EVAL_S=40    `cacheaug eval perplexity` by position (offsets 1..32, latents every 16
#                              tokens) on the held-out prose test files (the split of prose_smollm2.sh), on
#                              the CPU cores, PPL_TOKENS=4096 tokens
# Then results/gpu/summary.md: device, versions, the status and time of every stage.
set -uo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}

if [ -z "${DATA:-}" ]; then
    for candidate in ../shared/data shared/data; do [ -d "$candidate/english_pd_prose" ] && DATA=$candidate && break; done
fi
DATA=${DATA:-../shared/data}
SMOLLM2=${SMOLLM2:-smollm2-135m}
GEMMA3=${GEMMA3:-gemma3-270m}
RUNS=${RUNS:-runs/gpu-check}
OUT=${OUT:-results/gpu}
TESTS_S=${TESTS_S:-60} BENCH_S=${BENCH_S:-90} TRAIN_S=${TRAIN_S:-240} EVAL_S=${EVAL_S:-40}
BATCH=${BATCH:-4} PPL_TOKENS=${PPL_TOKENS:-4096}
SPLITS=$RUNS/splits
mkdir -p "$OUT/logs" "$RUNS"
TIMINGS=$OUT/timings.txt
: > "$TIMINGS"
STATUS=()
source experiments/timed.sh

stage() {  # stage NAME SECONDS COMMAND...: timed, signalled (SIGNAL, default TERM) at SECONDS, killed GRACE s
    local name=$1 limit=$2 code   # later; its status is recorded and the script goes on
    shift 2
    timed "$name" timeout --preserve-status -s "${SIGNAL:-TERM}" -k "${GRACE:-10}" "$limit" "$@"
    code=$?
    STATUS+=("$name: exit $code (limit ${limit} s)")
    return $code
}

# ---------------------------------------------------------------- 0. the device, the data split
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    python -c "import torch, transformers; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| transformers', transformers.__version__, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    python -c "import triton; print('triton', triton.__version__)" 2>&1
    echo "git $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) files changed"
} > "$OUT/environment.txt"
cat "$OUT/environment.txt"
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || { echo "no CUDA device: nothing to check"; exit 1; }

source experiments/prose_splits.sh
prose_splits "$DATA" "$SPLITS"

# ---------------------------------------------------------------- 1. gpu-marked tests
stage tests "$TESTS_S" python -m pytest -m gpu -p no:cacheprovider -q -rs tests --junitxml "$OUT/tests.xml"

# ---------------------------------------------------------------- 2. benchmark at the paper's shape
BENCH_END=$((SECONDS + BENCH_S))
bench() {  # bench NAME MODEL N_L ATTENTIONS...: one benchmark run in what is left of BENCH_S
    local name=$1 model=$2 latents=$3 left=$((BENCH_END - SECONDS))
    shift 3
    if [ "$left" -lt 15 ]; then STATUS+=("$name: skipped (benchmark budget spent)"); return 0; fi
    stage "$name" "$left" python benchmarks/train_step.py --device cuda --model "$model" --prefix 2048 \
        --points 128 --num-ahead 16 --num-latents "$latents" --batch "$BATCH" --repeats 3 \
        --attention "$@" --json "$OUT/$name.json"
}
bench bench-smollm2-nl16 "$SMOLLM2" 16 flex block sdpa
bench bench-gemma3-nl16 "$GEMMA3" 16 flex block sdpa
bench bench-smollm2-nl64 "$SMOLLM2" 64 flex block

# ---------------------------------------------------------------- 3. four minutes of training
steps_for_budget() {  # steps that fit TRAIN_S after ~60 s of loading and compiling, at the benchmark's flex speed
    python - "$OUT/bench-smollm2-nl16.json" "$TRAIN_S" <<'EOF'
import json, sys
try:
    rows = json.load(open(sys.argv[1]))["rows"]
    seconds = next(r["seconds_per_step"] for r in rows if r["attention"] == "flex" and "seconds_per_step" in r)
    print(max(20, int((float(sys.argv[2]) - 60) / seconds)))
except Exception:
    print(300)
EOF
}
STEPS=${STEPS:-$(steps_for_budget)}
echo "training steps: $STEPS"
rm -rf "$RUNS/train"
sed "s|^model: .*|model: $SMOLLM2|" configs/prose-smollm2.yaml > "$RUNS/train.yaml"  # the model is no override
SIGNAL=INT GRACE=25 stage train "$TRAIN_S" python -m cacheaug.cli train --config "$RUNS/train.yaml" --overwrite \
    --train.output_dir "$RUNS/train" \
    --data.source "$SPLITS/train" --data.validation_source "$SPLITS/validation" --data.seq_len 2048 \
    --coprocessor.num_latents 16 --coprocessor.num_ahead 16 --coprocessor.num_points 128 \
    --train.batch_size "$BATCH" --train.grad_accum 1 --train.max_steps "$STEPS" --train.warmup_steps 20 \
    --train.precision bf16 --train.attention auto --train.eval_every 0 --train.eval_batches 2 \
    --train.save_every 0 --train.keep_last 1 --train.log_every 5
mkdir -p "$OUT/train"
cp "$RUNS/train"/{run_config.json,metrics.jsonl,final_eval.json,final_table.md,curves.png} "$OUT/train/" 2>/dev/null

# ---------------------------------------------------------------- 4. perplexity by position on held-out prose
CKPT=$(ls -d "$RUNS/train"/step-* 2>/dev/null | sort | tail -n 1)
if [ -n "$CKPT" ]; then
    stage perplexity "$EVAL_S" python -m cacheaug.cli eval perplexity --ckpt "$CKPT" --data "$SPLITS/test" \
        --name prose-test --seq-len 256 --every 16 --offsets 32 --max-tokens "$PPL_TOKENS" --out "$OUT"
else
    STATUS+=("perplexity: skipped (no checkpoint)")
fi

# ---------------------------------------------------------------- summary
{
    echo "# GPU check ($(date -u +%Y-%m-%dT%H:%MZ), ${SECONDS} s)"
    echo
    sed 's/^/    /' "$OUT/environment.txt"
    echo
    echo "## Stages"
    printf -- '- %s\n' "${STATUS[@]}"
    echo "(exit 130 for train: stopped by SIGINT at its limit, checkpoint saved; 143: killed at the limit)"
    echo
    echo "## Tests"
    tail -n 8 "$OUT/logs/tests.log" 2>/dev/null | sed 's/^/    /'
    echo
    echo "## Benchmark (seconds per step, tokens/s, peak memory, useful-FLOP MFU)"
    for log in "$OUT"/logs/bench-*.log; do [ -f "$log" ] && { echo "$(basename "$log" .log):"; grep -E '^(points|.*peak)' "$log" | sed 's/^/    /'; }; done
    echo
    echo "## Training (last logged steps; checkpoint ${CKPT:-none})"
    tail -n 3 "$OUT/train/metrics.jsonl" 2>/dev/null | sed 's/^/    /'
    echo
    echo "## Perplexity by position, prose test"
    cat "$OUT/perplexity-prose-test.md" 2>/dev/null
} > "$OUT/summary.md"
cat "$OUT/summary.md"
