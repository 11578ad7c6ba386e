"""Stage 2: train one safety expert (a LoRA) per category with the Diffusion-DPO loss.

Each pair from stage 1 holds a loser (the model's image of an unsafe prompt) and a winner (its image
of the safe counterpart). Conditioned on the *unsafe* prompt, the expert learns to prefer the winner:
relative to the reference model (the same UNet with the LoRA switched off), it must denoise the
winner better and the loser worse. The loss has three named terms (`expert_loss`):
  * dpo: Diffusion-DPO, the paper's and the release's loss (`dpo_loss`);
  * sft: under the unsafe prompt, denoise the noisy winner and loser as the reference does under the
    pair's *safe* prompt (this repository's; it moves what the model samples: experiments/efficacy.md);
  * anchor: prior preservation, on anchors (the model's own images of safe prompts) predict what
    the reference predicts, so that the expert changes its concept and nothing else (this repository's).

    python 02_train_expert.py --category Violence            # one expert -> experts/toy/violence
    python 02_train_expert.py --category each                # one expert per category of the pair CSV
    python 02_train_expert.py --all_data                     # one LoRA on all pairs (the release's): the baseline
    python 02_train_expert.py --preset release ...           # the release's recipe for SD 1.5 (pure DPO)

Output: <output_dir>/pytorch_lora_weights.safetensors (`pipe.load_lora_weights(output_dir)`), lora.json
(a note), log.json, curve.png and run.json. A killed run resumes from <output_dir>/checkpoint.pt.
"""
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import toyworld
from common import (LORA_FILE, Parser, add_lora, anchor_condition, atomic_write, claim_output, digest, encode_training_data,
                    entry_point, fail, load_checkpoint, load_pipeline, output_path, positive, read_anchors,
                    read_pairs, reference_prediction, save_checkpoint, save_lora, step_generator, write_json)

# The recipes: the toy's (this repository's, experiments/efficacy.md) and the release's launcher and train.py, value for value.
PRESETS = {
    "toy": dict(beta=500, sft_weight=10.0, anchor_weight=100.0, empty_prompt_share=0.0, rank=4, alpha=4,
                train_batch_size=32, gradient_accumulation_steps=1, learning_rate=3e-3, scale_lr=False,
                lr_warmup_steps=0, max_train_steps=300, mixed_precision="no", max_grad_norm=0.0, augment=False),
    # The launcher's 4 pairs x 4 accumulated is run as 16 x 1 (~38 GB): the same update, twice the pairs/s
    "release": dict(beta=5000, sft_weight=0.0, anchor_weight=0.0, empty_prompt_share=0.2, rank=4, alpha=4,
                    train_batch_size=16, gradient_accumulation_steps=1, learning_rate=1e-5, scale_lr=True,
                    lr_warmup_steps=500, max_train_steps=2000, mixed_precision="fp16", max_grad_norm=1.0, augment=True)}
DTYPES = {"no": torch.float32, "fp16": torch.float16}
CHECKPOINT_EVERY = 50


