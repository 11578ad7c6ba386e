"""The four stages run as a user runs them, on the toy model with tiny settings."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common import LORA_FILE, read_lora, read_pairs
from conftest import TINY_GEN, TINY_TRAIN, load_stage, refusal, run_in_process, run_stage

CATEGORIES_BUT_TWO = ["Harassment", "Self-harm", "Sexual", "Shocking", "Illegal Activity"]  # the work fixture trains two
TINY_MERGE = ["--prompts_per_expert", "2", "--sampling_steps", "3", "--leave_out", *CATEGORIES_BUT_TWO]
TINY_EVAL = ["--concepts_per_category", "1", "--seeds_per_prompt", "1", "--sampling_steps", "5"]


@pytest.fixture(scope="module")
def evaluated(work, toy_model):
    """Stage 4 once for the module: the base model and the Violence expert."""
    out = work / "results"
    run_stage("04_evaluate.py", "--model", toy_model, "--lora", f"violence={work / 'Violence'}", *TINY_EVAL,
              "--output_dir", str(out))
    return out


def test_generate_writes_official_layout_and_resumes_identically(work, toy_model, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)  # the work fixture's pairs stay as they were for the other tests
    pairs = read_pairs(str(data / "pairs.csv"))
    assert len(pairs) == 7 * 4 and {c for p in pairs for c in p["categories"]} >= {"Violence", "Hate"}
    victim = data / "images" / pairs[5]["loser_image"]
    before_csv, before_image = (data / "pairs.csv").read_bytes(), np.asarray(Image.open(victim))
    victim.unlink()  # as if the run had been killed before this image was written
    result = run_stage("01_generate_data.py", "--model", toy_model, "--output_dir", str(data), *TINY_GEN)
    assert "1 rendered now" in result.stdout
    assert (data / "pairs.csv").read_bytes() == before_csv
    assert np.abs(np.asarray(Image.open(victim)).astype(int) - before_image).max() <= 1  # batch size may round


def test_generate_from_an_official_csv_renders_every_pair(toy_model, tmp_path):
    """CoProV2 may pair idx_N_0 and idx_N_1 under one N: each pair gets its own images and seed."""
    csv = tmp_path / "train.csv"
    csv.write_text("prompt,image,category\n"
                   "a red circle on a gray background,u_idx_3_0.jpg,Violence\n"
                   "a green circle on a gray background,s_idx_3_0.jpg,Violence\n"
                   "a red square on a navy background,u_idx_3_1.jpg,Violence\n"
                   "a green square on a navy background,s_idx_3_1.jpg,Violence\n")
    run_stage("01_generate_data.py", "--model", toy_model, "--csv", str(csv), "--output_dir", str(tmp_path / "gen"),
              "--sampling_steps", "4", "--filter", "none")
    pairs = read_pairs(str(tmp_path / "gen" / "pairs.csv"))
    assert [p["unsafe_prompt"] for p in pairs] == ["a red circle on a gray background", "a red square on a navy background"]
    images = {p[k] for p in pairs for k in ("loser_image", "winner_image")}
    assert len(images) == 4 and all((tmp_path / "gen" / "images" / i).exists() for i in images)
    result = refusal("01_generate_data.py", "--csv", str(csv), "--pairs_per_concept", "3")
    assert "--pairs_per_concept: the toy taxonomy's, not used with --csv" in result


def test_generate_refuses_to_resume_with_other_settings(work, toy_model, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)
    other = [a if a != "4" else "3" for a in TINY_GEN]  # 3 pairs per concept: indices map to other prompts
    result = refusal("01_generate_data.py", "--model", toy_model, "--output_dir", str(data), *other)
    assert "other settings" in result and "pairs_per_concept 4 -> 3" in result
    assert (data / "pairs.csv").read_bytes() == (work / "data" / "pairs.csv").read_bytes()


def test_training_starts_at_ln2_and_logs(work):
    log = json.load(open(work / "Violence" / "log.json"))["log"]
    # the LoRA starts as a no-op: policy == reference, so the DPO term is ln 2 and anchors have not drifted
    assert log[0]["dpo"] == pytest.approx(math.log(2), abs=1e-4)
    assert log[0]["anchor"] == pytest.approx(0.0, abs=1e-10)
    assert [s["step"] for s in log] == [1, 2, 3]
    note, layers = read_lora(str(work / "Violence"))
    assert note["category"] == "Violence" and all(a.shape[0] == 4 for a, _ in layers.values())


def test_the_curve_samples_from_step_0(work, toy_model, tmp_path):
    out = tmp_path / "sampled"
    run_stage("02_train_expert.py", "--model", toy_model, "--data", str(work / "data"), "--category", "Violence",
              "--output_dir", str(out), *TINY_TRAIN[:2], "--train_batch_size", "2", "--eval_every", "2")
    log = json.load(open(out / "log.json"))["log"]
    sampled = [s["step"] for s in log if "sampled_own_concept" in s]
    assert sampled == [0, 2] and log[0]["sampled_own_concept"] > 0.5  # the base model draws its unsafe prompts


def test_expert_loads_into_a_plain_pipeline_and_changes_it(work, toy_model):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(toy_model, safety_checker=None, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a red circle on a black background"

    def image():
        return pipe(prompt, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    base = image()
    pipe.load_lora_weights(str(work / "Violence"))
    assert np.abs(image() - base).max() > 1e-3


def test_merged_lora_loads_with_plain_load_lora_weights(work, toy_model):
    out = work / "merged"
    # Co-Merge takes its prompts from the pairs each expert was trained on (its note says which)
    run_stage("03_merge.py", str(work / "Violence"), str(work / "Hate"), *TINY_MERGE, "--output_dir", str(out))
    note, layers = read_lora(str(out))
    assert note["method"] == "comerge" and all(a.shape[0] == 8 for a, _ in layers.values())
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(toy_model, safety_checker=None, dtype=torch.float32)
    pipe.load_lora_weights(str(out))


def test_distillation_pulls_the_merge_toward_the_experts_and_the_reference(work, toy_model, monkeypatch, tmp_path):
    """Started three times too far (the experts' summed deltas x 3), 16 steps bring the merge closer to
    the experts on their prompts and to the base model on anchors."""
    from common import encode_training_data, load_pipeline, read_anchors
    from conftest import load_stage
    merge = load_stage("03_merge.py")
    monkeypatch.setitem(merge.DISTILL, "learning_rate", 1e-2)
    monkeypatch.setitem(merge.DISTILL, "batch_size", 4)
    factors = [read_lora(str(work / c))[1] for c in ("Violence", "Hate")]
    summed = {name: 3 * sum(b @ a for a, b in (f[name] for f in factors)) for name in factors[0]}
    layers, _ = merge.factorize(summed, 8)
    pairs = read_pairs(str(work / "data" / "pairs.csv"))
    own = [[p for p in pairs if c in p["categories"]] for c in ("Violence", "Hate")]
    pipe = load_pipeline(toy_model, "cpu")
    data = encode_training_data(pipe, own[0] + own[1], sorted(set(read_anchors(str(work / "data")))),
                                str(work / "data" / "images"))
    members = torch.arange(len(own[0]) + len(own[1])).split([len(own[0]), len(own[1])])
    _, distilled = merge.distill(pipe, layers, 8, factors, members, data, 16, 0, str(tmp_path))
    assert distilled["steps"] == 16
    assert distilled["expert_error_after"] < 0.5 * distilled["expert_error_before"]
    assert distilled["anchor_drift_after"] < 0.5 * distilled["anchor_drift_before"]


def test_distillation_resumes_as_one_run_and_refuses_other_settings(work):
    """Killed after 2 of 4 steps (a run of 2), rerun with 4: the same merge as 4 steps in one go.
    A rerun with another setting is refused and leaves the merge written before as it was."""
    merge = [str(work / "Violence"), str(work / "Hate"), *TINY_MERGE]
    once, twice = work / "distilled-once", work / "distilled-twice"
    run_stage("03_merge.py", *merge, "--distill_steps", "4", "--output_dir", str(once))
    run_stage("03_merge.py", *merge, "--distill_steps", "2", "--output_dir", str(twice))
    result = run_stage("03_merge.py", *merge, "--distill_steps", "4", "--output_dir", str(twice))
    assert "resuming at step 2 of 4" in result.stdout
    (_, expected), (_, resumed) = read_lora(str(once)), read_lora(str(twice))
    assert all(torch.allclose(a, ra, atol=1e-6) and torch.allclose(b, rb, atol=1e-6)
               for (a, b), (ra, rb) in zip(expected.values(), resumed.values()))
    written = (twice / LORA_FILE).read_bytes()
    result = refusal("03_merge.py", *merge, "--distill_steps", "4", "--seed", "1", "--output_dir", str(twice))
    assert "seed 0 -> 1" in result
    assert (twice / LORA_FILE).read_bytes() == written


def test_a_merge_never_writes_into_an_expert(work, tmp_path):
    expert = tmp_path / "Violence"
    shutil.copytree(work / "Violence", expert)
    before = {p.name: p.read_bytes() for p in expert.iterdir() if p.is_file()}
    result = refusal("03_merge.py", str(expert), str(work / "Hate"), *TINY_MERGE, "--output_dir", str(expert))
    assert "would write into the input" in result
    assert {p.name: p.read_bytes() for p in expert.iterdir() if p.is_file()} == before


def test_evaluate_writes_results_report_and_grid(evaluated):
    out = evaluated
    results = json.load(open(out / "results.json"))["results"]
    assert set(results) == {"base", "violence"}
    for r in results.values():
        assert 0 <= r["own_concept"] <= r["ip"] <= 1 and 0 <= r["fidelity"] <= 1
        assert 0 <= r["redirect"] <= 1 - r["ip"]  # a redirected image shows a safe colour
        assert len(r["per_category"]) == 7 and set(r["per_category"]["Violence"]) == {"ip", "own_concept", "redirect"}
    assert "| violence |" in (out / "report.md").read_text()
    assert Image.open(out / "grid.png").size[1] > 0


def test_evaluate_renders_only_what_is_missing(work, toy_model, evaluated, tmp_path):
    out, lora = tmp_path / "results", tmp_path / "moved"
    shutil.copytree(evaluated, out)
    shutil.copytree(work / "Violence", lora)  # a LoRA is known by its contents, not its folder
    images = sorted((out / "images").rglob("*.png"))
    victim = images[3]
    victim.unlink()  # as if killed before this image was written
    stamps = {p: p.stat().st_mtime_ns for p in images if p != victim}
    command = ["04_evaluate.py", "--model", toy_model, "--lora", f"violence={lora}", "--output_dir", str(out)]
    run_stage(*command, *TINY_EVAL)
    assert victim.exists() and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert json.loads((out / "results.json").read_text())["results"] == \
        json.loads((evaluated / "results.json").read_text())["results"]
    other = refusal(*command, *TINY_EVAL[:-1], "4")  # 4 sampling steps instead of 5: not these images
    assert "sampling_steps 5 -> 4" in other
    shutil.copy(work / "Hate" / LORA_FILE, lora / LORA_FILE)  # as if retrained in place
    retrained = refusal(*command, *TINY_EVAL)
    assert "changed" in retrained
    more = tmp_path / "more"  # a rerun with one more --lora renders that one only
    shutil.copytree(evaluated, more)
    stamps = {p: p.stat().st_mtime_ns for p in (more / "images").rglob("*.png")}
    run_stage("04_evaluate.py", "--model", toy_model, "--lora", f"violence={work / 'Violence'}", f"hate={work / 'Hate'}",
              "--output_dir", str(more), *TINY_EVAL)
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()) and len(list((more / "images" / "hate").iterdir()))
    assert set(json.loads((more / "results.json").read_text())["results"]) == {"base", "violence", "hate"}


def test_a_non_finite_loss_skips_the_step(work, toy_model):
    expert = work / "exploding"
    # One step at an absurd learning rate leaves finite but huge weights; the next steps' losses are not finite.
    run_stage("02_train_expert.py", "--model", toy_model, "--data", str(work / "data"), "--category", "Violence",
              "--output_dir", str(expert), "--train_batch_size", "4", "--learning_rate", "1e30", "--max_train_steps", "3")
    log = json.load(open(expert / "log.json"))["log"]
    assert [s.get("skipped", 0) for s in log] == [0, 1, 1]
    _, layers = read_lora(str(expert))  # the weights of the last finite step
    assert all(torch.isfinite(b).all() for _, b in layers.values())


def test_training_resumes_only_with_the_same_settings(work, toy_model, tmp_path):
    expert = tmp_path / "Violence"
    shutil.copytree(work / "Violence", expert)  # a finished 3-step run
    train = ["02_train_expert.py", "--model", toy_model, "--data", str(work / "data"), "--category", "Violence",
             "--output_dir", str(expert), *TINY_TRAIN[2:]]
    result = refusal(*train, "--max_train_steps", "4", "--beta", "1000")
    assert "beta 500 -> 1000.0" in result
    result = refusal(*train, "--max_train_steps", "4", "--seed", "1")  # another run's seed
    assert "seed 0 -> 1" in result
    result = refusal(*train, "--max_train_steps", "2")
    assert "at step 3, past the 2 steps asked for" in result
    assert (expert / LORA_FILE).read_bytes() == (work / "Violence" / LORA_FILE).read_bytes()
    run_stage(*train, "--max_train_steps", "4")  # the same run, one step longer
    log = json.loads((expert / "log.json").read_text())["log"]
    assert [s["step"] for s in log] == [1, 2, 3, 4]
    data = tmp_path / "data"  # the same settings on regenerated pairs (one prompt changed): refused too
    shutil.copytree(work / "data", data)
    (data / "pairs.csv").write_text((data / "pairs.csv").read_text().replace("a red", "a  red", 1))
    train[train.index(str(work / "data"))] = str(data)
    result = refusal(*train, "--max_train_steps", "5")
    assert "pairs changed" in result


def test_killed_training_resumes_to_the_same_tensors(work, toy_model, tmp_path):
    """SIGKILL part-way (after the step-50 checkpoint), rerun: the tensors of an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from conftest import ROOT
    train = ["02_train_expert.py", "--model", toy_model, "--data", str(work / "data"), "--category", "Hate",
             "--train_batch_size", "2", "--max_train_steps", "60"]
    run_stage(*train, "--output_dir", str(tmp_path / "once"))
    killed = subprocess.Popen([sys.executable, *train, "--output_dir", str(tmp_path / "twice")], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (tmp_path / "twice" / "checkpoint.pt").exists() and killed.poll() is None:
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    run_stage(*train, "--output_dir", str(tmp_path / "twice"))
    from safetensors.torch import load_file
    once, twice = (load_file(str(tmp_path / d / LORA_FILE)) for d in ("once", "twice"))
    assert all(torch.equal(once[k], twice[k]) for k in once)


def test_the_schedule_counts_only_steps_that_updated(work, toy_model, monkeypatch):
    """A step skipped for a non-finite loss leaves the warm-up where it was (accelerate's scheduler does the same)."""
    from common import load_pipeline
    train = load_stage("02_train_expert.py")
    expert_loss, calls, rates = train.expert_loss, [], []
    def nan_first(*args):
        loss, terms, logits = expert_loss(*args)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 1 else loss), terms, logits
    monkeypatch.setattr(train, "expert_loss", nan_first)
    monkeypatch.setattr(train, "learning_rate_at", lambda recipe, updates: rates.append(updates) or 1e-3)
    recipe = {**train.PRESETS["toy"], "max_train_steps": 3, "train_batch_size": 2, "anchor_weight": 0}
    pairs = read_pairs(str(work / "data" / "pairs.csv"))[:2]
    (work / "schedule").mkdir()
    log = train.train(recipe, 0, load_pipeline(toy_model, "cpu"), pairs, [], str(work / "data" / "images"),
                      str(work / "schedule"))
    assert [s.get("skipped", 0) for s in log] == [1, 0, 0] and rates[1:] == [0, 0, 1]  # rates[0]: the optimizer's start


@pytest.mark.parametrize("args, message", [
    (["02_train_expert.py", "--model", "no/such-model", "--category", "Hate", "--data", "{data}", "--output_dir",
      "{work}/nomodel"], "no/such-model"),
    (["02_train_expert.py", "--category", "Gore", "--data", "{data}"], "unknown category 'Gore'"),
    (["02_train_expert.py", "--category", "Hate", "--data", "{work}/empty"], "pairs.csv"),
    (["04_evaluate.py", "--lora", "x={work}/missing"], "missing"),
    (["04_evaluate.py", "--lora", "x={data}"], "pytorch_lora_weights.safetensors"),
    (["04_evaluate.py", "--lora", "v={work}/Violence", "--concepts_per_category", "2"], "toy taxonomies of [1]"),
    (["04_evaluate.py", "--lora", "base={work}/Violence"], "'base' is the base model's"),
    (["04_evaluate.py", "--lora", "v={work}/Violence", "v={work}/Hate"], "a name of its own"),
    (["04_evaluate.py", "--lora", "../x={work}/Violence", "--output_dir", "{work}/r"], "cannot name a file or folder"),
    (["04_evaluate.py", "--model", "{data}", "--lora", "v={work}/Violence"], "was trained on"),
    (["04_evaluate.py", "--clip_model", "x"], "--clip_model: used by --judge paper only"),
    (["01_generate_data.py", "--anchor_prompts", "{work}/missing.txt", "--output_dir", "{work}/gen"], "missing.txt"),
    (["01_generate_data.py", "--output_dir", "{work}/gen", "--sampling_steps", "5000", "--concepts_per_category", "1",
      "--pairs_per_concept", "1"], "error: "),
])
def test_bad_input_ends_with_one_clear_line(work, args, message):
    line = refusal(*[a.format(data=work / "data", work=work) for a in args])
    assert message in line and (line.startswith("error:") or ": error: " in line)  # argparse: "prog: error: ..."


def test_each_category_trains_every_expert_in_one_process(work, toy_model, tmp_path):
    """--category each: one expert per category of the CSV, each the same as a one-category run."""
    run_stage("02_train_expert.py", "--model", toy_model, "--data", str(work / "data"), "--category", "each",
              "--output_dir", str(tmp_path / "experts"), *TINY_TRAIN)
    folders = sorted(p.name for p in (tmp_path / "experts").iterdir() if p.is_dir())
    assert folders == ["harassment", "hate", "illegal-activity", "self-harm", "sexual", "shocking", "violence"]
    (_, alone), (_, together) = read_lora(str(work / "Violence")), read_lora(str(tmp_path / "experts" / "violence"))
    assert all(torch.allclose(alone[k][i], together[k][i], atol=1e-6) for k in alone for i in (0, 1))
    assert (tmp_path / "experts" / "violence" / "curve.png").stat().st_size > 0
    merged = refusal("03_merge.py", *[str(tmp_path / "experts" / f) for f in folders if f != "sexual"],
                     "--output_dir", str(tmp_path / "merged"))  # one category forgotten: refused
    assert "categories without an expert: Sexual" in merged
