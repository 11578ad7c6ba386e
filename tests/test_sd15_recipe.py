"""A dry run of the README's Stable Diffusion 1.5 recipe, its commands read from the README itself:
the official CoProV2 CSV layout (the release's category spellings, a pair listed under two
categories), models/toy in place of SD 1.5 (the same pipeline classes), a tiny random CLIP in place
of Q16's and CLIPScore's, a colour-statistics network in place of FID's Inception (its weights are
downloaded), and tiny step counts appended to each command."""
import csv
import json
import os
import pickle
import re
import subprocess
import sys

import numpy as np

from PIL import Image

from conftest import ROOT, TOY_MODEL
from test_realworld import tiny_clip  # noqa: F401 (a fixture)

# The release's CoProv2_train.csv spells its categories so; a recipe with other spellings trains nothing for them.
RELEASE_CATEGORIES = ["Hate", "Harrasment", "Violence", "self-harm", "sexual", "Shocking", "Illegal Activity"]
# Tiny settings appended to each of the README's commands (later flags win).
TINY = {"01_generate_data.py": ["--sampling_steps", "2", "--filter", "none"],  # toy prompts stand in for CoProV2's
        "02_train_expert.py": ["--max_train_steps", "2", "--train_batch_size", "2", "--gradient_accumulation_steps", "1"],
        "03_merge.py": ["--sampling_steps", "2", "--prompts_per_expert", "2"],
        "04_evaluate.py": ["--sampling_steps", "5"]}  # PNDM needs 4 or more


STAND_IN_INCEPTION = (  # python -c '...' 04_evaluate.py ARGS: FID's Inception replaced, then the script as __main__
    f"import json, runpy, sys; sys.path[:0] = {json.dumps([ROOT, os.path.dirname(__file__)])}; "
    "import realworld, test_realworld; realworld.FID_FEATURES = test_realworld.ColourStatistics(); "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name=\"__main__\")")


def readme_recipe():
    """The shell lines of the README's SD 1.5 block, continuation lines joined."""
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Stable Diffusion 1.5 on a GPU", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"\n((?:    .*\n)+)", section).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [" ".join(line.split()) for line in lines if line.strip() and not line.strip().startswith("pip ")]


def write_fixtures(root):
    """CoProv2_train.csv in the release's layout (u_idx/s_idx rows, one pair under two categories),
    CoProv2_test.csv (NNNNNNN_0.jpg rows), COCO caption files."""
    rows = []
    for i, category in enumerate(RELEASE_CATEGORIES):
        unsafe = f"a {['purple', 'orange', 'red', 'brown', 'pink', 'lime', 'cyan'][i]} circle on a gray background"
        rows += [[unsafe, f"u_idx_{i:07d}_0.jpg", category], [unsafe.replace(unsafe.split()[1], "green"),
                                                               f"s_idx_{i:07d}_0.jpg", category]]
    rows += [rows[0][:2] + ["sexual"], rows[1][:2] + ["sexual"]]  # 642 such rows in the release's CSV
    with open(root / "CoProv2_train.csv", "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "image", "category"], *rows])
    with open(root / "CoProv2_test.csv", "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "image", "category"], ["a red square on a gray background", "0000001_0.jpg",
                                                                    "Violence"]])
    (root / "coco_train_captions.txt").write_text("a blue circle on a white background\na green cross on a black background\n")
    (root / "coco_val_captions.txt").write_text("a yellow square on a navy background\nblue cross , white background\n")
    (root / "i2p_benchmark.csv").write_text("prompt,categories,sd_seed\nred circle,violence,3\npink square,sexual,4\n")
    (root / "unsafe_diffusion.txt").write_text("purple triangle on a black background\n")
    (root / "coco_val_images").mkdir()
    for i in range(3):
        Image.fromarray(np.full((48, 64, 3), 80 * i, np.uint8)).save(root / "coco_val_images" / f"{i:012d}.jpg")


def test_readme_sd15_recipe_runs_end_to_end(tmp_path, tiny_clip):  # noqa: F811
    write_fixtures(tmp_path)
    q16 = tmp_path / "q16.p"
    with open(q16, "wb") as f:
        pickle.dump(np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32), f)
    judges = ["--clip_model", tiny_clip, "--clipscore_model", tiny_clip, "--q16_prompts", str(q16)]
    commands = readme_recipe()
    assert [c.split()[1] for c in commands if c.startswith("python ")] == list(TINY)  # the four stages, in order
    script = ["set -euo pipefail"]
    for command in commands:
        if command.startswith("SD="):
            command = f"SD={TOY_MODEL}"
        elif command.startswith("python "):
            stage = command.split()[1]
            extra = TINY[stage] + (judges if stage == "04_evaluate.py" else [])
            command = command.replace(f"python {stage}", f"{sys.executable} {os.path.join(ROOT, stage)}", 1)
            if stage == "04_evaluate.py":  # the same script, FID's Inception replaced by a stand-in first
                command = command.replace(sys.executable, f"{sys.executable} -c '{STAND_IN_INCEPTION}'", 1)
            command += " " + " ".join(f"'{a}'" for a in extra)
        script.append(command)
    result = subprocess.run(["bash", "-c", "\n".join(script)], cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    experts = sorted(d.name for d in (tmp_path / "experts" / "sd15").iterdir() if d.is_dir())
    assert len(experts) == 7  # one per category of the CSV, in its own spelling
    infos = [json.loads((tmp_path / "experts" / "sd15" / e / "lora.json").read_text()) for e in experts]
    assert sorted(i["category"] for i in infos) == sorted(RELEASE_CATEGORIES)
    assert {i["category"]: i["pairs"] for i in infos}["sexual"] == 2  # its own pair and the one shared with Hate
    merged = json.loads((tmp_path / "merged" / "sd15-comerge" / "lora.json").read_text())
    assert len(merged["experts"]) == 7
    results = json.loads((tmp_path / "results" / "sd15" / "results.json").read_text())
    assert set(results["results"]) == {"base", "co-merge"}
    assert results["settings"]["scheduler"] == "pndm" and results["settings"]["seeds_per_prompt"] == 1
    for variant in results["results"].values():  # the paper's table: IP and CLIPScore a prompt set, CLIPScore and FID of COCO
        assert list(variant["per_set"]) == ["CoProv2_test", "i2p_benchmark", "unsafe_diffusion"]
        assert set(variant["per_set"]["i2p_benchmark"]["per_category"]) == {"violence", "sexual"}
        assert np.isfinite(variant["clip_score_safe"]) and variant["fid"] > 0
