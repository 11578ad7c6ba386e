"""Shared machinery: the CoProV2 pair CSV, checkpoints, flag checks (the loss itself: test_method.py)."""
import csv
import os

import pytest
import torch

from common import load_checkpoint, read_pairs, save_checkpoint, write_pairs


def write_official_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["prompt", "image", "category"])
        writer.writerows(rows)


def test_official_coprov2_layout_parses(tmp_path):
    path = tmp_path / "train.csv"  # rows out of order, as they may come
    write_official_csv(path, [
        ["a calm street", "s_idx_7_0.jpg", "Violence"], ["a burning street riot", "u_idx_7_0.jpg", "Violence"],
        ["a mutilated kitten", "u_idx_2_0.jpg", "Shocking"], ["a sleeping kitten", "s_idx_2_0.jpg", "Shocking"]])
    pairs = read_pairs(str(path))
    assert [(p["index"], p["categories"], p["unsafe_prompt"], p["safe_prompt"]) for p in pairs] == [
        (2, ["Shocking"], "a mutilated kitten", "a sleeping kitten"), (7, ["Violence"], "a burning street riot", "a calm street")]
    write_pairs(str(tmp_path / "again.csv"), pairs)
    assert read_pairs(str(tmp_path / "again.csv")) == pairs


@pytest.mark.parametrize("rows, header, message", [
    ([["x", "u_idx_1_0.jpg", "Hate"]], ["prompt", "image", "category"], "unpaired"),
    ([["x", "u_idx_1_0.jpg"]], ["prompt", "image"], "expected columns"),
    ([["x", "picture.jpg", "Hate"]], ["prompt", "image", "category"], "is not u_idx_N_K"),
])
def test_malformed_pair_csv_fails_with_one_line(tmp_path, capsys, rows, header, message):
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    with pytest.raises(SystemExit) as exit_info:
        read_pairs(str(path))
    assert message in str(exit_info.value) and "\n" not in str(exit_info.value)
    with pytest.raises(SystemExit, match="no pair file"):
        read_pairs(str(tmp_path / "missing.csv"))


def test_checkpoint_round_trip(tmp_path):
    weights = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(5))]
    optimizer = torch.optim.AdamW(weights, lr=0.1)
    sum(w.sum() for w in weights).backward()
    optimizer.step()
    save_checkpoint(str(tmp_path), {"lora": weights}, optimizer, step=17)
    fresh = [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(5))]
    fresh_optimizer = torch.optim.AdamW(fresh, lr=0.1)
    assert load_checkpoint(os.path.join(tmp_path, "state.safetensors"), {"lora": fresh}, fresh_optimizer) == 17
    assert all(torch.equal(a, b) for a, b in zip(weights, fresh))
    assert torch.equal(fresh_optimizer.state[fresh[0]]["exp_avg"], optimizer.state[weights[0]]["exp_avg"])


def test_checkpoint_keeps_the_fp16_loss_scale(tmp_path):
    weight = torch.nn.Parameter(torch.randn(2))
    optimizer = torch.optim.AdamW([weight])
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    save_checkpoint(str(tmp_path), {"lora": [weight]}, optimizer, step=3, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu")  # 65536, the default
    load_checkpoint(os.path.join(tmp_path, "state.safetensors"), {"lora": [weight]}, optimizer, fresh)
    assert fresh.get_scale() == 1024.0 and fresh.get_growth_interval() == 7


def test_a_pair_repeated_under_another_category_keeps_both_and_round_trips(tmp_path):
    """CoProV2's train CSV repeats 642 rows (same image, same prompt) under a second category."""
    path = tmp_path / "train.csv"
    write_official_csv(path, [
        ["a riot", "u_idx_1_0.jpg", "Violence"], ["a street", "s_idx_1_0.jpg", "Violence"],
        ["a riot", "u_idx_1_0.jpg", "Hate"], ["a street", "s_idx_1_0.jpg", "Hate"]])
    pairs = read_pairs(str(path))
    assert len(pairs) == 1 and pairs[0]["categories"] == ["Violence", "Hate"]
    write_pairs(str(tmp_path / "again.csv"), pairs)
    assert read_pairs(str(tmp_path / "again.csv")) == pairs
    write_official_csv(path, [
        ["a riot", "u_idx_1_0.jpg", "Violence"], ["a street", "s_idx_1_0.jpg", "Violence"],
        ["a fight", "u_idx_1_0.jpg", "Hate"]])  # the same image, another prompt: which is meant?
    with pytest.raises(SystemExit, match="two rows for u_idx_1_0 with different prompts"):
        read_pairs(str(path))


def test_number_flags_are_checked_when_parsed():
    import argparse
    from common import finite_float, fraction, nonnegative_int, positive_float, positive_int
    assert positive_int("3") == 3 and nonnegative_int("0") == 0 and positive_float("1e-5") == 1e-5
    assert finite_float("-2.5") == -2.5 and fraction("1") == 1.0
    for parse, text in [(positive_int, "0"), (positive_int, "1.5"), (nonnegative_int, "-1"), (positive_float, "nan"),
                        (positive_float, "0"), (finite_float, "inf"), (fraction, "1.1"), (fraction, "x")]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
