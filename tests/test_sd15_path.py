"""The SD 1.5 path of the stages on models/toy (a pipeline of SD 1.5's classes): the paper's protocol in
stage 4, images judged from disk, NaN images, anchors from a caption file."""
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import realworld
from common import batch_size_for, generate, load_pipeline
from conftest import TOY_MODEL, load_stage
from test_realworld import ColourStatistics, tiny_clip  # noqa: F401 (a fixture)


@pytest.fixture(scope="module")
def evaluate():
    return load_stage("04_evaluate.py")


def write_prompt_files(tmp_path):
    unsafe = tmp_path / "i2p.csv"
    unsafe.write_text("prompt,categories,sd_seed,sd_guidance_scale\nred circle,violence,11,7\nblue square,hate,12,9\n")
    safe = tmp_path / "safe.txt"
    safe.write_text("green circle\nyellow square\n")
    return str(unsafe), str(safe)


def test_the_paper_judge_is_the_release_protocol(evaluate, tmp_path):
    unsafe, safe = write_prompt_files(tmp_path)
    toy = evaluate.parse_args([])
    assert (toy.scheduler, toy.sampling_steps, toy.seeds_per_prompt) == ("ddim", 20, 2)
    paper = ["--judge", "paper", "--prompts", unsafe, "--safe_prompts", safe]
    release = evaluate.parse_args(paper)
    assert (release.scheduler, release.sampling_steps, release.seeds_per_prompt) == ("pndm", 50, 1)
    assert release.clipscore_model == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
    assert release.clip_model == "openai/clip-vit-large-patch14"  # Q16 keeps the CLIP its prompts were tuned for
    assert evaluate.parse_args([*paper, "--sampling_steps", "30"]).sampling_steps == 30  # explicit options win
    items = evaluate.test_prompts(release)[0]
    assert [i["seed"] for i in items] == [11, 12]  # I2P's own seeds, one image each (at guidance 7.5: GUIDANCE)
    from diffusers import DDIMScheduler, PNDMScheduler
    assert isinstance(load_pipeline(TOY_MODEL, "cpu").scheduler, DDIMScheduler)
    assert isinstance(load_pipeline(TOY_MODEL, "cpu", scheduler="pndm").scheduler, PNDMScheduler)


def run_evaluate(evaluate, argv, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["04_evaluate.py", *argv])
    evaluate.main()
    return capsys.readouterr().out


def fake_ip_judge(calls):
    def load_ip_judge(clip_model, q16_prompts, **kwargs):
        calls.append(clip_model)
        return lambda images: [False] * len(images)  # calls everything clean
    return load_ip_judge


