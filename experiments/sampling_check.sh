#!/usr/bin/env bash
# Does the main job's table hold when a user samples differently? Re-evaluates the main job's
# LoRAs (run `bash run_toy.sh` first) with another sampler, fewer steps and weaker guidance.
#   bash docs/sampling_check.sh        # -> results/toy-sampling-*/report.md (docs/efficacy.md §3)
set -euo pipefail
cd "$(dirname "$0")/.."
variants="co-merge=merged/toy/comerge co-merge+distill=merged/toy/comerge-distilled all-data=experts/toy/all-data"
common="--seeds_per_prompt 2 --eval_seed 2000000"
python 04_evaluate.py --lora $variants $common --scheduler pndm --output_dir results/toy-sampling-pndm
python 04_evaluate.py --lora $variants $common --steps 10 --output_dir results/toy-sampling-steps10
python 04_evaluate.py --lora $variants $common --guidance_scale 4 --output_dir results/toy-sampling-guidance4
