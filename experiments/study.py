"""The claims study: the paper's claims checked in miniature on the toy model, with an exact judge.

  (a) DPO on CoProV2-style pairs lowers the unsafe rate while keeping fidelity;
  (b) merged per-category experts beat one LoRA trained on all data (as the release trains);
  (c) Co-Merge beats other merges (linear average and TIES: experiments/merges.py);
  (d) experts scale to more concepts: 1x, 2x, 4x the unsafe concepts (7, 14, 28).
Beside the paper's Co-Merge it runs the main job's distilled merge ("comerge+distill": Co-Merge
trained to act as each expert on its prompts, 03_merge.py --distill_steps; this repository's
addition) at every size.
Every number is a mean over --seeds (each seed: new pairs, new training noise, new eval seeds
offset), with the spread (standard deviation) beside it.

    python experiments/study.py          # results/study: table.md, results.json, *.png

It only drives the four stage scripts and experiments/merges.py (so it measures exactly what a user
runs), from the repository root, and is resumable: finished stage outputs are reused on a rerun. The
(seed, taxonomy size) pipelines are independent, so --jobs of them run side by side, each stage with
cpu_count / jobs threads: the toy model is too small for two threads to keep two cores busy.
The tables in study/ (measured 2026-11-28/29) also had three Co-Merge variants (activations on all
inputs, rank 4, x1.5) and the concatenation merge: the lean stages have no flags for them.
"""
import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from tqdm import tqdm

from lab import ROOT, slug, write_text  # lab: the repository root on sys.path
import toyworld
from common import atomic_write, write_json

CATEGORIES = list(toyworld.CATEGORIES)
MERGES = ["comerge", "linear", "ties"]  # comerge: 03_merge.py; linear, ties: experiments/merges.py
SCALING_VARIANTS = ("base", "all-data", "comerge", "comerge+distill")  # evaluated at every size


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 2, 4], help="concepts per category")
    parser.add_argument("--main_scale", type=int, default=2,
                        help="the scale at which every variant is compared; 0: none, only the scaling rows "
                             "(e.g. --scales 1 4 --main_scale 0 adds the ends of the scaling curve to a --scales 2 run)")
    parser.add_argument("--pairs_per_concept", type=int, default=48)
    parser.add_argument("--seeds_per_prompt", type=int, default=2)
    parser.add_argument("--output_dir", default="results/study")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="pipelines run side by side (default: 2, or 1 on one core)")
    parser.add_argument("--train_args", default="", help="extra flags for 02_train_expert.py, e.g. '--beta 1000'")
    parser.add_argument("--eval_args", default="", help="extra flags for 04_evaluate.py, e.g. '--sampling_steps 10'")
    parser.add_argument("--distill_steps", type=int, default=3200, help="comerge+distill (run_toy.sh's, not tuned here)")
    args = parser.parse_args()
    args.output_dir = os.path.abspath(args.output_dir)  # the stages run from the repository root
    if not set(args.scales) <= {1, 2, 3, 4}:
        parser.error(f"--scales: the toy world has 1 to 4 concepts per category, got {args.scales}")
    if args.main_scale and args.main_scale not in args.scales:
        parser.error(f"--main_scale {args.main_scale} must be one of --scales {args.scales}")
    return args


RUNNING = set()  # stage processes in flight: stopped when another pipeline fails
STOPPING = threading.Event()  # set then: no pipeline starts another stage


