"""Stage 1: synthesize CoProV2-style preference pairs with the model being aligned.

For every unsafe concept of every safety category there is an unsafe prompt and a minimally edited
safe prompt. The model renders the unsafe prompt (the *loser*) and the safe prompt (the *winner*)
from the same seed, so that the two images differ in the concept and little else. On the toy model a
judge then drops the pairs where the model failed to draw the concept (nothing to unlearn) or drew
it from the safe prompt anyway (a bad winner). The prompts come from the toy world's taxonomy, or
from an official CoProV2 CSV (--csv: its prompts, rendered anew by *this* model).

    python 01_generate_data.py                                     # toy model -> data/toy
    python 01_generate_data.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --csv CoProv2_train.csv --output_dir data/coprov2 --anchor_prompts coco_train_captions.txt

Output: <output_dir>/pairs.csv in CoProV2's layout (prompt,image,category; u_idx_N_0 / s_idx_N_0),
anchors.csv (prompt,image: images of prompts an expert must leave unchanged, for stage 2's anchor
term), images/, run.json. A rerun after an interruption renders only the images not yet on disk.
"""
import csv
import os
import random
import time

import torch
from tqdm import tqdm

import toyworld
from common import Parser, atomic_write, claim_output, entry_point, fail, load_pipeline, open_image, positive, read_pairs, render_missing


# --- The method: pairs of prompts, rendered from one seed, filtered by a judge ------------------
def prompt_pairs(csv_path, concepts_per_category, pairs_per_concept):
    """The pairs to render: [{categories, unsafe_prompt, safe_prompt}]. The toy taxonomy's concepts
    each have one prompt pair per shape, cycled to pairs_per_concept pairs."""
    if csv_path:
        return read_pairs(csv_path)
    by_concept = {}
    for category, concept, unsafe, safe in toyworld.concept_prompts(toyworld.taxonomy(concepts_per_category), "train"):
        by_concept.setdefault(concept, []).append({"categories": [category], "unsafe_prompt": unsafe, "safe_prompt": safe})
    return [prompts[j % len(prompts)] for prompts in by_concept.values() for j in range(pairs_per_concept)]


def anchor_prompt_list(path, max_anchors, concepts_per_category, seed):
    """Prompts whose images an expert must leave unchanged: a file's lines (a seeded sample of
    max_anchors), or on the toy every safe combination, each from two seeds."""
    if path:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        keep = sorted(random.Random(seed).sample(range(len(prompts)), min(max_anchors, len(prompts))))
        return [prompts[i] for i in keep]
    return toyworld.safe_prompts(toyworld.taxonomy(concepts_per_category), template=0) * 2 if concepts_per_category else []


def keep_pair(image_dir, index, pair):
    """The toy filter: the loser must show the unsafe concept, the winner its safe counterpart."""
    loser, winner = (open_image(os.path.join(image_dir, name)) for name in image_names(index))
    return (toyworld.shows_concept(loser, toyworld.concept_of(pair["unsafe_prompt"]))
            and toyworld.shows_concept(winner, toyworld.concept_of(pair["safe_prompt"])))


def image_names(index):
    return f"u_idx_{index}_0.png", f"s_idx_{index}_0.png"


# --- The shell: arguments, inputs, outputs ------------------------------------------------------
def parse_args():
    parser = Parser(__doc__)
    parser.add_argument("--model", default="models/toy", help="local pipeline folder or hub id")
    parser.add_argument("--output_dir", default="data/toy")
    parser.add_argument("--csv", help="official CoProV2 CSV (prompt,image,category) to take the prompts from")
    parser.add_argument("--concepts_per_category", type=int, choices=[1, 2, 3, 4], help="toy taxonomy size (default 2)")
    parser.add_argument("--pairs_per_concept", type=positive(int), help="toy: pairs per unsafe concept (default 48)")
    parser.add_argument("--anchor_prompts", help="text file, a prompt a line, to render as anchors (toy: its safe prompts)")
    parser.add_argument("--max_anchors", type=positive(int), help="--anchor_prompts: a seeded sample of this many (default 2000)")
    parser.add_argument("--filter", choices=["toy", "none"], help="the judge that drops failed pairs (default: toy "
                        "for toy prompts, else none)")
    parser.add_argument("--sampling_steps", type=positive(int), default=20, help="DDIM steps")
    parser.add_argument("--seed", type=positive(int, zero=True), default=0)
    args = parser.parse_args()
    toy = [f"--{k}" for k in ("concepts_per_category", "pairs_per_concept") if getattr(args, k) is not None]
    if args.csv and toy:
        parser.error(f"{', '.join(toy)}: the toy taxonomy's, not used with --csv")
    if not args.anchor_prompts and args.max_anchors is not None:
        parser.error("--max_anchors: used with --anchor_prompts only")
    args.concepts_per_category, args.pairs_per_concept = args.concepts_per_category or 2, args.pairs_per_concept or 48
    args.max_anchors = args.max_anchors or 2000
    return args


