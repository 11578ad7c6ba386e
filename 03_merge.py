"""Stage 3: merge the safety experts into one LoRA.

Co-Merge (the paper): find "which expert has the highest activation for each weight across all
inputs" and merge "only the most active weights per expert". No merge code was released; this is
this repository's reading of it, for every LoRA layer:
  1. each expert's weight delta is dW_e = B_e A_e * alpha / rank;
  2. run each expert while it generates from its own category's unsafe prompts and record the mean
     |input| of every input feature j of the layer, a_e[j] ("activation", our reading);
  3. score every weight by its activation-weighted magnitude, S_e[i, j] = |dW_e[i, j]| * a_e[j];
  4. keep, per weight, the delta of the expert with the highest score;
  5. factor the merged delta back into one LoRA of the experts' summed rank by truncated SVD (our
     choice: a diffusers LoRA file needs factors).

The distillation (--distill_steps; this repository's addition, not the paper's): Co-Merge keeps each
expert only where it wins a weight, too little of it to remove its concept, and the experts' small
side effects on safe prompts add up (experiments/efficacy.md). So the merge is then trained to act as every
expert at once: on each expert's unsafe prompts it must predict what that expert predicts, on the
anchor prompts what the base model predicts. Linear and TIES merges: experiments/merges.py.

    E=experts/toy; experts="$E/hate $E/harassment $E/violence $E/self-harm $E/sexual $E/shocking $E/illegal-activity"
    python 03_merge.py $experts --output_dir merged/toy/comerge
    python 03_merge.py $experts --distill_steps 3200 --output_dir merged/toy/comerge-distilled

The output loads with plain `pipe.load_lora_weights(output_dir)`. A killed distillation resumes from
<output_dir>/checkpoint.pt when rerun with the same settings.
"""
import os
import random
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (LORA_FILE, Parser, add_lora, anchor_condition, claim_output, encode_training_data, entry_point, fail, generate,
                    load_checkpoint, load_pipeline, positive, read_anchors, read_lora, read_pairs, reference_prediction,
                    save_checkpoint, save_lora, step_generator)

DISTILL = dict(learning_rate=1e-3, batch_size=16, expert_weight=300.0, anchor_weight=3000.0)  # experiments/efficacy.md §3
CHECKPOINT_EVERY = 400


# --- The method: Co-Merge -----------------------------------------------------------------------
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
def record_activations(pipe, expert_dirs, prompts_of, prompts_per_expert, sampling_steps, seed):
    """Per expert and LoRA layer, the mean |x_j| of each input feature while the expert generates
    (both guidance branches) from a seeded sample of its own unsafe prompts."""
    activations = []
    for directory, prompts in zip(tqdm(expert_dirs, desc="recording activations"), prompts_of):
        if len(prompts) > prompts_per_expert:  # many (CoProV2: thousands): a seeded sample
            prompts = sorted(random.Random(seed).sample(prompts, prompts_per_expert))
        prompts = (prompts * prompts_per_expert)[:prompts_per_expert]  # few (the toy's 8): repeated
        pipe.load_lora_weights(directory)
        sums, hooks = {}, []
        for name, module in pipe.unet.named_modules():
            if hasattr(module, "base_layer"):  # a layer with the expert's LoRA
                def hook(mod, inputs, name="unet." + name):
                    x = inputs[0].detach().float().flatten(0, -2)
                    count, total = sums.get(name, (0, 0))
                    sums[name] = (count + len(x), total + x.abs().sum(0).cpu())
                hooks.append(module.register_forward_pre_hook(hook))
        generate(pipe, prompts, range(len(prompts)), sampling_steps, batch_size=len(prompts))
        for h in hooks:
            h.remove()
        pipe.unload_lora_weights()
        activations.append({name: total / count for name, (count, total) in sums.items()})
    return activations


def factorize(merged, rank):
    """Truncated SVD of each merged delta, dW ~ B A with B = U sqrt(S), A = sqrt(S) V^T; every layer
    padded to one rank. Returns the factors and the relative error of the whole merge."""
    layers, err_num, err_den = {}, 0.0, 0.0
    for name, delta in merged.items():
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, len(s))
        a, b = pad_rank(s[:r].sqrt()[:, None] * vh[:r], u[:, :r] * s[:r].sqrt(), rank)
        layers[name.removeprefix("unet.") + ".lora_A.weight"] = a.contiguous()
        layers[name.removeprefix("unet.") + ".lora_B.weight"] = b.contiguous()
        err_num += (delta - b @ a).pow(2).sum().item()
        err_den += delta.pow(2).sum().item()
    return layers, (err_num / max(err_den, 1e-30)) ** 0.5


def pad_rank(a, b, rank):
    """LoRA factors (A: r x in, B: out x r) padded with zeros to rank `rank`; B @ A is unchanged."""
    return (torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])]),
            torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1))


