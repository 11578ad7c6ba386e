"""The baselines that Co-Merge (stage 3) is compared with: the linear and TIES merges of the same experts.

peft's merge utilities on each layer's weight delta B @ A (alpha / rank folded in), factored back into
one LoRA of the experts' summed rank by stage 3's truncated SVD (`factorize`):
  * linear: the experts' average (task arithmetic, each weighted 1/n);
  * ties: TIES-merging (Yadav et al., 2023): each delta keeps its --density largest entries, each weight
    takes the sign of the larger total, and the entries of that sign are averaged.

    python experiments/merges.py experts/toy/* --method ties --output_dir merged/toy/ties

The output loads with plain `pipe.load_lora_weights(output_dir)`, as stage 3's does.
"""
import argparse
import os
import time

import torch

import lab  # the repository root on sys.path
from common import LORA_FILE, claim_output, entry_point, fail, positive, read_lora, save_lora

merge_stage = lab.load_stage("03_merge.py")


def merge(method, factors, density):
    """{layer: merged weight delta} of the experts' factors (per expert {layer: (A, B)})."""
    from peft.utils.merge_utils import task_arithmetic, ties
    n, merged = len(factors), {}
    for name in factors[0]:
        deltas = [b @ a for a, b in (f[name] for f in factors)]
        merged[name] = (task_arithmetic(deltas, torch.full((n,), 1 / n)) if method == "linear"
                        else ties(deltas, torch.ones(n), density, "total"))
    return merged


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experts", nargs="+", help="expert folders written by 02_train_expert.py")
    parser.add_argument("--method", choices=["linear", "ties"], required=True)
    parser.add_argument("--density", type=positive(float), help="ties: the share of each delta kept (default 0.5)")
    parser.add_argument("--output_dir", help="default: merged/<method>")
    args = parser.parse_args(argv)
    if args.density is not None and (args.method != "ties" or args.density > 1):
        parser.error("--density: a share in (0, 1], for --method ties only")
    args.density = args.density or (0.5 if args.method == "ties" else None)
    return args


@entry_point
def main():
    args, started = parse_args(), time.time()
    notes, factors = zip(*[read_lora(d) for d in args.experts])
    shapes = [{name: (b.shape[0], a.shape[1]) for name, (a, b) in f.items()} for f in factors]
    for note, shape, d in zip(notes, shapes, args.experts):
        if note.get("base_model_sha256") != notes[0].get("base_model_sha256") or shape != shapes[0]:
            fail(f"{d} and {args.experts[0]} differ in their base model or their layers: merge experts of one run")
    settings = {"method": args.method, "density": args.density}
    out = claim_output(args.output_dir or os.path.join("merged", args.method), settings,
                       {f"expert {i}": d for i, d in enumerate(args.experts)})  # the expert folders: never written into
    rank = sum(next(iter(f.values()))[0].shape[0] for f in factors)
    layers, error = merge_stage.factorize(merge(args.method, factors, args.density), rank)
    note = {key: notes[0].get(key) for key in ("base_model", "base_model_path", "base_model_sha256", "toy_taxonomy")}
    note.update(category="merged", method=args.method, density=args.density, experts=list(args.experts),
                relative_error=error)
    save_lora(out, layers, rank, note)  # alpha = rank: the factors carry the scale
    print(f"merges ({args.method}): {len(factors)} experts -> rank {rank}, relative reconstruction error {error:.4f}, "
          f"{time.time() - started:.0f}s -> {os.path.join(out, LORA_FILE)}")


if __name__ == "__main__":
    main()
