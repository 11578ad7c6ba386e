"""The shared shell: the pair CSV, the output-folder claim, the error wrapper, number flags (the loss
itself: test_method.py)."""
import csv
import json

import pytest

from common import Refused, claim_output, entry_point, output_path, positive, read_pairs


def write_official_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["prompt", "image", "category"], *rows])


def test_official_coprov2_layout_parses(tmp_path):
    path = tmp_path / "train.csv"  # rows out of order, as they may come
    write_official_csv(path, [
        ["a calm street", "s_idx_7_0.jpg", "Violence"], ["a burning street riot", "u_idx_7_0.jpg", "Violence"],
        ["a mutilated kitten", "u_idx_2_0.jpg", "Shocking"], ["a sleeping kitten", "s_idx_2_0.jpg", "Shocking"]])
    pairs = read_pairs(str(path))
    assert [(p["categories"], p["unsafe_prompt"], p["safe_prompt"], p["loser_image"]) for p in pairs] == [
        (["Shocking"], "a mutilated kitten", "a sleeping kitten", "u_idx_2_0.jpg"),
        (["Violence"], "a burning street riot", "a calm street", "u_idx_7_0.jpg")]


@pytest.mark.parametrize("rows, header, message", [
    ([["x", "u_idx_1_0.jpg", "Hate"]], ["prompt", "image", "category"], "without its safe row"),
    ([["x", "u_idx_1_0.jpg"]], ["prompt", "image"], "expected the columns"),
    ([["x", "picture.jpg", "Hate"]], ["prompt", "image", "category"], "is not u_idx_N_K"),
    ([["x", "../u_idx_1_0.jpg", "Hate"]], ["prompt", "image", "category"], "must be a file name inside"),
])
def test_malformed_pair_csv_is_refused_in_one_line(tmp_path, rows, header, message):
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    with pytest.raises(Refused, match=message):
        read_pairs(str(path))


def test_a_pair_repeated_under_another_category_keeps_both(tmp_path):
    """CoProV2's train CSV repeats 642 rows (same image, same prompt) under a second category."""
    path = tmp_path / "train.csv"
    write_official_csv(path, [
        ["a riot", "u_idx_1_0.jpg", "Violence"], ["a street", "s_idx_1_0.jpg", "Violence"],
        ["a riot", "u_idx_1_0.jpg", "Hate"], ["a street", "s_idx_1_0.jpg", "Hate"]])
    pairs = read_pairs(str(path))
    assert len(pairs) == 1 and pairs[0]["categories"] == ["Violence", "Hate"]
    write_official_csv(path, [
        ["a riot", "u_idx_1_0.jpg", "Violence"], ["a street", "s_idx_1_0.jpg", "Violence"],
        ["a fight", "u_idx_1_0.jpg", "Hate"]])  # the same image, another prompt: which is meant?
    with pytest.raises(Refused, match="two rows for u_idx_1_0 with different prompts"):
        read_pairs(str(path))


def test_the_output_claim_resumes_the_same_run_and_refuses_others(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "pairs.csv").write_text("a")
    out = tmp_path / "out"
    claim_output(str(out), {"beta": 500, "steps": 3}, {"pairs": str(data / "pairs.csv")}, free={"steps"})
    with pytest.raises(Refused, match="being written by another run"):  # the first claim still holds the lock
        claim_output(str(out), {"beta": 500, "steps": 3}, {"pairs": str(data / "pairs.csv")}, free={"steps"})
    from common import _LOCKS
    _LOCKS.pop().close()  # as if the first run had ended
    claim_output(str(out), {"beta": 500, "steps": 4}, {"pairs": str(data / "pairs.csv")}, free={"steps"})  # resumes
    _LOCKS.pop().close()
    with pytest.raises(Refused, match="beta 500 -> 1000"):
        claim_output(str(out), {"beta": 1000, "steps": 4}, {"pairs": str(data / "pairs.csv")}, free={"steps"})
    _LOCKS.pop().close()
    (data / "pairs.csv").write_text("b")  # the same name, other contents
    with pytest.raises(Refused, match="pairs changed"):
        claim_output(str(out), {"beta": 500, "steps": 4}, {"pairs": str(data / "pairs.csv")}, free={"steps"})
    _LOCKS.pop().close()
    for inside in (data, data / "sub"):  # never write into an input's folder
        with pytest.raises(Refused, match="would write into the input"):
            claim_output(str(inside), {}, {"data": str(data)})
    assert json.loads((out / "run.json").read_text())["settings"] == {"beta": 500}  # free settings are not recorded


def test_one_process_per_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's: every process would train and write the same folder
    with pytest.raises(Refused, match="torchrun is not supported"):
        claim_output(str(tmp_path / "out"), {}, {})
    assert not (tmp_path / "out").exists()


def test_names_from_data_are_checked_before_they_name_a_folder(tmp_path):
    assert output_path(str(tmp_path), "illegal-activity") == str(tmp_path / "illegal-activity")
    assert output_path(str(tmp_path), "co-merge+distill").endswith("co-merge+distill")
    for bad in ("../../escaped", "", ".", "..", "a/b", ".hidden"):
        with pytest.raises(Refused):
            output_path(str(tmp_path), bad)


def test_any_exception_ends_in_one_error_line(capsys, monkeypatch):
    @entry_point
    def main():
        raise OSError("[Errno 28] No space left on device\nmore detail")
    with pytest.raises(SystemExit) as end:
        main()
    assert end.value.code == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == "error: OSError: [Errno 28] No space left on device"
    monkeypatch.setenv("SAFETYDPO_DEBUG", "1")  # the traceback, for a developer
    with pytest.raises(OSError):
        main()


def test_number_flags_are_checked_when_parsed():
    assert positive(int)("3") == 3 and positive(int, zero=True)("0") == 0 and positive(float)("1e-5") == 1e-5
    for parse, text in [(positive(int), "0"), (positive(int), "1.5"), (positive(int, zero=True), "-1"),
                        (positive(float), "nan"), (positive(float), "0"), (positive(float), "inf"),
                        (positive(int, zero=True), "99999999999999999999")]:
        with pytest.raises(ValueError):
            parse(text)
