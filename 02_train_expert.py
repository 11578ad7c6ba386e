"""Stage 2: train one safety expert (a LoRA) per category with the Diffusion-DPO loss.

Each pair from stage 1 holds a loser (the image of the unsafe prompt) and a winner (the image of
its safe counterpart). Conditioned on the *unsafe* prompt, the expert learns to prefer the winner:
relative to the reference model, it should improve its denoising of the winner more than that of
the loser (one objective, on the difference). The reference is the same UNet with the LoRA
switched off, so no second UNet sits in memory.

On the toy model pure Diffusion-DPO saturates (loss ~0, implicit accuracy 1.0) without changing
what the model samples. Two additions make it work (README, "What made DPO remove a concept"):
a denoising loss on the winner under the unsafe prompt (--sft_weight), and prior preservation
(--anchor_weight): on anchor images of safe prompts, the expert must predict what the reference
predicts, so that it removes its concept and nothing else.

    python 02_train_expert.py --category Violence           # one expert -> experts/violence
    python 02_train_expert.py --category all                # one LoRA on all pairs: the official
                                                            # release's recipe, the baseline to beat
SD 1.5 (the release's settings: beta 5000, 2000 steps, fp16, learning rate 1e-5 times the batch
size, which this script does not do for you: at --train_batch_size 8, pass --learning_rate 8e-5):
    python 02_train_expert.py --model stable-diffusion-v1-5/stable-diffusion-v1-5 --data data/coprov2 \\
        --category Violence --output_dir experts/sd15/violence --beta 5000 --learning_rate 1e-5 --train_batch_size 1 \\
        --max_train_steps 2000 --mixed_precision fp16 --sft_weight 0 --anchor_weight 0 --empty_prompt_share 0.2
(drop the last three flags to keep this repository's winner SFT and anchors; stage 1 --anchor_prompts renders them)

Output: <output_dir>/pytorch_lora_weights.safetensors (diffusers format), lora.json, log.json.
A killed run resumes from <output_dir>/checkpoint/.

Several GPUs: `torchrun --nproc_per_node 8 02_train_expert.py --category Violence ...` (DDP). Each
process trains on its share of the same global batch (--train_batch_size), so the result does not
depend on the number of processes, and a run may resume with a different one.
"""
import argparse
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from tqdm import tqdm

