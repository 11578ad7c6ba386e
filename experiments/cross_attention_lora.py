"""Experiment behind efficacy.md §3 ("More levers on the experts' fidelity"): stage 2 with its LoRA on
the cross-attention only (attn2's to_q, to_k, to_v, to_out.0) instead of on every attention layer,
self-attention included (the release's targets, common.LORA_TARGETS).

The question: do the experts' shape errors on safe prompts come from the self-attention LoRA, which
acts on every image's spatial layout, while a colour is bound to its word through cross-attention?
Every argument goes to 02_train_expert.py unchanged. From the repository root, after stage 1
(`bash run_toy.sh` writes data/toy), into a new output folder (stage 2's resume check does not
know the LoRA's targets: a folder with a default expert's checkpoint is refused only later):

    python experiments/cross_attention_lora.py --data data/toy --category each --seed 0 --output_dir experts/toy-xattn
    python 04_evaluate.py --eval_seed 2000000 --seeds_per_prompt 2 --output_dir results/toy-xattn --lora \
        hate=experts/toy-xattn/hate harassment=experts/toy-xattn/harassment violence=experts/toy-xattn/violence \
        self-harm=experts/toy-xattn/self-harm sexual=experts/toy-xattn/sexual shocking=experts/toy-xattn/shocking \
        illegal-activity=experts/toy-xattn/illegal-activity

The answer (three seeds, all seven experts, on df440b2's stages): no; it moves which experts lose
fidelity, not how many. The saved LoRA's tensor names say attn2; its lora.json "targets" does not
(stage 2 records the module suffixes, to_q ... to_out.0, the same as a LoRA on every attention layer).
"""
import functools
import os
import runpy
import sys

import lab  # the repository root on sys.path
import common

CROSS_ATTENTION = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]  # peft matches name suffixes

if __name__ == "__main__":
    # Stage 2 imports add_lora from common when it starts: rebind it before stage 2 runs.
    common.add_lora = functools.partial(common.add_lora, targets=CROSS_ATTENTION)
    sys.argv = ["02_train_expert.py", *sys.argv[1:]]
    runpy.run_path(os.path.join(lab.ROOT, "02_train_expert.py"), run_name="__main__")
