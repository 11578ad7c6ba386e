"""Stage 3: merge the safety experts into one LoRA.

Co-Merge (the paper): find "which expert has the highest activation for each weight across all
inputs" and merge "only the most active weights per expert". No merge code was released; this is
this repository's reading of it, for every LoRA layer:
  1. each expert's weight delta is dW_e = B_e A_e * alpha / rank;
  2. run each expert while it generates from unsafe prompts (--activation_prompts own: its own
     category's; all: every expert's, the paper's "across all inputs") and record the mean |input|
     of every input feature j of the layer, a_e[j] ("activation", our reading);
  3. score every weight by its activation-weighted magnitude, S_e[i, j] = |dW_e[i, j]| * a_e[j];
  4. keep, per weight, the delta of the expert with the highest score;
  5. factor the merged delta back into one LoRA by truncated SVD (our choice: a diffusers LoRA file
     needs factors; at the experts' summed rank the toy's Co-Merge delta is off by a relative 0.20,
     and at 64 and 128 (0.07, 0.00) the measured unsafe rate was the same).
Baselines (peft's merge utilities on the same deltas): linear (the average), ties (TIES-merging),
and cat (the sum, i.e. all experts stacked: exact at rank = the sum of their ranks).

The distillation (--distill_steps; this repository's addition, not the paper's): Co-Merge keeps
each expert only where it wins a weight, too little of it to remove its concept, and the experts'
small side effects on safe prompts add up (docs/efficacy.md). So the merge is then trained to act as
every expert at once: on each expert's unsafe prompts it must predict what that expert predicts, on
the anchor prompts what the base model predicts.

    E=experts/toy; experts="$E/hate $E/harassment $E/violence $E/self-harm $E/sexual $E/shocking $E/illegal-activity"
    python 03_merge.py $experts --method comerge --output_dir merged/toy/comerge
    python 03_merge.py $experts --method comerge --distill_steps 3200 --output_dir merged/toy/comerge-distilled

The output loads with plain `pipe.load_lora_weights(output_dir)`. A killed distillation resumes
from <output_dir>/checkpoint/ when rerun with the same settings; a finished one is read back there.
"""
import argparse
import hashlib
import math
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (add_lora, anchor_condition, anchor_images, anchors_csv, check_output_dir, checkpoint_to_resume,
                    data_fingerprint, encode_training_data, fail, finite_float, fraction, generate, load_checkpoint,
                    load_lora_into, load_pipeline, nonnegative_float, nonnegative_int, pair_images, positive_float,
                    positive_int, read_lora, read_pairs, reference_prediction, save_checkpoint, save_lora, step_generator)


# ---------------------------------------------------------------------------------------------
# The method: Co-Merge
# ---------------------------------------------------------------------------------------------
def co_merge(factors, activations):
    """Per weight, the delta of the expert whose |delta| x input activation is largest there.
    factors: per expert {layer: (A, B)}; activations: per expert {layer: mean |x_j| per input feature}."""
    merged = {}
    for name in factors[0]:
        deltas = torch.stack([b @ a for a, b in (f[name] for f in factors)])           # (experts, out, in)
        scores = deltas.abs() * torch.stack([act[name] for act in activations])[:, None, :]
        merged[name] = deltas.gather(0, scores.argmax(0, keepdim=True))[0]
    return merged


@torch.no_grad()
def record_activations(args, pipe, dirs, factors, per_expert):
    """Per expert and LoRA layer, the mean |x_j| of each input feature while the expert generates
    (both guidance branches) from a seeded sample of unsafe prompts: its own category's, or all."""
    every = sorted({p["unsafe_prompt"] for _, pairs in per_expert for p in pairs})
    activations = []
    for d, (_, pairs) in zip(tqdm(dirs, desc="recording activations"), per_expert):
        prompts = every if args.activation_prompts == "all" else sorted({p["unsafe_prompt"] for p in pairs})
        if len(prompts) > args.prompts_per_expert:  # many (CoProV2: thousands): a seeded sample
            prompts = sorted(random.Random(args.seed).sample(prompts, args.prompts_per_expert))
        prompts = (prompts * args.prompts_per_expert)[:args.prompts_per_expert]  # few (the toy's 8): repeat them
        load_lora_into(pipe, d)
        sums, hooks = {}, []
        for name, module in pipe.unet.named_modules():
            if hasattr(module, "base_layer"):  # a layer with the expert's LoRA
                def hook(mod, inputs, name="unet." + name):
                    x = inputs[0].detach().float().flatten(0, -2)
                    count, total = sums.get(name, (0, 0))
                    sums[name] = (count + len(x), total + x.abs().sum(0).cpu())
                hooks.append(module.register_forward_pre_hook(hook))
        generate(pipe, prompts, range(len(prompts)), steps=args.steps, batch_size=len(prompts))
        for h in hooks:
            h.remove()
        pipe.unload_lora_weights()
        activations.append({name: total / count for name, (count, total) in sums.items()})
    return activations


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
        a, b = pad_rank(root[:, None] * vh[:r], u[:, :r] * root, rank)  # every layer at one rank: one adapter
        layers[name.removeprefix("unet.") + ".lora_A.weight"] = a.contiguous()
        layers[name.removeprefix("unet.") + ".lora_B.weight"] = b.contiguous()
        err_num += (delta - b @ a).pow(2).sum().item()
        err_den += delta.pow(2).sum().item()
    return layers, (err_num / max(err_den, 1e-30)) ** 0.5


