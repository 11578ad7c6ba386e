"""Every bad input ends a stage with one `error:` line naming what is wrong, a non-zero exit, no
traceback, and every file written before left as it was (issue 20). One table of cases; each gets
fresh copies of one tiny stage-1 output and one tiny expert. The stages run in this process (their
main() with sys.argv set, as `python 0N_*.py ...` would), which saves importing torch per case;
one case also runs as a real subprocess."""
import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from common import LORA_FILE
from conftest import ROOT, load_stage

image_ok = load_stage("01_generate_data.py").image_ok
lora_sha256 = load_stage("04_evaluate.py").lora_sha256

STAGES = {}
TINY_GEN = ["--concepts_per_category", "1", "--pairs_per_concept", "1", "--steps", "4", "--filter", "none"]
TINY_TRAIN = ["--category", "Hate",  # pair 0 is a Hate pair
              "--train_batch_size", "2", "--checkpoint_every", "1"]
ANCHORS = "a blue circle on a gray background\na green square on a navy background\n"


def run(script, *args):
    """(exit status, stdout, stderr) of main() of a stage, as the interpreter would report them."""
    if script not in STAGES:
        STAGES[script] = load_stage(script)
    out, err, argv, cwd = io.StringIO(), io.StringIO(), sys.argv, os.getcwd()
    sys.argv = [script, *map(str, args)]
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            STAGES[script].main()
        code = 0
    except SystemExit as end:  # fail() and argparse end here; a str is printed to stderr, status 1
        code = end.code if isinstance(end.code, int) else int(end.code is not None)
        if isinstance(end.code, str):
            err.write(end.code + "\n")
    except Exception:  # what a user would see as a traceback
        err.write(traceback.format_exc())
        code = 1
    finally:
        sys.argv = argv
        os.chdir(cwd)
    return code, out.getvalue(), err.getvalue()


def snapshot(root):
    """{relative path: sha256} of every file under root."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, toy_model):
    """One stage-1 output (7 pairs, 2 anchors) and one expert (2 steps, checkpointed), built once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "anchors.txt").write_text(ANCHORS)
    code, _, err = run("01_generate_data.py", "--model", toy_model, "--output_dir", root / "data", *TINY_GEN,
                       "--anchor_prompts", root / "anchors.txt")
    assert code == 0, err[-2000:]
    code, _, err = run("02_train_expert.py", "--model", toy_model, "--data", root / "data", "--output_dir",
                       root / "expert", *TINY_TRAIN, "--max_train_steps", "2")
    assert code == 0, err[-2000:]
    return root


class Case:
    """Fresh copies of the tiny data and expert in tmp, and helpers to break them."""

    def __init__(self, tiny, tmp, model):
        self.tmp, self.model = tmp, model
        self.data, self.expert = tmp / "data", tmp / "expert"
        shutil.copytree(tiny / "data", self.data)
        shutil.copytree(tiny / "expert", self.expert)
        (tmp / "anchors.txt").write_text(ANCHORS)
        self.gen = [*TINY_GEN, "--anchor_prompts", tmp / "anchors.txt"]
        self.fresh = ["--output_dir", tmp / "fresh"]  # no checkpoint to resume

    def write(self, path, content):
        path = self.tmp / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def truncate(self, path):
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])

    def lora_json(self, **changes):
        info = json.loads((self.expert / "lora.json").read_text())
        info.update(changes)
        (self.expert / "lora.json").write_text(json.dumps({k: v for k, v in info.items() if v is not None}))

    def tensors(self, change):
        path = self.expert / LORA_FILE
        save_file(change(load_file(str(path))), str(path))

    def pairs_rows(self, *rows):
        return self.write("data/pairs.csv", "prompt,image,category\n" + "".join(r + "\n" for r in rows))

    # the commands, on the copies
    def gen1(self, *args):
        return ("01_generate_data.py", "--model", self.model, "--output_dir", self.data, *self.gen, *args)

    def train(self, *args, steps=2):
        return ("02_train_expert.py", "--model", self.model, "--data", self.data, "--output_dir", self.expert,
                *TINY_TRAIN, "--max_train_steps", steps, *args)

    def merge(self, *args):
        return ("03_merge.py", self.expert, self.expert, "--method", "linear", "--output_dir", self.tmp / "merged", *args)

    def evaluate(self, *args):
        return ("04_evaluate.py", "--model", self.model, "--lora", f"v={self.expert}", "--concepts_per_category", "1",
                "--output_dir", self.tmp / "results", *args)


def renamed(tensors):
    return {k.replace("lora_A", "lora_X"): v for k, v in tensors.items()}


