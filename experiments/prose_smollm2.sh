#!/usr/bin/env bash
# results/prose-smollm2/: cache augmentation on SmolLM2-135M, trained on English public-domain prose.
#
#   bash experiments/prose_smollm2.sh            # everything, about 1 h 50 min on 2 CPU cores
#   STEPS=20 GSM8K_ITEMS=5 PPL_TOKENS=512 bash experiments/prose_smollm2.sh   # a quick dry run
#
# What it does (arXiv 2412.17747 sections 3.1-3.3, scaled to a CPU):
#   1. Splits ../shared/data/english_pd_prose by whole files into symlink folders under runs/:
#      validation = gutenberg/chesterton-thursday.txt + state_union/2005-GWBush.txt,
#      test       = gutenberg/austen-persuasion.txt + state_union/2006-GWBush.txt,
#      train      = the other 129 texts (the README.nltk.txt files are left out).
#   2. Trains four models with the SAME budget: STEPS optimiser steps x 1 sequence x 256 tokens
#      (250 x 256 = 64,000 training tokens each), 8 augmentation points per sequence, N_A = 16:
#        nl4, nl16, nl64  coprocessors (full copy of SmolLM2, pretrained init) with N_L = 4, 16, 64, lr 3e-4
#                         (the rate that trained best in results/quickstart/)
#        pause16          pause-token baseline, 16 trainable embeddings, no coprocessor, lr 1e-3
#                         (configs/pause-smollm2.yaml says why the learning rate differs)
#   3. Evaluates each on held-out text: perplexity of the k-th token (k = 1..32) after latents inserted
#      every 16th token, with and without latents, on the prose test files and on WikiText-2 test
#      (PPL_TOKENS tokens each, sequences of 256), and GSM8K 8-shot on the first GSM8K_ITEMS test items
#      (greedy, coprocessor called once at the end of the prompt). The plain base (no latents) is measured
#      in the same evaluations; for GSM8K once, in $OUT/base. Set COT=1 to add the base's zero-shot CoT.
#   4. Writes $OUT/report.md and its plots with `cacheaug report`.
#
# Time measured on 2 CPU cores (results/prose-smollm2/timings.txt):
#   training    nl4 636 s, nl16 718 s, nl64 1538 s, pause16 438 s                ~ 55 min
#   perplexity  2 datasets x 4 runs, 8192 tokens each, 74-172 s each             ~ 14 min
#   GSM8K       5 conditions x 250 items, 8 items per batch, 271-731 s each      ~ 40 min
#   total       ~1 h 50 min (COT=1 adds a few minutes). Every stage is skipped when its output exists,
#   and an interrupted training resumes, so the script can be rerun after a stop.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1

DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs/prose-smollm2}
OUT=${OUT:-results/prose-smollm2}
STEPS=${STEPS:-250}
GSM8K_ITEMS=${GSM8K_ITEMS:-250}
PPL_TOKENS=${PPL_TOKENS:-8192}
COT=${COT:-0}
SPLITS=$RUNS/splits
mkdir -p "$OUT/logs"
TIMINGS=$OUT/timings.txt

source experiments/timed.sh

# ---------------------------------------------------------------- 1. whole-file splits
source experiments/prose_splits.sh
prose_splits "$DATA" "$SPLITS"
echo "splits: $(ls "$SPLITS/train" | wc -l) train, $(ls "$SPLITS/validation" | wc -l) validation, $(ls "$SPLITS/test" | wc -l) test files"

# ---------------------------------------------------------------- 2. training, one budget for all
# name  config                      N_L  lr
RUN_TABLE="nl4 configs/paper-smollm2.yaml 4 3e-4
nl16 configs/paper-smollm2.yaml 16 3e-4
nl64 configs/paper-smollm2.yaml 64 3e-4
pause16 configs/pause-smollm2.yaml 16 1e-3"

SAVE_EVERY=$(( STEPS / 2 > 0 ? STEPS / 2 : 1 ))
while read -r name config latents lr; do
    if [ -f "$RUNS/$name/final_eval.json" ]; then continue; fi
    timed "train-$name" cacheaug train --config "$config" --resume \
        --train.output_dir "$RUNS/$name" \
        --data.source "$SPLITS/train" --data.validation_source "$SPLITS/validation" --data.seq_len 256 \
        --coprocessor.num_latents "$latents" --coprocessor.num_ahead 16 --coprocessor.num_points 8 \
        --train.max_steps "$STEPS" --train.lr "$lr" --train.batch_size 1 --train.grad_accum 1 --train.warmup_steps 20 \
        --train.eval_every 0 --train.eval_batches 4 --train.save_every "$SAVE_EVERY" --train.keep_last 1
done <<< "$RUN_TABLE"

# ---------------------------------------------------------------- 3. evaluation
STEP_DIR=step-$(printf %06d "$STEPS")
while read -r name config latents lr; do
    ckpt=$RUNS/$name/$STEP_DIR
    mkdir -p "$OUT/$name"
    cp "$RUNS/$name"/{run_config.json,metrics.jsonl,final_eval.json,final_table.md,curves.png} "$OUT/$name/" 2>/dev/null || true
    [ -f "$OUT/$name/perplexity-prose-test.json" ] || timed "ppl-prose-$name" \
        cacheaug eval perplexity --ckpt "$ckpt" --data "$SPLITS/test" --name prose-test \
        --seq-len 256 --every 16 --offsets 32 --max-tokens "$PPL_TOKENS" --out "$OUT/$name"
    [ -f "$OUT/$name/perplexity-wikitext2-test.json" ] || timed "ppl-wikitext-$name" \
        cacheaug eval perplexity --ckpt "$ckpt" --data "$DATA/wikitext2/test.txt" --name wikitext2-test \
        --seq-len 256 --every 16 --offsets 32 --max-tokens "$PPL_TOKENS" --out "$OUT/$name"
    [ -f "$OUT/$name/gsm8k-8shot.json" ] || timed "gsm8k-$name" \
        cacheaug eval gsm8k --ckpt "$ckpt" --data "$DATA/gsm8k/test.jsonl" --train-file "$DATA/gsm8k/train.jsonl" \
        --shots 8 --limit "$GSM8K_ITEMS" --max-new-tokens 192 --conditions augmented --out "$OUT/$name"
done <<< "$RUN_TABLE"

# The plain base: the same prompts, no latents (any checkpoint names the base; its coprocessor is unused).
mkdir -p "$OUT/base"
[ -f "$OUT/base/gsm8k-8shot.json" ] || timed "gsm8k-base" \
    cacheaug eval gsm8k --ckpt "$RUNS/nl4/$STEP_DIR" --data "$DATA/gsm8k/test.jsonl" --train-file "$DATA/gsm8k/train.jsonl" \
    --shots 8 --limit "$GSM8K_ITEMS" --max-new-tokens 192 --conditions base --out "$OUT/base"
if [ "$COT" = 1 ] && [ ! -f "$OUT/base/gsm8k-0shot-cot.json" ]; then
    timed "gsm8k-base-cot" \
        cacheaug eval gsm8k --ckpt "$RUNS/nl4/$STEP_DIR" --data "$DATA/gsm8k/test.jsonl" \
        --shots 0 --cot --limit "$GSM8K_ITEMS" --max-new-tokens 192 --conditions base --out "$OUT/base"
fi

# ---------------------------------------------------------------- 4. report
timed report cacheaug report "$OUT/base" "$OUT/nl4" "$OUT/nl16" "$OUT/nl64" "$OUT/pause16" --out "$OUT"
echo "done: $OUT/report.md"
