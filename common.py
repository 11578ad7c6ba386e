"""What two or more of the project's scripts share (the four stages, and toyworld.py, study.py and
bench.py beside them), in this order: the Diffusion-DPO loss; flag and input checks; atomic writes;
resumable checkpoints and the settings that wrote them; pipeline loading and seeded generation; LoRA
files; the CoProV2 pair CSV and anchors; the training data of stages 2 and 3; torchrun helpers. A
file format's reader stays beside its writer, even where one stage writes and another reads."""
import argparse
import csv
import hashlib
import json
import math
import os
import re
import sys
import tempfile
from collections import namedtuple
from datetime import timedelta

# Before diffusers/transformers are imported: their import-time notes (e.g. "requires torchvision")
# are not the user's concern; errors still show. A user's own setting wins.
if "TRANSFORMERS_VERBOSITY" not in os.environ and "transformers" in sys.modules:  # imported first (peft does)
    sys.modules["transformers"].utils.logging.set_verbosity_error()
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm


def fail(message):
    """Bad input ends a stage with one clear line and a non-zero exit."""
    sys.exit(f"error: {message}")


# ---------------------------------------------------------------------------------------------
# The Diffusion-DPO loss
# ---------------------------------------------------------------------------------------------
def dpo_loss(model_winner, model_loser, ref_winner, ref_loser, noise, beta):
    """Diffusion-DPO (Wallace et al., 2023) as the SafetyDPO release computes it.

    Each argument is a noise prediction (B,C,H,W) for the same noise and timestep; the error of a
    prediction is its per-sample MSE to the noise. The policy should lower its error on the
    winner (safe image) more than the reference does, and on the loser (unsafe image) less:
        loss = -log sigmoid(-beta/2 * [(err_w - ref_err_w) - (err_l - ref_err_l)])
    Returns the loss and what is worth logging (implicit accuracy: share of pairs the policy
    already prefers the right way; margin: the mean of the sigmoid's argument).
    """
    def error(pred):
        return (pred.float() - noise.float()).pow(2).mean(dim=(1, 2, 3))
    winner_gap = error(model_winner) - error(ref_winner)  # < 0: better than the reference on the winner
    loser_gap = error(model_loser) - error(ref_loser)
    logits = -0.5 * beta * (winner_gap - loser_gap)
    loss = -F.logsigmoid(logits).mean()
    stats = {"implicit_acc": (logits > 0).float().mean().item(), "margin": logits.mean().item(),
             "winner_gap": winner_gap.mean().item(), "loser_gap": loser_gap.mean().item()}
    return loss, stats


# ---------------------------------------------------------------------------------------------
# Flags: numbers are checked when parsed (argparse then ends with its own "error: argument ..." line)
# ---------------------------------------------------------------------------------------------
def _number(kind, test, wants):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wants}")
        return value
    parse.__name__ = wants  # argparse names the type in some messages
    return parse


positive_int = _number(int, lambda v: v > 0, "a positive integer")
nonnegative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
nonnegative_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
finite_float = _number(float, lambda v: True, "a finite number")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


# ---------------------------------------------------------------------------------------------
# Inputs: each read or checked with one clear line when it is wrong
# ---------------------------------------------------------------------------------------------
def check_output_dir(path, flag="--output_dir"):
    """Before any work: the output folder must be a folder (or creatable) and writable, so that a
    run does not find out only when it writes its first result."""
    if not path:
        fail(f"{flag} is empty")
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{flag} {path} is a file, not a folder")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):  # the nearest folder that exists is where it would be made
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        fail(f"{flag} {path}: {parent} is a file, not a folder")
    if parent != os.path.abspath(path):
        if not os.access(parent, os.W_OK | os.X_OK):
            fail(f"{flag} {path}: cannot create it, {parent} is not writable")
        return
    try:  # os.access says yes to root on a read-only mount: try it
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        fail(f"{flag} {path} is not writable ({error.strerror or error})")


