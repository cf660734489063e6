#!/usr/bin/env bash
# results/recipe-smollm2/: the do-no-harm recipe against the paper's recipe and pause tokens, SmolLM2-135M on
# English public-domain prose (the splits of experiments/prose_smollm2.sh).
#
#   bash experiments/recipe_smollm2.sh                       # everything (see timings.txt: about 2 h 30 min)
#   RUNS_ONLY="recipe16 paper16" bash experiments/recipe_smollm2.sh   # a subset of the run table
#   STEPS_SCALE=0.04 PPL_TOKENS=512 bash experiments/recipe_smollm2.sh  # a quick dry run
#
# Every run has the same data and batch: 1 sequence x 256 tokens per step, 8 augmentation points, N_A 16,
# body lr 3e-4 (pause: 1e-3), 20 warmup steps, cosine to 10%. What differs is in the run table:
#   readout  latent = the last latent predicts x_{t+1} (paper); token = x_t read again after the latents
#   gate     zero-initialised tanh gate per layer and head on the latent keys (exact no-op at step 0)
#   init     soft tokens: random (Gaussian) or vocab (embeddings of random tokens)
#   ilr      learning rate of soft tokens + gates ("-": the body's)
#   recipe16-kl adds KL(augmented || base) on the scored tokens, weight 1.0 at step 0 decaying linearly to 0 at
#   step 1000 (0.5 at its last step, 500): a pull toward the base where the latents do not help (out of domain)
#   res16 / res16-kl: latents = soft tokens + r * the coprocessor's output (latent_residual, r = 0 at start), so
#   training starts as pause16 and the coprocessor adds to it; res16-kl with recipe16-kl's KL
#   res16-r1: res16 with r = 1 at start (a skip connection around the coprocessor; the closed gates still make step 0
#   the base)
#   res16-r1-lora / res16-r1-slow: res16-r1 with the copy kept near the base, by LoRA rank 16 on every linear layer
#   (lr 1e-3, the adapters' usual) or by a 3x smaller body lr (1e-4, the paper's)
#   res16-mat / res16-mat-slow: res16 with r an (H, H) matrix starting at 0 (latent_residual_matrix), trained with
#   the body at lr 3e-4 / 1e-4, so the coprocessor's output can enter along any direction; res16-mat-lr3e-5 at 3e-5;
#   res16-mat-slow-kl: res16-mat-slow + recipe16-kl's KL
#   pause16-seed1: pause16 with another training seed (soft tokens, augmentation points), the same data: how far two
#   trainings of one recipe differ, to read the paired differences between recipes against (prose only);
#   pause16-seed2, res16-mat-slow-seed1: more seeds of both, to compare the recipes across trainings (prose only;
#   recipe_report.py's SEEDS)
#   pause16-kl: pause16 trained with recipe16-kl's KL, the pause baseline with the default's loss
#   res16-mat-slow-klc: res16-mat-slow-kl with the KL weight constant at 1.0 (kl_anneal_steps null), a steadier pull
#   toward the base out of domain
#   pause16-kl-seed1, recipe16-kl-seed1: a second seed of each, to compare the default with the pause baseline across
#   trainings on both test sets (recipe_report.py's SEEDS)
#   recipe16-kl-slow, recipe16-kl-slow-seed1: recipe16-kl with the body at lr 1e-4 (two seeds), the body lr that
#   helped res16-r1 and the matrix by 0.7-0.8 points in domain, about recipe16-kl's gap to pause16-kl
#   recipe16-kl-1k, pause16-kl-1k: recipe16-kl and pause16-kl trained twice as long (1000 steps, the KL annealed to 0
#   at the last step; over the 40-minute budget): whether the coprocessor's in-domain gap to the pause tokens shrinks
#   with training
#   recipe16-kl-seed2, pause16-kl-seed2: a third seed of the default (is its WikiText-2 upper end under +0.5% in most
#   trainings?) and of pause16-kl, three against three
#   recipe16-kl-p16, pause16-kl-p16: recipe16-kl and pause16-kl with 16 augmentation points per sequence instead of 8
#   (one every 16 tokens, the paper's density; the same tokens, twice the scored windows per step): whether the
#   coprocessor, with 106M parameters to train against the pause tokens' 9.5k, gains more from the denser signal
#   recipe16-kl-fast: recipe16-kl with the body at lr 1e-3, 3x the default's (the slow runs, 3x below, were worse on
#   both sets)
#   res16-mat-slow-kl03: res16-mat-slow with a weaker KL (0.3, annealed to 0 at step 1000): can the recipe that beats
#   pause16 in domain keep that lead and still pass WikiText-2?
#   pause16-kl03: the pause baseline with res16-mat-slow-kl03's weaker KL (is its lead over pause16 the coprocessor's, or
#   the weaker KL's?)
#   recipe16-kl-seed3: a fourth seed of the default, whose checkpoint experiments/context_swap.py also reads
#   (as it reads recipe16-kl-p16's, res16-mat-slow-kl03's and recipe16-kl-1k's)
#   recipe4-kl: recipe16-kl at N_L 4 with the same 500 steps (the target: N_L 16 at least as good as N_L 4)
# The eval column: full = prose and WikiText-2, prose = prose only, ablation = prose with ABLATION_TOKENS.
# Evaluation: perplexity of the k-th token (k = 1..32) after latents inserted every 16th token, with and
# without latents, 95% bootstrap intervals over sequences, on the prose test files and WikiText-2 test
# (PPL_TOKENS tokens each = 72 sequences of 256 = 1,008 insertion points per offset); ablation runs on
# prose only, ABLATION_TOKENS tokens. Training curves: the in-loop validation every 50 steps (k = 1..16).
# Every stage is skipped when its output exists, and an interrupted training resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1

DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs/recipe-smollm2}
OUT=${OUT:-results/recipe-smollm2}
SPLITS=${SPLITS:-runs/prose-smollm2/splits}
PPL_TOKENS=${PPL_TOKENS:-18432}
ABLATION_TOKENS=${ABLATION_TOKENS:-8192}
STEPS_SCALE=${STEPS_SCALE:-1}
RUNS_ONLY=${RUNS_ONLY:-}
mkdir -p "$OUT/logs"
TIMINGS=$OUT/timings.txt
source experiments/timed.sh

# ---------------------------------------------------------------- whole-file splits (as prose_smollm2.sh)
source experiments/prose_splits.sh
prose_splits "$DATA" "$SPLITS"

# ---------------------------------------------------------------- the run table, in the order run
# name     method      N_L steps readout gate  init   lr   ilr   eval  [more train flags]
# The paper's recipe is not rerun: results/prose-smollm2/nl16 and nl4 trained it with the same data, batch, points,
# N_A, lr and warmup for 250 steps (bash experiments/prose_smollm2.sh); recipe16's step-250 checkpoint is
# evaluated beside them (stage below), gate16 and token16 take one change away at that budget, and recipe64 (N_L 64)
# is compared with recipe16-step250 and recipe4 at that budget.
RUN_TABLE="recipe16 coprocessor 16 500 token true vocab 3e-4 1e-2 full
pause16 pause 16 500 token true vocab 1e-3 1e-2 full
recipe4 coprocessor 4 250 token true vocab 3e-4 1e-2 full
gate16 coprocessor 16 250 token true random 3e-4 - ablation
token16 coprocessor 16 250 token false random 3e-4 - ablation
recipe64 coprocessor 64 250 token true vocab 3e-4 1e-2 full
recipe16-kl coprocessor 16 500 token true vocab 3e-4 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000
res16 coprocessor 16 500 token true vocab 3e-4 1e-2 full --coprocessor.latent_residual true
res16-kl coprocessor 16 500 token true vocab 3e-4 1e-2 full --coprocessor.latent_residual true --train.kl_to_base 1.0 --train.kl_anneal_steps 1000
recipe4-kl coprocessor 4 500 token true vocab 3e-4 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000
res16-r1 coprocessor 16 500 token true vocab 3e-4 1e-2 full --coprocessor.latent_residual true --coprocessor.latent_residual_init 1.0
res16-r1-lora coprocessor 16 500 token true vocab 1e-3 1e-2 full --coprocessor.latent_residual true --coprocessor.latent_residual_init 1.0 --coprocessor.lora_rank 16
res16-r1-slow coprocessor 16 500 token true vocab 1e-4 1e-2 full --coprocessor.latent_residual true --coprocessor.latent_residual_init 1.0
res16-mat coprocessor 16 500 token true vocab 3e-4 1e-2 full --coprocessor.latent_residual true --coprocessor.latent_residual_matrix true
res16-mat-slow coprocessor 16 500 token true vocab 1e-4 1e-2 full --coprocessor.latent_residual true --coprocessor.latent_residual_matrix true
res16-mat-lr3e-5 coprocessor 16 500 token true vocab 3e-5 1e-2 full --coprocessor.latent_residual true --coprocessor.latent_residual_matrix true
res16-mat-slow-kl coprocessor 16 500 token true vocab 1e-4 1e-2 full --coprocessor.latent_residual true --coprocessor.latent_residual_matrix true --train.kl_to_base 1.0 --train.kl_anneal_steps 1000
pause16-seed1 pause 16 500 token true vocab 1e-3 1e-2 prose --train.seed 1
pause16-seed2 pause 16 500 token true vocab 1e-3 1e-2 prose --train.seed 2
res16-mat-slow-seed1 coprocessor 16 500 token true vocab 1e-4 1e-2 prose --coprocessor.latent_residual true --coprocessor.latent_residual_matrix true --train.seed 1
pause16-kl pause 16 500 token true vocab 1e-3 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000
res16-mat-slow-klc coprocessor 16 500 token true vocab 1e-4 1e-2 full --coprocessor.latent_residual true --coprocessor.latent_residual_matrix true --train.kl_to_base 1.0 --train.kl_anneal_steps null
pause16-kl-seed1 pause 16 500 token true vocab 1e-3 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000 --train.seed 1
recipe16-kl-seed1 coprocessor 16 500 token true vocab 3e-4 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000 --train.seed 1
recipe16-kl-slow coprocessor 16 500 token true vocab 1e-4 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000
recipe16-kl-slow-seed1 coprocessor 16 500 token true vocab 1e-4 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000 --train.seed 1
recipe16-kl-1k coprocessor 16 1000 token true vocab 3e-4 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000
pause16-kl-1k pause 16 1000 token true vocab 1e-3 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000
recipe16-kl-seed2 coprocessor 16 500 token true vocab 3e-4 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000 --train.seed 2
pause16-kl-seed2 pause 16 500 token true vocab 1e-3 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000 --train.seed 2
recipe16-kl-p16 coprocessor 16 500 token true vocab 3e-4 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000 --coprocessor.num_points 16
pause16-kl-p16 pause 16 500 token true vocab 1e-3 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000 --coprocessor.num_points 16
recipe16-kl-fast coprocessor 16 500 token true vocab 1e-3 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000
res16-mat-slow-kl03 coprocessor 16 500 token true vocab 1e-4 1e-2 full --coprocessor.latent_residual true --coprocessor.latent_residual_matrix true --train.kl_to_base 0.3 --train.kl_anneal_steps 1000
recipe16-kl-seed3 coprocessor 16 500 token true vocab 3e-4 1e-2 full --train.kl_to_base 1.0 --train.kl_anneal_steps 1000 --train.seed 3
pause16-kl03 pause 16 500 token true vocab 1e-3 1e-2 full --train.kl_to_base 0.3 --train.kl_anneal_steps 1000"