import toyworld
from common import (LORA_TARGETS, add_lora, anchor_images, anchors_csv, barrier, check_output_dir, check_settings, dpo_loss,
                    encode_training_data, fail, files_sha256, find_checkpoint, fraction, generate, init_distributed,
                    load_checkpoint, load_pipeline, nonnegative_float, nonnegative_int, pair_images, positive_float,
                    positive_int, read_json, read_pairs, save_checkpoint, save_lora, write_json)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/toy", help="local pipeline folder or hub id")
    parser.add_argument("--data", default="data/toy", help="stage 1 output: pairs.csv and images/")
    parser.add_argument("--pairs", help="pair CSV, if not <data>/pairs.csv (e.g. the official CoProV2 CSV)")
    parser.add_argument("--category", required=True, help="a category of the pair CSV, or 'all'")
    parser.add_argument("--output_dir", help="default: experts/<category>")
    parser.add_argument("--rank", type=positive_int, default=4)
    parser.add_argument("--alpha", type=positive_float, default=4)
    parser.add_argument("--lora_targets", nargs="+", default=LORA_TARGETS,
                        help="attention projections that get a LoRA (the release: all four, self- and cross-attention)")
    parser.add_argument("--beta", type=positive_float, default=500, help="DPO KL weight (the release uses 5000 on SD 1.5)")
    parser.add_argument("--sft_weight", type=nonnegative_float, default=1.0,
                        help="weight of an extra denoising loss on the winner (0 = pure Diffusion-DPO)")
    parser.add_argument("--anchor_weight", type=nonnegative_float, default=100.0,
                        help="weight of keeping the reference's prediction on anchor prompts")
    parser.add_argument("--anchors", help="anchor CSV (prompt,image), default: anchors.csv beside the pairs")
    parser.add_argument("--lora_scale_range", type=float, nargs=2, default=(1.0, 1.0), metavar=("LOW", "HIGH"),
                        help="each step scales the expert by a factor drawn from [LOW, HIGH], so that it still "
                             "works when a merge dilutes it (see README); default: off")
    parser.add_argument("--learning_rate", type=positive_float, default=3e-3)
    parser.add_argument("--train_batch_size", type=positive_int, default=16, help="pairs per step")
    parser.add_argument("--max_train_steps", type=positive_int, default=150)  # 0 steps: an expert that changes nothing
    parser.add_argument("--empty_prompt_share", type=fraction, default=0.0,
                        help="the release uses 0.2; with anchors pinning the unconditional branch, 0 is safer")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--gradient_checkpointing", action="store_true",
                        help="recompute the UNet's activations in backward: less memory, ~1/3 more compute")
    parser.add_argument("--checkpoint_every", type=positive_int, default=50)
    parser.add_argument("--eval_every", type=nonnegative_int, default=0, help="toy model: sample and judge every N steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def load_training_pairs(args):
    pairs_csv = args.pairs or os.path.join(args.data, "pairs.csv")
    pairs = read_pairs(pairs_csv)
    categories = sorted({c for p in pairs for c in p["categories"]})
    if args.category != "all":
        if args.category not in categories:
            fail(f"unknown category {args.category!r}; {pairs_csv} has: {', '.join(categories)}")
        pairs = [p for p in pairs if args.category in p["categories"]]
    if not pairs:
        fail(f"category {args.category!r} has no pairs in {pairs_csv}")
    return pair_images(pairs, pairs_csv)


def load_anchors(args, pairs_csv):
    """(prompt, image path) anchors: the model's own images of prompts the expert must not change."""
    path = args.anchors or anchors_csv(os.path.dirname(pairs_csv))
    if not os.path.exists(path):
        if args.anchor_weight:
            fail(f"--anchor_weight needs anchors: no {path} (stage 1 writes it; or pass --anchors CSV)")
        return []
    anchors = anchor_images(path)
    if args.anchor_weight and not anchors:
        fail(f"--anchor_weight needs anchors: {path} lists none")
    return anchors


def quick_eval(pipe, pairs, seed):
    """Toy model only: the share of samples from this expert's unsafe prompts that still show the
    concept. The DPO loss alone can saturate while sampling stays unchanged; this cannot."""
    prompts = sorted({p["unsafe_prompt"] for p in pairs})
    prompts = (prompts * (32 // len(prompts) + 1))[:32]
    images = generate(pipe, prompts, range(10**6 + seed, 10**6 + seed + len(prompts)), steps=20, batch_size=32)
    return float(np.mean([toyworld.shows_concept(im, toyworld.concept_of(p)) for im, p in zip(images, prompts)]))


def mean_over_ranks(stats, device):
    """Each number averaged over the processes. Every rank holds an equal share of the global batch,
    so these are the global batch's numbers, as a single process would log them."""
    import torch.distributed as dist
    values = torch.tensor(list(stats.values()), dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(stats, (values / dist.get_world_size()).tolist()))


# What a resumed run must share with the run that wrote the checkpoint (--max_train_steps may grow).
RESUME_KEYS = ("model", "category", "rank", "alpha", "lora_targets", "beta", "sft_weight", "anchor_weight",
               "lora_scale_range", "learning_rate", "train_batch_size", "empty_prompt_share", "mixed_precision", "seed")


def check_resume(args, pairs, anchors, checkpoint_dir, process):
    """Refuse to continue a checkpoint trained with other settings or other pairs (a regenerated
    pairs.csv): the result would belong to neither run."""
    def fingerprint(rows):  # prompts and image names, not paths: a moved data folder still resumes
        names = [[os.path.basename(v) if k.endswith("image") else v for k, v in sorted(r.items())] for r in rows]
        return hashlib.sha256(json.dumps(names).encode()).hexdigest()
    settings = {**{k: getattr(args, k) for k in RESUME_KEYS}, "pairs": len(pairs),
                "pairs_sha256": fingerprint(pairs), "anchors": len(anchors),
                "anchors_sha256": fingerprint([{"prompt": p, "image": i} for p, i in anchors]),
                # what training reads: a re-rendered image under the same name is another run
                "images_sha256": files_sha256([p[k] for p in pairs for k in ("winner_image", "loser_image")]
                                              + [i for _, i in anchors])}
    path = os.path.join(checkpoint_dir, "settings.json")
    if find_checkpoint(checkpoint_dir):
        if not os.path.exists(path):
            fail(f"{checkpoint_dir} holds a checkpoint without its settings.json; use a new --output_dir")
        check_settings(path, settings)
    elif process == 0:  # nothing to resume yet: this run's settings replace any earlier ones
        write_json(path, settings)


def draw_step(args, step, n_pairs, n_anchors, latent_shape, num_timesteps, process, world):
    """The step's random choices: pairs, noise, timesteps, empty prompts, anchors, LoRA strength.

    A per-step generator, so that a resumed run draws the same batches, noise and timesteps. Every
    rank draws the whole global batch, then keeps its own share of it."""
    g, n = torch.Generator().manual_seed(args.seed * 100003 + step), args.train_batch_size
    draw = {"pairs": torch.randint(n_pairs, (n,), generator=g)}
    draw["noise"] = torch.randn((n, *latent_shape), generator=g)
    draw["t"] = torch.randint(0, num_timesteps, (n,), generator=g)
    draw["empty"] = torch.rand(n, generator=g) < args.empty_prompt_share
    if args.anchor_weight:
        draw["anchors"] = torch.randint(n_anchors, (n,), generator=g)
        draw["anchor_empty"] = torch.rand(n, generator=g) < 0.5
    low, high = args.lora_scale_range
    strength = low + (high - low) * torch.rand(1, generator=g).item() if (low, high) != (1.0, 1.0) else None
    return {k: v[process::world] for k, v in draw.items()}, strength


def step_loss(args, unet, model, scheduler, batch, encoded):
    """The expert's loss on one batch: Diffusion-DPO + winner SFT + anchors (prior preservation)."""
    winners, losers, anchor_latents, prompt_embeds, anchor_embeds, empty_embed = encoded
    idx, t, noise = batch["pairs"], batch["t"].to(args.device), batch["noise"].to(args.device)
    cond = prompt_embeds[idx].clone()
    cond[batch["empty"]] = empty_embed
    # Winner and loser get the same noise and timestep: only the image differs.
    add_noise = scheduler.add_noise
    noisy, conds = [add_noise(winners[idx], noise, t), add_noise(losers[idx], noise, t)], [cond, cond]
    if args.anchor_weight:  # a third block: anchor images under their own prompts (the same noise
        a = batch["anchors"]  # and timesteps, only to keep the step cheap to draw)
        noisy.append(add_noise(anchor_latents[a], noise, t))
        anchor_cond = anchor_embeds[a].clone()  # half of them empty: guidance's unconditional
        anchor_cond[batch["anchor_empty"]] = empty_embed  # branch is shared by all prompts
        conds.append(anchor_cond)
    dtype, blocks = DTYPES[args.mixed_precision], len(conds)
    noisy, timesteps, cond = torch.cat(noisy).to(dtype), t.repeat(blocks), torch.cat(conds).to(dtype)
    with torch.autocast(args.device.split(":")[0], dtype, enabled=args.mixed_precision != "no"):
        with torch.no_grad():  # the reference: the same UNet with the expert switched off
            unet.disable_adapters()  # (the bare UNet, not DDP: nothing to sync without gradients)
            ref_w, ref_l, *ref_a = unet(noisy, timesteps, cond).sample.chunk(blocks)
            unet.enable_adapters()  # also turns requires_grad back on for the LoRA weights
        model_w, model_l, *model_a = model(noisy, timesteps, cond).sample.chunk(blocks)
    loss, stats = dpo_loss(model_w, model_l, ref_w, ref_l, noise, args.beta)
    stats["dpo_loss"] = loss.item()
    if args.sft_weight:  # also plainly denoise the winner under the unsafe prompt
        loss = loss + args.sft_weight * F.mse_loss(model_w.float(), noise.float())
    if args.anchor_weight:  # prior preservation: on anchor prompts, stay the reference
        drift = F.mse_loss(model_a[0].float(), ref_a[0].float())
        stats["anchor_drift"] = drift.item()
        loss = loss + args.anchor_weight * drift
    return loss, {"loss": loss.item(), **stats}


def train(args, pipe, pairs, anchors, process=0, world=1):
    unet = pipe.unet
    checkpoint_dir = os.path.join(args.output_dir, "checkpoint")
    check_resume(args, pairs, anchors, checkpoint_dir, process)
    encoded = encode_training_data(pipe, pairs, anchors, DTYPES[args.mixed_precision])
    lora_params = add_lora(unet, args.rank, args.alpha, args.lora_targets)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    lora_layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
    for p in lora_params:  # the LoRA trains in fp32 even when the UNet runs in half precision
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(lora_params, lr=args.learning_rate)
    scaler = torch.amp.GradScaler(enabled=args.mixed_precision == "fp16")
    state = find_checkpoint(checkpoint_dir)
    start = load_checkpoint(state, {"lora": lora_params}, optimizer, scaler) if state else 0
    if start > args.max_train_steps:
        fail(f"{checkpoint_dir} is at step {start}, past --max_train_steps {args.max_train_steps}; "
             "use a new --output_dir for a shorter run")
    barrier()  # every rank has read the checkpoint before rank 0 may overwrite it
    model = unet
    if world > 1:
        # DDP averages the LoRA's gradients over the ranks in backward(). No find_unused_parameters:
        # every LoRA weight is in the graph (while B is zero, its init, A's gradient is zero, but computed).
        model = torch.nn.parallel.DistributedDataParallel(
            unet, device_ids=[torch.cuda.current_device()] if args.device.startswith("cuda") else None)
    # The sampled check runs on rank 0 only; the others wait for it at the next gradient sync.
    sampled_check = process == 0 and args.eval_every and all(toyworld.concept_of(p["unsafe_prompt"]) for p in pairs)
    log_path = os.path.join(args.output_dir, "log.json")
    log = read_json(log_path, "the training log").get("log") if start and os.path.exists(log_path) else []
    if not isinstance(log, list) or not all(isinstance(s, dict) and isinstance(s.get("step"), int) for s in log):
        fail(f"{log_path}: not a training log (a list of steps); delete it, or use a new --output_dir")
    log = [s for s in log if s["step"] <= start]
    bar = tqdm(range(start, args.max_train_steps), desc=f"expert {args.category}", initial=start,
               total=args.max_train_steps, disable=process != 0)
    for step in bar:
        batch, strength = draw_step(args, step, len(pairs), len(anchors), encoded[0].shape[1:],
                                    pipe.scheduler.config.num_train_timesteps, process, world)
        if strength is not None:  # train the expert at a random strength (merging dilutes it)
            for layer in lora_layers:
                layer.scale_layer(strength)
        loss, stats = step_loss(args, unet, model, pipe.scheduler, batch, encoded)
        for layer in lora_layers:  # back to the trained strength, alpha / rank
            layer.unscale_layer()
        if world > 1:  # log the global batch's numbers; a NaN on any rank then stops them all
            stats = mean_over_ranks(stats, args.device)
        if not math.isfinite(stats["loss"]):
            kept = f"the last good checkpoint is kept in {checkpoint_dir}" if find_checkpoint(checkpoint_dir) else \
                "no checkpoint had been written yet"
            fail(f"loss is {stats['loss']} at step {step}; {kept}")
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        stats = {"step": step + 1, **stats}
        if sampled_check and (step + 1) % args.eval_every == 0:
            stats["sampled_unsafe_rate"] = quick_eval(pipe, pairs, args.seed)
        log.append(stats)
        bar.set_postfix({k: f"{v:.3g}" for k, v in stats.items() if k in ("loss", "implicit_acc", "sampled_unsafe_rate")})
        if process == 0 and ((step + 1) % args.checkpoint_every == 0 or step + 1 == args.max_train_steps):
            save_checkpoint(checkpoint_dir, {"lora": lora_params}, optimizer, step + 1, scaler)
            write_json(log_path, {"args": vars(args), "log": log})
    return log


def toy_taxonomy(pairs_csv):
    """Toy pairs: the taxonomy size stage 1 drew them from (its settings.json beside pairs.csv), kept
    with the expert so that stage 4 evaluates on the same taxonomy. None for other pairs."""
    path = os.path.join(os.path.dirname(pairs_csv), "settings.json")
    if os.path.basename(pairs_csv) != "pairs.csv" or not os.path.exists(path):
        return None
    settings = read_json(path, "stage 1's settings")
    return None if settings.get("csv") or settings.get("llm") else settings.get("concepts_per_category")


def main():
    args = parse_args()
    args.output_dir = args.output_dir or os.path.join("experts", args.category.lower().replace(" ", "-"))
    check_output_dir(args.output_dir)
    torch.manual_seed(args.seed)  # the expert's gaussian init; every training draw has its own generator
    started = time.time()
    process, world = init_distributed()  # under torchrun: DDP, each rank a share of every batch
    if world > 1 and args.device.startswith("cuda"):
        args.device = f"cuda:{torch.cuda.current_device()}"
    if args.train_batch_size % world:
        fail(f"--train_batch_size {args.train_batch_size} does not split evenly over {world} processes")
    pairs_csv = args.pairs or os.path.join(args.data, "pairs.csv")
    pairs, anchors, taxonomy = load_training_pairs(args), load_anchors(args, pairs_csv), toy_taxonomy(pairs_csv)
    pipe = load_pipeline(args.model, args.device, DTYPES[args.mixed_precision])
    log = train(args, pipe, pairs, anchors, process, world)
    if process != 0:  # rank 0 writes the expert
        return
    from peft.utils import get_peft_model_state_dict
    save_lora(args.output_dir, get_peft_model_state_dict(pipe.unet), args.rank, args.alpha,
              {"base_model": args.model, "category": args.category, "pairs": len(pairs),
               "steps": args.max_train_steps, "beta": args.beta, "learning_rate": args.learning_rate,
               "toy_taxonomy": taxonomy, "pairs_csv": pairs_csv},
              args.lora_targets)
    last = log[-1] if log else {}
    print(f"02 expert {args.category}: {len(pairs)} pairs, {args.max_train_steps} steps, final loss "
          f"{last.get('loss', float('nan')):.4f}, implicit acc {last.get('implicit_acc', float('nan')):.2f}, "
          f"{time.time() - started:.0f}s -> {args.output_dir}")


if __name__ == "__main__":
    main()
