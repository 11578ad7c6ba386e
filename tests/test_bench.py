"""experiments/bench.py on the toy architecture with one step: every row measured, the table printable."""
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import bench  # noqa: E402


def test_bench_toy_measures_every_row(toy_model, capsys):
    args = bench.parse_args(["--arch", "toy", "--device", "cpu", "--steps", "1", "--warmup", "1",
                             "--batch_size", "2", "--gen_images", "2", "--gen_steps", "2"])
    rows = bench.run(args)
    names = [name for name, _ in rows]
    assert names == ["DPO step, reference = adapters off", "DPO step, reference = second UNet",
                     "generation, batch 2", "generation, one at a time"]
    for name, m in rows:
        assert m["rate"] > 0 and m["memory"] is None, name  # peak memory is measured on CUDA only
    for _, m in rows[:2]:
        assert m["tflops"] > 0 and m["gflop_per_pair"] > 0
    # both ways of computing the reference run the same UNet passes: same FLOPs
    assert rows[0][1]["gflop_per_pair"] == pytest.approx(rows[1][1]["gflop_per_pair"])
    text = bench.table(rows, peak_tflops=None)
    assert all(name in text for name in names) and "pairs/s" in text and "images/s" in text
    assert bench.dpo_loss.__module__ == "train_expert"  # stage 2's loss, not a copy
    with pytest.raises(SystemExit):
        bench.parse_args(["--steps", "0"])
    assert "argument --steps: invalid positive int value: '0'" in capsys.readouterr().err