while read -r name method latents steps readout gate init lr ilr eval extra; do
    if [ -n "$RUNS_ONLY" ] && [[ " $RUNS_ONLY " != *" $name "* ]]; then continue; fi
    steps=$(python -c "print(max(2, round($steps * $STEPS_SCALE)))")
    interface=()
    [ "$ilr" != "-" ] && interface=(--train.interface_lr "$ilr")
    if [ ! -f "$RUNS/$name/final_eval.json" ]; then
        timed "train-$name" cacheaug train --config configs/prose-smollm2.yaml --resume \
            --train.output_dir "$RUNS/$name" \
            --data.source "$SPLITS/train" --data.validation_source "$SPLITS/validation" --data.seq_len 256 \
            --coprocessor.method "$method" --coprocessor.num_latents "$latents" --coprocessor.num_ahead 16 \
            --coprocessor.num_points 8 --coprocessor.readout "$readout" --coprocessor.latent_gate "$gate" \
            --coprocessor.soft_token_init "$init" \
            --train.max_steps "$steps" --train.lr "$lr" "${interface[@]}" --train.batch_size 1 --train.grad_accum 1 \
            --train.warmup_steps 20 --train.eval_every 50 --train.eval_batches 4 \
            --train.save_every "$(( steps / 2 > 0 ? steps / 2 : 1 ))" --train.keep_last 2 \
            --train.kl_to_base 0 $extra  # the config's KL is off unless the row sets it
    fi
    ckpt=$RUNS/$name/step-$(printf %06d "$steps")
    mkdir -p "$OUT/$name"
    cp "$RUNS/$name"/{run_config.json,metrics.jsonl,final_eval.json,final_table.md,curves.png} "$OUT/$name/" 2>/dev/null || true
    tokens=$PPL_TOKENS
    [ "$eval" = ablation ] && tokens=$ABLATION_TOKENS
    [ -f "$OUT/$name/perplexity-prose-test.json" ] || timed "ppl-prose-$name" \
        cacheaug eval perplexity --ckpt "$ckpt" --data "$SPLITS/test" --name prose-test \
        --seq-len 256 --every 16 --offsets 32 --max-tokens "$tokens" --out "$OUT/$name"
    if [ "$eval" = full ] && [ ! -f "$OUT/$name/perplexity-wikitext2-test.json" ]; then
        timed "ppl-wikitext-$name" \
            cacheaug eval perplexity --ckpt "$ckpt" --data "$DATA/wikitext2/test.txt" --name wikitext2-test \
            --seq-len 256 --every 16 --offsets 32 --max-tokens "$PPL_TOKENS" --out "$OUT/$name"
    fi
