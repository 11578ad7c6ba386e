"""The four stages run as a user runs them, on the toy model with tiny settings."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from common import LORA_FILE, read_lora, read_pairs
from conftest import error_line, run_stage, run_torchrun

TINY_GEN = ["--concepts_per_category", "1", "--pairs_per_concept", "4", "--steps", "8", "--filter", "none"]
TINY_TRAIN = ["--max_train_steps", "3", "--train_batch_size", "4", "--learning_rate", "1e-2", "--checkpoint_every", "1"]
CATEGORIES_BUT_TWO = ["Harassment", "Self-harm", "Sexual", "Shocking", "Illegal Activity"]  # the work fixture trains two
TINY_EVAL = ["--concepts_per_category", "1", "--seeds_per_prompt", "1", "--steps", "5"]
# Two processes need two GPUs where there is one; on a CPU they share it (gloo).
two_processes = pytest.mark.skipif(torch.cuda.device_count() == 1, reason="torchrun tests need 0 or >= 2 GPUs")


@pytest.fixture(scope="module")
def work(tmp_path_factory, toy_model):
    """Stages 1 and 2 once for the module: pairs and two experts."""
    root = tmp_path_factory.mktemp("stages")
    data = str(root / "data")
    run_stage("01_generate_data.py", "--model", toy_model, "--output_dir", data, *TINY_GEN)
    for category in ("Violence", "Hate"):
        run_stage("02_train_expert.py", "--model", toy_model, "--data", data, "--category", category,
                  "--output_dir", str(root / category), *TINY_TRAIN)
    return root


@pytest.fixture(scope="module")
def evaluated(work, toy_model):
    """Stage 4 once for the module: the base model and the Violence expert."""
    out = work / "results"
    run_stage("04_evaluate.py", "--model", toy_model, "--lora", f"violence={work / 'Violence'}", *TINY_EVAL,
              "--output_dir", str(out))
    return out


def test_generate_writes_official_layout_and_resumes_identically(work, toy_model):
    data = work / "data"
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
              "--steps", "4", "--filter", "none")
    pairs = read_pairs(str(tmp_path / "gen" / "pairs.csv"))
    assert [p["unsafe_prompt"] for p in pairs] == ["a red circle on a gray background", "a red square on a navy background"]
    images = {p[k] for p in pairs for k in ("loser_image", "winner_image")}
    assert len(images) == 4 and all((tmp_path / "gen" / "images" / i).exists() for i in images)
    result = run_stage("01_generate_data.py", "--csv", str(csv), "--llm", "gpt2", check=False)  # one source only
    assert result.returncode != 0 and "argument --llm: not allowed with argument --csv" in error_line(result)


def test_generate_refuses_to_resume_with_other_settings(work, toy_model, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)
    other = [a if a != "4" else "3" for a in TINY_GEN]  # 3 pairs per concept: indices map to other prompts
    result = run_stage("01_generate_data.py", "--model", toy_model, "--output_dir", str(data), *other, check=False)
    assert result.returncode != 0 and "other settings" in error_line(result)
    assert (data / "pairs.csv").read_bytes() == (work / "data" / "pairs.csv").read_bytes()


def test_training_starts_at_ln2_and_logs(work):
    log = json.load(open(work / "Violence" / "log.json"))["log"]
    # the LoRA starts as a no-op: policy == reference, so the DPO term is ln 2 and anchors have not drifted
    assert log[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert log[0]["anchor_drift"] == pytest.approx(0.0, abs=1e-10)
    assert [s["step"] for s in log] == [1, 2, 3]
    info = json.load(open(work / "Violence" / "lora.json"))
    assert (info["rank"], info["category"]) == (4, "Violence")


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


def test_cross_attention_experiment_trains_an_expert_on_attn2_only(work, toy_model, tmp_path):
    """docs/cross_attention_lora.py (an experiment beside the stages): stage 2, its LoRA on attn2 only."""
    out = tmp_path / "xattn"
    run_stage("docs/cross_attention_lora.py", "--model", toy_model, "--data", str(work / "data"), "--category",
              "Violence", "--output_dir", str(out), *TINY_TRAIN)
    info, layers = read_lora(str(out))
    assert info["targets"] == ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    assert all(".attn2." in k for k in layers)
    assert any(".attn1." in k for k in read_lora(str(work / "Violence"))[1])  # the stage alone: every attention layer


@pytest.mark.parametrize("method", ["comerge", "ties"])
def test_merged_lora_loads_with_plain_load_lora_weights(work, toy_model, method):
    out = work / f"merged-{method}"
    # no --data: Co-Merge takes its prompts from the pairs each expert was trained on (lora.json)
    run_stage("03_merge.py", str(work / "Violence"), str(work / "Hate"), "--method", method,
              "--prompts_per_expert", "2", "--steps", "3", "--leave_out", *CATEGORIES_BUT_TWO, "--output_dir", str(out))
    info, layers = read_lora(str(out))
    assert info["rank"] == 8 and all(a.shape[0] == 8 for a, _ in layers.values())
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(toy_model, safety_checker=None, dtype=torch.float32)
    pipe.load_lora_weights(str(out))


def test_distillation_pulls_the_merge_toward_the_experts_and_the_reference(work, toy_model):
    out = work / "merged-distilled"
    result = run_stage("03_merge.py", str(work / "Violence"), str(work / "Hate"), "--method", "cat", "--scale", "3",
                       "--distill_steps", "16", "--distill_batch_size", "4", "--distill_learning_rate", "1e-2",
                       "--leave_out", *CATEGORIES_BUT_TWO, "--output_dir", str(out))
    info, layers = read_lora(str(out))
    distilled = info["distill"]
    assert distilled["steps"] == 16 and "error to the experts" in result.stdout
    assert distilled["expert_error_after"] < 0.5 * distilled["expert_error_before"]
    assert distilled["anchor_drift_after"] < 0.5 * distilled["anchor_drift_before"]
    assert info["rank"] == 8 and all(a.shape[0] == 8 for a, _ in layers.values())


def test_distillation_resumes_as_one_run_and_refuses_other_settings(work):
    """Killed after 4 of 8 steps (a run of 4), rerun with 8: the same merge as 8 steps in one go.
    A rerun with another setting is refused and leaves the merge written before as it was."""
    merge = [str(work / "Violence"), str(work / "Hate"), "--method", "linear", "--distill_batch_size", "4",
             "--distill_learning_rate", "1e-2", "--leave_out", *CATEGORIES_BUT_TWO]
    once, twice = work / "distilled-once", work / "distilled-twice"
    run_stage("03_merge.py", *merge, "--distill_steps", "8", "--output_dir", str(once))
    run_stage("03_merge.py", *merge, "--distill_steps", "4", "--output_dir", str(twice))
    result = run_stage("03_merge.py", *merge, "--distill_steps", "8", "--output_dir", str(twice))
    assert "resuming at step 4 of 8" in result.stdout
    (_, expected), (_, resumed) = read_lora(str(once)), read_lora(str(twice))
    assert all(torch.allclose(a, ra, atol=1e-6) and torch.allclose(b, rb, atol=1e-6)
               for (a, b), (ra, rb) in zip(expected.values(), resumed.values()))
    written = (twice / LORA_FILE).read_bytes()
    result = run_stage("03_merge.py", *merge, "--distill_steps", "8", "--distill_anchor_weight", "10",
                       "--output_dir", str(twice), check=False)
    assert result.returncode != 0 and "distill_anchor_weight" in error_line(result)
    assert (twice / LORA_FILE).read_bytes() == written


def test_merge_refuses_experts_of_different_ranks(work):
    other = work / "other-rank"
    shutil.copytree(work / "Hate", other, dirs_exist_ok=True)
    info = json.load(open(other / "lora.json"))
    json.dump({**info, "rank": 8}, open(other / "lora.json", "w"))
    result = run_stage("03_merge.py", str(work / "Violence"), str(other), "--method", "linear",
                       "--output_dir", str(work / "nope"), check=False)
    assert result.returncode != 0 and "rank" in error_line(result)
    assert not (work / "nope" / "pytorch_lora_weights.safetensors").exists()


def test_distillation_refuses_a_merge_rank_below_the_experts(work):
    result = run_stage("03_merge.py", str(work / "Violence"), str(work / "Hate"), "--method", "linear", "--rank", "2",
                       "--distill_steps", "3", "--leave_out", *CATEGORIES_BUT_TWO, "--output_dir", str(work / "nope-rank"),
                       check=False)
    assert result.returncode != 0 and "--rank" in error_line(result)
    assert not (work / "nope-rank").exists()


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


@two_processes
def test_ddp_training_under_torchrun_matches_one_process(work, toy_model):
    """Two ranks each train on half of the same global batch; DDP averages their gradients."""
    out = work / "ddp"
    run_torchrun(2, "02_train_expert.py", "--model", toy_model, "--data", str(work / "data"), "--category", "Violence",
                 "--output_dir", str(out), *TINY_TRAIN)
    from safetensors.torch import load_file
    one, two = (load_file(str(d / "pytorch_lora_weights.safetensors")) for d in (work / "Violence", out))
    assert one.keys() == two.keys()
    # float rounding differs ~1e-5; ranks that trained on their halves alone would differ by ~5e-2
    assert all(torch.allclose(one[k], two[k], atol=1e-4) for k in one)
    logs = [json.loads((d / "log.json").read_text())["log"] for d in (work / "Violence", out)]
    assert [s["loss"] for s in logs[1]] == pytest.approx([s["loss"] for s in logs[0]], rel=1e-4)  # averaged over ranks


@two_processes
def test_evaluate_under_torchrun_matches_one_process(work, toy_model, evaluated):
    out = work / "results-ddp"
    run_torchrun(2, "04_evaluate.py", "--model", toy_model, "--lora", f"violence={work / 'Violence'}", *TINY_EVAL,
                 "--output_dir", str(out))
    one, two = (json.loads((d / "results.json").read_text()) for d in (evaluated, out))
    assert two["results"] == one["results"] and two["unsafe_images"] == one["unsafe_images"]
    grids = [np.asarray(Image.open(d / "grid.png")).astype(int) for d in (evaluated, out)]
    assert np.abs(grids[0] - grids[1]).max() <= 1  # same seeds; only the batches differ


def test_evaluate_reuses_finished_variants(work, toy_model, evaluated, tmp_path):
    out, lora = tmp_path / "results", tmp_path / "moved"
    shutil.copytree(evaluated, out)
    shutil.copytree(work / "Violence", lora)  # variants are known by their LoRA's contents, not its folder
    command = ["04_evaluate.py", "--model", toy_model, "--lora", f"violence={lora}", "--output_dir", str(out)]
    again = run_stage(*command, *TINY_EVAL)
    assert again.stdout.count("(from an earlier run)") == 2
    assert json.loads((out / "results.json").read_text())["results"] == \
        json.loads((evaluated / "results.json").read_text())["results"]
    other = run_stage(*command, *TINY_EVAL[:-1], "4")  # 4 sampling steps instead of 5: rendered anew
    assert "(from an earlier run)" not in other.stdout
    shutil.copy(work / "Hate" / LORA_FILE, lora / LORA_FILE)  # as if retrained in place
    retrained = run_stage(*command, *TINY_EVAL[:-1], "4")  # the base model from the run above, the LoRA anew
    assert retrained.stdout.count("(from an earlier run)") == 1 and "violence: IP" in retrained.stdout
    assert "(from an earlier run)" not in retrained.stdout.split("violence: ")[1].splitlines()[0]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(work, toy_model):
    expert = work / "exploding"
    # One step at an absurd learning rate leaves finite but huge weights; the next step's loss is NaN.
    train = ["02_train_expert.py", "--model", toy_model, "--data", str(work / "data"), "--category", "Violence",
             "--output_dir", str(expert), *TINY_TRAIN[2:], "--learning_rate", "1e30"]
    run_stage(*train, "--max_train_steps", "1")
    state = (expert / "checkpoint" / "state.safetensors").read_bytes()
    lora = (expert / "pytorch_lora_weights.safetensors").read_bytes()
    result = run_stage(*train, "--max_train_steps", "5", check=False)
    assert result.returncode != 0 and "loss is nan at step 1; the last good checkpoint is kept" in error_line(result)
    assert (expert / "checkpoint" / "state.safetensors").read_bytes() == state
    assert (expert / "pytorch_lora_weights.safetensors").read_bytes() == lora


def test_training_resumes_only_with_the_same_settings(work, toy_model, tmp_path):
    expert = tmp_path / "Violence"
    shutil.copytree(work / "Violence", expert)  # a finished 3-step run
    train = ["02_train_expert.py", "--model", toy_model, "--data", str(work / "data"), "--category", "Violence",
             "--output_dir", str(expert), *TINY_TRAIN[2:]]
    result = run_stage(*train, "--max_train_steps", "4", "--beta", "1000", check=False)
    assert result.returncode != 0 and "other settings (beta 500 -> 1000.0)" in error_line(result)
    run_stage(*train, "--max_train_steps", "4")  # the same run, one step longer
    log = json.loads((expert / "log.json").read_text())["log"]
    assert [s["step"] for s in log] == [1, 2, 3, 4]
    # the same settings on regenerated pairs (one prompt changed): refused too
    data = tmp_path / "data"
    shutil.copytree(work / "data", data)
    text = (data / "pairs.csv").read_text()
    (data / "pairs.csv").write_text(text.replace("a red", "a  red", 1))
    train[train.index(str(work / "data"))] = str(data)
    result = run_stage(*train, "--max_train_steps", "5", check=False)
    assert result.returncode != 0 and "pairs_sha256" in error_line(result)


@pytest.mark.parametrize("args, message", [
    (["02_train_expert.py", "--model", "no/such-model", "--category", "Hate", "--data", "{data}"], "cannot load model"),
    (["02_train_expert.py", "--category", "Gore", "--data", "{data}"], "unknown category 'Gore'"),
    (["02_train_expert.py", "--category", "Hate", "--data", "{work}/empty"], "no pair file"),
    (["04_evaluate.py", "--lora", "x={work}/missing"], "--lora wants NAME=DIR"),
    (["04_evaluate.py", "--lora", "x={data}"], "holds no pytorch_lora_weights.safetensors"),
    (["04_evaluate.py", "--lora", "v={work}/Violence", "--concepts_per_category", "2"], "toy taxonomies of [1]"),
    (["04_evaluate.py", "--lora", "base={work}/Violence"], "the name 'base' is taken by the base model"),
    (["04_evaluate.py", "--lora", "v={work}/Violence", "v={work}/Hate"], "the name 'v' is taken"),
    (["04_evaluate.py", "--model", "{data}", "--lora", "v={work}/Violence"], "was trained on"),
    (["01_generate_data.py", "--anchor_prompts", "{work}/missing.txt", "--output_dir", "{work}/gen"], "--anchor_prompts"),
])
def test_bad_input_ends_with_one_clear_line(work, args, message):
    args = [a.format(data=work / "data", work=work) for a in args]
    result = run_stage(*args, check=False)
    assert result.returncode != 0 and message in error_line(result) and error_line(result).startswith("error:")


def test_inputs_that_contradict_earlier_outputs_are_refused(work, toy_model, tmp_path):
    """Saved LLM prompts of other settings, a checkpoint past --max_train_steps, experts of two toy
    taxonomies: each ends with one line, and what was written stays."""
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"Violence": ["a weapon"]}))
    gen = tmp_path / "gen"
    gen.mkdir()
    saved = json.dumps({"settings": {"llm": "other-llm", "concepts": [], "pairs_per_concept": 1, "seed": 0},
                        "pairs": [["Violence", "a gun", "a toy"]]})
    (gen / "llm_prompts.json").write_text(saved)
    result = run_stage("01_generate_data.py", "--model", toy_model, "--llm", "my-llm", "--concepts", str(concepts),
                       "--output_dir", str(gen), check=False)
    assert result.returncode != 0 and "written with other --llm" in error_line(result)
    assert (gen / "llm_prompts.json").read_text() == saved
    concepts.write_text(json.dumps({"Violence": "a weapon"}))  # a string, not a list of concepts
    result = run_stage("01_generate_data.py", "--llm", "my-llm", "--concepts", str(concepts), "--output_dir",
                       str(tmp_path / "gen2"), check=False)
    assert result.returncode != 0 and "expected {category: [concept, ...]}" in error_line(result)

    expert = tmp_path / "Violence"
    shutil.copytree(work / "Violence", expert)  # finished at step 3
    result = run_stage("02_train_expert.py", "--model", toy_model, "--data", str(work / "data"), "--category",
                       "Violence", "--output_dir", str(expert), *TINY_TRAIN[2:], "--max_train_steps", "2", check=False)
    assert result.returncode != 0 and "at step 3, past --max_train_steps 2" in error_line(result)
    assert (expert / LORA_FILE).read_bytes() == (work / "Violence" / LORA_FILE).read_bytes()

    info = json.loads((expert / "lora.json").read_text())
    (expert / "lora.json").write_text(json.dumps({**info, "toy_taxonomy": 2}))
    result = run_stage("03_merge.py", str(work / "Hate"), str(expert), "--method", "linear",
                       "--output_dir", str(tmp_path / "merged"), check=False)
    assert result.returncode != 0 and "toy taxonomy of 2 concepts per category" in error_line(result)


def test_bf16_training_keeps_the_lora_in_fp32(work, toy_model):
    out = work / "bf16"
    run_stage("02_train_expert.py", "--model", toy_model, "--data", str(work / "data"), "--category", "Hate",
              "--output_dir", str(out), "--mixed_precision", "bf16", *TINY_TRAIN)
    log = json.load(open(out / "log.json"))["log"]
    assert all(math.isfinite(s["loss"]) for s in log)
    from safetensors.torch import load_file
    assert all(t.dtype == torch.float32 for t in load_file(str(out / "pytorch_lora_weights.safetensors")).values())


def test_gradient_checkpointing_trains_the_same_expert(work, toy_model):
    out = work / "checkpointed"
    run_stage("02_train_expert.py", "--model", toy_model, "--data", str(work / "data"), "--category", "Violence",
              "--output_dir", str(out), "--gradient_checkpointing", *TINY_TRAIN)
    (_, plain), (_, checkpointed) = read_lora(str(work / "Violence")), read_lora(str(out))
    # recomputing activations in backward changes memory, not the gradients
    assert all(torch.allclose(plain[k][i], checkpointed[k][i], atol=1e-5) for k in plain for i in (0, 1))


def test_each_category_trains_every_expert_in_one_process(work, toy_model, tmp_path):
    """--category each: one expert per category of the CSV, each the same as a one-category run."""
    run_stage("02_train_expert.py", "--model", toy_model, "--data", str(work / "data"), "--category", "each",
              "--output_dir", str(tmp_path / "experts"), *TINY_TRAIN)
    folders = sorted(p.name for p in (tmp_path / "experts").iterdir())
    assert folders == ["harassment", "hate", "illegal-activity", "self-harm", "sexual", "shocking", "violence"]
    (_, alone), (_, together) = read_lora(str(work / "Violence")), read_lora(str(tmp_path / "experts" / "violence"))
    assert all(torch.allclose(alone[k][i], together[k][i], atol=1e-6) for k in alone for i in (0, 1))
    assert (tmp_path / "experts" / "violence" / "curve.png").stat().st_size > 0
    merged = run_stage("03_merge.py", *[str(tmp_path / "experts" / f) for f in folders if f != "sexual"], "--method", "linear",
                       "--output_dir", str(tmp_path / "merged"), check=False)  # one category forgotten: refused
    assert merged.returncode != 0 and "categories without an expert: Sexual" in error_line(merged)


def test_gradient_accumulation_logs_the_effective_batch(work, toy_model, tmp_path):
    out = tmp_path / "accumulated"
    run_stage("02_train_expert.py", "--model", toy_model, "--data", str(work / "data"), "--category", "Violence",
              "--output_dir", str(out), *TINY_TRAIN, "--gradient_accumulation_steps", "2", "--lr_warmup_steps", "2")
    log = json.load(open(out / "log.json"))["log"]
    assert [s["step"] for s in log] == [1, 2, 3]
    assert log[0]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)  # step 0 trains at lr 0 (warm-up): the
    assert log[1]["dpo_loss"] == pytest.approx(math.log(2), abs=1e-4)  # LoRA is still a no-op at step 1
    assert log[2]["dpo_loss"] != pytest.approx(math.log(2), abs=1e-4)
