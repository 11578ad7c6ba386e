"""Every bad input ends a stage with one `error:` line naming what is wrong, a non-zero exit, no
traceback, and every file written before left as it was (issue 20). One table of cases; each gets
fresh copies of one tiny stage-1 output and one tiny expert. The stages run in this process (their
main() with sys.argv set, as `python 0N_*.py ...` would), which saves importing torch per case;
one case also runs as a real subprocess."""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common import LORA_FILE
from conftest import ROOT, refusal, run_in_process

ONE_PAIR_GEN = ["--concepts_per_category", "1", "--pairs_per_concept", "1", "--sampling_steps", "4", "--filter", "none"]
HATE_TRAIN = ["--category", "Hate", "--train_batch_size", "2"]  # pair 0 is a Hate pair
OTHERS = ["--leave_out", "Harassment", "Self-harm", "Sexual", "Shocking", "Illegal Activity"]
ANCHORS = "a blue circle on a gray background\na green square on a navy background\n"


def snapshot(root):
    """{relative path: sha256} of every file under root."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.islink(path):
                continue
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return files


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, toy_model):
    """One stage-1 output (7 pairs, 2 anchors) and two experts (2 steps each), built once."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "anchors.txt").write_text(ANCHORS)
    code, _, err = run_in_process("01_generate_data.py", "--model", toy_model, "--output_dir", root / "data", *ONE_PAIR_GEN,
                       "--anchor_prompts", root / "anchors.txt")
    assert code == 0, err[-2000:]
    for name, category in (("expert", "Hate"), ("other", "Violence")):
        code, _, err = run_in_process("02_train_expert.py", "--model", toy_model, "--data", root / "data", "--output_dir",
                           root / name, "--category", category, "--train_batch_size", "2", "--max_train_steps", "2")
        assert code == 0, err[-2000:]
    return root


