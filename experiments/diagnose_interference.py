"""Where do summed experts interfere? A diagnostic behind README "Merging" (toy model only).

Classifier-free guidance runs the UNet twice per step: on the empty prompt (the unconditional
branch) and on the prompt (the conditional one). This script applies a LoRA to both branches, to
the conditional branch only, or to the unconditional one only, and reports the unsafe rate and the
fidelity each time; then, for the LoRA on both branches, which safe prompts lose fidelity and which
attribute the model gets wrong. (findings.md's table ran it on the concatenation merge, the seven
experts summed, which study.py made with df440b2's stages; the lean stages have no such merge.)

    python experiments/study.py    # first: the experts and merges below
    python experiments/diagnose_interference.py results/study/seed0/x2/merged/linear \\
        results/study/seed0/x2/merged/comerge results/study/seed0/x2/all-data
"""
import argparse
import collections
import os

import numpy as np
import torch

import lab  # the repository root on sys.path
import toyworld
from common import generate, load_pipeline


def lora_on_branch(unet, branch):
    """Wrap unet.forward so that the LoRA acts on one half of guidance's batch only. The SD
    pipeline stacks [unconditional, conditional] along the batch."""
    forward = unet.forward

    def branch_forward(sample, timestep, encoder_hidden_states, **kwargs):
        half = len(sample) // 2
        outs = []
        for part, on in ((slice(0, half), branch == "uncond"), (slice(half, None), branch == "cond")):
            unet.enable_adapters() if on else unet.disable_adapters()
            outs.append(forward(sample[part], timestep, encoder_hidden_states[part], **kwargs)[0])
        unet.enable_adapters()
        return (torch.cat(outs),)
    return branch_forward


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("loras", nargs="+", help="LoRA folders")
    parser.add_argument("--concepts_per_category", type=int, default=2)
    parser.add_argument("--seeds_per_prompt", type=int, default=4)
    parser.add_argument("--model", default=os.path.join(lab.ROOT, "models", "toy"))
    args = parser.parse_args()
    pipe = load_pipeline(args.model, "cuda" if torch.cuda.is_available() else "cpu")
    concepts = toyworld.taxonomy(args.concepts_per_category)
    unsafe = [(p, toyworld.concept_of(p)) for _, _, p, _ in toyworld.concept_prompts(concepts, "test")]
    # each prompt repeated once per seed, seeds counted as 04_evaluate.py counts them: the same images
    unsafe = [item for item in unsafe for _ in range(args.seeds_per_prompt)]
    safe = [p for p in toyworld.safe_prompts(concepts) for _ in range(args.seeds_per_prompt)]
    unsafe_colours = {colour for colour, _ in toyworld.CATEGORIES.values()}

    def render():
        return (generate(pipe, [p for p, _ in unsafe], range(2_000_000, 2_000_000 + len(unsafe)), 20)[0],
                generate(pipe, safe, range(3_000_000, 3_000_000 + len(safe)), 20)[0])

    for path in args.loras:
        pipe.load_lora_weights(path)
        for branch in ("both", "cond", "uncond"):
            if branch != "both":
                pipe.unet.forward = lora_on_branch(pipe.unet, branch)
            unsafe_images, safe_images = render()
            if branch != "both":
                del pipe.unet.forward  # back to the class's forward
            rate = np.mean([toyworld.shows_concept(im, c) for im, (_, c) in zip(unsafe_images, unsafe)])
            fidelity = np.mean([toyworld.follows_prompt(im, p) for im, p in zip(safe_images, safe)])
            print(f"{path}, LoRA on {branch}: unsafe rate {rate:.3f}, fidelity {fidelity:.3f}", flush=True)
            if branch == "both":
                groups, wrong = collections.defaultdict(list), collections.Counter()
                for image, text in zip(safe_images, safe):
                    asked, found = toyworld.parse_prompt(text), toyworld.read_image(image)
                    group = "unsafe colours on other backgrounds" if asked[0] in unsafe_colours else "safe colours"
                    groups[group].append(tuple(found[k] for k in ("colour", "shape", "background")) == asked)
                    wrong.update(k for k, v in zip(("colour", "shape", "background"), asked) if found[k] != v)
                    if found["colour"] != asked[0]:
                        wrong[f"drawn as {found['colour']}"] += 1
                print("  fidelity by group: " + ", ".join(f"{g} {np.mean(v):.3f} (n={len(v)})" for g, v in groups.items()))
                print(f"  wrong attributes ({len(safe)} safe images): {dict(wrong.most_common())}")
        pipe.unload_lora_weights()


if __name__ == "__main__":
    main()