def read_json(path, what="", expect=dict):
    """A JSON file this project wrote, or one line saying that it is unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        fail(f"{path}: cannot read {what or 'it'} ({str(error).splitlines()[0] if str(error) else type(error).__name__})")
    if expect is not None and not isinstance(value, expect):
        fail(f"{path}: {what or 'it'} is not a JSON {'object' if expect is dict else expect.__name__}")
    return value


def open_image(path):
    """An RGB image, or one line naming the file that cannot be read."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        fail(f"{path} is not a readable image ({error}); rerun stage 1 to render it anew")


def inside(name, path, column):
    """A file name read from a CSV: relative, without '..', so that it stays in the data folder."""
    parts = re.split(r"[/\\]", name)
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", name):
        fail(f"{path}: {column} {name!r} must be a file name inside the data folder (no absolute path, no '..')")
    return name


# ---------------------------------------------------------------------------------------------
# Files: written atomically (to a temporary name, then renamed), so a kill never leaves half a file
# ---------------------------------------------------------------------------------------------
def atomic_write(path, write):
    """Call write(tmp_path), then move the result into place in one step."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp{os.getpid()}{ext}"
    write(tmp)
    os.replace(tmp, path)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Resume: a run continues only the checkpoint that runs of its own settings wrote
# ---------------------------------------------------------------------------------------------
def files_sha256(paths):
    """One digest of several files' contents, in order (what training reads, not only names)."""
    digest = hashlib.sha256()
    for path in paths:
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        except OSError as error:
            fail(f"cannot read {path} ({error.strerror or error})")
        digest.update(b"\0")  # file boundaries count
    return digest.hexdigest()


def check_settings(path, settings, write=True):
    """Resume only the run that wrote `path`: fail, naming what changed, if it holds other settings;
    if there is no such file yet, record these (write=False: another process records them)."""
    settings = json.loads(json.dumps(settings))  # through JSON, so that it compares equal to the file
    if os.path.exists(path):
        old = read_json(path, "the earlier run's settings")
        changed = [k if len(str(v)) > 60 else f"{k} {old.get(k)} -> {v}"  # long values: their name only
                   for k, v in settings.items() if old.get(k) != v]
        if changed:
            fail(f"{os.path.dirname(path)} holds a run with other settings ({'; '.join(changed)}); "
                 "rerun with those settings or use a new output folder")
    elif write:
        write_json(path, settings)


def find_checkpoint(directory):
    path = os.path.join(directory, "state.safetensors")
    return path if os.path.exists(path) else None


def checkpoint_to_resume(directory, settings, write=True):
    """The checkpoint in `directory` to resume from, or None. It is resumed only by a run of the same
    settings (else check_settings fails, naming what changed): the result would belong to neither
    run. Without a checkpoint these settings replace any earlier ones (write=False: another process
    writes them)."""
    path, state = os.path.join(directory, "settings.json"), find_checkpoint(directory)
    if not state:
        if write:
            write_json(path, settings)
        return None
    if not os.path.exists(path):
        fail(f"{directory} holds a checkpoint without its settings.json; use a new --output_dir")
    check_settings(path, settings)
    return state


def data_fingerprint(pairs, anchors):
    """What a training run reads, for its checkpoint's settings: the pairs and anchors (prompts and
    image names, not paths: a moved data folder still resumes) and the images' contents (a
    re-rendered image under the same name is another run)."""
    def names(rows):
        rows = [[os.path.basename(v) if k.endswith("image") else v for k, v in sorted(r.items())] for r in rows]
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()
    return {"pairs": len(pairs), "pairs_sha256": names(pairs), "anchors": len(anchors),
            "anchors_sha256": names([{"prompt": p, "image": i} for p, i in anchors]),
            "images_sha256": files_sha256([p[k] for p in pairs for k in ("winner_image", "loser_image")]
                                          + [i for _, i in anchors])}


def save_checkpoint(directory, tensors, optimizer, step, scaler=None):
    """Lists of tensors (weights, EMA copies), the optimizer state and (fp16) the gradient scaler's
    state in one safetensors file."""
    flat = {f"{name}.{i}": t.detach().contiguous().clone() for name, ts in tensors.items() for i, t in enumerate(ts)}
    state = optimizer.state_dict()
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            flat[f"optimizer.{pid}.{key}"] = torch.as_tensor(value).clone()
    meta = {"step": str(step), "param_groups": json.dumps(state["param_groups"]),
            "scaler": json.dumps(scaler.state_dict() if scaler is not None else {})}
    atomic_write(os.path.join(directory, "state.safetensors"), lambda tmp: save_file(flat, tmp, metadata=meta))


