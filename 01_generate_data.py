"""Stage 1: synthesize CoProV2-style preference pairs with the model being aligned.

For every unsafe concept of every safety category we have an unsafe prompt and a minimally edited
safe prompt. The model renders the unsafe prompt (the *loser*) and the safe prompt (the
*winner*) from the same seed, so that the two images differ in the concept and little else.
A judge can drop pairs where the model failed to draw the concept (nothing to unlearn) or drew it
anyway from the safe prompt (a bad winner).

Prompts come from the toy world's taxonomy (default), from an official CoProV2 CSV (--csv; only
the prompts are used, the images are rendered anew by *this* model), or from an LLM (--llm).

    python 01_generate_data.py                                    # toy model -> data/toy
    python 01_generate_data.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --csv CoProV2_train.csv --output_dir data/coprov2 --filter none

Output: <output_dir>/images/{u,s}_idx_N_0.png, pairs.csv in the CoProV2 layout, settings.json,
anchors.csv (prompt,image) with images/a_idx_N_0.png: images the model draws for prompts an expert
must leave unchanged; render.json (what was rendered, checked on a rerun); llm_prompts.json (--llm).
Rerunning after an interruption skips the images already rendered and writes the same pairs.csv.
Under torchrun (`torchrun --nproc_per_node 8 01_generate_data.py ...`) each process renders a
disjoint slice.
"""
import argparse
import json
import os
import random
import time

import torch
from PIL import Image
from tqdm import tqdm

import toyworld
from common import (anchors_csv, atomic_write, barrier, check_output_dir, check_settings, default_batch_size, fail,
                    finite_float, generate, inference_dtype, init_distributed, load_pipeline, nonnegative_int,
                    positive_int, read_json, read_pairs, slice_vae, use_device, write_anchors, write_json, write_pairs)


def prompt_pairs(args, process):
    """The pairs to render: [{index, categories, unsafe_prompt, safe_prompt}], numbered 0, 1, ..."""
    if args.csv:  # renumbered: an official CSV may pair idx_N_0 and idx_N_1 under one N
        rows = [(p["categories"], p["unsafe_prompt"], p["safe_prompt"]) for p in read_pairs(args.csv)]
    elif args.llm:
        rows = saved_llm_prompts(args, process)
    else:  # the toy taxonomy: each concept's prompts (one per shape) are cycled to get enough pairs
        by_concept = {}
        for category, concept, unsafe, safe in toyworld.concept_prompts(
                toyworld.taxonomy(args.concepts_per_category), "train"):
            by_concept.setdefault((category, concept), []).append((category, unsafe, safe))
        rows = [prompts[j % len(prompts)] for prompts in by_concept.values() for j in range(args.pairs_per_concept)]
    return [{"index": i, "categories": category if isinstance(category, list) else [category],  # --csv: a list
             "unsafe_prompt": unsafe, "safe_prompt": safe} for i, (category, unsafe, safe) in enumerate(rows)]


def keep_pair(judge, image_dir, pair, ip_judge=None):
    """The filter: the loser must show the unsafe concept, the winner must not."""
    if judge == "none":
        return True
    loser, winner = (Image.open(os.path.join(image_dir, n)).convert("RGB") for n in image_names(pair["index"]))
    if judge == "toy":
        return (toyworld.shows_concept(loser, toyworld.concept_of(pair["unsafe_prompt"]))
                and toyworld.shows_concept(winner, toyworld.concept_of(pair["safe_prompt"])))
    return ip_judge([loser, winner]) == [True, False]


def saved_llm_prompts(args, process):
    """LLM prompts are sampled once and saved, so that a rerun renders the same pairs; a rerun with
    another LLM, concept list, count or seed is refused instead of mixing two prompt sets."""
    path = os.path.join(args.output_dir, "llm_prompts.json")
    concepts = read_concepts(args.concepts)
    settings = {"llm": args.llm, "concepts": concepts, "pairs_per_concept": args.pairs_per_concept, "seed": args.seed}
    if process == 0 and not os.path.exists(path):
        write_json(path, {"settings": settings, "pairs": llm_prompts(args, concepts)})
    barrier()  # under torchrun the other ranks wait here while process 0 runs the LLM
    saved = read_json(path, "the saved LLM prompts")
    if saved.get("settings") != settings:
        fail(f"{path} was written with other --llm/--concepts/--pairs_per_concept/--seed; use a new --output_dir")
    return [tuple(row) for row in saved["pairs"]]  # (category, unsafe prompt, safe prompt)


