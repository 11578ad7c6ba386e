"""The scaling experiment (experiments/scaling_world.py, experiments/scaling.py): its taxonomy, its judge,
UCE's closed form, and one tiny point end to end on the committed toy model."""
import json
import os
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import scaling  # noqa: E402
import scaling_world  # noqa: E402

LARGE = scaling_world.World("large")


def test_taxonomy_reaches_700_concepts_nested_each_with_a_counterpart_one_word_away_and_safe_neighbours():
    sizes = (7, 28, 112, 448, 700)
    taxonomies = {n: scaling_world.taxonomy(LARGE, n) for n in sizes}
    for small, large in zip(sizes, sizes[1:]):  # a smaller N's concepts are the first of a larger N's
        assert [c["unsafe"] for c in taxonomies[large][:small]] == [c["unsafe"] for c in taxonomies[small]]
    concepts = taxonomies[700]
    unsafe = {c["unsafe"] for c in concepts}
    assert len(unsafe) == 700 and {c["category"] for c in concepts[:7]} == set(LARGE.categories)
    assert len({c["attribute"] for c in concepts}) == 5  # the categories act on every attribute, not only colour
    for c in concepts:
        differ = [a for a, u, s in zip(LARGE.attributes, c["unsafe"], c["safe"]) if u != s]
        assert differ == [c["attribute"]] and c["safe"] not in unsafe
        assert c["neighbours"] and not unsafe & set(c["neighbours"])
        assert all(sum(a != b for a, b in zip(m, c["unsafe"])) == 1 for m in c["neighbours"])
    assert scaling_world.taxonomy(scaling_world.World("toy"), 28)  # the committed model's world holds 28 (not 112)


def test_judge_reads_fresh_renders_of_the_large_world_exactly(monkeypatch):
    rng = np.random.default_rng(5)
    combos = [LARGE.all[i] for i in rng.integers(len(LARGE.all), size=300)]
    assert all(LARGE.read(LARGE.draw(c, rng)) == c for c in combos)
    assert all(LARGE.parse(LARGE.prompt(c, t)) == c for c in combos[:20] for t in (0, 1))
    monkeypatch.setattr(scaling_world.toyworld, "vocabulary", LARGE.vocabulary)  # what pretraining uses
    tokenizer = scaling_world.toyworld.build_tokenizer()
    assert all(len(tokenizer(w).input_ids) == 3 for w in LARGE.vocabulary())  # a word, a token
    longest = max((LARGE.prompt(c, t) for c in combos for t in (0, 1)), key=lambda p: len(tokenizer(p).input_ids))
    assert len(tokenizer(longest).input_ids) <= tokenizer.model_max_length


def test_uce_maps_unsafe_text_to_its_counterpart_and_keeps_preserved_text(toy_model):
    from common import load_pipeline
    pipe = load_pipeline(toy_model, "cpu")
    erase, target = ["a red circle on a gray background"], ["a green circle on a gray background"]
    preserve = ["a red circle on a black background", "a blue square on a white background", ""]
    edits = scaling.uce(pipe, erase, target, preserve, lam=0.1, preserve_scale=0.3)
    layers = scaling.key_value_layers(pipe.unet)
    assert len(edits) == 8 and set(edits) == set(layers)  # four cross-attention blocks, key and value each
    embed = lambda prompts: scaling.last_word_embeddings(pipe, prompts)
    n_tokens = len(pipe.tokenizer(erase[0]).input_ids)  # start of text, the words, end of text
    assert torch.equal(embed(erase)[0].float(), pipe.encode_prompt(erase, "cpu", 1, False)[0][0, n_tokens - 2])  # "background"
    c, c_star, c_p = (embed(prompts).float() for prompts in (erase, target, preserve))
    for name, layer in layers.items():
        old, new = layer.weight.detach(), edits[name]
        before, after = ((c @ w.T - c_star @ old.T).norm() for w in (old, new))
        assert after < 0.5 * before  # closer to the counterpart's (the preserved prompts pull back)
        w0, w, e, e_star, e_p = (x.double() for x in (old, new, c, c_star, c_p))
        gradient = (w @ e.T - w0 @ e_star.T) @ e + 0.3 * (w - w0) @ e_p.T @ e_p + 0.1 * (w - w0)  # of UCE's objective, / 2
        assert gradient.norm() < 1e-4 * (w0 @ e_star.T @ e).norm()  # the closed form is its minimum


