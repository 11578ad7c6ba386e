"""What two or more stages share: the shell every stage runs in (one error wrapper, one claim on the
output folder, atomic writes), the pipeline and seeded generation, LoRA files, the CoProV2 pair CSV
and the training data that stages 2 and 3 encode from it."""
import argparse
import csv
import fcntl
import functools
import hashlib
import json
import math
import os
import re
import sys
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # the libraries' import-time notes are not the user's concern
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm


# --- The shell: one error wrapper, one claim on the output folder, atomic writes
class Refused(Exception):  # bad input, said in one line
    pass


def fail(message):
    raise Refused(message)


class Parser(argparse.ArgumentParser):
    """argparse with the stage's docstring as its help, and usage errors as one `error:` line too."""
    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        fail(f"{message} (see --help)")


def entry_point(main):
    """Any exception escaping a stage's main() ends it with one `error:` line (on a line of its own,
    after any progress bar) and exit status 1. SAFETYDPO_DEBUG=1 shows the traceback instead."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("\nerror: interrupted; the same command resumes", file=sys.stderr)
            sys.exit(130)
        except Exception as error:
            if os.environ.get("SAFETYDPO_DEBUG"):
                raise
            for bar in list(getattr(tqdm, "_instances", [])):
                bar.close()
            kind = "" if isinstance(error, Refused) else f"{type(error).__name__}: "
            print(f"\nerror: {kind}{(str(error).strip().splitlines() or [''])[0]}", file=sys.stderr)
            sys.exit(1)
    return run


def positive(kind, zero=False):
    """An argparse type: a finite number > 0 (>= 0 with zero=True)."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero) or (kind is int and value >= 2 ** 40):
            raise ValueError(text)
        return value
    parse.__name__ = f"{'non-negative' if zero else 'positive'} {kind.__name__}"
    return parse


_DIGESTS = {}  # a path's files, sizes and times -> its digest: hashed once a process while they stay unchanged