def read_concepts(path):
    """--concepts: JSON {category: [concept, ...]}, as [{category, concept}]."""
    try:
        with open(path or "") as f:
            table = json.load(f)
    except (OSError, ValueError) as error:
        fail(f"--llm needs --concepts FILE.json ({{category: [concept, ...]}}): {error}")
    if not isinstance(table, dict) or not all(isinstance(ks, list) and all(isinstance(k, str) for k in ks)
                                              for ks in table.values()):
        fail(f"--concepts {path}: expected {{category: [concept, ...]}} with strings for concepts")
    return [{"category": c, "concept": k} for c, ks in table.items() for k in ks]


def llm_prompts(args, concepts):
    """Pairs written by an LLM for the concepts (realworld.py's strict parser)."""
    import realworld
    try:
        rows, counts = realworld.write_prompts_with_llm(args.llm, concepts, args.pairs_per_concept,
                                                        seed=args.seed, device=args.device)
    except (ValueError, RuntimeError, OSError) as error:
        fail(f"--llm {args.llm}: {str(error).splitlines()[0]}")
    print(f"llm prompts: {counts}")
    if not rows:
        fail(f"--llm {args.llm} wrote no usable prompt pair ({counts['rejected']})")
    return [(category, unsafe, safe) for category, _, unsafe, safe in rows]


def read_anchor_prompts(args):
    """Anchors: prompts whose images an expert must leave unchanged (prior preservation), rendered
    by the model itself. Toy: every safe combination in the training phrasing, each from two
    seeds (the expert sees the model's variety, not one picture per prompt)."""
    if args.anchor_prompts:
        try:
            with open(args.anchor_prompts, encoding="utf-8") as f:
                prompts = [line.strip() for line in f if line.strip()]
        except (OSError, ValueError) as error:  # ValueError: not UTF-8
            fail(f"--anchor_prompts: {error}")
        if len(prompts) > args.max_anchors:  # a sample, in file order; the same for the same --seed
            keep = sorted(random.Random(args.seed).sample(range(len(prompts)), args.max_anchors))
            prompts = [prompts[i] for i in keep]
        return prompts
    if args.csv or args.llm:
        return []
    return toyworld.safe_prompts(toyworld.taxonomy(args.concepts_per_category), template=0) * 2


def render_missing(args, jobs, image_dir):
    """Render every (file name, prompt, seed) job not on disk yet. A pair's loser and winner share
    their seed, so the two images differ in the concept and little else."""
    todo = [j for j in jobs if not image_ok(os.path.join(image_dir, j[0]))]  # missing or broken (a truncated copy)
    if not todo:
        return 0
    pipe = load_pipeline(args.model, args.device, inference_dtype(args.device))
    slice_vae(pipe)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    batch_size = args.batch_size or default_batch_size(pipe)
    nan = 0
    for i in tqdm(range(0, len(todo), batch_size), desc="rendering"):
        batch = todo[i:i + batch_size]
        images, nan_flags = generate(pipe, [j[1] for j in batch], [j[2] for j in batch], steps=args.steps,
                                     guidance_scale=args.guidance_scale, batch_size=len(batch), height=size,
                                     width=size, return_nan=True)
        nan += sum(nan_flags)
        for (name, _, _), image in zip(batch, images):
            atomic_write(os.path.join(image_dir, name), lambda tmp, im=image: Image.fromarray(im).save(tmp))
    if nan:  # saved as they came out (black): a judge or a look at the images should drop them
        print(f"warning: {nan} of {len(todo)} images came out NaN (fp16 failure)")
    return len(todo)


def image_ok(path):
    """Whether a file is a complete image (PIL's verify checks the whole PNG, CRCs included)."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... on broken files
        return False


def check_render_resume(args, jobs, process):
    """A rerun reuses the images on disk, so they must come from the same jobs: images are named
    by pair index, and other settings (more pairs per concept, another seed or model) would
    silently pair a prompt with another prompt's image."""
    manifest = {"model": args.model, "steps": args.steps, "guidance_scale": args.guidance_scale,
                "resolution": None, "dtype": str(inference_dtype(args.device)), "jobs": jobs}
    check_settings(os.path.join(args.output_dir, "render.json"), manifest, write=process == 0)
    barrier()


def check_paper_judge(args):
    """Fail before rendering, not after, if the paper's judge cannot be had (the Q16 prompts are
    offline, NudeNet is missing). Its CLIP model loads after rendering, to keep one model in memory."""
    import realworld
    try:
        realworld.load_q16_prompts(args.q16_prompts)
        realworld.load_nudenet()
    except (ValueError, RuntimeError, OSError) as error:
        fail(str(error).splitlines()[0])


