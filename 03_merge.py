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

Co-Merge keeps ~0.6 of each expert (README, "Merging"), too little to remove its concept, and a
merge scaled up to make up for it (--scale) drifts on safe prompts, because the experts' small side
effects add up. --repair_steps (this repository's addition, not the paper's) then trains the
merged LoRA briefly with prior preservation alone, no preference pairs: on the anchor prompts it
must predict what the reference predicts, on the unsafe prompts what the merge predicted.

    python 03_merge.py experts/hate experts/violence ... --method comerge --output_dir merged/comerge
    python 03_merge.py experts/hate experts/violence ... --method comerge --scale 1.75 --repair_steps 800 \
        --output_dir merged/comerge-repaired

The output loads with plain `pipe.load_lora_weights(output_dir)`.
"""
import argparse
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (LORA_TARGETS, add_lora, anchor_images, anchors_csv, check_output_dir, encode_training_data, fail,
                    finite_float, fraction, generate, load_pipeline, nonnegative_float, nonnegative_int, pair_images,
                    load_lora_into, positive_float, positive_int, read_lora, read_pairs, save_lora)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experts", nargs="+", help="expert folders written by 02_train_expert.py")
    parser.add_argument("--method", choices=["comerge", "linear", "ties", "cat"], default="comerge")
    parser.add_argument("--rank", type=positive_int, help="rank of the merged LoRA (default: the experts' ranks summed)")
    parser.add_argument("--scale", type=finite_float, default=1.0, help="multiply the merged delta (task-arithmetic lambda)")
    parser.add_argument("--density", type=fraction, default=0.5, help="ties: share of each delta kept")
    parser.add_argument("--select", choices=["weight", "row", "module", "factors"], default="weight",
                        help="co-merge: what one expert wins: each weight (the paper), each output row, each "
                             "whole layer, or each weight of A and of B separately")
    parser.add_argument("--statistic", choices=["mean", "rms"], default="mean",
                        help="co-merge, select weight/factors: the input activation, mean |x| or root mean square")
    parser.add_argument("--data", help="co-merge, repair: stage 1 folder whose pairs.csv prompts drive the activations "
                        "(default: the pair CSV each expert was trained on)")
    parser.add_argument("--prompts_per_expert", type=positive_int, default=16)
    parser.add_argument("--steps", type=positive_int, default=10, help="co-merge: sampling steps while recording")
    parser.add_argument("--repair_steps", type=nonnegative_int, default=0,
                        help="after merging: steps of prior preservation on the merged LoRA (default 0: none)")
    parser.add_argument("--keep_target", choices=["merge", "experts"], default="merge",
                        help="repair: on unsafe prompts keep the merge's prediction, or each category's own expert's (distillation)")
    parser.add_argument("--repair_learning_rate", type=positive_float, default=1e-3)
    parser.add_argument("--repair_batch_size", type=positive_int, default=16)
    parser.add_argument("--anchor_weight", type=nonnegative_float, default=300.0,
                        help="repair: weight of staying the reference on anchor prompts (stage 2's term)")
    parser.add_argument("--keep_weight", type=nonnegative_float, default=100.0,
                        help="repair: weight of keeping the merge's prediction on the unsafe prompts")
    parser.add_argument("--seed", type=int, default=0)
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
        shapes = {n: (a.shape[1], b.shape[0]) for n, (a, b) in layers.items()}
        if shapes != {n: (a.shape[1], b.shape[0]) for n, (a, b) in factors[0].items()}:
            fail(f"{d} has layers of other shapes than {dirs[0]}")
        if info.get("toy_taxonomy") != infos[0].get("toy_taxonomy"):
            fail(f"{d} was trained on a toy taxonomy of {info.get('toy_taxonomy')} concepts per category, "
                 f"{dirs[0]} on {infos[0].get('toy_taxonomy')}")
    return infos, factors


def expert_pairs(args, infos, dirs):
    """Per expert, (pair CSV, its own pairs): its category's rows of the CSV it was trained on (or --data's)."""
    per_expert, files = [], {}  # experts usually share one pair file: read it once
    for info, d in zip(infos, dirs):
        pairs_csv = os.path.join(args.data, "pairs.csv") if args.data else info.get("pairs_csv")
        if not pairs_csv:
            fail(f"{d}/lora.json does not say which pairs it was trained on; pass --data")
        if pairs_csv not in files:
            files[pairs_csv] = read_pairs(pairs_csv)
        pairs = [dict(p) for p in files[pairs_csv] if info["category"] == "all" or info["category"] in p["categories"]]
        if not pairs:
            fail(f"no pairs of category {info['category']!r} in {pairs_csv}")
        per_expert.append((pairs_csv, pairs))
    return per_expert


def record_activations(args, pipe, dirs, factors, per_expert):
    """Per expert and layer, how active it is while generating from its own category's unsafe
    prompts (both guidance branches), for inputs x of the layer:
      "input":  per input feature j, mean |x_j| (or, --statistic rms, the root mean square);
      "output": per output feature i, mean |(dW x)_i|, the expert's own contribution;
      "hidden": per LoRA component k, mean |(A x)_k|."""
    activations = []
    for d, layers, (_, pairs) in zip(tqdm(dirs, desc="recording activations"), factors, per_expert):
        prompts = sorted({p["unsafe_prompt"] for p in pairs})
        prompts = (prompts * args.prompts_per_expert)[:args.prompts_per_expert]
        load_lora_into(pipe, d)
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


def teacher_params(unet, factors, rank):
    """Each expert's factors padded to the merged rank, under the names of the merged LoRA's parameters:
    functional_call(unet, teacher_params[e]) is expert e alone."""
    names = {name for name, p in unet.named_parameters() if p.requires_grad}
    teachers = []
    for layers in factors:
        params = {}
        for layer, (a, b) in layers.items():
            stem = layer.removeprefix("unet.")
            k = a.shape[0]
            pa = a.new_zeros(rank, a.shape[1]); pa[:k] = a
            pb = b.new_zeros(b.shape[0], rank); pb[:, :k] = b
            params[stem + ".lora_A.default.weight"], params[stem + ".lora_B.default.weight"] = pa, pb
        assert set(params) == names, sorted(set(params) ^ names)[:4]
        teachers.append(params)
    return teachers


def repair(args, pipe, layers, rank, targets, per_expert, factors=None):
    """Prior preservation after the merge (this repository's addition; the paper stops at the merge).

    The merged LoRA trains on two terms, with the same noise and timestep for both: on the anchor
    prompts (stage 1's images of every safe prompt) it must predict what the reference (no LoRA)
    predicts, which undoes the experts' summed drift on safe prompts; on the experts' unsafe prompts
    (noised winners and losers alike) it must predict what the merge itself predicted, which keeps
    what the experts removed. No preference pairs and no DPO: the experts' work is not redone."""
    from torch.func import functional_call
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    pairs = [p for pairs_csv, rows in per_expert for p in pair_images(rows, pairs_csv)]
    owner = torch.tensor([e for e, (_, rows) in enumerate(per_expert) for _ in rows])  # each pair's expert
    anchor_files = sorted({anchors_csv(os.path.dirname(pairs_csv)) for pairs_csv, _ in per_expert})
    for path in anchor_files:
        if not os.path.exists(path):
            fail(f"--repair_steps needs anchors: no {path} (stage 1 writes it)")
    anchors = sorted({a for path in anchor_files for a in anchor_images(path)})
    if not anchors:
        fail(f"--repair_steps needs anchors: {', '.join(anchor_files)} list none")
    winners, losers, anchor_latents, unsafe_embeds, anchor_embeds, empty = encode_training_data(pipe, pairs, anchors)
    unet, scheduler = pipe.unet, pipe.scheduler
    params = add_lora(unet, rank, rank, targets)  # alpha = rank: the factors carry the scale
    set_peft_model_state_dict(unet, layers)  # start at the merge (the inverse of what save_lora is given)
    merge = {name: p.detach().clone() for name, p in unet.named_parameters() if p.requires_grad}
    teachers = teacher_params(unet, factors, rank) if args.keep_target == "experts" else None
    optimizer = torch.optim.AdamW(params, lr=args.repair_learning_rate)

    def draw(step):  # a per-step generator, like stage 2: the run is reproducible
        g, n = torch.Generator().manual_seed(args.seed * 100003 + step), args.repair_batch_size
        i, a = torch.randint(len(pairs), (n,), generator=g), torch.randint(len(anchors), (n,), generator=g)
        noise = torch.randn((n, *winners.shape[1:]), generator=g).to(args.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g).to(args.device)
        winner = (torch.rand(n, generator=g) < 0.5).to(args.device)[:, None, None, None]
        unsafe = scheduler.add_noise(torch.where(winner, winners[i], losers[i]), noise, t)
        anchor = scheduler.add_noise(anchor_latents[a], noise, t)
        anchor_cond = anchor_embeds[a].clone()  # half of them empty: guidance's unconditional branch
        anchor_cond[torch.rand(n, generator=g) < 0.5] = empty
        return unsafe, unsafe_embeds[i], anchor, anchor_cond, t, owner[i]

    def errors(batch):
        """(keep, drift): the LoRA's squared distance to the merge on unsafe prompts, to the
        reference on anchor prompts."""
        unsafe, unsafe_cond, anchor, anchor_cond, t, who = batch
        with torch.no_grad():
            unet.disable_adapters()
            reference = unet(anchor, t, anchor_cond).sample
            unet.enable_adapters()
            if teachers is None:
                merged = functional_call(unet, merge, (unsafe, t, unsafe_cond)).sample
            else:  # each unsafe sample's target: its own category's expert
                merged = torch.empty_like(unsafe)
                for e in who.unique().tolist():
                    m = who == e
                    merged[m] = functional_call(unet, teachers[e], (unsafe[m], t[m], unsafe_cond[m])).sample
        out_unsafe, out_anchor = unet(torch.cat([unsafe, anchor]), t.repeat(2), torch.cat([unsafe_cond, anchor_cond])).sample.chunk(2)
        return F.mse_loss(out_unsafe, merged), F.mse_loss(out_anchor, reference)

    held_out = draw(-1)  # one fixed batch, to report the drift before and after
    with torch.no_grad():
        drift_before = errors(held_out)[1].item()
    for step in tqdm(range(args.repair_steps), desc="repairing the merge"):
        keep, drift = errors(draw(step))
        loss = args.keep_weight * keep + args.anchor_weight * drift
        if not math.isfinite(loss.item()):
            fail(f"repair loss is {loss.item()} at step {step}; nothing was written")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        keep, drift = (e.item() for e in errors(held_out))
    return get_peft_model_state_dict(unet), {"steps": args.repair_steps, "learning_rate": args.repair_learning_rate,
                                             "anchor_weight": args.anchor_weight, "keep_weight": args.keep_weight,
                                             "anchor_drift_before": drift_before, "anchor_drift_after": drift,
                                             "keep_error_after": keep}


def main():
    args = parse_args()
    args.output_dir = args.output_dir or os.path.join("merged", args.method)
    check_output_dir(args.output_dir)
    started = time.time()
    infos, factors = load_experts(args.experts)
    rank = args.rank or sum(i["rank"] for i in infos)
    targets = infos[0].get("targets", LORA_TARGETS)
    if args.method == "comerge" or args.repair_steps:
        pipe = load_pipeline(infos[0]["base_model"], args.device)
        per_expert = expert_pairs(args, infos, args.experts)
    if args.method == "comerge":
        merged = co_merge(factors, record_activations(args, pipe, args.experts, factors, per_expert), args.select)
    else:
        merged = peft_merge(args.method, factors, args.density)
    merged = {name: delta * args.scale for name, delta in merged.items()}
    layers, error = factorize(merged, rank)
    info = {"base_model": infos[0]["base_model"], "category": "merged", "method": args.method, "scale": args.scale,
            "experts": args.experts, "relative_error": error, "toy_taxonomy": infos[0].get("toy_taxonomy")}
    if args.repair_steps:
        layers, info["repair"] = repair(args, pipe, layers, rank, targets, per_expert, factors)
        print(f"03 repair: anchor drift {info['repair']['anchor_drift_before']:.2e} -> "
              f"{info['repair']['anchor_drift_after']:.2e} in {args.repair_steps} steps")
    save_lora(args.output_dir, layers, rank, rank, info, targets)  # alpha = rank: the factors carry the scale
    print(f"03 merge ({args.method}): {len(infos)} experts -> rank {rank}, relative reconstruction error "
          f"{error:.4f}, {time.time() - started:.0f}s -> {args.output_dir}")


if __name__ == "__main__":
    main()
