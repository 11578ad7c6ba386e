"""Speed, measured: one Diffusion-DPO training step and image generation, on random weights.

The training step is timed twice in the same run, once for each way of computing the reference:
  (a) the same UNet with the LoRA switched off (what this repository does, like diffusers' example)
  (b) a second, frozen copy of the full UNet (what the official SafetyDPO/DiffusionDPO release does)
Both do the same work, so pairs/s should match; what (b) costs is memory, which only CUDA reports.
Generation is timed with all images in one batch and one image at a time.

    python experiments/bench.py --arch toy                                        # a CPU, seconds
    python experiments/bench.py --arch sd15 --mixed_precision bf16 --batch_size 8 # a GPU, SD 1.5's size

Weights are random (nothing is downloaded): speed does not depend on their values. The DPO loss is
stage 2's own (02_train_expert.py's dpo_loss).
"""
import argparse
import copy
import gc
import os
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm
from torch.utils.flop_counter import FlopCounterMode

import lab  # the repository root on sys.path
import toyworld
from common import add_lora, entry_point, fail, generate, load_pipeline, positive

train_expert = lab.load_stage("02_train_expert.py")
dpo_loss = train_expert.dpo_loss

# NVIDIA's datasheet dense BF16 tensor-core TFLOP/s (the datasheets' larger figures assume sparsity)
PEAK_TFLOPS = {"H100 PCIe": 756, "H100": 989, "H200": 989, "A100": 312}
DTYPES = {**train_expert.DTYPES, "bf16": torch.bfloat16}  # stage 2's, and bf16 (which stage 2 does not offer)
SHAPES = {"toy": {"latents": (4, 8, 8), "text": (16, 64)}, "sd15": {"latents": (4, 64, 64), "text": (77, 768)}}
TOY_MODEL = os.path.join(lab.ROOT, "models", "toy")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(SHAPES), default="toy")
    parser.add_argument("--batch_size", type=positive(int), default=16, help="pairs per DPO step")
    parser.add_argument("--steps", type=positive(int), default=20, help="timed DPO steps per variant")
    parser.add_argument("--warmup", type=positive(int, zero=True), default=3,
                        help="untimed steps first (and one untimed generation)")
    parser.add_argument("--mixed_precision", choices=list(DTYPES), default="no")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="the UNet's (the stages do not use it)")
    parser.add_argument("--gen_images", type=positive(int, zero=True), default=8, help="0 skips the generation rows")
    parser.add_argument("--gen_batch_size", type=positive(int), help="default: all --gen_images in one batch")
    parser.add_argument("--gen_steps", type=positive(int), help="sampler steps (default: 20 toy, 10 sd15)")
    parser.add_argument("--peak_tflops", type=positive(float), help="the device's peak (default: by the GPU's name)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    args.gen_batch_size = args.gen_batch_size or args.gen_images
    args.gen_steps = args.gen_steps or (20 if args.arch == "toy" else 10)
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        fail(f"unknown device {args.device!r}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda, but this torch sees no CUDA GPU (try --device cpu)")
    return args


def build_unet(arch):
    """The toy world's UNet, or Stable Diffusion 1.5's UNet config, at random init."""
    if arch == "toy":
        return toyworld.build_models(toyworld.build_tokenizer())[2]
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fresh_memory(device):
    """Free what the last measurement left, so that each peak counts only its own tensors."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed(fn, n, device, desc=None):
    sync(device)
    started = time.perf_counter()
    for _ in tqdm(range(n), desc=desc, leave=False) if desc else range(n):
        fn()
    sync(device)
    return time.perf_counter() - started


def dpo_step(unet, reference, optimizer, scaler, batch, args):
    """One training step as 02_train_expert.py does it: winner and loser share noise and timestep."""
    noisy, t, cond, noise = batch
    dtype = DTYPES[args.mixed_precision]
    with torch.autocast(args.device.type, dtype, enabled=args.mixed_precision != "no"):
        with torch.no_grad():
            if reference is None:  # (a) the same UNet with the LoRA switched off
                unet.disable_adapters()
                ref = unet(noisy, t, cond).sample
                unet.enable_adapters()  # also turns requires_grad back on for the LoRA weights
            else:  # (b) a second full UNet, frozen
                ref = reference(noisy, t, cond).sample
        pred = unet(noisy, t, cond).sample
    loss, _ = dpo_loss(*pred.chunk(2), *ref.chunk(2), noise, beta=5000)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def count_flops(step, device):
    """FLOPs of one step (it doubles as a warm-up step). FlopCounterMode knows the GPU attention
    kernels but not the CPU one, so on a CPU attention is counted on its plain-matmul path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else nullcontext():
        with FlopCounterMode(display=False) as counter:
            step()
    return counter.get_total_flops()


def bench_dpo(template, second_unet, batch, args):
    """pairs/s, peak GiB and TFLOP/s of the DPO step with reference (a) or (b)."""
    fresh_memory(args.device)
    dtype = DTYPES[args.mixed_precision]
    unet = copy.deepcopy(template).to(args.device, dtype)
    reference = copy.deepcopy(template).to(args.device, dtype).requires_grad_(False) if second_unet else None
    lora = add_lora(unet, rank=4, alpha=4)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    for p in lora:  # the LoRA trains in fp32 even when the UNet runs in half precision
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(lora, lr=1e-5)
    scaler = torch.amp.GradScaler(args.device.type, enabled=args.mixed_precision == "fp16")

    def step():
        dpo_step(unet, reference, optimizer, scaler, batch, args)
    flops = count_flops(step, args.device)
    for _ in range(args.warmup):
        step()
    if args.device.type == "cuda":  # the peak from here on: weights, optimizer state, one step's activations
        torch.cuda.reset_peak_memory_stats(args.device)
    seconds = timed(step, args.steps, args.device, "reference = " + ("second UNet" if second_unet else "adapters off"))
    return {"rate": args.batch_size * args.steps / seconds, "unit": "pairs/s", "memory": peak_gib(args.device),
            "tflops": flops * args.steps / seconds / 1e12, "gflop_per_pair": flops / args.batch_size / 1e9}


def sd15_pipeline(unet, args):
    """A StableDiffusionPipeline of SD 1.5's components at random init. It takes prompt embeddings
    directly, so it needs no tokenizer (none can be downloaded here)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(args.device, DTYPES[args.mixed_precision])


def bench_generation(pipe, batch_size, args):
    """images/s and peak GiB for --gen_images images drawn batch_size at a time."""
    n, dtype = args.gen_images, DTYPES[args.mixed_precision]
    prompts = [toyworld.prompt(*toyworld.ALL_TRIPLES[i % len(toyworld.ALL_TRIPLES)]) for i in range(n)]
    embeds = torch.randn(2, 1, *SHAPES[args.arch]["text"], device=args.device, dtype=dtype)

    def draw(count, steps):
        if args.arch == "toy":  # the toy pipeline has its own tokenizer: prompts as the stages pass them
            generate(pipe, prompts[:count], range(count), steps, batch_size=batch_size)
            return
        for i in tqdm(range(0, count, batch_size), desc=f"batch {batch_size}", leave=False):
            b = min(batch_size, count - i)
            pipe(prompt_embeds=embeds[0].expand(b, -1, -1), negative_prompt_embeds=embeds[1].expand(b, -1, -1),
                 num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(i), output_type="np")
    fresh_memory(args.device)
    if args.warmup:
        draw(batch_size, 1)
    seconds = timed(lambda: draw(n, args.gen_steps), 1, args.device)
    return {"rate": n / seconds, "unit": "images/s", "memory": peak_gib(args.device), "tflops": None}


def run(args):
    """The table's rows: (name, measurement or None when skipped)."""
    torch.manual_seed(0)
    template = build_unet(args.arch)  # stays on the CPU in fp32; each measurement takes a copy
    latents, text = SHAPES[args.arch]["latents"], SHAPES[args.arch]["text"]
    dtype, B = DTYPES[args.mixed_precision], args.batch_size
    # Random inputs: winner and loser latents after noising (one batch of 2B), their shared noise,
    # timestep and prompt. Their values do not change the speed.
    batch = (torch.randn(2 * B, *latents, device=args.device, dtype=dtype),
             torch.randint(0, 1000, (B,), device=args.device).repeat(2),
             torch.randn(B, *text, device=args.device, dtype=dtype).repeat(2, 1, 1),
             torch.randn(B, *latents, device=args.device))
    print(f"arch {args.arch}: UNet {sum(p.numel() for p in template.parameters()) / 1e6:.1f}M parameters, "
          f"{B} pairs per step, {args.mixed_precision} mixed precision, "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, device {args.device}"
          + (f", torch threads {torch.get_num_threads()}" if args.device.type == "cpu" else ""))
    rows = [("DPO step, reference = adapters off", bench_dpo(template, False, batch, args)),
            ("DPO step, reference = second UNet", bench_dpo(template, True, batch, args))]
    fresh_memory(args.device)
    gen = [f"generation, batch {args.gen_batch_size}", "generation, one at a time"]
    if not args.gen_images:
        return rows + [(name, None) for name in gen]
    if args.arch == "toy" and not os.path.exists(os.path.join(TOY_MODEL, "model_index.json")):
        print(f"note: generation skipped, no pretrained toy pipeline at {TOY_MODEL}")
        return rows + [(name, None) for name in gen]
    pipe = load_pipeline(TOY_MODEL, args.device, dtype) if args.arch == "toy" else sd15_pipeline(template, args)
    return rows + [(gen[0], bench_generation(pipe, args.gen_batch_size, args)), (gen[1], bench_generation(pipe, 1, args))]


def table(rows, peak_tflops):
    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)
    lines = ["| measurement | rate | peak memory GiB | TFLOP/s | % of peak |", "|---|---|---|---|---|"]
    for name, m in rows:
        if m is None:
            lines.append(f"| {name} | skipped | | | |")
            continue
        tflops = "-" if m["tflops"] is None else f"{m['tflops']:.3g}"
        share = m["tflops"] / peak_tflops * 100 if m["tflops"] is not None and peak_tflops else None
        lines.append(f"| {name} | {m['rate']:.3g} {m['unit']} | {fmt(m['memory'], '.2f')} | {tflops} | "
                     f"{'-' if m['tflops'] is None else fmt(share, '.1f')} |")
    return "\n".join(lines)


@entry_point
def main():
    args = parse_args()
    peak = args.peak_tflops
    if peak is None and args.device.type == "cuda":
        name = torch.cuda.get_device_name(args.device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    rows = run(args)
    print(table(rows, peak))
    (_, a), (_, b) = rows[:2]
    print(f"one DPO step: {a['gflop_per_pair']:.3g} GFLOP per pair; % of peak against "
          + (f"{peak:g} TFLOP/s dense bf16" if peak else "n/a (pass --peak_tflops)"))
    if a["memory"] is not None:
        print(f"memory (a)/(b): {a['memory'] / b['memory']:.2f} (the second UNet costs {b['memory'] - a['memory']:.2f} GiB)")
    else:
        print("memory (a)/(b): n/a on a CPU (peak memory is measured on CUDA only)")


if __name__ == "__main__":
    main()