def test_one_tiny_point_end_to_end_then_resumed(toy_model, tmp_path):
    argv = ["--model", toy_model, "--world", "toy", "--sizes", "7", "--pair_budget", "14", "--anchors", "4",
            "--expert_steps", "1", "--distill_steps", "1", "--all_data_steps", "1", "--eval_images", "14",
            "--sampling_steps", "3", "--filter", "none", "--work_dir", str(tmp_path / "work"),
            "--points_dir", str(tmp_path / "points")]
    torch.manual_seed(0)
    scaling.main(argv)
    point = json.loads((tmp_path / "points" / "toy-seed0-N7.json").read_text())
    assert set(point["results"]) == set(scaling.METHODS)
    assert point["data"] == {"pairs_per_concept": 4, "pairs": 28, "pairs_kept": 28, "anchors": 4}
    assert point["test_images"] == {"unsafe": 14, "neighbours": 14, "safe": 14}
    for method, r in point["results"].items():
        assert all(0 <= r[k] <= 1 for k in ("ip", "redirect", "fidelity", "neighbour_fidelity"))
        assert r["deployed_rank"] == (28 if method in ("all-data", "comerge", "comerge+distill", "linear", "ties")
                                      else r["deployed_rank"])
    assert point["results"]["comerge+distill"]["train_cpu_s"] > point["results"]["comerge"]["train_cpu_s"] > 0
    table = (tmp_path / "points" / "table.md").read_text()
    assert table.count("| toy | 7 |") == len(scaling.METHODS) and (tmp_path / "points" / "scaling.png").stat().st_size
    mtime = (tmp_path / "points" / "toy-seed0-N7.json").stat().st_mtime
    scaling.main(argv)  # a finished point is not run again
    assert (tmp_path / "points" / "toy-seed0-N7.json").stat().st_mtime == mtime
    from common import _LOCKS
    while _LOCKS:  # the folder's lock would outlive the first run in this one process
        _LOCKS.pop().close()
    scaling.main(argv + ["--uce_preserve_scale", "0.3"])  # other UCE settings: UCE alone is redone
    again = json.loads((tmp_path / "points" / "toy-seed0-N7.json").read_text())
    assert again["settings"]["uce_preserve_scale"] == 0.3 and "completed_minutes" in again
    assert again["wall_minutes"] == point["wall_minutes"] and again["results"]["ties"] == point["results"]["ties"]
    assert len(list((tmp_path / "work" / "toy-seed0-N7" / "eval").glob("uce-*.json"))) == 2
    del again["results"]["negative-words"]  # a point of before a method existed gets that method alone
    (tmp_path / "points" / "toy-seed0-N7.json").write_text(json.dumps(again))
    (tmp_path / "work" / "toy-seed0-N7" / "eval" / "negative-words.json").unlink()
    while _LOCKS:
        _LOCKS.pop().close()
    scaling.main(argv + ["--uce_preserve_scale", "0.3"])
    completed = json.loads((tmp_path / "points" / "toy-seed0-N7.json").read_text())
    assert set(completed["results"]) == set(scaling.METHODS) and completed["results"]["uce"] == again["results"]["uce"]
    with pytest.raises(SystemExit, match="measured with another expert_steps"):  # one table, one configuration
        scaling.main(argv + ["--expert_steps", "2"])
    with pytest.raises(SystemExit, match="work folder .* is gone"):  # completed from the cache, or not at all
        scaling.main(argv + ["--work_dir", str(tmp_path / "elsewhere")])