@entry_point
def main():
    args, started = parse_args(), time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs = prompt_pairs(args.csv, args.concepts_per_category, args.pairs_per_concept)
    if not pairs:
        fail("no prompt pairs to render")
    toy_prompts = all(toyworld.concept_of(p["unsafe_prompt"]) and toyworld.concept_of(p["safe_prompt"]) for p in pairs)
    pair_filter = args.filter or ("toy" if toy_prompts else "none")
    if pair_filter == "toy" and not toy_prompts:
        fail("--filter toy judges toy prompts only; these are not")
    toy_taxonomy = None if args.csv else args.concepts_per_category
    anchors = anchor_prompt_list(args.anchor_prompts, args.max_anchors, toy_taxonomy, args.seed)
    settings = {**{k: v for k, v in vars(args).items() if k not in ("model", "output_dir", "csv", "anchor_prompts")},
                "toy_taxonomy": toy_taxonomy, "dtype": "fp16" if device.startswith("cuda") else "fp32", "filter": pair_filter}
    inputs = {"model": args.model, **{k: getattr(args, k) for k in ("csv", "anchor_prompts") if getattr(args, k)}}
    out = claim_output(args.output_dir, settings, inputs)
    image_dir = os.path.join(out, "images")
    os.makedirs(image_dir, exist_ok=True)
    jobs = [job for i, p in enumerate(pairs)  # (file name, prompt, seed): a pair's loser and winner share their seed
            for job in zip(image_names(i), (p["unsafe_prompt"], p["safe_prompt"]), [args.seed + i] * 2)]
    jobs += [(f"a_idx_{i}_0.png", a, args.seed + 10**6 + i) for i, a in enumerate(anchors)]
    pipe = load_pipeline(args.model, device, torch.float16 if device.startswith("cuda") else torch.float32)
    _, rendered = render_missing(pipe, [(os.path.join(image_dir, name), p, seed) for name, p, seed in jobs], args.sampling_steps)
    kept = [i for i, p in enumerate(tqdm(pairs, desc=f"filter ({pair_filter})"))
            if pair_filter == "none" or keep_pair(image_dir, i, p)]
    if not kept:  # nothing to train on; an earlier pairs.csv stays as it was
        fail(f"the {pair_filter} filter kept 0 of {len(pairs)} pairs; nothing written (--filter none keeps every pair)")
    write_csv(os.path.join(out, "pairs.csv"), [
        row for i in kept for c in pairs[i]["categories"]  # a pair of several categories: a row pair per category
        for row in ([pairs[i]["unsafe_prompt"], image_names(i)[0], c], [pairs[i]["safe_prompt"], image_names(i)[1], c])])
    write_csv(os.path.join(out, "anchors.csv"), [[a, f"a_idx_{i}_0.png"] for i, a in enumerate(anchors)], ["prompt", "image"])
    print(f"01 generate: {len(kept)} of {len(pairs)} pairs kept ({pair_filter} filter), {len(anchors)} anchors; {rendered} "
          f"rendered now, {time.time() - started:.0f}s -> {os.path.join(args.output_dir, 'pairs.csv')}")


def write_csv(path, rows, header=("prompt", "image", "category")):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    atomic_write(path, write)


if __name__ == "__main__":
    main()
