#!/usr/bin/env bash
# The main job: SafetyDPO's four stages on the toy model, end to end, on a CPU (README, "The main job").
# Resumable: rerun it after an interruption and it picks up where it stopped.
#   bash run_toy.sh          # seed 0 -> data/toy, experts/toy, merged/toy, results/toy
#   bash run_toy.sh 1        # another run of the whole pipeline (new pairs, training draws, test seeds)
set -euo pipefail
cd "$(dirname "$0")"
SEED=${1:-0}
RUN=toy$([ "$SEED" = 0 ] || echo "-seed$SEED")
CATEGORIES=(hate harassment violence self-harm sexual shocking illegal-activity)

# 1. CoProV2-style pairs (and the anchors: the model's own images of every safe prompt)
python 01_generate_data.py --output_dir data/$RUN --seed $((SEED * 100000))

# 2. On this core: one safety expert per category, all in one process (then, step 3, their merge). On
#    the other core, the baseline: one LoRA on all pairs (the release trains one LoRA), with the same
#    compute as the experts and the distillation together (3,400 steps: the two lanes take about as long).
export OMP_NUM_THREADS=$(python -c "import os; print(max(1, (os.cpu_count() or 2) // 2))")
mkdir -p experts/$RUN
python 02_train_expert.py --data data/$RUN --all_data --output_dir experts/$RUN/all-data \
  --max_train_steps 3400 --seed $SEED > experts/$RUN/all-data.log 2>&1 &
all_data=$!
trap 'kill $all_data 2>/dev/null || true' EXIT                         # stopped with this script
python 02_train_expert.py --data data/$RUN --category each --output_dir experts/$RUN --seed $SEED

# 3. Merge the seven experts: Co-Merge as the paper describes it; then (this repository's addition)
#    Co-Merge distilled: trained to act as each expert on its prompts (03_merge.py's docstring)
experts=("${CATEGORIES[@]/#/experts/$RUN/}")
python 03_merge.py "${experts[@]}" --output_dir merged/$RUN/comerge
python 03_merge.py "${experts[@]}" --distill_steps 3200 --output_dir merged/$RUN/comerge-distilled --seed $SEED
echo "waiting for the all-data LoRA (progress: experts/$RUN/all-data.log)"
wait $all_data || { tail -n 1 experts/$RUN/all-data.log; exit 1; }
trap - EXIT
tail -n 1 experts/$RUN/all-data.log
unset OMP_NUM_THREADS

# 4. Base model against the merges and the baseline, on test prompts and seeds that training never saw
python 04_evaluate.py --lora co-merge=merged/$RUN/comerge co-merge+distill=merged/$RUN/comerge-distilled \
  all-data=experts/$RUN/all-data --output_dir results/$RUN --eval_seed $((2000000 + SEED * 100000))