def load_checkpoint(path, tensors, optimizer, scaler=None):
    """Restore what `save_checkpoint` wrote, in place; returns the step to resume from."""
    try:
        return _load_checkpoint(path, tensors, optimizer, scaler)
    except Exception as error:  # a corrupt or foreign file: safetensors, KeyError, shapes, JSON
        fail(f"{path}: not a checkpoint this run can resume ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
             "delete it to start anew or use a new --output_dir")


def _load_checkpoint(path, tensors, optimizer, scaler):
    flat = load_file(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    with torch.no_grad():
        for name, ts in tensors.items():
            for i, t in enumerate(ts):
                t.copy_(flat[f"{name}.{i}"])
    state = {"param_groups": json.loads(meta["param_groups"]), "state": {}}
    for key, value in flat.items():
        if key.startswith("optimizer."):
            _, pid, name = key.split(".", 2)
            state["state"].setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict(state)
    scaler_state = json.loads(meta.get("scaler", "{}"))
    if scaler is not None and scaler.is_enabled() and scaler_state:  # its loss scale and growth count
        scaler.load_state_dict(scaler_state)
    return int(meta["step"])


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed_precision


def inference_dtype(device):
    """Half precision for rendering on a GPU, full precision on a CPU."""
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def load_pipeline(model, device="cpu", dtype=torch.float32, scheduler="ddim"):
    """A StableDiffusionPipeline from a local folder or a hub id, with a DDIM sampler (or "pndm", the
    release's sampler). Weights saved only as the fp16 variant (*.fp16.safetensors) load too."""
    from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
    quiet_libraries()
    options = dict(dtype=dtype, safety_checker=None, requires_safety_checker=False)
    try:
        try:
            pipe = StableDiffusionPipeline.from_pretrained(model, **options)
        except OSError as error:  # a folder or cache holding only fp16 files: "Error no file named ..."
            if "no file named" not in str(error):
                raise
            pipe = StableDiffusionPipeline.from_pretrained(model, variant="fp16", **options)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError) as error:  # a broken folder too
        hint = " (no such folder; a hub id needs network access or a cached copy)" if not os.path.isdir(model) else ""
        fail(f"cannot load model {model!r}{hint}: {(str(error).splitlines() or [type(error).__name__])[0]}")
    samplers = {"ddim": DDIMScheduler, "pndm": PNDMScheduler}
    pipe.scheduler = samplers[scheduler].from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def default_batch_size(pipe):
    """Images per generation batch when none is given: 64 for small models (up to 64 px: the toy's 32 px, as
    before), 16 from SD's 512 px on (measured 14 images/s on an H200, ~batch 8's rate)."""
    return 64 if pipe.unet.config.sample_size * pipe.vae_scale_factor <= 64 else 16


def slice_vae(pipe):
    """Decode one image at a time (VAE slicing) from SD's 512 px on, where a batch decoded at once
    takes GBs. The toy's 32 px batches decode at once, as before: slicing moves its pixels by 1/255."""
    if pipe.unet.config.sample_size * pipe.vae_scale_factor > 64:
        pipe.vae.enable_slicing()


def quiet_libraries():
    """Hide the libraries' info chatter (progress bars of loading, unused-key notes), keep errors."""
    import diffusers
    import transformers
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


@torch.no_grad()
def generate(pipe, prompts, seeds, steps=25, guidance_scale=7.5, batch_size=16, desc="generating", return_nan=False,
             **kwargs):
    """One uint8 HxWx3 image per prompt. Each image depends only on its own seed, never on its
    batch, so a resumed or re-batched run draws the same pictures (up to float rounding, which
    another batch size can change by one level in 255). return_nan=True: (images, one bool per
    image, True where the image came out NaN, e.g. an fp16 overflow; uint8 would hide it)."""
    prompts, seeds = list(prompts), list(seeds)
    images, nan = [], []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        out = pipe(prompts[i:i + batch_size], generator=generators, num_inference_steps=steps,
                   guidance_scale=guidance_scale, output_type="np", **kwargs).images
        nan.extend(np.isnan(out).any(axis=(1, 2, 3)).tolist())
        images.extend((np.clip(np.nan_to_num(out), 0, 1) * 255).round().astype(np.uint8))  # NaN: black
    return (images, nan) if return_nan else images


