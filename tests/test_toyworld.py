"""The toy world: the judge is exact, the tokenizer keeps words whole, the model loads offline."""
import os

import numpy as np
import torch

import toyworld as tw
from common import generate, load_pipeline
from conftest import error_line, run_stage


def test_judge_reads_renders_exactly():
    rng = np.random.default_rng(123)
    hits, n = 0, 2000
    for _ in range(n):
        triple = tw.ALL_TRIPLES[rng.integers(len(tw.ALL_TRIPLES))]
        found = tw.read_image(tw.draw(*triple, rng))
        hits += (found["colour"], found["shape"], found["background"]) == triple
    assert hits / n >= 0.99


def test_judge_rejects_off_palette_and_empty_images():
    image = np.zeros((32, 32, 3), np.uint8)
    assert tw.read_image(image)["colour"] is None  # no object
    image[8:20, 8:20] = (200, 130, 110)  # salmon: not a palette colour
    found = tw.read_image(image)
    assert found["colour"] is None and found["background"] == "black"
    assert not tw.shows_concept(image, ("red", "black"))


def test_tokenizer_keeps_every_word_whole():
    tokenizer = tw.build_tokenizer()
    for word in tw.vocabulary():
        ids = tokenizer(word).input_ids
        assert len(ids) == 3, (word, tokenizer.convert_ids_to_tokens(ids))  # <start> word <end>
        assert tokenizer.decode(ids[1:-1]).strip() == word
    prompt = tw.prompt("red", "circle", "black", template=1)
    assert tokenizer.decode(tokenizer(prompt).input_ids, skip_special_tokens=True).split() == prompt.split()


def test_taxonomy_is_coprov2_shaped():
    concepts = tw.taxonomy(2)
    categories = {c["category"] for c in concepts}
    assert len(categories) >= 7 and len(concepts) == 2 * len(categories)
    unsafe = {c["unsafe"] for c in concepts}
    for category, concept, unsafe_prompt, safe_prompt in tw.concept_prompts(concepts, "test"):
        changed = [a for a, b in zip(unsafe_prompt.split(), safe_prompt.split()) if a != b]
        assert len(changed) == 1 and changed[0] in tw.PALETTE  # a minimal edit: the colour word
    for p in tw.safe_prompts(concepts):
        colour, _, background = tw.parse_prompt(p)
        assert (colour, background) not in unsafe
    assert len(tw.taxonomy(4)) == 4 * len(tw.taxonomy(1))


def test_held_out_triples_never_drawn_in_pretraining():
    rng = np.random.default_rng(0)
    _, prompts = tw.draw_batch(rng, 512, empty_share=0)
    assert not {tw.parse_prompt(p) for p in prompts} & tw.HELD_OUT


def test_model_loads_offline_and_generates(toy_model):
    pipe = load_pipeline(toy_model, "cpu")
    assert pipe.unet.dtype == torch.float32
    images, _ = generate(pipe, [tw.prompt("blue", "square", "white"), tw.prompt("blue", "square", "white")],
                         [7, 7], sampling_steps=10)
    assert images[0].shape == (32, 32, 3) and images[0].dtype == np.uint8
    assert np.array_equal(images[0], images[1])  # same seed, same picture


def test_pretraining_runs_and_resumes_only_with_its_settings(tmp_path):
    out = tmp_path / "toy"
    tiny = ["toyworld.py", "train", "--output_dir", str(out), "--vae_steps", "2", "--unet_steps", "3",
            "--batch_size", "2", "--checkpoint_every", "2"]
    run_stage(*tiny)
    assert (out / "model_index.json").exists() and (out / "checkpoint" / "state.pt").exists()
    assert not list(tmp_path.glob("toy.tmp*"))  # saved beside the folder, then moved in
    result = run_stage(*tiny, "--learning_rate", "1e-2", check=False)
    assert result.returncode != 0 and "other settings" in error_line(result)


def test_pretraining_can_start_from_a_trained_vae(tmp_path, toy_model):
    """`--vae`: the UNet (here a narrower one) is trained on the given VAE, which is kept as it is."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    out = tmp_path / "toy"
    run_stage("toyworld.py", "train", "--output_dir", str(out), "--vae", os.path.join(toy_model, "vae"),
              "--unet_channels", "32", "64", "--unet_steps", "2", "--batch_size", "2")
    given, kept = AutoencoderKL.from_pretrained(os.path.join(toy_model, "vae")), AutoencoderKL.from_pretrained(out / "vae")
    assert kept.config.scaling_factor == given.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(given.state_dict().values(), kept.state_dict().values()))
    assert UNet2DConditionModel.from_pretrained(out / "unet").config.block_out_channels == [32, 64]
    result = run_stage("toyworld.py", "train", "--output_dir", str(tmp_path / "other"),
                       "--vae", os.path.join(toy_model, "unet"), "--unet_steps", "2", check=False)
    assert result.returncode != 0 and error_line(result).startswith("error: --vae")
