"""The claims study's bookkeeping (experiments/study.py): its tables from stage 4's results, no stage run."""
import argparse
import json
import math
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import study  # noqa: E402


def result(own, fidelity, ip=None, redirect=0.5):
    r = {"own_concept": own, "fidelity": fidelity, "redirect": redirect,
         "per_category": {c: {"ip": own, "own_concept": own} for c in study.CATEGORIES}}
    if ip is not None:
        r["ip"] = ip
    return r


def test_study_table_gives_mean_and_spread_over_seeds(tmp_path):
    by_seed = [{2: {"base": result(1.0, 0.9, 1.0), "all-data": result(0.4, 0.9, 0.5), "comerge": result(0.8, 0.9, 0.9),
                    "comerge+distill": result(0.2, 0.95, 0.3), "expert-Hate": result(0.5, 0.9, 0.6)}},
               {2: {"base": result(1.0, 0.9, 1.0), "all-data": result(0.4, 0.9, 0.5), "comerge": result(0.8, 0.9, 0.9),
                    "comerge+distill": result(0.4, 0.85, 0.5), "expert-Hate": result(0.5, 0.9, 0.6)}}]
    args = argparse.Namespace(main_scale=2, scales=[2], output_dir=str(tmp_path))
    table = study.write_outputs(args, by_seed, minutes=1.0)
    assert "| comerge+distill | 0.400 ± 0.100 | 0.300 ± 0.100 | 0.500 ± 0.000 | 0.900 ± 0.050 |" in table
    assert "| 14 | comerge+distill | 0.400 ± 0.100 | 0.300 ± 0.100 | 0.500 ± 0.000 | 0.900 ± 0.050 |" in table
    assert (tmp_path / "table.md").read_text().strip() == table.strip()
    assert (tmp_path / "variants.png").stat().st_size and (tmp_path / "scaling.png").stat().st_size


def test_study_reevaluates_when_a_cached_evaluation_lacks_a_variant(tmp_path):
    path = tmp_path / "results.json"
    assert not study.evaluated(str(path), {"comerge": "x"})
    path.write_text(json.dumps({"results": {"base": {}, "comerge": {}}}))
    assert study.evaluated(str(path), {"base": None, "comerge": "x"})
    assert not study.evaluated(str(path), {"comerge": "x", "comerge+distill": "y"})  # an older study's evaluation
    assert math.isnan(study.measure(result(0.5, 0.9), "ip"))  # results from before the column: NaN, not a crash


def test_study_main_scale_0_writes_the_scaling_rows_only(tmp_path):
    row = {"base": result(1.0, 0.9), "all-data": result(0.4, 0.9), "comerge": result(0.8, 0.9),
           "comerge+distill": result(0.2, 0.9)}
    args = argparse.Namespace(main_scale=0, scales=[1, 4], output_dir=str(tmp_path))
    table = study.write_outputs(args, [{1: row, 4: row}], minutes=1.0)
    assert "Every variant" not in table and not (tmp_path / "variants.png").exists()
    assert "| 28 | comerge+distill | nan ± nan | 0.200 ± 0.000 | 0.500 ± 0.000 | 0.900 ± 0.000 |" in table