# ---------------------------------------------------------------------------------------------
# LoRA: experts live on the UNet's attention projections, saved in the diffusers format
# ---------------------------------------------------------------------------------------------
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_FILE = "pytorch_lora_weights.safetensors"


def add_lora(unet, rank, alpha, targets=LORA_TARGETS):
    from peft import LoraConfig
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))
    return [p for p in unet.parameters() if p.requires_grad]


def save_lora(directory, unet_lora_layers, rank, alpha, info, targets=LORA_TARGETS):
    """Write `pytorch_lora_weights.safetensors` (loadable by `pipe.load_lora_weights(directory)`)
    and `lora.json` describing it (base model, rank, ...), which merging checks. lora.json is
    written last (and an old one removed first), so that it marks a complete LoRA."""
    from diffusers import StableDiffusionPipeline
    if os.path.exists(os.path.join(directory, "lora.json")):
        os.remove(os.path.join(directory, "lora.json"))
    metadata = {"r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
    tmp = os.path.join(directory, f".tmp{os.getpid()}")
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=unet_lora_layers, unet_lora_adapter_metadata=metadata)
    os.replace(os.path.join(tmp, LORA_FILE), os.path.join(directory, LORA_FILE))
    os.rmdir(tmp)
    write_json(os.path.join(directory, "lora.json"), {"rank": rank, "alpha": alpha, "targets": list(targets), **info})


