#!/usr/bin/env bash
# results/prose-smollm2/ablations/: why a CPU-sized budget gives no gain (issue 4), on the cheapest model of
# experiments/prose_smollm2.sh (N_L = 4) and the same budget: 250 steps x 1 sequence x 256 tokens, 8 points,
# N_A = 16, the same splits. One setting changes per run:
#
#   lr1e-4, lr1e-3           learning rate (the main runs use 3e-4)
#   lora64                   LoRA rank 64 on a frozen copy (the paper's ablation), lr 1e-3
# (A trainable latent scale calibrated to the embedding std trained slower in results/quickstart/, so it is
# not repeated here.)
#
#   init-nl4, init-nl16      no training at all (step 0), for the starting gap
#
# Each is evaluated by perplexity by position on the held-out prose test files (8192 tokens, latents every 16th
# token, 32 offsets), like the main runs. About 10 minutes per trained setting, 2 per untrained one on 2 CPU cores.
#
#   bash experiments/prose_ablations.sh          # after experiments/prose_smollm2.sh (it reuses its splits)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1

RUNS=${RUNS:-runs/prose-smollm2}
OUT=${OUT:-results/prose-smollm2/ablations}
STEPS=${STEPS:-250}
PPL_TOKENS=${PPL_TOKENS:-8192}
SPLITS=$RUNS/splits
[ -d "$SPLITS/train" ] || { echo "run experiments/prose_smollm2.sh first (it makes $SPLITS)"; exit 2; }
mkdir -p "$OUT/logs"
TIMINGS=$OUT/timings.txt

source experiments/timed.sh

# name     overrides (on top of configs/prose-smollm2.yaml with N_L = 4)
ABLATIONS="lr1e-4 --train.lr 1e-4
lr1e-3 --train.lr 1e-3
lora64 --train.lr 1e-3 --coprocessor.lora_rank 64"

# Where training starts: the untrained coprocessors (seed 0, as `cacheaug train` builds them) of nl4 and nl16,
# saved as step-0 checkpoints and evaluated the same way. The gap at step 0 vs at step 250 shows whether
# training closes it.
for latents in 4 16; do
    name=init-nl$latents
    ckpt=$RUNS/$name/step-000000
    if [ ! -f "$ckpt/cacheaug_config.json" ]; then
        timed "save-$name" python -c "
import sys, torch
from cacheaug import AugmentedLM, load_base
from cacheaug.config import load_run_config
config = load_run_config('configs/prose-smollm2.yaml', {'coprocessor.num_latents': int(sys.argv[1]),
                         'coprocessor.num_ahead': 16, 'coprocessor.num_points': 8})
torch.manual_seed(config.train.seed)
base, _ = load_base(config.model, config.dtype)
AugmentedLM(base, config.coprocessor).save_pretrained(sys.argv[2])
" "$latents" "$ckpt"
    fi
    mkdir -p "$OUT/$name"
    [ -f "$OUT/$name/perplexity-prose-test.json" ] || timed "ppl-prose-$name" \
        cacheaug eval perplexity --ckpt "$ckpt" --data "$SPLITS/test" --name prose-test \
        --seq-len 256 --every 16 --offsets 32 --max-tokens "$PPL_TOKENS" --out "$OUT/$name"
done

STEP_DIR=step-$(printf %06d "$STEPS")
while read -r name overrides; do
    run=$RUNS/ablation-$name
    if [ ! -f "$run/final_eval.json" ]; then
        # shellcheck disable=SC2086  # the overrides are words
        timed "train-$name" cacheaug train --config configs/prose-smollm2.yaml --resume \
            --train.output_dir "$run" \
            --data.source "$SPLITS/train" --data.validation_source "$SPLITS/validation" --data.seq_len 256 \
            --coprocessor.num_latents 4 --coprocessor.num_ahead 16 --coprocessor.num_points 8 \
            --train.max_steps "$STEPS" --train.batch_size 1 --train.grad_accum 1 --train.warmup_steps 20 \
            --train.eval_every 0 --train.eval_batches 4 --train.save_every "$STEPS" --train.keep_last 1 $overrides
    fi
    mkdir -p "$OUT/$name"
    cp "$run"/{run_config.json,metrics.jsonl,final_eval.json,final_table.md,curves.png} "$OUT/$name/" 2>/dev/null || true
    [ -f "$OUT/$name/perplexity-prose-test.json" ] || timed "ppl-prose-$name" \
        cacheaug eval perplexity --ckpt "$run/$STEP_DIR" --data "$SPLITS/test" --name prose-test \
        --seq-len 256 --every 16 --offsets 32 --max-tokens "$PPL_TOKENS" --out "$OUT/$name"
done <<< "$ABLATIONS"

timed report cacheaug report "$OUT"/init-nl4 results/prose-smollm2/nl4 "$OUT"/init-nl16 results/prose-smollm2/nl16 "$OUT"/lr1e-4 "$OUT"/lr1e-3 "$OUT"/lora64 \
    --out "$OUT"
echo "done: $OUT/report.md"