def test_the_papers_table_from_images_on_disk(evaluate, tiny_clip, tmp_path, monkeypatch, capsys):  # noqa: F811
    unsafe, safe = write_prompt_files(tmp_path)
    coprov2 = tmp_path / "CoProv2_test.csv"  # a second prompt set: the release's test CSV layout
    coprov2.write_text("prompt,image,category\npink cross,0000000_0.jpg,Sexual\n")
    reference = tmp_path / "coco"
    reference.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(reference / f"{i}.jpg")
    monkeypatch.setattr(realworld, "FID_FEATURES", ColourStatistics())  # FID's Inception is downloaded: a stand-in
    calls, seen = [], []
    monkeypatch.setattr(realworld, "load_ip_judge", fake_ip_judge(calls))
    scores = realworld.clip_scores
    monkeypatch.setattr(realworld, "clip_scores", lambda ims, ps, model, *a: seen.append((len(ims), model))
                        or scores(ims, ps, model, *a))
    monkeypatch.setattr(evaluate, "JUDGE_CHUNK", 3)  # 6 unsafe images: chunks of 3 and 3; 4 safe: 3 and 1
    out = tmp_path / "out"
    run_evaluate(evaluate, ["--model", TOY_MODEL, "--judge", "paper", "--prompts", unsafe, str(coprov2), "--safe_prompts", safe,
                            "--reference_images", str(reference), "--clip_model", "q16-clip", "--clipscore_model", tiny_clip,
                            "--seeds_per_prompt", "2", "--sampling_steps", "4", "--output_dir", str(out)], monkeypatch, capsys)
    assert calls == ["q16-clip"] and seen == [(3, tiny_clip), (3, tiny_clip), (3, tiny_clip), (1, tiny_clip)]
    names = sorted(os.listdir(out / "images" / "base"))
    assert names == [f"{kind}_{i:06d}.png" for kind, n in (("safe", 4), ("unsafe", 6)) for i in range(n)]
    read = lambda kind, idx: [np.asarray(Image.open(out / "images" / "base" / f"{kind}_{i:06d}.png")) for i in idx]
    base = json.loads((out / "results.json").read_text())["results"]["base"]
    assert base["clip_score_safe"] == pytest.approx(np.mean(scores(read("safe", range(4)), ["green circle"] * 2
                                                                   + ["yellow square"] * 2, tiny_clip)), abs=1e-4)
    assert base["per_set"]["CoProv2_test"]["clip_score"] == pytest.approx(  # the release's: the test prompts
        np.mean(scores(read("unsafe", [4, 5]), ["pink cross"] * 2, tiny_clip)), abs=1e-4)
    assert base["per_set"]["i2p"]["per_category"] == {"hate": {"ip": 0.0}, "violence": {"ip": 0.0}}
    safe_files = [str(out / "images" / "base" / f"safe_{i:06d}.png") for i in range(4)]
    assert base["fid"] == pytest.approx(realworld.load_fid(str(reference))(safe_files), rel=1e-6)
    report = (out / "report.md").read_text()
    assert "| variant | IP i2p | CLIPScore i2p | IP CoProv2_test | CLIPScore CoProv2_test | CLIPScore safe prompts | FID |" in report
    assert "| variant | CoProv2_test: IP Sexual |" in report  # IP per category, a table a prompt set


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """models/toy with a NaN in the VAE decoder's last layer: every image comes out NaN."""
    pipe = load_pipeline(TOY_MODEL, "cpu")
    with torch.no_grad():
        pipe.vae.decoder.conv_out.bias[0] = float("nan")
    path = tmp_path_factory.mktemp("nan_model")
    pipe.save_pretrained(path)
    return str(path)


def test_nan_images_are_counted_and_never_clean(evaluate, nan_model, tmp_path, monkeypatch, capsys):
    images, nan = generate(load_pipeline(nan_model, "cpu"), ["red circle"] * 2, [0, 1], sampling_steps=2)
    assert nan == [True, True] and len(images) == 2 and images[0].dtype == np.uint8
    assert generate(load_pipeline(TOY_MODEL, "cpu"), ["red circle"], [0], sampling_steps=2)[1] == [False]
    unsafe, safe = write_prompt_files(tmp_path)
    monkeypatch.setattr(realworld, "load_ip_judge", fake_ip_judge([]))
    brightness = lambda ims, *a: [float(np.asarray(im).mean()) for im in ims]  # a stand-in for CLIPScore
    monkeypatch.setattr(realworld, "clip_scores", brightness)
    out = run_evaluate(evaluate, ["--model", nan_model, "--judge", "paper", "--prompts", unsafe, "--safe_prompts", safe,
                                  "--sampling_steps", "4", "--output_dir", str(tmp_path / "out")], monkeypatch, capsys)
    base = json.loads((tmp_path / "out" / "results.json").read_text())["results"]["base"]
    assert base["nan_images"] == 4 and base["per_set"]["i2p"]["ip"] == 1.0
    saved = [Image.open(f) for f in sorted((tmp_path / "out" / "images" / "base").glob("safe_*.nan.png"))]
    assert len(saved) == 2 and base["clip_score_safe"] == pytest.approx(np.mean(brightness(saved)))  # scored as saved
    assert "4 NaN images" in out and len(list((tmp_path / "out" / "images" / "base").glob("*.nan.png"))) == 4


def test_batch_size_by_image_size():
    assert batch_size_for(load_pipeline(TOY_MODEL, "cpu")) == 64  # the toy
    sd15 = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(sample_size=64)), vae_scale_factor=8)
    assert batch_size_for(sd15) == 16


def test_max_anchors_caps_anchor_prompts(tmp_path):
    generate_data = load_stage("01_generate_data.py")
    path = tmp_path / "captions.txt"
    path.write_text("".join(f"caption {i}\n" for i in range(50)))
    read = lambda n, seed=0: generate_data.anchor_prompt_list(str(path), n, None, seed)
    ten = read(10)
    assert len(ten) == 10 and ten == read(10) and ten != read(10, seed=1)  # seeded
    assert ten == sorted(ten, key=lambda c: int(c.split()[1]))  # in file order
    assert len(read(2000)) == 50  # the default keeps a short file whole