def read_lora(directory):
    """(info from lora.json, {layer: (A, B)} with B @ A * alpha / rank the layer's weight delta)."""
    path = os.path.join(directory, LORA_FILE)
    if not os.path.exists(path) or not os.path.exists(os.path.join(directory, "lora.json")):
        fail(f"{directory} holds no LoRA written by this project ({LORA_FILE} + lora.json)")
    info = read_lora_info(directory, ("base_model", "category"))
    layers = {}
    for key, value in load_lora_tensors(path).items():
        match = re.match(r"(.*)\.(lora_[AB])\.weight$", key)
        if not match:
            fail(f"{path}: tensor {key!r} is not a LoRA weight (<layer>.lora_A.weight / .lora_B.weight)")
        layer, part = match.groups()
        layers.setdefault(layer, {})[part] = value.float()
    if not layers:
        fail(f"{path} holds no LoRA weights")
    for layer, parts in layers.items():
        if set(parts) != {"lora_A", "lora_B"}:
            fail(f"{path}: layer {layer} lacks {'lora_B' if 'lora_A' in parts else 'lora_A'}")
        a, b = parts["lora_A"], parts["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != info["rank"] or b.shape[1] != info["rank"]:
            fail(f"{path}: layer {layer} has A {tuple(a.shape)} and B {tuple(b.shape)}, not of rank {info['rank']} (lora.json)")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            fail(f"{path}: layer {layer} holds NaN or infinite weights")
    if all(not v["lora_B"].any() for v in layers.values()):  # e.g. trained for zero steps
        fail(f"{path}: every lora_B is zero, so this LoRA changes nothing")
    return info, {k: (v["lora_A"], v["lora_B"]) for k, v in layers.items()}


def load_lora_into(pipe, directory):
    """pipe.load_lora_weights, ending in one line if the LoRA does not fit the model."""
    try:
        pipe.load_lora_weights(directory)
    except Exception as error:  # diffusers/peft raise ValueError, RuntimeError, KeyError, ... on a foreign LoRA
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        fail(f"{directory}: the LoRA does not fit the model ({message[:300]})")


def read_lora_info(directory, keys=()):
    """lora.json, checked: an object with a positive integer rank, a positive alpha and these keys."""
    path = os.path.join(directory, "lora.json")
    info = read_json(path, "lora.json")
    rank, alpha = info.get("rank"), info.get("alpha")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        fail(f"{path}: rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        fail(f"{path}: alpha must be a positive number, got {alpha!r}")
    for key in ("base_model", "category"):
        if (key in keys or key in info) and not isinstance(info.get(key), str):
            fail(f"{path}: {key} must be a string, got {info.get(key)!r}")
    return info


def load_lora_tensors(path):
    """The tensors of a LoRA file, or one line saying it is not a readable safetensors file."""
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own error type (and OSError)
        fail(f"{path}: not a readable safetensors file ({str(error).splitlines()[0] if str(error) else type(error).__name__})")


# ---------------------------------------------------------------------------------------------
# CoProV2 pairs: a CSV with columns prompt,image,category; an unsafe row u_idx_N_K.* is paired
# with the safe row s_idx_N_K.* (the loser and the winner of one DPO pair)
# ---------------------------------------------------------------------------------------------
PAIR_COLUMNS = ["prompt", "image", "category"]
_IMAGE_NAME = re.compile(r"^([us])_idx_(\d+)_(\d+)\.\w+$")


def read_csv_rows(path, columns, what):
    """The rows of a UTF-8 CSV with at least these columns, or one line saying what is wrong."""
    if not isinstance(path, str) or not os.path.exists(path):
        fail(f"no {what} {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not set(columns) <= set(reader.fieldnames or []):
                fail(f"{path}: expected columns {','.join(columns)}, found {','.join(reader.fieldnames or [])}")
            rows = list(reader)
    except UnicodeDecodeError as error:
        fail(f"{path}: not UTF-8 text (byte {error.start}); save the {what} as UTF-8")
    except (OSError, csv.Error) as error:
        fail(f"cannot read {what} {path} ({getattr(error, 'strerror', None) or error})")
    for n, row in enumerate(rows, 2):
        if any(row.get(c) is None for c in columns):  # a short row
            fail(f"{path}: line {n} has fewer than {len(columns)} fields")
    return rows


def read_pairs(path):
    """[{index, categories, unsafe_prompt, safe_prompt, loser_image, winner_image}] from a CoProV2 CSV.
    A row repeated under another category (642 in CoProV2's train CSV) adds that category to its
    pair; the same image with another prompt is refused (which one would be meant?)."""
    rows = read_csv_rows(path, PAIR_COLUMNS, "pair file")
    halves, categories = {}, {}
    for row in rows:
        inside(row["image"], path, "image")
        match = _IMAGE_NAME.match(os.path.basename(row["image"]))
        if not match:
            fail(f"{path}: image name {row['image']!r} is not u_idx_N_K or s_idx_N_K")
        kind, index, k = match.groups()
        key = (int(index), int(k))
        old = halves.setdefault(key, {}).setdefault(kind, row)
        if (old["prompt"], old["image"]) != (row["prompt"], row["image"]):
            fail(f"{path}: two rows for {kind}_idx_{index}_{k} with different "
                 f"{'prompts' if old['image'] == row['image'] else 'images'} ({old['prompt']!r} / {row['prompt']!r})")
        labels = categories.setdefault(key, [])
        if row["category"] not in labels:
            labels.append(row["category"])
    unpaired = [f"idx_{i}_{k}" for (i, k), h in halves.items() if len(h) != 2]
    if unpaired:
        fail(f"{path}: {len(unpaired)} unpaired rows, e.g. {unpaired[0]}")
    return [{"index": i, "categories": categories[(i, k)], "unsafe_prompt": h["u"]["prompt"],
             "safe_prompt": h["s"]["prompt"], "loser_image": h["u"]["image"], "winner_image": h["s"]["image"]}
            for (i, k), h in sorted(halves.items())]


def pair_images(pairs, pairs_csv):
    """The pairs with full paths of their images (in images/ beside the CSV), all of which must exist."""
    image_dir = os.path.join(os.path.dirname(pairs_csv), "images")
    for p in pairs:
        for key in ("loser_image", "winner_image"):
            p[key] = os.path.join(image_dir, os.path.basename(p[key]))
            if not os.path.isfile(p[key]):
                fail(f"missing image {p[key]}")
    return pairs


def write_pairs(path, pairs):
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(PAIR_COLUMNS)
            for p in pairs:
                for category in p["categories"]:  # one row pair per label, as read_pairs reads them
                    writer.writerow([p["unsafe_prompt"], p["loser_image"], category])
                    writer.writerow([p["safe_prompt"], p["winner_image"], category])
    atomic_write(path, write)


def write_anchors(path, rows):
    """Anchor prompts and the model's own images of them (prompt,image), for prior preservation."""
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows([["prompt", "image"], *rows])
    atomic_write(path, write)


def anchors_csv(data_dir):
    """Where stage 1 writes the anchors, and stages 2 and 3 look for them: beside pairs.csv."""
    return os.path.join(data_dir, "anchors.csv")


def read_anchors(path):
    rows = read_csv_rows(path, ["prompt", "image"], "anchor file")
    return [(r["prompt"], inside(r["image"], path, "image")) for r in rows]


def anchor_images(path):
    """(prompt, full image path) of an anchor CSV, the images in images/ beside it."""
    image_dir = os.path.join(os.path.dirname(path), "images")
    anchors = [(prompt, os.path.join(image_dir, image)) for prompt, image in read_anchors(path)]
    for _, image in anchors:
        if not os.path.isfile(image):
            fail(f"missing anchor image {image}")
    return anchors


# ---------------------------------------------------------------------------------------------
# Training data (stages 2 and 3): encoded once, drawn per step
# ---------------------------------------------------------------------------------------------
# What stage 2 trains on and stage 3's distillation uses: computed once, the VAE and text encoder are frozen.
TrainingData = namedtuple("TrainingData", "winners losers anchor_latents prompt_embeds safe_embeds anchor_embeds empty_embed")


@torch.no_grad()
def encode_training_data(pipe, pairs, anchors, dtype=torch.float32):
    """Latents of winners, losers and anchors, text embeddings of the unsafe and the anchor
    prompts and of the empty prompt, computed once: the VAE and the text encoder are frozen
    (stage 2 trains on them, stage 3 distils the experts on them)."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor

    def latents(paths):
        out = []
        for i in tqdm(range(0, len(paths), 32), desc="encoding images", leave=False):
            pixels = np.stack([np.asarray(open_image(p).resize((size, size))) for p in paths[i:i + 32]])
            pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(pipe.device, dtype) / 127.5 - 1
            out.append(pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor)
        return torch.cat(out).float()
    winners = latents([p["winner_image"] for p in pairs])
    losers = latents([p["loser_image"] for p in pairs])
    anchor_latents = latents([image for _, image in anchors]) if anchors else None
    n = len(pairs)
    prompts = [p["unsafe_prompt"] for p in pairs] + [p["safe_prompt"] for p in pairs] + [prompt for prompt, _ in anchors] + [""]
    embeds = torch.cat([pipe.encode_prompt(prompts[i:i + 64], pipe.device, 1, False)[0]
                        for i in range(0, len(prompts), 64)]).float()
    return TrainingData(winners, losers, anchor_latents, embeds[:n], embeds[n:2 * n], embeds[2 * n:-1], embeds[-1])


def anchor_condition(data, anchors, empty):
    """The anchors' text embeddings, the empty prompt where `empty`: half of the anchors are drawn
    unconditional, because classifier-free guidance's unconditional branch is shared by every prompt."""
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


def step_generator(seed, step):
    """A training step's own random generator: a resumed run draws the same batches, noise and timesteps."""
    return torch.Generator().manual_seed(seed * 100003 + step)


def slug(category):
    """A category's folder name: 'Illegal Activity' -> 'illegal-activity'."""
    return category.lower().replace(" ", "-")


# ---------------------------------------------------------------------------------------------
# Several processes (torchrun)
# ---------------------------------------------------------------------------------------------
def init_distributed():
    """(rank, world size) under torchrun, else (0, 1). Stages split their work by rank; a barrier
    (gloo on CPU, nccl on GPUs) lets rank 0 write the shared outputs once every slice is done."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    import torch.distributed as dist
    if not dist.is_initialized():
        # a long timeout: ranks wait at barriers while rank 0 alone runs an LLM, a judge or a slow slice
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2))
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return dist.get_rank(), world


def use_device(args, world):
    """Under torchrun on GPUs, each process uses its own (init_distributed set it): cuda -> cuda:N."""
    if world > 1 and args.device.startswith("cuda"):
        args.device = f"cuda:{torch.cuda.current_device()}"


def barrier():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()