def stage(*args):
    """Run one stage script (from the repository root); a failure stops the study with its own error line."""
    if STOPPING.is_set():
        sys.exit("study: stopped")
    process = subprocess.Popen([sys.executable, *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT)
    RUNNING.add(process)
    if STOPPING.is_set():  # started while the others were being stopped
        process.kill()
    out, err = process.communicate()
    RUNNING.discard(process)
    if process.returncode != 0:
        sys.exit(f"study: {args[0]} failed: {(err.strip().splitlines() or ['?'])[-1]}")
    return out


def run_pipeline(args, seed, scale):
    """All four stages for one seed at one taxonomy size; returns stage 4's results."""
    work = os.path.join(args.output_dir, f"seed{seed}", f"x{scale}")  # own pairs and anchors per size
    data = os.path.join(work, "data")
    stage("01_generate_data.py", "--output_dir", data, "--concepts_per_category", scale,
          "--pairs_per_concept", args.pairs_per_concept, "--seed", seed * 100_000)
    # experts: stage 2's defaults; all-data: the experts' + the distillation's compute, as in run_toy.sh
    stage("02_train_expert.py", "--data", data, "--category", "each", "--output_dir", os.path.join(work, "experts"),
          "--seed", seed, *args.train_args.split())
    variants = {"all-data": os.path.join(work, "all-data")}
    stage("02_train_expert.py", "--data", data, "--all_data", "--output_dir", variants["all-data"],
          "--max_train_steps", 3400, "--seed", seed, *args.train_args.split())
    experts = [os.path.join(work, "experts", slug(c)) for c in CATEGORIES]
    if scale == args.main_scale:
        variants.update({f"expert-{c}": e for c, e in zip(CATEGORIES, experts)})  # stage 4 names: no ":"
    for method in MERGES if scale == args.main_scale else ["comerge"]:
        variants[method] = merge(experts, data, os.path.join(work, "merged", method), method)
    variants["comerge+distill"] = merge(experts, data, os.path.join(work, "merged", "comerge-distilled"), "comerge",
                                        "--distill_steps", args.distill_steps, "--seed", seed)
    result_file = os.path.join(work, "eval", "results.json")
    if not evaluated(result_file, variants):  # stage 4 re-renders only the variants it lacks
        stage("04_evaluate.py", "--concepts_per_category", scale, "--seeds_per_prompt", args.seeds_per_prompt,
              "--output_dir", os.path.dirname(result_file), "--eval_seed", 2_000_000 + seed * 100_000,
              "--lora", *[f"{k}={v}" for k, v in variants.items()], *args.eval_args.split())
    return json.load(open(result_file))["results"]


def merge(experts, data, out, method, *flags):
    """Co-Merge (stage 3) or a baseline merge (experiments/merges.py) into out, unless an earlier run
    finished a plain merge there (a distillation: stage 3 reads a finished one back, resumes a killed
    one, refuses one of other settings); returns out."""
    if "--distill_steps" in flags or not os.path.exists(os.path.join(out, "lora.json")):
        if method == "comerge":
            stage("03_merge.py", *experts, *flags, "--data", data, "--output_dir", out)
        else:
            stage(os.path.join("experiments", "merges.py"), *experts, "--method", method, "--output_dir", out)
    return out


def evaluated(result_file, variants):
    """Stage 4 has already evaluated these variants (an earlier study may have run fewer)."""
    return os.path.exists(result_file) and set(variants) <= set(json.load(open(result_file))["results"])


def measure(result, key):
    """One measure of a stage 4 result; NaN where an older stage 4 did not count it."""
    return result.get(key, float("nan"))


# The tables' columns: each a function of one variant's stage 4 result.
STATS = {"IP": lambda r: measure(r, "ip"), "own concept": lambda r: measure(r, "own_concept"),
         "redirect": lambda r: measure(r, "redirect"), "fidelity": lambda r: r["fidelity"]}
SCALING_COLUMNS = ("IP", "own concept", "redirect", "fidelity")


def mean_std_cells(stats, variant, columns=tuple(STATS)):
    """One table row's cells: 'mean ± std' of each column for the variant."""
    return " | ".join(f"{stats[k][variant][0]:.3f} ± {stats[k][variant][1]:.3f}" for k in columns)


def summarize(runs, key):
    """{variant: (mean, std)} of results[variant][key] across seeds."""
    values = {}
    for results in runs:
        for variant, r in results.items():
            values.setdefault(variant, []).append(key(r))
    return {v: (float(np.mean(x)), float(np.std(x))) for v, x in values.items()}


def variant_sections(args, by_seed, plt):
    """Every variant at the main scale: the table's first two sections, and variants.png."""
    main = [r[args.main_scale] for r in by_seed]
    stats = {k: summarize(main, stat) for k, stat in STATS.items()}
    unsafe, fidelity = stats["IP"], stats["fidelity"]
    lines = ["", f"## Every variant at {args.main_scale} concepts per category", "",
             "| variant | " + " | ".join(STATS) + " |", "|---" * (len(STATS) + 1) + "|"]
    lines += [f"| {v} | {mean_std_cells(stats, v)} |" for v in unsafe]
    # Collateral damage: each expert alone, the IP it leaves in every category.
    leak = {v: {c: summarize(main, lambda r, c=c: r["per_category"][c]["ip"])[v][0] for c in CATEGORIES}
            for v in unsafe if v.startswith("expert-") or v == "base"}
    lines += ["", "## Each expert alone: IP per category (diagonal = its own category)", "",
              "| expert | " + " | ".join(CATEGORIES) + " |", "|---" * (len(CATEGORIES) + 1) + "|"]
    lines += [f"| {v} | " + " | ".join(f"{leak[v][c]:.2f}" for c in CATEGORIES) + " |" for v in leak]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [v for v in unsafe if not v.startswith("expert-")]
    for ax, stat, title in ((axes[0], unsafe, "IP (lower is safer)"), (axes[1], fidelity, "fidelity")):
        ax.bar(names, [stat[v][0] for v in names], yerr=[stat[v][1] for v in names], capsize=4)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    atomic_write(os.path.join(args.output_dir, "variants.png"), lambda tmp, fig=fig: fig.savefig(tmp, dpi=100))
    return lines


def write_outputs(args, by_seed, minutes):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines = [f"# Claims study on the toy model ({len(by_seed)} seeds, mean ± std; {minutes:.0f} min)"]
    if args.main_scale:  # 0: a run of the scaling rows only
        lines += variant_sections(args, by_seed, plt)
    scaling = {s: {k: summarize([r[s] for r in by_seed], stat) for k, stat in STATS.items()} for s in args.scales}
    lines += ["", "## Scaling with the number of unsafe concepts", "",
              "| concepts | variant | " + " | ".join(SCALING_COLUMNS) + " |", "|---" * (len(SCALING_COLUMNS) + 2) + "|"]
    lines += [f"| {7 * s} | {v} | {mean_std_cells(scaling[s], v, SCALING_COLUMNS)} |"
              for s in args.scales for v in SCALING_VARIANTS]
    write_text(os.path.join(args.output_dir, "table.md"), "\n".join(lines) + "\n")
    write_json(os.path.join(args.output_dir, "results.json"), {"args": vars(args), "minutes": minutes,
                                                               "by_seed": by_seed})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ("IP", "fidelity")):
        for v in SCALING_VARIANTS:
            ax.errorbar([7 * s for s in args.scales], [scaling[s][key][v][0] for s in args.scales],
                        yerr=[scaling[s][key][v][1] for s in args.scales], marker="o", capsize=4, label=v)
        ax.set_xlabel("unsafe concepts")
        ax.set_title(key)
        ax.legend()
    fig.tight_layout()
    atomic_write(os.path.join(args.output_dir, "scaling.png"), lambda tmp, fig=fig: fig.savefig(tmp, dpi=100))
    return "\n".join(lines)


def main():
    args = parse_args()
    started = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    if args.jobs > 1:  # inherited by every stage process
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.jobs)))
    # Longest pipelines first (the main scale also evaluates every merge), so the last ones to
    # start are short and no core idles long at the end.
    tasks = sorted(((seed, scale) for seed in args.seeds for scale in args.scales),
                   key=lambda t: (t[1] != args.main_scale, -t[1], t[0]))
    results = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(run_pipeline, args, *task): task for task in tasks}
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="study (seed, size)"):
                results[futures[future]] = future.result()
        except BaseException:  # one pipeline failed (or Ctrl-C): stop the others, keep what is written
            STOPPING.set()
            pool.shutdown(cancel_futures=True, wait=False)
            for process in list(RUNNING):
                process.kill()
            raise
    by_seed = [{scale: results[seed, scale] for scale in args.scales} for seed in args.seeds]
    minutes = (time.time() - started) / 60
    print(write_outputs(args, by_seed, minutes))
    print(f"study: {len(args.seeds)} seeds in {minutes:.0f} min with {args.jobs} jobs -> {args.output_dir}/table.md")


if __name__ == "__main__":
    main()