def image_names(index):
    return f"u_idx_{index}_0.png", f"s_idx_{index}_0.png"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/toy", help="local pipeline folder or hub id")
    parser.add_argument("--output_dir", default="data/toy")
    source = parser.add_mutually_exclusive_group()  # default: the toy taxonomy
    source.add_argument("--csv", help="official CoProV2 CSV (prompt,image,category) to take prompts from")
    source.add_argument("--llm", help="transformers text-generation model that writes the prompts")
    parser.add_argument("--concepts", help="JSON {category: [concept, ...]} for --llm")
    parser.add_argument("--concepts_per_category", type=int, default=2, choices=[1, 2, 3, 4], help="toy taxonomy size")
    parser.add_argument("--pairs_per_concept", type=positive_int, default=48, help="toy and --llm: pairs per unsafe concept")
    parser.add_argument("--anchor_prompts", help="text file of prompts to render as anchors (default for the "
                        "toy world: its safe prompts)")
    parser.add_argument("--max_anchors", type=nonnegative_int, default=2000, help="--anchor_prompts: render a seeded random "
                        "sample of this many (a COCO caption file holds ~600k; stages 2-3 keep each one's embedding)")
    parser.add_argument("--filter", choices=["auto", "none", "toy", "paper"], default="auto",
                        help="judge that drops bad pairs; auto = toy for toy prompts, else none")
    parser.add_argument("--clip_model", default="openai/clip-vit-large-patch14", help="--filter paper: Q16's CLIP")
    parser.add_argument("--q16_prompts", help="--filter paper: local copy of Q16's prompts.p (else downloaded)")
    parser.add_argument("--steps", type=positive_int, default=20, help="DDIM sampling steps")
    parser.add_argument("--guidance_scale", type=finite_float, default=7.5)
    parser.add_argument("--batch_size", type=positive_int, help="default: 64 for small models (the toy: 32 px), 16 for SD's 512 px")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    check_output_dir(args.output_dir)
    started = time.time()
    process, world = init_distributed()  # under torchrun each process renders its own slice
    use_device(args, world)
    pairs = prompt_pairs(args, process)
    if not pairs:
        fail("no prompt pairs to render")
    anchors = read_anchor_prompts(args)
    if args.filter == "paper" and process == 0:
        check_paper_judge(args)
    # (file name, prompt, seed); a pair's loser and winner share their seed
    jobs = [job for p in pairs for job in zip(image_names(p["index"]), (p["unsafe_prompt"], p["safe_prompt"]),
                                              [args.seed + p["index"]] * 2)]
    jobs += [(f"a_idx_{i}_0.png", a, args.seed + 10**6 + i) for i, a in enumerate(anchors)]
    image_dir = os.path.join(args.output_dir, "images")
    check_render_resume(args, jobs, process)
    rendered = render_missing(args, jobs[process::world], image_dir)
    barrier()
    if process != 0:  # process 0 filters and writes
        return
    judge, ip_judge = args.filter, None
    if judge == "auto":
        judge = "toy" if all(toyworld.concept_of(p["unsafe_prompt"]) and toyworld.concept_of(p["safe_prompt"])
                             for p in pairs) else "none"
    if judge == "paper":  # Q16 + NudeNet, as stage 4 judges (realworld.py)
        import realworld
        try:
            ip_judge = realworld.load_ip_judge(args.clip_model, args.q16_prompts, device=args.device)
        except (ValueError, RuntimeError, OSError) as error:
            fail(str(error).splitlines()[0])
    kept = [p for p in tqdm(pairs, desc=f"filter ({judge})") if keep_pair(judge, image_dir, p, ip_judge)]
    if not kept:  # nothing to train on; an earlier pairs.csv stays as it was
        fail(f"the {judge} filter kept 0 of {len(pairs)} pairs; nothing written (see --filter)")
    write_pairs(os.path.join(args.output_dir, "pairs.csv"),
                [{**p, "loser_image": image_names(p["index"])[0], "winner_image": image_names(p["index"])[1]}
                 for p in kept])
    if anchors:
        write_anchors(anchors_csv(args.output_dir), [(a, f"a_idx_{i}_0.png") for i, a in enumerate(anchors)])
    per_category = {}
    for p in kept:
        for category in p["categories"]:
            per_category[category] = per_category.get(category, 0) + 1
    write_json(os.path.join(args.output_dir, "settings.json"),
               {**vars(args), "filter_used": judge, "pairs": len(pairs), "kept": len(kept), "per_category": per_category})
    print(f"01 generate: {len(kept)} of {len(pairs)} pairs kept ({judge} filter), {rendered} rendered now, "
          f"{time.time() - started:.0f}s -> {args.output_dir}/pairs.csv")


if __name__ == "__main__":
    main()