# --- The method: the loss of one batch, in three named terms -----------------------------------
def dpo_loss(model_winner, model_loser, ref_winner, ref_loser, noise, beta):
    """Diffusion-DPO (Wallace et al., 2023) as the SafetyDPO release computes it. Each argument is a
    noise prediction for the same noise and timestep; err is its per-sample MSE to the noise:
        loss = -log sigmoid(-beta/2 * [(err_w - ref_err_w) - (err_l - ref_err_l)])
    diffusers' train_diffusion_dpo.py writes -beta_dpo * [...] without the 1/2: its 2500 is 5000 here.
    Returns the loss and the logits (> 0: the pair is already preferred the right way)."""
    def err(pred):
        return (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
    logits = -0.5 * beta * ((err(model_winner) - err(ref_winner)) - (err(model_loser) - err(ref_loser)))
    return -F.logsigmoid(logits).mean(), logits


def expert_loss(recipe, unet, scheduler, batch, data):
    """(loss, terms, DPO logits) of one batch: the DPO term and, where their weights are not 0, SFT toward
    the safe counterpart and prior preservation on anchors. Winner, loser and anchor share noise and timestep."""
    idx, t, noise = batch["pairs"], batch["t"], batch["noise"]
    unsafe, safe = data.unsafe_embeds[idx].clone(), data.safe_embeds[idx].clone()
    unsafe[batch["empty"]] = safe[batch["empty"]] = data.empty_embed  # the release drops 20% of prompts
    winner, loser = (scheduler.add_noise(latents.draw(idx, batch.get(f"{side}_flip"), batch.get(f"{side}_eps")), noise, t)
                     for side, latents in (("winner", data.winner_latents), ("loser", data.loser_latents)))
    policy = {"winner": (winner, unsafe), "loser": (loser, unsafe)}  # what the LoRA predicts on (named blocks)
    if recipe["anchor_weight"]:
        policy["anchor"] = (scheduler.add_noise(data.anchor_latents.draw(batch["anchors"]), noise, t),
                            anchor_condition(data, batch["anchors"], batch["anchor_empty"]))
    reference = dict(policy)  # the reference predicts the same blocks, and for SFT the pair under its safe prompt
    if recipe["sft_weight"]:
        reference.update(safe_winner=(winner, safe), safe_loser=(loser, safe))
    dtype = DTYPES[recipe["mixed_precision"]]
    with torch.autocast(noise.device.type, dtype, enabled=dtype != torch.float32):
        ref = predict(lambda *a: reference_prediction(unet, *a), reference, t, dtype)
        pred = predict(lambda *a: unet(*a).sample, policy, t, dtype)
    terms = {}
    terms["dpo"], logits = dpo_loss(pred["winner"], pred["loser"], ref["winner"], ref["loser"], noise, recipe["beta"])
    if recipe["sft_weight"]:  # under the unsafe prompt, denoise as the reference does under the safe one
        terms["sft"] = (F.mse_loss(pred["winner"].float(), ref["safe_winner"].float())
                        + F.mse_loss(pred["loser"].float(), ref["safe_loser"].float())) / 2
    if recipe["anchor_weight"]:  # on anchor prompts, stay the reference
        terms["anchor"] = F.mse_loss(pred["anchor"].float(), ref["anchor"].float())
    weights = {"dpo": 1, "sft": recipe["sft_weight"], "anchor": recipe["anchor_weight"]}
    return sum(weights[name] * term for name, term in terms.items()), terms, logits


def predict(unet_call, blocks, t, dtype):
    """One UNet call on the named blocks stacked into one batch; the prediction of each block by name."""
    noisy, cond = (torch.cat([b[k] for b in blocks.values()]).to(dtype) for k in (0, 1))
    return dict(zip(blocks, unet_call(noisy, t.repeat(len(blocks)), cond).chunk(len(blocks))))


def draw_batch(recipe, seed, micro_step, n_pairs, n_anchors, latent_shape, num_timesteps, device):
    """One micro-batch's random choices, from the step's own generator: a resumed run draws the same."""
    n, at = recipe["train_batch_size"], dict(generator=step_generator(seed, micro_step, device), device=device)
    batch = {"pairs": torch.randint(n_pairs, (n,), **at), "noise": torch.randn((n, *latent_shape), **at),
             "t": torch.randint(0, num_timesteps, (n,), **at), "empty": torch.rand(n, **at) < recipe["empty_prompt_share"]}
    if recipe["anchor_weight"]:
        batch["anchors"] = torch.randint(n_anchors, (n,), **at)
        batch["anchor_empty"] = torch.rand(n, **at) < 0.5
    for side in ("winner", "loser") if recipe["augment"] else ():  # the release's: a random mirror, a sampled latent
        batch[f"{side}_flip"], batch[f"{side}_eps"] = torch.rand(n, **at) < 0.5, torch.randn((n, *latent_shape), **at)
    return batch


def learning_rate_at(recipe, step):
    """Constant after a linear warm-up (the release's scheduler); scale_lr multiplies the rate by
    accumulation x batch, as the release's --scale_lr does."""
    lr = recipe["learning_rate"] * (recipe["gradient_accumulation_steps"] * recipe["train_batch_size"]
                                    if recipe["scale_lr"] else 1)
    return lr * min(1.0, step / recipe["lr_warmup_steps"]) if recipe["lr_warmup_steps"] else lr


def train(recipe, seed, pipe, pairs, anchors, image_dir, output_dir, eval_every=0):
    """Train one expert; returns its training log. Resumes from output_dir/checkpoint.pt."""
    unet, device = pipe.unet, pipe.device
    torch.manual_seed(seed)  # the LoRA's gaussian init: the same for every expert of a run
    params = add_lora(unet, recipe["rank"], recipe["alpha"])
    optimizer = torch.optim.AdamW(params, lr=learning_rate_at(recipe, 0))
    scaler = torch.amp.GradScaler(enabled=recipe["mixed_precision"] == "fp16")
    state = load_checkpoint(os.path.join(output_dir, "checkpoint.pt"), params, optimizer, recipe["max_train_steps"])
    start, log = (state["step"], state["log"]) if state else (0, [])
    if state and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])  # fp16: the loss scale
    if start < recipe["max_train_steps"]:  # a finished expert is not encoded again
        data = encode_training_data(pipe, pairs, anchors, image_dir, DTYPES[recipe["mixed_precision"]], recipe["augment"])
    sample = lambda: toyworld.own_concept_rate(pipe, [p["unsafe_prompt"] for p in pairs], seed)  # the toy judge
    if eval_every and start == 0:  # the curve starts at the base model's rate
        log.append({"step": 0, "sampled_own_concept": sample()})
    accumulate, updates = recipe["gradient_accumulation_steps"], sum("loss" in s and "skipped" not in s for s in log)
    bar = tqdm(range(start, recipe["max_train_steps"]), desc=f"expert {os.path.basename(output_dir)}",
               initial=start, total=recipe["max_train_steps"])
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(recipe, updates)  # the schedule counts the steps that updated
        optimizer.zero_grad()
        stats = {}
        for k in range(accumulate):  # the effective batch: accumulation x train_batch_size pairs
            batch = draw_batch(recipe, seed, step * accumulate + k, len(pairs), len(anchors), data.winner_latents.latent_shape,
                               pipe.scheduler.config.num_train_timesteps, device)
            loss, terms, logits = expert_loss(recipe, unet, pipe.scheduler, batch, data)
            scaler.scale(loss / accumulate).backward()
            values = torch.stack([loss, (logits > 0).float().mean(), *terms.values()]).tolist()  # one host sync
            stats = {k: stats.get(k, 0) + v / accumulate for k, v in zip(["loss", "implicit_acc", *terms], values)}
        scale = scaler.get_scale()  # fp16: GradScaler skips a step whose gradients overflow, and lowers its scale
        if np.isfinite(stats["loss"]):
            if recipe["max_grad_norm"]:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, recipe["max_grad_norm"])
            scaler.step(optimizer)
            scaler.update()
        if not np.isfinite(stats["loss"]) or scaler.get_scale() < scale:  # skipped, counted and logged
            stats["skipped"] = 1
        updates += "skipped" not in stats
        if eval_every and (step + 1) % eval_every == 0:
            stats["sampled_own_concept"] = sample()
        log.append({"step": step + 1, **stats})
        bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if k in ("loss", "implicit_acc", "sampled_own_concept")})
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == recipe["max_train_steps"]:
            save_checkpoint(os.path.join(output_dir, "checkpoint.pt"), step + 1, params, optimizer,
                            scaler=scaler.state_dict(), log=log)
    return log