class Case:
    """Fresh copies of the tiny data and experts in tmp, and helpers to break them."""

    def __init__(self, tiny, tmp, model):
        self.tmp, self.model = tmp, model
        self.data, self.expert, self.other = tmp / "data", tmp / "expert", tmp / "other"
        for name in ("data", "expert", "other"):
            shutil.copytree(tiny / name, tmp / name)
        (tmp / "anchors.txt").write_text(ANCHORS)
        self.gen = [*ONE_PAIR_GEN, "--anchor_prompts", tmp / "anchors.txt"]
        self.fresh = ["--output_dir", tmp / "fresh"]  # no checkpoint to resume

    def write(self, path, content):
        path = self.tmp / path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    def truncate(self, path):
        data = path.read_bytes()
        path.write_bytes(data[:len(data) // 2])

    def tensors(self, change):
        path = self.expert / LORA_FILE
        with safe_open(str(path), "pt") as f:
            header = f.metadata()
        save_file(change(load_file(str(path))), str(path), metadata=header)

    def pairs_rows(self, *rows):
        return self.write("data/pairs.csv", "prompt,image,category\n" + "".join(r + "\n" for r in rows))

    # the commands, on the copies
    def gen1(self, *args):
        return ("01_generate_data.py", "--model", self.model, "--output_dir", self.data, *self.gen, *args)

    def gen_csv(self, csv, *args):
        return ("01_generate_data.py", "--model", self.model, "--output_dir", self.tmp / "gen", "--csv", csv,
                "--sampling_steps", "4", *args)

    def paper(self, *args):
        return ("04_evaluate.py", "--model", self.model, "--judge", "paper", "--prompts", self.write("p.txt", "x\n"),
                "--safe_prompts", self.write("s.txt", "a cat\n"), "--output_dir", self.tmp / "results", *args)

    def train(self, *args, steps=2):
        return ("02_train_expert.py", "--model", self.model, "--data", self.data, "--output_dir", self.expert,
                *HATE_TRAIN, "--max_train_steps", steps, *args)

    def merge(self, *args):
        return ("03_merge.py", self.expert, self.other, *OTHERS, "--prompts_per_expert", "2", "--sampling_steps", "2",
                "--output_dir", self.tmp / "merged", *args)

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


def other_image(path, size=8):
    Image.fromarray(np.full((size, size, 3), 99, np.uint8)).save(path)


NOT_UTF8 = "prompt,image,category\n".encode() + "a caf\u00e9,u_idx_0_0.png,Violence\n".encode("latin-1")

# (id, how to build the broken input and the command, expected part of the error line)
CASES = [
    # flags, checked when parsed; flags the chosen mode would ignore are refused
    ("gen-steps-0", lambda c: c.gen1("--sampling_steps", "0"), "argument --sampling_steps"),
    ("gen-pairs-per-concept-0", lambda c: c.gen1("--pairs_per_concept", "0"), "argument --pairs_per_concept"),
    ("gen-seed-huge", lambda c: c.gen1("--seed", "99999999999999999999"), "argument --seed"),
    ("gen-toy-flag-with-csv", lambda c: c.gen1("--csv", c.data / "pairs.csv", "--pairs_per_concept", "3"),
     "not used with --csv"),
    ("gen-max-anchors-without-file", lambda c: ("01_generate_data.py", "--max_anchors", "5"), "--anchor_prompts only"),
    ("gen-steps-5000", lambda c: c.gen1("--sampling_steps", "5000", *c.fresh), "error: "),
    ("train-batch-0", lambda c: c.train("--train_batch_size", "0"), "argument --train_batch_size"),
    ("train-lr-nan", lambda c: c.train("--learning_rate", "nan"), "argument --learning_rate"),
    ("train-lr-0", lambda c: c.train("--learning_rate", "0"), "argument --learning_rate"),
    ("train-0-steps", lambda c: c.train(steps=0), "argument --max_train_steps"),
    ("train-beta-0", lambda c: c.train("--beta", "0"), "argument --beta"),
    ("train-beta-negative", lambda c: c.train("--beta", "-5"), "argument --beta"),
    ("train-seed-huge", lambda c: c.train("--seed", "99999999999999999999"), "argument --seed"),
    ("train-category-and-all-data", lambda c: c.train("--all_data"), "not allowed with argument"),
    ("merge-distill-negative", lambda c: c.merge("--distill_steps", "-1"), "argument --distill_steps"),
    ("eval-steps-0", lambda c: c.evaluate("--sampling_steps", "0"), "argument --sampling_steps"),
    ("eval-pndm-steps-2", lambda c: c.paper("--prompts", c.write("p.txt", "x\n"), "--sampling_steps", "2"),
     "PNDM needs at least 4"),
    ("eval-seeds-0", lambda c: c.evaluate("--seeds_per_prompt", "0"), "argument --seeds_per_prompt"),
    ("eval-batch-0", lambda c: c.evaluate("--batch_size", "0"), "argument --batch_size"),
    ("eval-clip-with-toy-judge", lambda c: c.evaluate("--clip_model", "x"), "--clip_model: used by --judge paper only"),
    # output folders: claimed before any work
    ("gen-output-is-file", lambda c: c.gen1("--output_dir", c.write("out", "x")), "File exists"),
    ("train-output-is-file", lambda c: c.train("--output_dir", c.write("out", "x")), "File exists"),
    ("merge-output-under-file", lambda c: c.merge("--output_dir", c.write("out", "x") / "m"), "Not a directory"),
    ("merge-into-an-expert", lambda c: c.merge("--output_dir", c.expert), "would write into the input"),
    ("train-into-the-data", lambda c: c.train("--output_dir", c.data), "would write into the input"),
    ("eval-output-is-file", lambda c: c.evaluate("--output_dir", c.write("out", "x")), "File exists"),
    ("gen-output-symlink-loop", lambda c: (os.symlink(c.tmp / "loop", c.tmp / "loop"), c.gen1("--output_dir", c.tmp / "loop"))[1],
     "error: "),
    ("gen-rerun-without-its-anchor-file", lambda c: ("01_generate_data.py", "--model", c.model, "--output_dir", c.data,
                                                     *ONE_PAIR_GEN), "anchor_prompts changed (not given now)"),
    ("merge-undistilled-over-distilled", lambda c: (c.write("merged/checkpoint.pt", b"x"), c.merge())[1],
     "holds a distilled merge"),
    ("train-another-seed-same-folder", lambda c: c.train("--seed", "1"), "seed 0 -> 1"),
    # text files
    ("gen-anchor-prompts-not-utf8", lambda c: c.gen1("--anchor_prompts", c.write("a.txt", b"caf\xe9\n")), "codec can't decode"),
    ("eval-prompt-set-not-utf8", lambda c: c.paper("--prompts", c.write("bad.txt", b"caf\xe9\n")), "bad.txt: not UTF-8"),
    ("train-model-folder-broken", lambda c: (c.write("model/model_index.json", "{"), c.train("--model", c.tmp / "model",
                                                                                            *c.fresh))[1], "error: "),
    # pair and anchor CSVs
    ("pairs-not-utf8", lambda c: (c.write("data/pairs.csv", NOT_UTF8), c.train(*c.fresh))[1], "codec can't decode"),
    ("pairs-is-folder", lambda c: ((c.data / "pairs.csv").unlink(), (c.data / "pairs.csv").mkdir(), c.train(*c.fresh))[2],
     "Is a directory"),
    ("gen-csv-not-utf8", lambda c: c.gen_csv(c.write("in.csv", NOT_UTF8)), "codec can't decode"),
    ("pairs-same-image-other-prompt", lambda c: (c.pairs_rows(
        "a red circle,u_idx_0_0.png,Violence", "a green circle,s_idx_0_0.png,Violence",
        "a red square,u_idx_0_0.png,Hate", "a green circle,s_idx_0_0.png,Hate"), c.train(*c.fresh))[1],
     "two rows for u_idx_0_0 with different prompts"),
    ("pairs-absolute-image", lambda c: (c.pairs_rows(
        "a red circle,/etc/u_idx_0_0.png,Violence", "a green circle,s_idx_0_0.png,Violence"), c.train(*c.fresh))[1],
     "must be a file name inside"),
    ("pairs-dotdot-image", lambda c: (c.pairs_rows(
        "a red circle,../u_idx_0_0.png,Violence", "a green circle,s_idx_0_0.png,Violence"), c.train(*c.fresh))[1],
     "must be a file name inside"),
    ("pairs-category-escapes", lambda c: (c.pairs_rows(
        "a red circle,u_idx_0_0.png,../../escaped", "a green circle,s_idx_0_0.png,../../escaped"),
        c.train("--category", "each", *c.fresh))[1], "cannot name a file or folder"),
    ("pairs-category-empty", lambda c: (c.pairs_rows(
        "a red circle,u_idx_0_0.png,", "a green circle,s_idx_0_0.png,"), c.train("--category", "each", *c.fresh))[1],
     "cannot name a file or folder"),
    ("anchors-absolute", lambda c: (c.write("data/anchors.csv", "prompt,image\nx,/etc/passwd\n"), c.train(*c.fresh))[1],
     "must be a file name inside"),
    ("anchors-none-for-the-anchor-term", lambda c: (c.write("data/anchors.csv", "prompt,image\n"), c.train(*c.fresh))[1],
     "--anchor_weight needs anchors"),
    ("anchors-none-for-distillation", lambda c: (c.write("data/anchors.csv", "prompt,image\n"),
                                                 c.merge("--data", c.data, "--distill_steps", "2"))[1], "--distill_steps needs anchors"),
    ("anchors-dotdot", lambda c: (c.write("data/anchors.csv", "prompt,image\nx,../../x.png\n"), c.train(*c.fresh))[1],
     "must be a file name inside"),
    # stage 1's own files
    ("gen-run-json-invalid", lambda c: (c.write("data/run.json", "{oops"), c.gen1())[1], "JSONDecodeError"),
    ("gen-keeps-no-pair", lambda c: (c.write("gen0/pairs.csv", "old"), c.gen_csv(
        c.write("in.csv", "prompt,image,category\na red circle on a gray background,u_idx_0_0.png,Violence\n"
                          "a green circle on a gray background,s_idx_0_0.png,Violence\n"),
        "--sampling_steps", "1", "--filter", "toy", "--output_dir", c.tmp / "gen0"))[1], "kept 0 of 1 pairs"),
    # images that training reads
    ("train-truncated-png", lambda c: (c.truncate(c.data / "images" / "s_idx_0_0.png"), c.train(*c.fresh))[1], "error: "),
    ("train-text-as-png", lambda c: (c.write("data/images/u_idx_0_0.png", "not an image"), c.train(*c.fresh))[1],
     "cannot identify image file"),
    ("train-image-of-another-size", lambda c: (other_image(c.data / "images" / "u_idx_0_0.png", 700), c.train(*c.fresh))[1],
     "not 32x32"),
    # stage 2's checkpoint and folder record
    ("train-corrupt-checkpoint", lambda c: (c.write("expert/checkpoint.pt", b"\x00" * 64), c.train(steps=3))[1], "error: "),
    ("train-corrupt-run-json", lambda c: (c.write("expert/run.json", "[1,"), c.train(steps=3))[1], "JSONDecodeError"),
    ("train-resume-on-rerendered-images", lambda c: (other_image(c.data / "images" / "s_idx_0_0.png", 32),
                                                     c.train(steps=3))[1], "images changed"),
    # LoRAs (stage 3 reads experts, stage 4 variants)
    ("merge-corrupt-weights", lambda c: (c.write(f"expert/{LORA_FILE}", b"garbage"), c.merge())[1], "SafetensorError"),
    ("merge-tensor-names", lambda c: (c.tensors(renamed), c.merge())[1], "is not a finite LoRA weight"),
    ("merge-tensor-shapes", lambda c: (c.tensors(wrong_shape), c.merge())[1], "not a LoRA of one rank"),
    ("merge-zero-expert", lambda c: (c.tensors(lambda t: {k: v * 0 if "lora_B" in k else v for k, v in t.items()}),
                                     c.merge())[1], "every lora_B is zero"),
    ("merge-other-layers", lambda c: (c.tensors(lambda t: {k: v for k, v in t.items() if ".attn1.to_q." not in k}),
                                      c.merge())[1], "adapts other layers"),
    ("merge-same-expert-twice", lambda c: ("03_merge.py", c.expert, c.expert, "--output_dir", c.tmp / "m"),
     "is not one expert's among the others'"),
    ("eval-corrupt-weights", lambda c: (c.write(f"expert/{LORA_FILE}", b"garbage"), c.evaluate())[1], "SafetensorError"),
    ("eval-lora-of-another-model", lambda c: (c.tensors(other_model), c.evaluate("--seeds_per_prompt", "1",
                                                                                 "--sampling_steps", "1"))[1], "error: "),
    ("eval-local-base-on-hub-model", lambda c: c.evaluate("--model", "some-org/some-model"), "was trained on"),
    ("eval-variant-dotdot", lambda c: ("04_evaluate.py", "--lora", f"..={c.expert}", "--output_dir", c.tmp / "r"),
     "cannot name a file or folder"),
]


@pytest.mark.parametrize("build, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_ends_with_one_error_line(tiny, toy_model, tmp_path, build, expected):
    case = Case(tiny, tmp_path, toy_model)
    command = [a for a in build(case) if a is not None]
    before = snapshot(tmp_path)
    line = refusal(*command)
    assert line.startswith("error:") or ": error: " in line, line  # argparse: "prog: error: ..."
    assert expected in line, line
    after = snapshot(tmp_path)
    assert {k: after.get(k) for k in before} == before, "a file written before was changed or lost"


def test_as_a_subprocess_one_line_and_no_library_warnings(tiny, toy_model, tmp_path):
    """The real command line: a broken image after the model loaded and a progress bar ran, the exit
    status, and the error on a line of its own (`grep '^error:'` finds it), no library chatter."""
    case = Case(tiny, tmp_path, toy_model)
    case.truncate(case.data / "images" / "u_idx_0_0.png")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    result = subprocess.run([sys.executable, *map(str, case.train(*case.fresh))], cwd=ROOT, capture_output=True, text=True,
                            env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.split("\n") if line.startswith("error: ")] == [result.stderr.strip().split("\n")[-1]]
    assert "torchvision" not in result.stderr and "Warning" not in result.stderr, result.stderr[:2000]


def test_lora_json_is_only_a_note(tiny, toy_model, tmp_path):
    """Rank, alpha and targets come from the weights file: a lora.json that lies or is broken changes nothing."""
    case = Case(tiny, tmp_path, toy_model)
    code, _, err = run_in_process(*case.merge("--output_dir", tmp_path / "honest"))
    assert code == 0, err[-2000:]
    info = json.loads((case.expert / "lora.json").read_text())
    (case.expert / "lora.json").write_text(json.dumps({**info, "alpha": 400, "rank": 8, "targets": ["conv"]}))
    (case.other / "lora.json").write_text("{")
    code, _, err = run_in_process(*case.merge("--output_dir", tmp_path / "lied-to"))
    assert code == 0, err[-2000:]
    assert load_file(str(tmp_path / "honest" / LORA_FILE)).keys() == load_file(str(tmp_path / "lied-to" / LORA_FILE)).keys()
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(tmp_path / "honest" / LORA_FILE)).values(),
                                                 load_file(str(tmp_path / "lied-to" / LORA_FILE)).values()))


def test_the_same_model_under_another_path_is_the_same_model(tiny, toy_model, tmp_path):
    """The expert was trained on an absolute path; evaluated on a relative one, run from the repository."""
    case = Case(tiny, tmp_path, toy_model)
    for model in ("models/toy", "./models/toy"):
        code, _, err = run_in_process(*case.evaluate("--model", model, "--seeds_per_prompt", "1", "--sampling_steps", "1",
                                          "--output_dir", tmp_path / model.replace("/", "_")))
        assert code == 0, err[-2000:]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write to a read-only folder")
def test_a_read_only_output_folder_is_refused_before_any_work(tiny, toy_model, tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, _, err = run_in_process("04_evaluate.py", "--model", toy_model, "--output_dir", out)
    finally:
        out.chmod(0o755)
    assert code != 0 and "Permission denied" in err.strip().splitlines()[-1]