def pad_rank(a, b, rank):
    """LoRA factors (A: r x in, B: out x r) padded with zeros to rank `rank`; B @ A is unchanged."""
    return (torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])]),
            torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1))


# ---------------------------------------------------------------------------------------------
# This repository's addition: distil the experts into the merge
# ---------------------------------------------------------------------------------------------
def distill(args, pipe, layers, rank, per_expert, factors):
    """Train the merged LoRA, starting at the merge, to act as every expert at once. Each step takes
    one expert's pairs (the experts in turn) and two terms, with the same noise and timestep: on that
    expert's unsafe prompts (noised winners and losers alike) the merge must predict what *that
    expert* predicts; on the anchor prompts (stage 1's images of every safe prompt) it must predict
    what the reference (no LoRA) predicts, which undoes the experts' summed drift on safe prompts.
    No preference pairs, no DPO: the experts already learnt the preference. A pair of several
    categories is taught by each of their experts in turn; --scale scales the starting point only."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from torch.func import functional_call
    pairs = [p for pairs_csv, rows in per_expert for p in pair_images(rows, pairs_csv)]
    members = torch.arange(len(pairs)).split([len(rows) for _, rows in per_expert])  # each expert's pairs
    anchor_files = sorted({anchors_csv(os.path.dirname(pairs_csv)) for pairs_csv, _ in per_expert})
    for path in anchor_files:
        if not os.path.exists(path):
            fail(f"--distill_steps needs anchors: no {path} (stage 1 writes it)")
    anchors = sorted({a for path in anchor_files for a in anchor_images(path)})
    if not anchors:
        fail(f"--distill_steps needs anchors: {', '.join(anchor_files)} list none")
    checkpoint_dir = os.path.join(args.output_dir, "checkpoint")
    state = distillation_checkpoint(args, rank, factors, pairs, anchors, checkpoint_dir)  # before any work
    data = encode_training_data(pipe, pairs, anchors)
    unet, scheduler = pipe.unet, pipe.scheduler
    params = add_lora(unet, rank, rank)  # alpha = rank: the factors carry the scale
    teachers = [{k: v.to(args.device) for k, v in as_adapter_weights(expert, rank).items()} for expert in factors]
    set_peft_model_state_dict(unet, layers)  # start at the merge (the inverse of what save_lora is given)
    optimizer = torch.optim.AdamW(params, lr=args.distill_learning_rate)

    def draw(step):  # a per-step generator, like stage 2: the run is reproducible
        g, n, e = step_generator(args.seed, step), args.distill_batch_size, step % len(teachers)
        i = members[e][torch.randint(len(members[e]), (n,), generator=g)]
        a = torch.randint(len(anchors), (n,), generator=g)
        noise = torch.randn((n, *data.winners.shape[1:]), generator=g).to(args.device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g).to(args.device)
        winner = (torch.rand(n, generator=g) < 0.5).to(args.device)[:, None, None, None]
        unsafe = scheduler.add_noise(torch.where(winner, data.winners[i], data.losers[i]), noise, t)
        anchor = scheduler.add_noise(data.anchor_latents[a], noise, t)
        anchor_cond = anchor_condition(data, a, torch.rand(n, generator=g) < 0.5)
        return e, unsafe, data.prompt_embeds[i], anchor, anchor_cond, t

    def errors(batch):
        """(expert error, anchor drift): the LoRA's squared distance to the expert on its unsafe
        prompts, to the reference on anchor prompts."""
        e, unsafe, unsafe_cond, anchor, anchor_cond, t = batch
        with torch.no_grad():
            reference = reference_prediction(unet, anchor, t, anchor_cond)
            expert = functional_call(unet, teachers[e], (unsafe, t, unsafe_cond)).sample
        out_unsafe, out_anchor = unet(torch.cat([unsafe, anchor]), t.repeat(2),
                                      torch.cat([unsafe_cond, anchor_cond])).sample.chunk(2)
        return F.mse_loss(out_unsafe, expert), F.mse_loss(out_anchor, reference)

    fixed = [draw(-1 - e) for e in range(len(teachers))]  # fixed batches (one per expert), to report before and after

    def fixed_errors():
        with torch.no_grad():
            return [sum(errors(b)[k].item() for b in fixed) / len(fixed) for k in (0, 1)]
    before = fixed_errors()
    start = load_checkpoint(state, {"lora": params}, optimizer) if state else 0
    if start > args.distill_steps:
        fail(f"{checkpoint_dir} is at step {start}, past --distill_steps {args.distill_steps}; "
             "use a new --output_dir for a shorter distillation")
    if state:
        done = "finished, read back" if start == args.distill_steps else "resuming"
        print(f"03 distill: {done} at step {start} of {args.distill_steps} ({checkpoint_dir})")
    for step in tqdm(range(start, args.distill_steps), desc="distilling the experts into the merge", initial=start,
                     total=args.distill_steps):
        expert_error, drift = errors(draw(step))
        loss = args.distill_expert_weight * expert_error + args.distill_anchor_weight * drift
        if not math.isfinite(loss.item()):
            fail(f"distillation loss is {loss.item()} at step {step}; the merged LoRA was not written (the checkpoint "
                 f"in {checkpoint_dir}, if any, is kept: lower --distill_learning_rate in a new --output_dir)")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % DISTILL_CHECKPOINT_EVERY == 0 or step + 1 == args.distill_steps:
            save_checkpoint(checkpoint_dir, {"lora": params}, optimizer, step + 1)
    after = fixed_errors()
    return get_peft_model_state_dict(unet), {
        "steps": args.distill_steps, "learning_rate": args.distill_learning_rate, "batch_size": args.distill_batch_size,
        "expert_weight": args.distill_expert_weight, "anchor_weight": args.distill_anchor_weight,
        "expert_error_before": before[0], "expert_error_after": after[0],
        "anchor_drift_before": before[1], "anchor_drift_after": after[1]}


# A killed distillation resumes from <output_dir>/checkpoint/, written every this many steps; a
# finished one is not redone (rerun run_toy.sh: the merge is read back, not trained again).
DISTILL_CHECKPOINT_EVERY = 400
# What a resumed distillation must share with the run that wrote the checkpoint (--distill_steps may grow).
DISTILL_RESUME_KEYS = ("model", "method", "scale", "density", "activation_prompts", "prompts_per_expert", "steps",
                       "distill_learning_rate", "distill_batch_size", "distill_expert_weight", "distill_anchor_weight",
                       "seed")


def distillation_checkpoint(args, rank, factors, pairs, anchors, checkpoint_dir):
    """The checkpoint to resume from, or None: only one written by the same distillation (the same
    settings, the same experts' weights, the same pairs, anchors and images) is resumed."""
    experts = hashlib.sha256()  # the weights' values (a re-saved expert file may differ in its bytes only)
    for expert in factors:
        for name in sorted(expert):
            experts.update(name.encode() + b"".join(t.contiguous().numpy().tobytes() for t in expert[name]))
    settings = {**{k: getattr(args, k) for k in DISTILL_RESUME_KEYS}, "rank": rank, "experts_sha256": experts.hexdigest(),
                **data_fingerprint(pairs, anchors)}
    return checkpoint_to_resume(checkpoint_dir, settings)


def as_adapter_weights(expert, rank):
    """One expert's factors {layer: (A, B)} as the merged adapter's parameters (peft's names, zeros
    padding rank 4 to the merge's rank), for torch.func.functional_call: the expert's own prediction."""
    weights = {}
    for name, (a, b) in expert.items():
        key = name.removeprefix("unet.")
        weights[key + ".lora_A.default.weight"], weights[key + ".lora_B.default.weight"] = pad_rank(a, b, rank)
    return weights


# ---------------------------------------------------------------------------------------------
# Reading and checking the experts
# ---------------------------------------------------------------------------------------------
def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experts", nargs="+", help="expert folders written by 02_train_expert.py")
    parser.add_argument("--method", choices=["comerge", "linear", "ties", "cat"], default="comerge")
    parser.add_argument("--model", help="the base model (default: the one the experts were trained on)")
    parser.add_argument("--data", help="stage 1 folder whose pairs.csv prompts drive the activations and the "
                        "distillation (default: the pair CSV each expert was trained on)")
    parser.add_argument("--leave_out", nargs="*", default=[], metavar="CATEGORY",
                        help="categories of the pair CSV deliberately merged without an expert")
    parser.add_argument("--rank", type=positive_int, help="rank of the merged LoRA (default: the experts' ranks summed)")
    parser.add_argument("--scale", type=finite_float, default=1.0, help="multiply the merged delta (task-arithmetic lambda)")
    parser.add_argument("--density", type=fraction, default=0.5, help="ties: share of each delta kept")
    parser.add_argument("--activation_prompts", choices=["own", "all"], default="own",
                        help="co-merge: record each expert on its own category's unsafe prompts, or on all")
    parser.add_argument("--prompts_per_expert", type=positive_int, default=16,
                        help="co-merge: a seeded random sample of this many unsafe prompts per expert")
    parser.add_argument("--steps", type=positive_int, default=10, help="co-merge: sampling steps while recording")
    parser.add_argument("--distill_steps", type=nonnegative_int, default=0,
                        help="after merging: steps of distilling the experts into the merged LoRA (0: none)")
    parser.add_argument("--distill_learning_rate", type=positive_float, default=1e-3)
    parser.add_argument("--distill_batch_size", type=positive_int, default=16)
    parser.add_argument("--distill_expert_weight", type=nonnegative_float, default=300.0,
                        help="distill: weight of predicting each expert on its unsafe prompts")
    parser.add_argument("--distill_anchor_weight", type=nonnegative_float, default=3000.0,
                        help="distill: weight of predicting the reference on anchor prompts (docs/efficacy.md, section 3)")
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
    categories = [info.get("category") for info in infos]
    twice = sorted({c for c in categories if categories.count(c) > 1})
    if twice:
        fail(f"two experts of the same category: {', '.join(map(str, twice))}")
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


def check_every_category(args, infos):
    """A merge that silently lacks a category's expert (a typo in a training loop) is refused: every
    category of the pair CSV needs an expert, unless --leave_out names it."""
    pairs_csv = os.path.join(args.data, "pairs.csv") if args.data else infos[0].get("pairs_csv")
    if not pairs_csv or not os.path.exists(pairs_csv) or "all" in {i.get("category") for i in infos}:
        return
    missing = sorted({c for p in read_pairs(pairs_csv) for c in p["categories"]} - {i.get("category") for i in infos}
                     - set(args.leave_out))
    if missing:
        fail(f"{pairs_csv} has categories without an expert: {', '.join(missing)} "
             "(train them, or pass --leave_out to merge without them)")


def main():
    args = parse_args()
    args.output_dir = args.output_dir or os.path.join("merged", args.method)
    check_output_dir(args.output_dir)
    started = time.time()
    infos, factors = load_experts(args.experts)
    check_every_category(args, infos)
    rank = args.rank or sum(i["rank"] for i in infos)
    if args.distill_steps and rank < infos[0]["rank"]:
        fail(f"--distill_steps needs --rank of at least the experts' rank ({infos[0]['rank']}): the merge must be able "
             f"to act as each expert; got --rank {rank}")
    model = args.model = args.model or infos[0]["base_model"]  # as the distillation's checkpoint records it
    if args.method == "comerge" or args.distill_steps:
        pipe = load_pipeline(model, args.device)
        if args.distill_steps and pipe.unet.config.sample_size > 8:  # larger than the toy's 8x8 latents
            fail("--distill_steps has run on the toy model only; on a model this size it would train in fp32 "
                 "without gradient checkpointing (beyond one 80 GB GPU for SD 1.5): not supported yet")
        per_expert = expert_pairs(args, infos, args.experts)
    if args.method == "comerge":
        merged = co_merge(factors, record_activations(args, pipe, args.experts, factors, per_expert))
    else:
        merged = peft_merge(args.method, factors, args.density)
    merged = {name: delta * args.scale for name, delta in merged.items()}
    layers, error = factorize(merged, rank)
    info = {"base_model": infos[0]["base_model"], "category": "merged", "method": args.method, "scale": args.scale,
            "activation_prompts": args.activation_prompts, "experts": args.experts, "relative_error": error,
            "toy_taxonomy": infos[0].get("toy_taxonomy")}
    if args.distill_steps:
        layers, info["distill"] = distill(args, pipe, layers, rank, per_expert, factors)
        d = info["distill"]
        print(f"03 distill: error to the experts {d['expert_error_before']:.2e} -> {d['expert_error_after']:.2e}, "
              f"anchor drift {d['anchor_drift_before']:.2e} -> {d['anchor_drift_after']:.2e} in {args.distill_steps} steps")
    save_lora(args.output_dir, layers, rank, rank, info)  # alpha = rank: the factors carry the scale
    print(f"03 merge ({args.method}): {len(infos)} experts -> rank {rank}, relative reconstruction error "
          f"{error:.4f}{' (before the distillation)' if args.distill_steps else ''}, {time.time() - started:.0f}s -> "
          f"{args.output_dir}")


if __name__ == "__main__":
    main()
