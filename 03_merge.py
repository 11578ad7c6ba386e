"""Stage 3: merge the safety experts into one LoRA.

Co-Merge (the paper): find "which expert has the highest activation for each weight across all
inputs" and merge "only the most active weights per expert". Concretely, for every LoRA layer:
  1. each expert's weight delta is dW_e = B_e A_e * alpha / rank;
  2. run each expert on its own category's prompts and record the mean |input| of every input
     feature j of the layer, a_e[j];
  3. score every weight by its activation-weighted magnitude, S_e[i, j] = |dW_e[i, j]| * a_e[j];
  4. keep, per weight, the delta of the expert with the highest score;
  5. factor the merged delta back into one LoRA by truncated SVD.
Baselines (peft's merge utilities on the same deltas): linear (the average), ties (TIES-merging),
and cat (the sum, i.e. all experts stacked: exact at rank = the sum of their ranks).

    python 03_merge.py experts/hate experts/violence ... --method comerge --output_dir merged/comerge

The output loads with plain `pipe.load_lora_weights(output_dir)`.
"""
import argparse
import os
import time

import torch
from tqdm import tqdm

from common import LORA_TARGETS, fail, generate, load_pipeline, read_lora, read_pairs, save_lora


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experts", nargs="+", help="expert folders written by 02_train_expert.py")
    parser.add_argument("--method", choices=["comerge", "linear", "ties", "cat"], default="comerge")
    parser.add_argument("--rank", type=int, help="rank of the merged LoRA (default: the experts' ranks summed)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the merged delta (task-arithmetic lambda)")
    parser.add_argument("--density", type=float, default=0.5, help="ties: share of each delta kept")
    parser.add_argument("--select", choices=["weight", "row", "module", "factors"], default="weight",
                        help="co-merge: what one expert wins: each weight (the paper), each output row, each "
                             "whole layer, or each weight of A and of B separately")
    parser.add_argument("--statistic", choices=["mean", "rms"], default="mean",
                        help="co-merge, select weight/factors: the input activation, mean |x| or root mean square")
    parser.add_argument("--data", help="co-merge: stage 1 folder whose pairs.csv prompts drive the activations "
                        "(default: the pair CSV each expert was trained on)")
    parser.add_argument("--prompts_per_expert", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="co-merge: sampling steps while recording")
    parser.add_argument("--output_dir", help="default: merged/<method>")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args()


def load_experts(dirs):
    """The experts' infos and factors {layer: (A, B)}, with alpha / rank folded into B so that the
    layer's weight delta is simply B @ A; refuses experts that cannot be merged."""
    infos, factors = [], []
    for d in dirs:
        info, layers = read_lora(d)
        infos.append(info)
        factors.append({name: (a, b * info["alpha"] / info["rank"]) for name, (a, b) in layers.items()})
    for info, layers, d in zip(infos, factors, dirs):
        if info["base_model"] != infos[0]["base_model"]:
            fail(f"{d} was trained on {info['base_model']}, {dirs[0]} on {infos[0]['base_model']}")
        if info["rank"] != infos[0]["rank"]:
            fail(f"{d} has rank {info['rank']}, {dirs[0]} rank {infos[0]['rank']}: retrain with one rank")
        if layers.keys() != factors[0].keys():
            fail(f"{d} adapts other layers than {dirs[0]}")
        if info.get("toy_taxonomy") != infos[0].get("toy_taxonomy"):
            fail(f"{d} was trained on a toy taxonomy of {info.get('toy_taxonomy')} concepts per category, "
                 f"{dirs[0]} on {infos[0].get('toy_taxonomy')}")
    return infos, factors


def record_activations(args, infos, dirs, factors):
    """Per expert and layer, how active it is while generating from its own category's unsafe
    prompts (both guidance branches), for inputs x of the layer:
      "input":  per input feature j, mean |x_j| (or, --statistic rms, the root mean square);
      "output": per output feature i, mean |(dW x)_i|, the expert's own contribution;
      "hidden": per LoRA component k, mean |(A x)_k|."""
    pipe = load_pipeline(infos[0]["base_model"], args.device)
    activations, pair_files = [], {}  # experts usually share one pair file: read it once
    for info, d, layers in zip(infos, tqdm(dirs, desc="recording activations"), factors):
        pairs_csv = os.path.join(args.data, "pairs.csv") if args.data else info.get("pairs_csv")
        if not pairs_csv:
            fail(f"{d}/lora.json does not say which pairs it was trained on; pass --data")
        if pairs_csv not in pair_files:
            pair_files[pairs_csv] = read_pairs(pairs_csv)
        prompts = sorted({p["unsafe_prompt"] for p in pair_files[pairs_csv]
                          if info["category"] in ("all", p["category"])})
        if not prompts:
            fail(f"no prompts of category {info['category']!r} in {pairs_csv}")
        prompts = (prompts * args.prompts_per_expert)[:args.prompts_per_expert]
        pipe.load_lora_weights(d)
        sums, hooks = {}, []
        for name, module in pipe.unet.named_modules():
            if hasattr(module, "base_layer"):  # a layer with the expert's LoRA
                def hook(mod, inputs, name="unet." + name):
                    x = inputs[0].detach().float().flatten(0, -2)
                    a, b = layers[name]
                    hidden = x @ a.T.to(x.device)
                    stats = {"input": x.pow(2) if args.statistic == "rms" else x.abs(),
                             "output": (hidden @ b.T.to(x.device)).abs(), "hidden": hidden.abs()}
                    total = sums.setdefault(name, {"count": 0})
                    total["count"] += len(x)
                    for key, value in stats.items():
                        total[key] = total.get(key, 0) + value.sum(0).cpu()
                hooks.append(module.register_forward_pre_hook(hook))
        generate(pipe, prompts, range(len(prompts)), steps=args.steps, batch_size=len(prompts))
        for h in hooks:
            h.remove()
        pipe.unload_lora_weights()
        means = {name: {k: v / t["count"] for k, v in t.items() if k != "count"} for name, t in sums.items()}
        if args.statistic == "rms":
            for m in means.values():
                m["input"] = m["input"].sqrt()
        activations.append(means)
    return activations


