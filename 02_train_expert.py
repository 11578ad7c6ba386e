"""Stage 2: train one safety expert (a LoRA) per category with the Diffusion-DPO loss.

Each pair from stage 1 holds a loser (the image of the unsafe prompt) and a winner (the image of
its safe counterpart). Conditioned on the *unsafe* prompt, the expert learns to prefer the winner:
relative to the reference model, it should improve its denoising of the winner more than that of
the loser. The reference is the same UNet with the LoRA switched off (no second UNet in memory).

    python 02_train_expert.py --category Violence           # one expert -> experts/violence
    python 02_train_expert.py --category each               # one expert per category of the pair
                                                            # CSV, in one process -> experts/<category>
    python 02_train_expert.py --category all                # one LoRA on all pairs, as the release
                                                            # trains it: the baseline to beat
    python 02_train_expert.py --preset release ...          # the release's training recipe (SD 1.5;
                                                            # docs/fidelity.md: what still differs)

The release's loss is Diffusion-DPO alone (`--preset release`: beta 5000, 20% empty prompts, batch
4 x accumulation 4, learning rate 1e-5 x 16, 500 warm-up steps, 2,000 steps, fp16). On the toy
model it saturates without changing what the model samples, so the toy default adds two terms,
this repository's additions (docs/efficacy.md measures each):
  * SFT toward the safe counterpart (--sft_weight, --sft_target counterpart): under the unsafe
    prompt, the expert must denoise the noisy winner and loser as the reference denoises them under
    the pair's *safe* prompt. This is what moves sampling to the safe version of the prompt, shape
    and background kept. (--sft_target noise denoises the winner towards its true noise instead:
    the same target on average, but far noisier; it costs fidelity: docs/efficacy.md.)
  * prior preservation (--anchor_weight; the DreamBooth term, diffusers' "prior preservation"):
    on anchor images (the model's own images of safe prompts, stage 1) the expert must predict
    what the reference predicts, so that it changes its concept and nothing else.

Output: <output_dir>/pytorch_lora_weights.safetensors (diffusers format, `pipe.load_lora_weights`),
lora.json, log.json and curve.png (the training curves). A killed run resumes from
<output_dir>/checkpoint/. Under torchrun (`torchrun --nproc_per_node 8 02_train_expert.py ...`) each
process trains on its share of the same global batch (DDP), so the result does not depend on the
number of processes.
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import toyworld
from common import (DTYPES, TrainingData, add_lora, anchor_condition, atomic_write, anchor_images, anchors_csv, barrier,
                    check_output_dir, checkpoint_to_resume, data_fingerprint, dpo_loss, encode_training_data, fail, find_checkpoint,
                    fraction, generate, init_distributed, load_checkpoint, load_pipeline, nonnegative_float,
                    nonnegative_int, pair_images, positive_float, positive_int, read_json, read_pairs, reference_prediction,
                    save_checkpoint, save_lora, slug, step_generator, use_device, write_json)


# ---------------------------------------------------------------------------------------------
# The method: one training step's loss
# ---------------------------------------------------------------------------------------------
def expert_loss(args, unet, model, scheduler, batch, data: TrainingData):
    """Diffusion-DPO (+ SFT toward the safe counterpart + prior preservation, where their weights are
    not 0) on one batch."""
    idx, t, noise = batch["pairs"], batch["t"].to(args.device), batch["noise"].to(args.device)
    cond = data.prompt_embeds[idx].clone()
    cond[batch["empty"]] = data.empty_embed  # the release drops 20% of prompts (classifier-free guidance)
    # Winner and loser get the same noise and timestep: only the image differs.
    noisy = [scheduler.add_noise(data.winners[idx], noise, t), scheduler.add_noise(data.losers[idx], noise, t)]
    conds = [cond, cond]
    if args.anchor_weight:  # a third block: anchor images under their own prompts (same noise and t)
        noisy.append(scheduler.add_noise(data.anchor_latents[batch["anchors"]], noise, t))
        conds.append(anchor_condition(data, batch["anchors"], batch["anchor_empty"]))
    dtype, blocks = DTYPES[args.mixed_precision], len(conds)
    ref_noisy, ref_conds = list(noisy), list(conds)
    if args.sft_weight and args.sft_target == "counterpart":  # the reference also sees the winner and
        safe = data.safe_embeds[idx].clone()                   # the loser under the pair's *safe* prompt
        safe[batch["empty"]] = data.empty_embed
        ref_noisy, ref_conds = ref_noisy + noisy[:2], ref_conds + [safe, safe]
    with torch.autocast(args.device.split(":")[0], dtype, enabled=args.mixed_precision != "no"):
        ref_w, ref_l, *ref_rest = reference_prediction(unet, torch.cat(ref_noisy).to(dtype), t.repeat(len(ref_conds)),
                                                       torch.cat(ref_conds).to(dtype)).chunk(len(ref_conds))
        model_w, model_l, *model_a = model(torch.cat(noisy).to(dtype), t.repeat(blocks),
                                           torch.cat(conds).to(dtype)).sample.chunk(blocks)
    loss, stats = dpo_loss(model_w, model_l, ref_w, ref_l, noise, args.beta)
    stats["dpo_loss"] = loss.item()
    if args.sft_weight:
        if args.sft_target == "counterpart":  # under the unsafe prompt, denoise as the reference does under the safe one
            safe_w, safe_l = ref_rest[-2:]
            sft = (F.mse_loss(model_w.float(), safe_w.float()) + F.mse_loss(model_l.float(), safe_l.float())) / 2
        else:  # plainly denoise the winner under the unsafe prompt
            sft = F.mse_loss(model_w.float(), noise.float())
        stats["sft"] = sft.item()
        loss = loss + args.sft_weight * sft
    if args.anchor_weight:  # prior preservation: on anchor prompts, stay the reference
        drift = F.mse_loss(model_a[0].float(), ref_rest[0].float())
        stats["anchor_drift"] = drift.item()
        loss = loss + args.anchor_weight * drift
    return loss, {"loss": loss.item(), **stats}


def draw_step(args, micro_step, n_pairs, n_anchors, latent_shape, num_timesteps, process, world):
    """One micro-batch's random choices: pairs, noise, timesteps, empty prompts, anchors. Its own
    generator, so a resumed run draws the same; every rank draws the global batch and keeps its share."""
    g, n = step_generator(args.seed, micro_step), args.train_batch_size
    draw = {"pairs": torch.randint(n_pairs, (n,), generator=g)}
    draw["noise"] = torch.randn((n, *latent_shape), generator=g)
    draw["t"] = torch.randint(0, num_timesteps, (n,), generator=g)
    draw["empty"] = torch.rand(n, generator=g) < args.empty_prompt_share
    if args.anchor_weight:
        draw["anchors"] = torch.randint(n_anchors, (n,), generator=g)
        draw["anchor_empty"] = torch.rand(n, generator=g) < 0.5
    return {k: v[process::world] for k, v in draw.items()}


def learning_rate_at(args, step):
    """Constant with linear warm-up (the release's scheduler); --scale_lr multiplies the rate by the
    effective batch (accumulation x global batch), as the release's --scale_lr does."""
    lr = args.learning_rate * (args.gradient_accumulation_steps * args.train_batch_size if args.scale_lr else 1)
    return lr * min(1.0, step / args.lr_warmup_steps) if args.lr_warmup_steps else lr


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------
def train(args, pipe, pairs, anchors, output_dir, process=0, world=1):
    unet = pipe.unet
    checkpoint_dir = os.path.join(output_dir, "checkpoint")
    state = check_training_resume(args, pairs, anchors, checkpoint_dir, process)
    data = encode_training_data(pipe, pairs, anchors, DTYPES[args.mixed_precision])
    torch.manual_seed(args.seed)  # the expert's gaussian init: the same for every expert of a run
    lora_params = add_lora(unet, args.rank, args.alpha)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    for p in lora_params:  # the LoRA trains in fp32 even when the UNet runs in half precision
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(lora_params, lr=learning_rate_at(args, 0))
    scaler = torch.amp.GradScaler(enabled=args.mixed_precision == "fp16")
    start = load_checkpoint(state, {"lora": lora_params}, optimizer, scaler) if state else 0
    if start > args.max_train_steps:
        fail(f"{checkpoint_dir} is at step {start}, past --max_train_steps {args.max_train_steps}; "
             "use a new --output_dir for a shorter run")
    barrier()  # every rank has read the checkpoint before rank 0 may overwrite it
    model = unet
    if world > 1:  # DDP averages the LoRA's gradients over the ranks in backward()
        model = torch.nn.parallel.DistributedDataParallel(
            unet, device_ids=[torch.cuda.current_device()] if args.device.startswith("cuda") else None)
    sampled_check = process == 0 and args.eval_every and all(toyworld.concept_of(p["unsafe_prompt"]) for p in pairs)
    log_path = os.path.join(output_dir, "log.json")
    log = read_json(log_path, "the training log") if start and os.path.exists(log_path) else {"log": []}
    log = log.get("log") if isinstance(log, dict) else None
    if not isinstance(log, list) or not all(isinstance(s, dict) and isinstance(s.get("step"), int) for s in log):
        fail(f"{log_path}: not a training log (a list of steps); delete it, or use a new --output_dir")
    log = [s for s in log if s["step"] <= start]
    accumulate = args.gradient_accumulation_steps
    bar = tqdm(range(start, args.max_train_steps), desc=f"expert {args.category}", initial=start,
               total=args.max_train_steps, disable=process != 0)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(args, step)
        optimizer.zero_grad()
        stats = {}
        for k in range(accumulate):  # the effective batch: accumulate x --train_batch_size pairs
            batch = draw_step(args, step * accumulate + k, len(pairs), len(anchors), data.winners.shape[1:],
                              pipe.scheduler.config.num_train_timesteps, process, world)
            loss, micro = expert_loss(args, unet, model, pipe.scheduler, batch, data)
            if world > 1:  # log the global batch's numbers; a NaN on any rank then stops them all
                micro = mean_over_ranks(micro, args.device)
            if not math.isfinite(micro["loss"]):
                kept = f"the last good checkpoint is kept in {checkpoint_dir}" if find_checkpoint(checkpoint_dir) else \
                    "no checkpoint had been written yet"
                fail(f"loss is {micro['loss']} at step {step}; {kept}")
            scaler.scale(loss / accumulate).backward()
            stats = {key: stats.get(key, 0) + value / accumulate for key, value in micro.items()}
        if args.max_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        stats = {"step": step + 1, **stats}
        if sampled_check and (step + 1) % args.eval_every == 0:
            stats["sampled_own_concept"] = quick_eval(pipe, pairs, args.seed)
        log.append(stats)
        bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if k in ("loss", "implicit_acc", "sampled_own_concept")})
        if process == 0 and ((step + 1) % args.checkpoint_every == 0 or step + 1 == args.max_train_steps):
            save_checkpoint(checkpoint_dir, {"lora": lora_params}, optimizer, step + 1, scaler)
            write_json(log_path, {"args": vars(args), "log": log})
    return log


