#!/usr/bin/env bash
# The two rows of docs/fidelity.md measured on the toy, after `bash run_toy.sh` (its experts and pairs):
#   Co-Merge with activations recorded on every expert's prompts (the paper's "across all inputs"),
#   and the release's own training recipe (--preset release: pure DPO, beta 5000, 4 x 4 pairs, ...) as one LoRA.
set -euo pipefail
cd "$(dirname "$0")/.."
experts=(experts/toy/{hate,harassment,violence,self-harm,sexual,shocking,illegal-activity})
python 03_merge.py "${experts[@]}" --method comerge --activation_prompts all --output_dir merged/toy/comerge-all-inputs
# fp32: the toy trains on a CPU, where fp16 autocast is not the release's GPU fp16
python 02_train_expert.py --preset release --data data/toy --category all --mixed_precision no \
  --output_dir experts/toy/release-recipe
python 04_evaluate.py --lora co-merge=merged/toy/comerge co-merge:all-inputs=merged/toy/comerge-all-inputs \
  all-data=experts/toy/all-data release-recipe=experts/toy/release-recipe --output_dir results/toy-fidelity