# --- The shell: arguments, inputs, outputs -----------------------------------------------------
def parse_args(argv=None):
    parser = Parser(__doc__)
    parser.add_argument("--preset", choices=list(PRESETS), default="toy", help="the recipe; the flags below override it")
    parser.add_argument("--model", default="models/toy", help="local pipeline folder or hub id")
    parser.add_argument("--data", default="data/toy", help="stage 1's output: pairs.csv, anchors.csv, images/")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--category", help="a category of the pair CSV, or 'each': one expert per category")
    which.add_argument("--all_data", action="store_true", help="one LoRA on every pair (the release's design)")
    parser.add_argument("--output_dir", help="default: experts/toy/<category>, experts/toy (each), experts/toy/all-data")
    parser.add_argument("--beta", type=positive(float), help="DPO's KL weight (toy 500, release 5000)")
    parser.add_argument("--sft_weight", type=positive(float, zero=True), help="SFT term's weight (toy 10, release 0)")
    parser.add_argument("--anchor_weight", type=positive(float, zero=True), help="anchor term's weight (toy 100, release 0)")
    parser.add_argument("--learning_rate", type=positive(float), help="toy 3e-3; release 1e-5 x accumulation x batch")
    parser.add_argument("--train_batch_size", type=positive(int), help="pairs per micro-step (toy 32, release 16)")
    parser.add_argument("--gradient_accumulation_steps", type=positive(int))
    parser.add_argument("--max_train_steps", type=positive(int), help="optimizer steps (toy 300, release 2000)")
    parser.add_argument("--eval_every", type=positive(int, zero=True), default=0,
                        help="toy model: sample the expert's prompts and judge them every N steps (and at step 0)")
    parser.add_argument("--seed", type=positive(int, zero=True), default=0)
    args = parser.parse_args(argv)
    args.recipe = {**PRESETS[args.preset], **{k: getattr(args, k) for k in PRESETS["toy"] if getattr(args, k, None) is not None}}
    return args