def wrong_shape(tensors):
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    return {**tensors, key: torch.ones(3, tensors[key].shape[1])}


def other_model(tensors):  # consistent in itself (rank 4), but made for wider inputs than this UNet's
    key = sorted(k for k in tensors if "lora_A" in k)[0]
    return {**tensors, key: torch.ones(tensors[key].shape[0], tensors[key].shape[1] + 1)}


def other_image(path):
    Image.fromarray(np.full((8, 8, 3), 99, np.uint8)).save(path)


NOT_UTF8 = "prompt,image,category\n".encode() + "a caf\u00e9,u_idx_0_0.png,Violence\n".encode("latin-1")

# (id, how to build the broken input and the command, expected part of the error line)
CASES = [
    # flags, checked when parsed
    ("gen-steps-0", lambda c: c.gen1("--steps", "0"), "argument --steps"),
    ("gen-batch-0", lambda c: c.gen1("--batch_size", "0"), "argument --batch_size"),
    ("gen-pairs-per-concept-0", lambda c: c.gen1("--pairs_per_concept", "0"), "argument --pairs_per_concept"),
    ("gen-guidance-nan", lambda c: c.gen1("--guidance_scale", "nan"), "argument --guidance_scale"),
    ("train-batch-0", lambda c: c.train("--train_batch_size", "0"), "argument --train_batch_size"),
    ("train-rank-0", lambda c: c.train("--rank", "0"), "argument --rank"),
    ("train-lr-nan", lambda c: c.train("--learning_rate", "nan"), "argument --learning_rate"),
    ("train-lr-0", lambda c: c.train("--learning_rate", "0"), "argument --learning_rate"),
    ("train-0-steps", lambda c: c.train(steps=0), "argument --max_train_steps"),
    ("train-checkpoint-every-0", lambda c: c.train("--checkpoint_every", "0"), "argument --checkpoint_every"),
    ("train-beta-0", lambda c: c.train("--beta", "0"), "argument --beta"),
    ("train-beta-negative", lambda c: c.train("--beta", "-5"), "argument --beta"),
    ("train-empty-share-2", lambda c: c.train("--empty_prompt_share", "2"), "argument --empty_prompt_share"),
    ("merge-scale-nan", lambda c: c.merge("--scale", "nan"), "argument --scale"),
    ("merge-rank-0", lambda c: c.merge("--rank", "0"), "argument --rank"),
    ("eval-steps-0", lambda c: c.evaluate("--steps", "0"), "argument --steps"),
    ("eval-pndm-steps-2", lambda c: c.evaluate("--scheduler", "pndm", "--steps", "2"), "PNDM needs at least 4 steps"),
    ("eval-seeds-0", lambda c: c.evaluate("--seeds_per_prompt", "0"), "argument --seeds_per_prompt"),
    ("eval-batch-0", lambda c: c.evaluate("--batch_size", "0"), "argument --batch_size"),
    # output folders, checked before any work
    ("gen-output-is-file", lambda c: c.gen1("--output_dir", c.write("out", "x")), "is a file, not a folder"),
    ("train-output-is-file", lambda c: c.train("--output_dir", c.write("out", "x")), "is a file, not a folder"),
    ("merge-output-under-file", lambda c: c.merge("--output_dir", c.write("out", "x") / "m"), "is a file, not a folder"),
    ("eval-output-is-file", lambda c: c.evaluate("--output_dir", c.write("out", "x")), "is a file, not a folder"),
    ("gen-anchor-prompts-not-utf8", lambda c: c.gen1("--anchor_prompts", c.write("a.txt", b"caf\xe9\n")), "--anchor_prompts"),
    ("eval-prompt-set-not-utf8", lambda c: c.evaluate("--judge", "paper", "--prompts", c.write("p.txt", b"caf\xe9\n"),
                                                      "--safe_prompts", c.write("s.txt", "a cat\n")), "p.txt: not UTF-8"),
    ("train-model-folder-broken", lambda c: (c.write("model/model_index.json", "{"), c.train("--model", c.tmp / "model"))[1],
     "cannot load model"),
    # pair and anchor CSVs
    ("pairs-not-utf8", lambda c: (c.write("data/pairs.csv", NOT_UTF8), c.train())[1], "not UTF-8"),
    ("pairs-is-folder", lambda c: ((c.data / "pairs.csv").unlink(), (c.data / "pairs.csv").mkdir(), c.train())[2],
     "cannot read pair file"),
    ("gen-csv-not-utf8", lambda c: c.gen1("--csv", c.write("in.csv", NOT_UTF8)), "not UTF-8"),
    ("pairs-same-image-other-prompt", lambda c: (c.pairs_rows(
        "a red circle,u_idx_0_0.png,Violence", "a green circle,s_idx_0_0.png,Violence",
        "a red square,u_idx_0_0.png,Hate", "a green circle,s_idx_0_0.png,Hate"), c.train())[1],
     "two rows for u_idx_0_0 with different prompts"),
    ("pairs-absolute-image", lambda c: (c.pairs_rows(
        "a red circle,/etc/u_idx_0_0.png,Violence", "a green circle,s_idx_0_0.png,Violence"), c.train())[1],
     "must be a file name inside the data folder"),
    ("pairs-dotdot-image", lambda c: (c.pairs_rows(
        "a red circle,../u_idx_0_0.png,Violence", "a green circle,s_idx_0_0.png,Violence"), c.train())[1],
     "must be a file name inside the data folder"),
    ("anchors-absolute", lambda c: (c.write("data/anchors.csv", "prompt,image\nx,/etc/passwd\n"), c.train())[1],
     "must be a file name inside the data folder"),
    ("anchors-dotdot", lambda c: (c.write("data/anchors.csv", "prompt,image\nx,../../x.png\n"), c.train())[1],
     "must be a file name inside the data folder"),
    # stage 1's own files
    ("gen-render-json-invalid", lambda c: (c.write("data/render.json", "{oops"), c.gen1())[1], "render.json: cannot read"),
    ("gen-keeps-no-pair", lambda c: (c.write("gen0/pairs.csv", "old"), c.gen1(
        "--csv", c.write("in.csv", "prompt,image,category\na red circle on a gray background,u_idx_0_0.png,Violence\n"
                                   "a green circle on a gray background,s_idx_0_0.png,Violence\n"),
        "--steps", "1", "--filter", "toy", "--output_dir", c.tmp / "gen0"))[1], "kept 0 of 1 pairs"),
    # images that training reads
    ("train-truncated-png", lambda c: (c.truncate(c.data / "images" / "s_idx_0_0.png"), c.train(*c.fresh))[1],
     "s_idx_0_0.png is not a readable image"),
    ("train-text-as-png", lambda c: (c.write("data/images/u_idx_0_0.png", "not an image"), c.train(*c.fresh))[1],
     "u_idx_0_0.png is not a readable image"),
    # stage 2's checkpoint
    ("train-corrupt-state", lambda c: (c.write("expert/checkpoint/state.safetensors", b"\x00" * 64), c.train(steps=3))[1],
     "not a checkpoint this run can resume"),
    ("train-corrupt-settings", lambda c: (c.write("expert/checkpoint/settings.json", "[1,"), c.train(steps=3))[1],
     "settings.json: cannot read"),
    ("train-corrupt-log", lambda c: (c.write("expert/log.json", "\xff"), c.train(steps=3))[1], "log.json: cannot read"),
    ("train-resume-on-rerendered-images", lambda c: (other_image(c.data / "images" / "s_idx_0_0.png"), c.train(steps=3))[1],
     "images_sha256"),
    # LoRAs (stage 3 reads experts, stage 4 variants)
    ("merge-corrupt-weights", lambda c: (c.write(f"expert/{LORA_FILE}", b"garbage"), c.merge())[1],
     "not a readable safetensors file"),
    ("merge-lora-json-invalid", lambda c: (c.write("expert/lora.json", "{"), c.merge())[1], "cannot read lora.json"),
    ("merge-lora-json-list", lambda c: (c.write("expert/lora.json", "[]"), c.merge())[1], "lora.json is not a JSON object"),
    ("merge-lora-json-no-alpha", lambda c: (c.lora_json(alpha=None), c.merge())[1], "alpha must be a positive number"),
    ("merge-lora-json-rank-0", lambda c: (c.lora_json(rank=0), c.merge())[1], "rank must be a positive integer"),
    ("merge-tensor-names", lambda c: (c.tensors(renamed), c.merge())[1], "is not a LoRA weight"),
    ("merge-tensor-shapes", lambda c: (c.tensors(wrong_shape), c.merge())[1], "not of rank 4"),
    ("merge-zero-expert", lambda c: (c.tensors(lambda t: {k: v * 0 if "lora_B" in k else v for k, v in t.items()}),
                                     c.merge())[1], "every lora_B is zero"),
    ("eval-corrupt-weights", lambda c: (c.write(f"expert/{LORA_FILE}", b"garbage"), c.evaluate())[1],
     "not a readable safetensors file"),
    ("eval-no-lora-json-corrupt-weights", lambda c: ((c.expert / "lora.json").unlink(),
                                                     c.write(f"expert/{LORA_FILE}", b"\x01" * 9), c.evaluate())[2],
     "not a readable safetensors file"),
    ("eval-lora-of-another-model", lambda c: (c.tensors(other_model), c.evaluate())[1], "does not fit the model's UNet"),
    ("eval-lora-json-list", lambda c: (c.write("expert/lora.json", "[]"), c.evaluate())[1], "is not a JSON object"),
    ("eval-hub-base-on-local-model", lambda c: (c.lora_json(base_model="some-org/some-model"), c.evaluate())[1],
     "was trained on some-org/some-model"),
    ("eval-local-base-on-hub-model", lambda c: c.evaluate("--model", "some-org/some-model"), "was trained on"),
    ("eval-variant-dotdot", lambda c: ("04_evaluate.py", "--lora", f"..={c.expert}", "--output_dir", c.tmp / "r"),
     "may not start with '.'"),
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_ends_with_one_error_line(tiny, toy_model, tmp_path, build, expected):
    case = Case(tiny, tmp_path, toy_model)
    command = build(case)
    before = snapshot(tmp_path)
    code, _, err = run(*command)
    lines = err.strip().splitlines()
    assert code != 0 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("error:") or ": error: " in lines[-1], lines[-1]  # argparse: "prog: error: ..."
    assert expected in lines[-1], lines[-1]
    after = snapshot(tmp_path)
    assert {k: after.get(k) for k in before} == before, "a file written before was changed or lost"


def test_as_a_subprocess_one_line_and_no_library_warnings(tiny, toy_model, tmp_path):
    """The real command line: a broken image after the model loaded (transformers' import-time notes
    would show by then), the exit status and the last line as the user sees them."""
    case = Case(tiny, tmp_path, toy_model)
    case.truncate(case.data / "images" / "u_idx_0_0.png")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    result = subprocess.run([sys.executable, *map(str, case.train(*case.fresh))], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "torchvision" not in result.stderr and "Warning" not in result.stderr, result.stderr[:2000]


def test_a_truncated_rendered_image_is_rendered_again(tiny, toy_model, tmp_path):
    case = Case(tiny, tmp_path, toy_model)
    victim = case.data / "images" / "u_idx_3_0.png"
    victim.write_bytes(victim.read_bytes()[:-5])  # only the end marker lost: PIL still decodes it
    pairs = (case.data / "pairs.csv").read_bytes()
    code, out, err = run(*case.gen1())
    assert code == 0, err[-2000:]
    assert "1 rendered now" in out and image_ok(victim)
    assert (case.data / "pairs.csv").read_bytes() == pairs


def test_a_corrupt_cached_variant_is_rendered_again(toy_model, tmp_path):
    out = tmp_path / "results"
    command = ["04_evaluate.py", "--model", toy_model, "--concepts_per_category", "1", "--seeds_per_prompt", "1",
               "--steps", "1", "--output_dir", out]
    code, _, err = run(*command)
    assert code == 0, err[-2000:]
    first = json.loads((out / "results.json").read_text())["results"]
    for damage in (lambda: (out / "variants" / "base.json").write_text("{not json"),
                   lambda: (out / "variants" / "base.png").write_bytes((out / "variants" / "base.png").read_bytes()[:40])):
        damage()
        code, stdout, err = run(*command)
        assert code == 0 and "Traceback" not in err, err[-2000:]
        assert "(from an earlier run)" not in stdout  # redone, not trusted
        assert json.loads((out / "results.json").read_text())["results"] == first


def test_a_lora_is_known_by_its_tensors_not_its_file_bytes(tiny, tmp_path):
    tensors = load_file(str(tiny / "expert" / LORA_FILE))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    save_file(dict(sorted(tensors.items())), str(tmp_path / "a" / LORA_FILE))
    save_file(dict(sorted(tensors.items(), reverse=True)), str(tmp_path / "b" / LORA_FILE), metadata={"x": "y"})
    assert (tmp_path / "a" / LORA_FILE).read_bytes() != (tmp_path / "b" / LORA_FILE).read_bytes()
    assert lora_sha256(str(tmp_path / "a")) == lora_sha256(str(tmp_path / "b")) == lora_sha256(str(tiny / "expert"))
    key = sorted(tensors)[0]
    save_file({**tensors, key: tensors[key] + 1}, str(tmp_path / "b" / LORA_FILE))
    assert lora_sha256(str(tmp_path / "a")) != lora_sha256(str(tmp_path / "b"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write to a read-only folder")
def test_a_read_only_output_folder_is_refused_before_any_work(tiny, toy_model, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, _, err = run("04_evaluate.py", "--model", toy_model, "--output_dir", out)
    finally:
        out.chmod(0o755)
    assert code != 0 and "is not writable" in err.strip().splitlines()[-1]