# --- This repository's addition: distil the experts into the merge ------------------------------
def distill(pipe, layers, rank, factors, members, data, steps, seed, output_dir):
    """Train the merged LoRA, starting at the merge, to act as every expert at once. Each step takes
    one expert (the experts in turn) and two terms with the same noise and timestep: on that expert's
    unsafe prompts (noised winners and losers alike) predict what *that expert* predicts; on the anchor
    prompts predict what the reference (no LoRA) predicts. No DPO: the experts already learnt the
    preference. members[e]: the indices of expert e's pairs."""
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
    from torch.func import functional_call
    unet, scheduler, device = pipe.unet, pipe.scheduler, pipe.device
    params = add_lora(unet, rank, rank, [name.removeprefix("unet.") for name in factors[0]])  # alpha = rank: the factors carry the scale
    teachers = [{k: v.to(device) for k, v in as_adapter_weights(expert, rank).items()} for expert in factors]
    set_peft_model_state_dict(unet, layers)  # start at the merge
    optimizer = torch.optim.AdamW(params, lr=DISTILL["learning_rate"])

    def draw(step):  # the step's own generator, as in stage 2: the run is reproducible
        g, n, e = step_generator(seed, step), DISTILL["batch_size"], step % len(teachers)
        i = members[e][torch.randint(len(members[e]), (n,), generator=g)]
        a = torch.randint(len(data.anchor_latents), (n,), generator=g)
        noise = torch.randn((n, *data.winner_latents.latent_shape), generator=g).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=g).to(device)
        winner = (torch.rand(n, generator=g) < 0.5).to(device)[:, None, None, None]
        unsafe = scheduler.add_noise(torch.where(winner, data.winner_latents.draw(i), data.loser_latents.draw(i)), noise, t)
        anchor = scheduler.add_noise(data.anchor_latents.draw(a), noise, t)
        return e, unsafe, data.unsafe_embeds[i], anchor, anchor_condition(data, a, torch.rand(n, generator=g) < 0.5), t

    def errors(batch):
        """(expert error, anchor drift): the merge's squared distance to the expert on its unsafe
        prompts, and to the reference on anchor prompts."""
        e, unsafe, unsafe_cond, anchor, anchor_cond, t = batch
        with torch.no_grad():
            reference = reference_prediction(unet, anchor, t, anchor_cond)
            expert = functional_call(unet, teachers[e], (unsafe, t, unsafe_cond)).sample
        out_unsafe, out_anchor = unet(torch.cat([unsafe, anchor]), t.repeat(2),
                                      torch.cat([unsafe_cond, anchor_cond])).sample.chunk(2)
        return F.mse_loss(out_unsafe, expert), F.mse_loss(out_anchor, reference)

    fixed = [draw(-1 - e) for e in range(len(teachers))]  # one fixed batch per expert, reported before and after

    def fixed_errors():
        with torch.no_grad():
            return [sum(errors(b)[k].item() for b in fixed) / len(fixed) for k in (0, 1)]
    before, path = fixed_errors(), os.path.join(output_dir, "checkpoint.pt")
    start = (load_checkpoint(path, params, optimizer, steps) or {"step": 0})["step"]
    if start:
        print(f"03 distill: {'finished, read back' if start == steps else 'resuming'} at step {start} of {steps}")
    for step in tqdm(range(start, steps), desc="distilling the experts into the merge", initial=start, total=steps):
        expert_error, drift = errors(draw(step))
        loss = DISTILL["expert_weight"] * expert_error + DISTILL["anchor_weight"] * drift
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
            save_checkpoint(path, step + 1, params, optimizer)
    after = fixed_errors()
    return get_peft_model_state_dict(unet), {"steps": steps, **DISTILL, "expert_error_before": before[0],
                                             "expert_error_after": after[0], "anchor_drift_before": before[1],
                                             "anchor_drift_after": after[1]}


def as_adapter_weights(expert, rank):
    """One expert's factors {layer: (A, B)} as the merged adapter's parameters (peft's names, zeros
    padding its rank to the merge's), for torch.func.functional_call: the expert's own prediction."""
    weights = {}
    for name, (a, b) in expert.items():
        key = name.removeprefix("unet.")
        weights[key + ".lora_A.default.weight"], weights[key + ".lora_B.default.weight"] = pad_rank(a, b, rank)
    return weights


