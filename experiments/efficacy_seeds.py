"""The main job over several seeds, with the spread: the efficacy table of docs/efficacy.md.

For each seed, run the main job exactly as a user runs it (`bash run_toy.sh SEED`: new pairs, new
training draws, new test seeds), then evaluate each of its seven experts alone; then print the
mean ± standard deviation of every variant and of each expert on its own category.

    python experiments/efficacy_seeds.py --seeds 0 1 2    # -> experiments/efficacy_seeds.md (and results/)

Resumable: a finished stage is not run again (run_toy.sh and the stages resume).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from lab import ROOT, slug, write_text  # lab: the repository root on sys.path
import toyworld

MEASURES = ("ip", "own_concept", "redirect", "fidelity")


def run(*command):
    subprocess.run(command, cwd=ROOT, check=True)


def seed_results(seed):
    """(the main job's results, each expert alone: {category: result}) for one seed."""
    name = "toy" if seed == 0 else f"toy-seed{seed}"
    started = time.time()
    run("bash", "run_toy.sh", str(seed))
    print(f"efficacy_seeds: bash run_toy.sh {seed} took {time.time() - started:.0f} s", flush=True)
    experts = [f"{slug(c)}=experts/{name}/{slug(c)}" for c in toyworld.CATEGORIES]
    out = f"results/{name}-experts"
    if not os.path.exists(os.path.join(ROOT, out, "results.json")):
        run(sys.executable, "04_evaluate.py", "--lora", *experts, "--output_dir", out, "--seeds_per_prompt", "2",
            "--eval_seed", str(2_000_000 + seed * 100_000))
    main = json.load(open(os.path.join(ROOT, "results", name, "results.json")))["results"]
    alone = json.load(open(os.path.join(ROOT, out, "results.json")))["results"]
    return main, {c: alone[slug(c)] for c in toyworld.CATEGORIES}


def cell(values):
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def table(by_seed, seeds):
    lines = [f"Seeds {', '.join(map(str, seeds))} of `bash run_toy.sh SEED` (mean ± std over seeds).", "",
             "| variant | IP | own concept | redirect | fidelity |", "|---|---|---|---|---|"]
    for variant in by_seed[0][0]:
        lines.append(f"| {variant} | " + " | ".join(cell([m[variant][k] for m, _ in by_seed]) for k in MEASURES) + " |")
    lines += ["", "Each expert alone, on its own category's unsafe prompts (fidelity: all safe prompts):", "",
              "| expert | IP | own concept | redirect | fidelity |", "|---|---|---|---|---|"]
    for c in toyworld.CATEGORIES:
        lines.append(f"| {c} | " + " | ".join(cell([a[c]["per_category"][c][k] for _, a in by_seed]) for k in MEASURES[:3])
                     + f" | {cell([a[c]['fidelity'] for _, a in by_seed])} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default=os.path.join(ROOT, "experiments", "efficacy_seeds.md"))
    args = parser.parse_args()
    by_seed = [seed_results(seed) for seed in args.seeds]
    text = table(by_seed, args.seeds)
    write_text(args.output, "# The main job over seeds\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