done <<< "$RUN_TABLE"

# ---------------------------------------------------------------- recipe16 half-way (same steps as the paper runs)
half=$RUNS/recipe16/step-$(printf %06d "$(python -c "print(max(2, round(500 * $STEPS_SCALE)) // 2)")")
if [ -d "$half" ] && [ ! -f "$OUT/recipe16-step250/perplexity-prose-test.json" ]; then
    mkdir -p "$OUT/recipe16-step250"
    timed ppl-prose-recipe16-step250 cacheaug eval perplexity --ckpt "$half" --data "$SPLITS/test" --name prose-test \
        --seq-len 256 --every 16 --offsets 32 --max-tokens "$PPL_TOKENS" --out "$OUT/recipe16-step250"
fi

# ---------------------------------------------------------------- recipe16 with its gates halved after training
# tanh(gate) -> 0.5 tanh(gate): how much of the in-domain gain survives quieter latents, and what it does out of domain
final=$RUNS/recipe16/step-$(printf %06d "$(python -c "print(max(2, round(500 * $STEPS_SCALE)))")")
if [ -d "$final" ]; then
    [ -d "$RUNS/recipe16-gates0.5" ] || python experiments/scale_gates.py "$final" "$RUNS/recipe16-gates0.5" --alpha 0.5
    mkdir -p "$OUT/recipe16-gates0.5"
    [ -f "$OUT/recipe16-gates0.5/perplexity-wikitext2-test.json" ] || timed ppl-wikitext-recipe16-gates0.5 \
        cacheaug eval perplexity --ckpt "$RUNS/recipe16-gates0.5" --data "$DATA/wikitext2/test.txt" --name wikitext2-test \
        --seq-len 256 --every 16 --offsets 32 --max-tokens "$PPL_TOKENS" --out "$OUT/recipe16-gates0.5"
    [ -f "$OUT/recipe16-gates0.5/perplexity-prose-test.json" ] || timed ppl-prose-recipe16-gates0.5 \
        cacheaug eval perplexity --ckpt "$RUNS/recipe16-gates0.5" --data "$SPLITS/test" --name prose-test \
        --seq-len 256 --every 16 --offsets 32 --max-tokens "$PPL_TOKENS" --out "$OUT/recipe16-gates0.5"
fi

# ---------------------------------------------------------------- how far r opened in the latent_residual runs
residual=()
for name in res16 res16-kl res16-r1 res16-r1-lora res16-r1-slow res16-mat res16-mat-slow res16-mat-lr3e-5 res16-mat-slow-kl res16-mat-slow-seed1 res16-mat-slow-klc; do
    final=$RUNS/$name/step-$(printf %06d "$(python -c "print(max(2, round(500 * $STEPS_SCALE)))")")
    if [ -d "$final" ]; then residual+=("$name=$final"); fi
done
if [ ${#residual[@]} -gt 0 ]; then python experiments/residual_stats.py --out "$OUT/residual.json" "${residual[@]}"; fi

# ---------------------------------------------------------------- do the latents carry their context?
# Each sequence's own latents vs latents computed at the same points of another test sequence (context_swap.py); the
# pause run is the control (its latents ignore the context, so swapping must change nothing; prose only).
# recipe16-kl-1k: does the context the latents carry grow with twice the training?
for name in pause16-kl-p16 recipe16-kl-p16 res16-mat-slow-kl03 recipe16-kl-seed3 recipe16-kl-1k; do
    [ -f "$RUNS/$name/final_eval.json" ] || continue
    final=$(ls -d "$RUNS/$name"/step-* | tail -1)  # the last checkpoint: 500 steps, 1000 for the -1k run
    [ -f "$OUT/$name/context-swap-prose-test.json" ] || timed "swap-prose-$name" \
        python experiments/context_swap.py "$final" --data "$SPLITS/test" --max-tokens "$PPL_TOKENS" \
        --compare "$OUT/$name/perplexity-prose-test.json" --out "$OUT/$name/context-swap-prose-test.json"
    [ "$name" = pause16-kl-p16 ] && continue  # the control: prose shows it
    [ -f "$OUT/$name/context-swap-wikitext2-test.json" ] || timed "swap-wikitext-$name" \
        python experiments/context_swap.py "$final" --data "$DATA/wikitext2/test.txt" --max-tokens "$PPL_TOKENS" \
        --compare "$OUT/$name/perplexity-wikitext2-test.json" --out "$OUT/$name/context-swap-wikitext2-test.json"
done

# ---------------------------------------------------------------- tables and plots
python experiments/recipe_report.py "$OUT" --paper250 results/prose-smollm2/nl16 --paper250-nl4 results/prose-smollm2/nl4
echo "done: $OUT/report.md"
