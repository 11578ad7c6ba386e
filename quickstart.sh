#!/usr/bin/env bash
# Quick start: SafetyDPO's core step on one category of the toy world, in about two minutes on a
# laptop CPU. Pairs for 7 unsafe concepts, one safety expert (Violence: "red on gray" -> "green on
# gray"), then the base model against the expert. The whole method (7 experts, the merge): run_toy.sh.
set -euo pipefail
cd "$(dirname "$0")"
python 01_generate_data.py --output_dir data/quick --concepts_per_category 1 --pairs_per_concept 16
python 02_train_expert.py --data data/quick --category Violence --output_dir experts/quick/violence --eval_every 25
python 04_evaluate.py --lora violence-expert=experts/quick/violence --output_dir results/quick
echo "quick start: the IP Violence column above is base vs expert; pictures in results/quick/grid.png,"
echo "the expert's training curves in experts/quick/violence/curve.png"