@entry_point
def main():
    args, started = parse_args(), time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and args.recipe["mixed_precision"] != "no":  # the release's fp16 is a GPU recipe
        print("note: fp16 training needs a GPU; this CPU trains in fp32")
        args.recipe["mixed_precision"] = "no"
    pairs_csv, image_dir = os.path.join(args.data, "pairs.csv"), os.path.join(args.data, "images")
    pairs = read_pairs(pairs_csv)
    categories = sorted({c for p in pairs for c in p["categories"]})  # a CoProV2 pair may have several
    if args.category not in (None, "each", *categories):
        fail(f"unknown category {args.category!r}; {pairs_csv} has: {', '.join(categories)}")
    chosen = ["all-data"] if args.all_data else categories if args.category == "each" else [args.category]
    if args.eval_every and not all(toyworld.concept_of(p["unsafe_prompt"]) for p in pairs):
        fail("--eval_every samples with the toy judge: these pairs are not toy prompts")
    anchors = read_anchors(args.data, "--anchor_weight") if args.recipe["anchor_weight"] else []  # read only when used
    folders = [category.lower().replace(" ", "-") for category in chosen]
    root = args.output_dir or os.path.join("experts", "toy", "" if args.category == "each" else folders[0])
    output_dirs = [output_path(root, f) if args.category == "each" else root for f in folders]  # names checked first
    inputs = {"model": args.model, "pairs": pairs_csv, "images": image_dir,
              **({"anchors": os.path.join(args.data, "anchors.csv")} if anchors else {})}
    claim_output(root, {**args.recipe, "which": chosen, "seed": args.seed}, inputs, free={"max_train_steps"})
    stage1 = os.path.join(args.data, "run.json")  # toy pairs: their taxonomy's size, for stage 4
    toy_taxonomy = json.load(open(stage1))["settings"].get("toy_taxonomy") if os.path.exists(stage1) else None
    pipe = load_pipeline(args.model, device, DTYPES[args.recipe["mixed_precision"]])
    base_model = {"base_model": args.model, "base_model_path": os.path.realpath(args.model) if os.path.exists(args.model)
                  else args.model, "base_model_sha256": digest(args.model)}  # the LoRA's note on its base model
    for category, output_dir in zip(chosen, output_dirs):
        os.makedirs(output_dir, exist_ok=True)
        expert_pairs = pairs if args.all_data else [p for p in pairs if category in p["categories"]]
        log = train(args.recipe, args.seed, pipe, expert_pairs, anchors, image_dir, output_dir, args.eval_every)
        from peft.utils import get_peft_model_state_dict
        save_lora(output_dir, get_peft_model_state_dict(pipe.unet), args.recipe["alpha"], {
            **base_model, "category": category, "pairs": len(expert_pairs), "pairs_csv": os.path.realpath(pairs_csv),
            "toy_taxonomy": toy_taxonomy, "recipe": args.recipe})
        write_json(os.path.join(output_dir, "log.json"), {"recipe": args.recipe, "log": log})
        plot_curves(log, os.path.join(output_dir, "curve.png"), f"expert {category}")
        last, skipped = log[-1], sum(s.get("skipped", 0) for s in log)
        print(f"02 expert {category}: {len(expert_pairs)} pairs, {args.recipe['max_train_steps']} steps, final loss "
              f"{last.get('loss', float('nan')):.4f}" + (f", {skipped} steps skipped (loss or gradients not finite)" if skipped else "")
              + f", {time.time() - started:.0f}s -> {os.path.join(output_dir, LORA_FILE)}")
        pipe.unet.delete_adapters("default")  # the next category starts from the bare UNet


def plot_curves(log, path, title):
    """curve.png: the DPO term, implicit accuracy, the anchor term and (where sampled) the own-concept rate."""
    import matplotlib.pyplot as plt
    panels = [k for k in ("dpo", "implicit_acc", "anchor", "sampled_own_concept") if any(k in s for s in log)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        ax.plot(*zip(*[(s["step"], s[key]) for s in log if key in s]), marker="o" if key.startswith("sampled") else None)
        ax.set(title=key.replace("_", " "), xlabel="step")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