def co_merge(factors, activations, select="weight"):
    """Per weight (or per output row, or per whole layer), the delta of the expert that is most
    active there. select "factors" applies the per-weight rule to A and B separately."""
    merged = {}
    for name in factors[0]:
        act = {k: torch.stack([a[name][k] for a in activations]) for k in ("input", "output", "hidden")}
        if select == "factors":  # A's weights scored by their inputs, B's by the LoRA's hidden units
            a = pick(torch.stack([f[name][0] for f in factors]), act["input"][:, None, :])
            b = pick(torch.stack([f[name][1] for f in factors]), act["hidden"][:, None, :])
            merged[name] = b @ a
            continue
        stacked = torch.stack([b @ a for a, b in (f[name] for f in factors)])       # (E, out, in)
        if select == "weight":   # the paper's rule: activation-weighted magnitude of each weight
            scores = stacked.abs() * act["input"][:, None, :]
        elif select == "row":    # whole output rows, by the expert's output activation
            scores = act["output"][:, :, None].expand_as(stacked)
        else:                    # whole layers, by the expert's total output activation
            scores = act["output"].sum(1)[:, None, None].expand_as(stacked)
        merged[name] = stacked.gather(0, scores.argmax(0, keepdim=True))[0]
    return merged


def pick(stacked, activation):
    """Per entry, the value of the expert with the highest |value| x activation."""
    scores = stacked.abs() * activation
    return stacked.gather(0, scores.argmax(0, keepdim=True))[0]


def peft_merge(method, factors, density):
    from peft.utils.merge_utils import task_arithmetic, ties
    n = len(factors)
    merged = {}
    for name in factors[0]:
        tensors = [b @ a for a, b in (f[name] for f in factors)]
        if method == "linear":
            merged[name] = task_arithmetic(tensors, torch.full((n,), 1 / n))
        elif method == "cat":
            merged[name] = task_arithmetic(tensors, torch.ones(n))
        else:
            merged[name] = ties(tensors, torch.ones(n), density, "total")
    return merged


def factorize(merged, rank):
    """Truncated SVD of each merged delta: dW ~ B A with B = U sqrt(S), A = sqrt(S) V^T."""
    layers, err_num, err_den = {}, 0.0, 0.0
    for name, delta in merged.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, len(s))
        root = s[:r].sqrt()
        b, a = u[:, :r] * root, root[:, None] * vh[:r]
        if r < rank:  # keep every layer at the same rank so that the file loads as one adapter
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], 1)
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], 0)
        layers[name.removeprefix("unet.") + ".lora_A.weight"] = a.contiguous()
        layers[name.removeprefix("unet.") + ".lora_B.weight"] = b.contiguous()
        err_num += (delta - b @ a).pow(2).sum().item()
        err_den += delta.pow(2).sum().item()
    return layers, (err_num / max(err_den, 1e-30)) ** 0.5


def main():
    args = parse_args()
    args.output_dir = args.output_dir or os.path.join("merged", args.method)
    started = time.time()
    infos, factors = load_experts(args.experts)
    rank = args.rank or sum(i["rank"] for i in infos)
    if args.method == "comerge":
        merged = co_merge(factors, record_activations(args, infos, args.experts, factors), args.select)
    else:
        merged = peft_merge(args.method, factors, args.density)
    merged = {name: delta * args.scale for name, delta in merged.items()}
    layers, error = factorize(merged, rank)
    save_lora(args.output_dir, layers, rank, rank,  # alpha = rank: the factors carry the scale
              {"base_model": infos[0]["base_model"], "category": "merged", "method": args.method,
               "experts": args.experts, "relative_error": error,
               "toy_taxonomy": infos[0].get("toy_taxonomy")},
              infos[0].get("targets", LORA_TARGETS))
    print(f"03 merge ({args.method}): {len(infos)} experts -> rank {rank}, relative reconstruction error "
          f"{error:.4f}, {time.time() - started:.0f}s -> {args.output_dir}")


if __name__ == "__main__":
    main()
