#!/usr/bin/env bash
# The main job: SafetyDPO's four stages on the toy model, end to end, on a CPU.
# Every stage is resumable: rerun this script after an interruption and it picks up where it stopped.
set -euo pipefail
cd "$(dirname "$0")"
CATEGORIES=(Hate Harassment Violence Self-harm Sexual Shocking "Illegal Activity")

python 01_generate_data.py --output_dir data/toy                      # CoProV2-style pairs

# One LoRA on all pairs (the release's recipe, the baseline) trains beside the seven experts, each
# side on half the cores: it has exactly their compute (7 x 150 steps), and the toy UNet is too
# small for one training to keep all cores busy, so two side by side finish sooner (1.25x, README).
export OMP_NUM_THREADS=$(python -c "import os; print(max(1, (os.cpu_count() or 2) // 2))")
mkdir -p experts
python 02_train_expert.py --data data/toy --category all --output_dir experts/all \
  --max_train_steps $((150 * ${#CATEGORIES[@]})) > experts/all.log 2>&1 &
all_data=$!
trap 'kill $all_data 2>/dev/null || true' EXIT                         # stopped with this script
experts=()
for category in "${CATEGORIES[@]}"; do                                # one safety expert per category
  dir="experts/$(echo "$category" | tr 'A-Z ' 'a-z-')"
  python 02_train_expert.py --data data/toy --category "$category" --output_dir "$dir"
  experts+=("$dir")
done
echo "waiting for the all-data LoRA (progress: experts/all.log)"
wait $all_data || { tail -n 1 experts/all.log; exit 1; }
trap - EXIT                                                           # it has ended: nothing left to stop
tail -n 1 experts/all.log
unset OMP_NUM_THREADS                                                 # from here on, one job at a time

python 03_merge.py "${experts[@]}" --method comerge --data data/toy --output_dir merged/comerge
# Co-Merge scaled up, then repaired with prior preservation (not in the paper; README, "Repairing the merge")
python 03_merge.py "${experts[@]}" --method comerge --data data/toy --scale 1.75 --repair_steps 800 \
  --output_dir merged/comerge-repaired
python 04_evaluate.py --lora co-merge=merged/comerge co-merge+repair=merged/comerge-repaired all-data=experts/all \
  --output_dir results/toy