# --- The shell: arguments, inputs, outputs ------------------------------------------------------
def parse_args():
    parser = Parser(__doc__)
    parser.add_argument("experts", nargs="+", help="expert folders written by 02_train_expert.py")
    parser.add_argument("--output_dir", default="merged/toy/comerge")
    parser.add_argument("--distill_steps", type=positive(int, zero=True), default=0,
                        help="after Co-Merge: steps of distilling the experts into the merge (0: none, the paper's method)")
    parser.add_argument("--data", help="stage 1's folder (default: the one the experts were trained on)")
    parser.add_argument("--leave_out", nargs="*", default=[], metavar="CATEGORY",
                        help="categories of the pair CSV deliberately merged without an expert")
    parser.add_argument("--prompts_per_expert", type=positive(int), default=16, help="unsafe prompts recorded per expert")
    parser.add_argument("--sampling_steps", type=positive(int), default=10, help="DDIM steps while recording")
    parser.add_argument("--seed", type=positive(int, zero=True), default=0)
    return parser.parse_args()


@entry_point
def main():
    args, started = parse_args(), time.time()
    notes, factors = zip(*[read_lora(d) for d in args.experts])
    categories = [n.get("category") for n in notes]
    for i, (note, d) in enumerate(zip(notes, args.experts)):
        for key in ("base_model_sha256", "pairs_csv", "toy_taxonomy"):
            if note.get(key) != notes[0].get(key) and not (key == "pairs_csv" and args.data):
                fail(f"{d} and {args.experts[0]} differ in {key} ({note.get(key)} / {notes[0].get(key)}): merge experts of one run")
        if factors[i].keys() != factors[0].keys():
            fail(f"{d} adapts other layers than {args.experts[0]}: merge experts of one run")
        if categories.count(note.get("category")) > 1 or note.get("category") in (None, "all-data"):
            fail(f"{d}: its category {note.get('category')!r} is not one expert's among the others'")
    pairs_csv = os.path.join(args.data, "pairs.csv") if args.data else notes[0]["pairs_csv"]
    pairs = read_pairs(pairs_csv)
    missing = sorted({c for p in pairs for c in p["categories"]} - set(categories) - set(args.leave_out))
    if missing:
        fail(f"{pairs_csv} has categories without an expert: {', '.join(missing)} (or pass --leave_out)")
    expert_pairs = [[p for p in pairs if c in p["categories"]] for c in categories]
    if not all(expert_pairs):
        fail(f"{pairs_csv} has no pairs of {categories[[bool(rows) for rows in expert_pairs].index(False)]!r}")
    data_dir = os.path.dirname(pairs_csv)
    anchors = sorted(read_anchors(data_dir, "--distill_steps")) if args.distill_steps else []  # the main job's order
    inputs = {f"expert {i}": os.path.join(d, LORA_FILE) for i, d in enumerate(args.experts)}
    inputs.update(pairs=pairs_csv, images=os.path.join(data_dir, "images"),
                  **({"anchors": os.path.join(data_dir, "anchors.csv")} if args.distill_steps else {}))
    out = claim_output(args.output_dir, {k: v for k, v in vars(args).items() if k not in ("output_dir", "experts", "data")},
                       inputs, free={"distill_steps"})
    if not args.distill_steps and os.path.exists(os.path.join(out, "checkpoint.pt")):
        fail(f"{args.output_dir} holds a distilled merge; a merge without distillation goes to another --output_dir")
    model = notes[0]["base_model_path"] if os.path.exists(notes[0]["base_model_path"]) else notes[0]["base_model"]
    pipe = load_pipeline(model, "cuda" if torch.cuda.is_available() else "cpu")
    activations = record_activations(pipe, args.experts, [sorted({p["unsafe_prompt"] for p in rows}) for rows in expert_pairs],
                                     args.prompts_per_expert, args.sampling_steps, args.seed)
    rank = sum(next(iter(f.values()))[0].shape[0] for f in factors)
    layers, error = factorize(co_merge(factors, activations), rank)
    note = {key: notes[0][key] for key in ("base_model", "base_model_path", "base_model_sha256", "toy_taxonomy")}
    note.update(category="merged", method="comerge", experts=list(args.experts), relative_error=error)
    if args.distill_steps:
        members = torch.arange(sum(map(len, expert_pairs))).split([len(rows) for rows in expert_pairs])  # each expert's
        data = encode_training_data(pipe, [p for rows in expert_pairs for p in rows], anchors, os.path.join(data_dir, "images"))
        layers, note["distill"] = distill(pipe, layers, rank, factors, members, data, args.distill_steps, args.seed, out)
        d = note["distill"]
        print(f"03 distill: error to the experts {d['expert_error_before']:.2e} -> {d['expert_error_after']:.2e}, "
              f"anchor drift {d['anchor_drift_before']:.2e} -> {d['anchor_drift_after']:.2e}")
    save_lora(out, layers, rank, note)  # alpha = rank: the factors carry the scale
    print(f"03 merge: {len(factors)} experts -> rank {rank}, relative reconstruction error {error:.4f}, "
          f"{time.time() - started:.0f}s -> {os.path.join(args.output_dir, LORA_FILE)}")


if __name__ == "__main__":
    main()