def digest(path):
    """SHA-256 of a file's contents, or of a folder's files (names and contents, dot files skipped);
    a path that does not exist (a hub id) stands for itself."""
    if not os.path.exists(path):
        return str(path)
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, folders, names in os.walk(path) for name in names
        if not name.startswith(".") and "/." not in root.removeprefix(path))
    stamp = (os.path.realpath(path), *((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files))
    if stamp in _DIGESTS:
        return _DIGESTS[stamp]
    sha = hashlib.sha256()
    for name in files:
        sha.update(os.path.relpath(name, path).encode() + b"\0")
        if name.endswith(".safetensors"):  # known by its header and tensors: safetensors orders its header at random
            with safe_open(name, "pt") as f:
                sha.update(json.dumps(sorted((f.metadata() or {}).items())).encode())
                for key in sorted(f.keys()):
                    sha.update(key.encode() + f.get_tensor(key).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        else:
            with open(name, "rb") as f:
                sha.update(hashlib.file_digest(f, "sha256").digest())
    _DIGESTS[stamp] = sha.hexdigest()
    return _DIGESTS[stamp]


_LOCKS = []  # held until the process ends


def claim_output(path, settings, inputs, free=(), may_join=()):
    """Claim the output folder for this run and return its resolved path. Refused: a folder that holds
    an input (or is one), one that another run is writing (an exclusive lock), and one
    made with other settings or inputs than these (run.json records both): the same ones resume;
    `free` settings (a longer run) are not recorded and may change. `inputs` maps a role to a path;
    roles that start with one of `may_join` (stage 4's "lora ") may come and go between runs."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        fail("this reference runs one process per stage (one GPU); torchrun is not supported")
    out = os.path.realpath(path)
    for given in inputs.values():  # never the folder of an input file, nor an input folder or inside it
        source = os.path.realpath(given)
        if os.path.exists(source) and (out in (source, os.path.dirname(source)) or out.startswith(source + os.sep)):
            fail(f"--output_dir {path} would write into the input {given}; choose another folder")
    os.makedirs(out, exist_ok=True)
    lock = open(os.path.join(out, ".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        fail(f"{path} is being written by another run; wait for it or choose another --output_dir")
    _LOCKS.append(lock)
    record = {"settings": json.loads(json.dumps({k: v for k, v in settings.items() if k not in free})),
              "inputs": {k: digest(v) for k, v in inputs.items()}}
    run_json = os.path.join(out, "run.json")
    if os.path.exists(run_json):
        old = json.load(open(run_json))
        changed = [f"{k} {old['settings'].get(k)} -> {v}" for k, v in record["settings"].items()
                   if old["settings"].get(k) != v]
        for k in sorted(set(old["inputs"]) | set(record["inputs"])):
            comes_or_goes = k.startswith(tuple(may_join)) and (k not in old["inputs"] or k not in record["inputs"])
            if old["inputs"].get(k) != record["inputs"].get(k) and not comes_or_goes:
                changed.append(f"{k} changed ({inputs.get(k, 'not given now')})")
        if changed:
            fail(f"{path} holds a run of other settings or inputs ({'; '.join(changed)}); "
                 "rerun with those, or choose a new --output_dir")
        record["inputs"] = {**old["inputs"], **record["inputs"]}
    write_json(run_json, record)
    return out


def output_path(root, *names):
    """A file or folder under the output folder, each name (a category, a variant) checked first."""
    for name in names:
        if not re.fullmatch(r"[\w][\w.+ -]*", name) or ".." in name:
            fail(f"{name!r} cannot name a file or folder (letters, digits, '_', '-', '+', '.' and spaces)")
    return os.path.join(root, *names)


def atomic_write(path, write):
    """Call write(tmp_path), then move the result into place in one step: a kill never leaves half a file."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    atomic_write(path, lambda tmp: open(tmp, "w").write(text))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2))


def save_checkpoint(path, step, params, optimizer, **extra):
    """A run's state as a torch.save dict (read back with weights_only=True: tensors and numbers only)."""
    state = {"step": step, "lora": [p.detach() for p in params], "optimizer": optimizer.state_dict(), **extra}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path, params, optimizer, last_step):
    """The state save_checkpoint wrote, its weights and optimizer restored in place; None if there is none."""
    if not os.path.exists(path):
        return None
    state = torch.load(path, weights_only=True)
    if state["step"] > last_step:
        fail(f"{path} is at step {state['step']}, past the {last_step} steps asked for; choose a new --output_dir")
    with torch.no_grad():
        for p, saved in zip(params, state["lora"], strict=True):
            p.copy_(saved)
    optimizer.load_state_dict(state["optimizer"])
    return state


# --- Models: loading and seeded generation
def load_pipeline(model, device, dtype=torch.float32, scheduler="ddim"):
    """A StableDiffusionPipeline (a local folder or a hub id) with a DDIM sampler (or "pndm", the release's)."""
    import diffusers
    import transformers
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(model, dtype=dtype, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = {"ddim": DDIMScheduler, "pndm": PNDMScheduler}[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if pipe.unet.config.sample_size * pipe.vae_scale_factor > 64:
        pipe.vae.enable_slicing()  # SD's 512 px: decode one image at a time (the toy's 32 px batches decode at once)
    return pipe.to(device)


def batch_size_for(pipe):  # images per generation batch: 64 for the toy's 32 px, 16 for SD's 512 px
    return 64 if pipe.unet.config.sample_size * pipe.vae_scale_factor <= 64 else 16


@torch.no_grad()
def generate(pipe, prompts, seeds, sampling_steps=20, guidance_scale=7.5, batch_size=None):
    """(images, nan): one uint8 HxWx3 image per prompt, each from its own seed (so a resumed or
    re-batched run draws the same picture, up to rounding), and whether it came out NaN (fp16)."""
    prompts, seeds, images, nan = list(prompts), list(seeds), [], []
    batch_size = batch_size or batch_size_for(pipe)
    for i in range(0, len(prompts), batch_size):
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        out = pipe(prompts[i:i + batch_size], generator=generators, num_inference_steps=sampling_steps,
                   guidance_scale=guidance_scale, output_type="np").images
        nan.extend(np.isnan(out).any(axis=(1, 2, 3)).tolist())
        images.extend((np.clip(np.nan_to_num(out), 0, 1) * 255).round().astype(np.uint8))  # NaN: black
    return images, nan


def render_missing(pipe, jobs, sampling_steps, guidance_scale=7.5, batch_size=None, mark_nan=False):
    """Render every job (path.png, prompt, seed) whose image is not on disk yet, a batch at a time, while a
    background thread writes the previous batch's PNGs. An image that came out NaN (fp16) is saved black,
    as path.nan.png where mark_nan (it counts as done too). Returns each job's file and how many were rendered."""
    nan_path = lambda path: path.removesuffix(".png") + ".nan.png"
    def on_disk(path):  # the job's file: path, or the .nan.png written instead of it
        return nan_path(path) if mark_nan and not os.path.exists(path) and os.path.exists(nan_path(path)) else path
    todo = [job for job in jobs if not os.path.exists(on_disk(job[0]))]
    batch_size = batch_size or batch_size_for(pipe)
    with ThreadPoolExecutor(1) as writer:
        written = []
        for i in tqdm(range(0, len(todo), batch_size), desc="rendering", leave=False):
            batch = todo[i:i + batch_size]
            images, nan = generate(pipe, [j[1] for j in batch], [j[2] for j in batch], sampling_steps, guidance_scale, len(batch))
            written += [writer.submit(atomic_write, nan_path(path) if bad and mark_nan else path, Image.fromarray(image).save)
                        for (path, _, _), image, bad in zip(batch, images, nan)]
            if any(nan) and not mark_nan:
                print(f"warning: {sum(nan)} images came out NaN (an fp16 failure), saved black")
        for future in written:
            future.result()  # a failed write ends the stage here
    return [on_disk(path) for path, _, _ in jobs], len(todo)


def open_image(path):
    return Image.open(path).convert("RGB")


# --- LoRA files: diffusers' format; rank, alpha and targets read from the weights file itself
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_FILE = "pytorch_lora_weights.safetensors"


def add_lora(unet, rank, alpha, targets=LORA_TARGETS):
    from peft import LoraConfig
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # the LoRA trains in fp32 even when the UNet runs in half precision
        p.data = p.data.float()
    return params


def save_lora(directory, layers, alpha, info):
    """`pytorch_lora_weights.safetensors`, as diffusers writes it (`pipe.load_lora_weights(directory)`
    reads it): peft's {layer}.lora_A/B.weight under "unet.", rank, alpha and targets in its header,
    and this project's note (base model, category, ...) beside them; lora.json repeats the note."""
    rank = next(v.shape[0] for k, v in layers.items() if k.endswith("lora_A.weight"))
    targets = sorted({k.rsplit(".lora_", 1)[0] for k in layers})  # the adapted layers, by full name
    header = {"format": "pt", "safetydpo": json.dumps(info),
              "lora_adapter_metadata": json.dumps({"unet.r": rank, "unet.lora_alpha": alpha, "unet.target_modules": targets})}
    tensors = {"unet." + k: v.detach().float().contiguous() for k, v in layers.items()}
    atomic_write(os.path.join(directory, LORA_FILE), lambda tmp: save_file(tensors, tmp, metadata=header))
    write_json(os.path.join(directory, "lora.json"), {"rank": rank, "alpha": alpha, "targets": targets, **info})


def read_lora(directory):
    """(note, {layer: (A, B)} with B @ A the layer's weight delta, alpha / rank folded into B)."""
    path = os.path.join(directory, LORA_FILE)
    with safe_open(path, "pt") as f:
        header, tensors = f.metadata() or {}, {k: f.get_tensor(k).float() for k in f.keys()}
    alpha = json.loads(header.get("lora_adapter_metadata", "{}")).get("unet.lora_alpha")
    layers = {}
    for key, value in tensors.items():
        match = re.fullmatch(r"(.*)\.lora_([AB])\.weight", key)
        if not match or value.dim() != 2 or not torch.isfinite(value).all():
            fail(f"{path}: {key} is not a finite LoRA weight (<layer>.lora_A.weight / .lora_B.weight)")
        layers.setdefault(match[1], {})[match[2]] = value
    ranks = {(v.get("A", torch.empty(0, 0)).shape[0], v.get("B", torch.empty(0, 0)).shape[-1]) for v in layers.values()}
    if not layers or len(ranks) != 1 or len(set(ranks.pop())) != 1:
        fail(f"{path}: not a LoRA of one rank with an A and a B for every layer")
    rank = next(iter(layers.values()))["A"].shape[0]
    if not any(v["B"].any() for v in layers.values()):
        fail(f"{path}: every lora_B is zero, so this LoRA changes nothing")
    scale = (alpha or rank) / rank  # diffusers' default when the header has no alpha
    return json.loads(header.get("safetydpo", "{}")), {k: (v["A"], v["B"] * scale) for k, v in layers.items()}


# --- CoProV2 pairs: prompt,image,category; the unsafe row u_idx_N_K and the safe s_idx_N_K are a loser and its winner
def read_csv(path, columns):
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if rows and not set(columns) <= set(rows[0]) or any(None in (r.get(c) for c in columns) for r in rows):
        fail(f"{path}: expected the columns {','.join(columns)} on every line")
    for row in rows:
        if "image" in row and (os.path.basename(row["image"]) != row["image"] or row["image"] in ("", ".", "..")):
            fail(f"{path}: image {row['image']!r} must be a file name inside the data folder's images/")
    return rows


def read_pairs(path):
    """[{categories, unsafe_prompt, safe_prompt, loser_image, winner_image}]. A row repeated under
    another category (642 in CoProV2's train CSV) adds that category to its pair."""
    halves = {}
    for row in read_csv(path, ["prompt", "image", "category"]):
        match = re.fullmatch(r"([us])_idx_(\d+_\d+)\.\w+", row["image"])
        if not match:
            fail(f"{path}: image name {row['image']!r} is not u_idx_N_K or s_idx_N_K")
        half = halves.setdefault(match[2], {"categories": []})
        if half.setdefault(match[1], row)["prompt"] != row["prompt"]:
            fail(f"{path}: two rows for {match[1]}_idx_{match[2]} with different prompts")
        half["categories"] += [row["category"]] * (row["category"] not in half["categories"])
    if any(len(h) != 3 for h in halves.values()):
        fail(f"{path}: an unsafe row without its safe row, or the reverse")
    return [{"categories": h["categories"], "unsafe_prompt": h["u"]["prompt"], "safe_prompt": h["s"]["prompt"],
             "loser_image": h["u"]["image"], "winner_image": h["s"]["image"]}
            for _, h in sorted(halves.items(), key=lambda kv: tuple(map(int, kv[0].split("_"))))]


def read_anchors(data_dir, needed_by=None):
    """Anchors (stage 1's anchors.csv): prompts an expert must leave unchanged, with the model's images of them.
    needed_by: the flag that uses them (none listed is then refused)."""
    path = os.path.join(data_dir, "anchors.csv")
    anchors = [(r["prompt"], r["image"]) for r in read_csv(path, ["prompt", "image"])] if os.path.exists(path) else []
    if needed_by and not anchors:
        fail(f"{needed_by} needs anchors: {path} lists none (stage 1 writes it)")
    return anchors


class Latents:
    """Each image's VAE posterior, scaled as the UNet sees it: a list of views, each N x C x h x w, of its
    mean and std. The views: the image and, under the release's augmentation, its mirror image (encoded as such)."""
    def __init__(self, mean, std=None):
        self.mean, self.std, self.latent_shape = mean, std, mean[0].shape[1:]

    def __len__(self):
        return len(self.mean[0])

    def draw(self, idx, flip=None, eps=None):
        """The latents of images idx: the posterior mean, or (eps given) a sample; mirrored where flip."""
        pick = lambda views: views[0][idx] if flip is None else torch.where(flip[:, None, None, None], views[1][idx], views[0][idx])
        return pick(self.mean) if eps is None else pick(self.mean) + pick(self.std) * eps


TrainingData = namedtuple("TrainingData", "winner_latents loser_latents anchor_latents unsafe_embeds safe_embeds "
                                         "anchor_embeds empty_embed")


@torch.no_grad()
def encode_training_data(pipe, pairs, anchors, image_dir, dtype=torch.float32, augment=False):
    """Latents of winners, losers and anchors, and text embeddings of the unsafe, safe, anchor and
    empty prompts, computed once: the VAE and the text encoder are frozen. augment: the release's random
    flip and sampled latents (each winner and loser also mirrored, its posterior's std kept)."""
    size, scale = pipe.unet.config.sample_size * pipe.vae_scale_factor, pipe.vae.config.scaling_factor

    def latents(names, augment=False):
        mean, std = [[], []], [[], []]  # by view: the image, its mirror image
        for i in tqdm(range(0, len(names), 32), desc="encoding images", leave=False):
            images = [open_image(os.path.join(image_dir, n)) for n in names[i:i + 32]]
            if any(im.size != (size, size) for im in images):
                fail(f"an image of {image_dir} is not {size}x{size}, the model's size: render it with this model")
            pixels = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2)
            pixels = pixels.to(pipe.device, dtype) / 127.5 - 1
            for view, p in enumerate([pixels, pixels.flip(-1)] if augment else [pixels]):
                posterior = pipe.vae.encode(p).latent_dist
                mean[view].append(posterior.mean * scale)
                std[view] += [posterior.std * scale] if augment else []
        views = lambda parts: [torch.cat(p).float() for p in parts if p]
        return Latents(views(mean), views(std) if augment else None)
    n = len(pairs)
    prompts = [p["unsafe_prompt"] for p in pairs] + [p["safe_prompt"] for p in pairs] + [a for a, _ in anchors] + [""]
    embeds = torch.cat([pipe.encode_prompt(prompts[i:i + 64], pipe.device, 1, False)[0]
                        for i in range(0, len(prompts), 64)]).float()
    return TrainingData(latents([p["winner_image"] for p in pairs], augment), latents([p["loser_image"] for p in pairs], augment),
                        latents([image for _, image in anchors]) if anchors else None,
                        embeds[:n], embeds[n:2 * n], embeds[2 * n:-1], embeds[-1])


def anchor_condition(data, anchors, empty):
    """The anchors' text embeddings, the empty prompt where `empty` (classifier-free guidance's
    unconditional branch is shared by every prompt, so it is anchored too)."""
    cond = data.anchor_embeds[anchors].clone()
    cond[empty] = data.empty_embed
    return cond


@torch.no_grad()
def reference_prediction(unet, noisy, timesteps, cond):
    """The reference model's noise prediction: the same UNet with its LoRA switched off (no second
    UNet in memory). enable_adapters() also turns requires_grad back on for the LoRA weights."""
    unet.disable_adapters()
    try:
        return unet(noisy, timesteps, cond).sample
    finally:
        unet.enable_adapters()


def step_generator(seed, step, device="cpu"):
    """A training step's own random generator, on the device that draws (noise is drawn where it is used):
    a resumed run draws the same batches, noise and timesteps."""
    return torch.Generator(device).manual_seed(seed * 100003 + step)