def quick_eval(pipe, pairs, seed):
    """Toy model only: the share of samples from this expert's unsafe prompts that still show their
    concept. The DPO loss alone can saturate while sampling stays unchanged; this cannot."""
    prompts = sorted({p["unsafe_prompt"] for p in pairs})
    prompts = (prompts * (32 // len(prompts) + 1))[:32]
    images = generate(pipe, prompts, range(10**6 + seed, 10**6 + seed + len(prompts)), steps=20, batch_size=32)
    return float(np.mean([toyworld.shows_concept(im, toyworld.concept_of(p)) for im, p in zip(images, prompts)]))


def plot_curves(log, path, title):
    """curve.png: the DPO loss, implicit accuracy, anchor drift and (where measured) the sampled unsafe rate."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [k for k in ("dpo_loss", "implicit_acc", "anchor_drift", "sampled_own_concept") if any(k in s for s in log)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 2.8), squeeze=False)
    for ax, key in zip(axes[0], panels):
        points = [(s["step"], s[key]) for s in log if key in s]
        ax.plot(*zip(*points), marker="o" if key == "sampled_own_concept" else None)
        ax.set_title(key.replace("_", " "))
        ax.set_xlabel("step")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Settings, data, resume
# ---------------------------------------------------------------------------------------------
# The release's launcher (launchers/train_lora_sd15.sh) and train.py, flag for flag.
PRESETS = {"release": dict(beta=5000, sft_weight=0, anchor_weight=0, empty_prompt_share=0.2, rank=4, alpha=4,
                           train_batch_size=4, gradient_accumulation_steps=4, learning_rate=1e-5, scale_lr=True,
                           lr_warmup_steps=500, max_train_steps=2000, mixed_precision="fp16", max_grad_norm=1.0)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), help="defaults of a named recipe; flags given still win")
    parser.add_argument("--model", default="models/toy", help="local pipeline folder or hub id")
    parser.add_argument("--data", default="data/toy", help="stage 1 output: pairs.csv and images/")
    parser.add_argument("--pairs", help="pair CSV, if not <data>/pairs.csv (e.g. the official CoProV2 CSV)")
    parser.add_argument("--category", required=True, help="a category of the pair CSV, 'each' or 'all'")
    parser.add_argument("--output_dir", help="default: experts/<category> (--category each: experts/)")
    parser.add_argument("--rank", type=positive_int, default=4, help="LoRA rank (the release: 4)")
    parser.add_argument("--alpha", type=positive_float, default=4, help="LoRA alpha (the release: 4)")
    parser.add_argument("--beta", type=positive_float, default=500, help="DPO KL weight (the release: 5000 on SD 1.5)")
    parser.add_argument("--sft_weight", type=nonnegative_float, default=10.0,
                        help="weight of the SFT term toward the safe counterpart (0 = pure Diffusion-DPO, the release)")
    parser.add_argument("--sft_target", choices=["counterpart", "noise"], default="counterpart",
                        help="counterpart: the reference's prediction under the safe prompt, on the noisy winner and "
                        "loser; noise: the winner's true noise (plain denoising, higher variance)")
    parser.add_argument("--anchor_weight", type=nonnegative_float, default=100.0,
                        help="weight of keeping the reference's prediction on anchor prompts (0: the release)")
    parser.add_argument("--learning_rate", type=positive_float, default=3e-3)
    parser.add_argument("--scale_lr", action="store_true",
                        help="multiply the learning rate by accumulation x batch size (the release does)")
    parser.add_argument("--lr_warmup_steps", type=nonnegative_int, default=0, help="linear warm-up (the release: 500)")
    parser.add_argument("--train_batch_size", type=positive_int, default=32, help="pairs per micro-step (global over processes)")
    parser.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    parser.add_argument("--max_train_steps", type=positive_int, default=300, help="optimizer steps (0 would be an expert that changes nothing)")
    parser.add_argument("--max_grad_norm", type=nonnegative_float, default=0.0, help="gradient clipping (0: off; the release: 1)")
    parser.add_argument("--empty_prompt_share", type=fraction, default=0.0,
                        help="share of empty prompts (the release: 0.2; the anchors hold the unconditional branch here)")
    parser.add_argument("--mixed_precision", choices=list(DTYPES), default="no")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="recompute the UNet's activations in backward: less memory, ~1/3 more compute")
    parser.add_argument("--checkpoint_every", type=positive_int, default=50)
    parser.add_argument("--eval_every", type=nonnegative_int, default=0, help="toy model: sample and judge every N steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    preset = parser.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**PRESETS[preset])
    return parser.parse_args(argv)


def training_pairs(args, pairs_csv):
    """{category: its pairs} for --category NAME, 'each' (every category of the CSV) or 'all' (one LoRA)."""
    pairs = read_pairs(pairs_csv)
    categories = sorted({c for p in pairs for c in p["categories"]})  # a CoProV2 pair may have several
    if args.category == "all":
        chosen = {"all": pairs}
    elif args.category == "each":
        chosen = {c: [p for p in pairs if c in p["categories"]] for c in categories}
    elif args.category in categories:
        chosen = {args.category: [p for p in pairs if args.category in p["categories"]]}
    else:
        fail(f"unknown category {args.category!r}; {pairs_csv} has: {', '.join(categories)}")
    for category, rows in chosen.items():
        if not rows:
            fail(f"category {category!r} has no pairs in {pairs_csv}")
    return {c: pair_images(rows, pairs_csv) for c, rows in chosen.items()}


def load_anchors(args, pairs_csv):
    """(prompt, image path) anchors: the model's own images of prompts the expert must not change."""
    path = anchors_csv(os.path.dirname(pairs_csv))
    if not os.path.exists(path):
        if args.anchor_weight:
            fail(f"--anchor_weight needs anchors: no {path} (stage 1 writes it with --anchor_prompts)")
        return []
    anchors = anchor_images(path)
    if args.anchor_weight and not anchors:
        fail(f"--anchor_weight needs anchors: {path} lists none")
    return anchors


# What a resumed run must share with the run that wrote the checkpoint (--max_train_steps may grow).
RESUME_KEYS = ("model", "category", "rank", "alpha", "beta", "sft_weight", "sft_target", "anchor_weight", "learning_rate",
               "scale_lr", "lr_warmup_steps", "train_batch_size", "gradient_accumulation_steps", "max_grad_norm",
               "empty_prompt_share", "mixed_precision", "seed")


def check_training_resume(args, pairs, anchors, checkpoint_dir, process):
    """The checkpoint to resume, or None; one trained with other settings or other pairs (a
    regenerated pairs.csv) is refused."""
    settings = {**{k: getattr(args, k) for k in RESUME_KEYS}, **data_fingerprint(pairs, anchors)}
    return checkpoint_to_resume(checkpoint_dir, settings, write=process == 0)


def mean_over_ranks(stats, device):
    """Each number averaged over the processes: every rank holds an equal share of the global batch."""
    import torch.distributed as dist
    values = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(stats, (values / dist.get_world_size()).tolist()))


def toy_taxonomy_of(pairs_csv):
    """Toy pairs: the taxonomy size stage 1 drew them from (its settings.json beside pairs.csv), kept
    with the expert so that stage 4 evaluates on the same taxonomy. None for other pairs."""
    path = os.path.join(os.path.dirname(pairs_csv), "settings.json")
    if os.path.basename(pairs_csv) != "pairs.csv" or not os.path.exists(path):
        return None
    settings = read_json(path, "stage 1's settings")
    return None if settings.get("csv") or settings.get("llm") else settings.get("concepts_per_category")


def main():
    args = parse_args()
    started = time.time()
    process, world = init_distributed()  # under torchrun: DDP, each rank a share of every batch
    use_device(args, world)
    if args.train_batch_size % world:
        fail(f"--train_batch_size {args.train_batch_size} does not split evenly over {world} processes")
    pairs_csv = args.pairs or os.path.join(args.data, "pairs.csv")
    by_category, anchors = training_pairs(args, pairs_csv), load_anchors(args, pairs_csv)
    each = args.category == "each"
    root = args.output_dir or ("experts" if each else os.path.join("experts", slug(args.category)))
    check_output_dir(root)
    pipe = load_pipeline(args.model, args.device, DTYPES[args.mixed_precision])
    for category, pairs in by_category.items():
        output_dir = os.path.join(root, slug(category)) if each else root
        args.category = category  # what this expert's checkpoint, log and lora.json record
        log = train(args, pipe, pairs, anchors, output_dir, process, world)
        if process == 0:  # rank 0 writes the expert
            from peft.utils import get_peft_model_state_dict
            save_lora(output_dir, get_peft_model_state_dict(pipe.unet), args.rank, args.alpha,
                      {"base_model": args.model, "category": category, "pairs": len(pairs),
                       "steps": args.max_train_steps, "beta": args.beta, "learning_rate": args.learning_rate,
                       "toy_taxonomy": toy_taxonomy_of(pairs_csv), "pairs_csv": pairs_csv})
            plot_curves(log, os.path.join(output_dir, "curve.png"), f"expert {category}")
            last = log[-1] if log else {}
            print(f"02 expert {category}: {len(pairs)} pairs, {args.max_train_steps} steps, final loss "
                  f"{last.get('loss', float('nan')):.4f}, implicit acc {last.get('implicit_acc', float('nan')):.2f}, "
                  f"{time.time() - started:.0f}s -> {output_dir}")
        pipe.unet.delete_adapters("default")  # the next category starts from the bare UNet
        barrier()


if __name__ == "__main__":
    main()
