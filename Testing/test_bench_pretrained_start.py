"""The pretrained-start benchmark's tables (bench/pretrained_start.py): each pretrained run is compared with the
equal-time study's from-scratch run of the same recipe, minutes and seed, and the validation curves become Dice
against minutes."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def _rec(experiment, seed, test, val, curve, minutes=5, recipe="supervised_small"):
    return {"key": f"{experiment}|{recipe}@{minutes}|s{seed}", "experiment": experiment, "dataset": "hippocampus", "budget": 4, "minutes": minutes,
            "variant": recipe, "seed": seed, "config": {"iterations": 2400}, "validation_curve": curve,
            "test_last": {"mean_dice": test}, "validation_last": {"mean_dice": val}}


def test_classes_put_background_first():
    import pretrained_start as P

    assert [c["name"] for c in P._classes(["anterior", "posterior"])] == ["background", "anterior", "posterior"]
    assert [c["label_value"] for c in P._classes(["atrium"])] == [0, 1]


def test_pretrained_runs_are_compared_with_scratch_of_the_same_seed_and_minutes():
    import pretrained_start as P

    scratch = [_rec("equal_time", 0, 0.80, 0.79, [[480, 0.70], [2400, 0.79]]),
               _rec("equal_time", 1, 0.82, 0.80, [[480, 0.72], [2400, 0.80]]),
               _rec("equal_time", 0, 0.70, 0.70, [[480, 0.5]], minutes=10)]  # other minutes: never the reference
    pre = [_rec("pretrained_start", 0, 0.83, 0.80, [[480, 0.78], [2400, 0.80]]),
           _rec("pretrained_start", 1, 0.81, 0.82, [[480, 0.76], [2400, 0.82]])]
    text = P.tables(pre, scratch)
    row = next(line for line in text.splitlines() if line.startswith("| hippocampus | 4 | supervised_small | 5 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[4] == "0, 1" and cells[5] == "81.0 ± 1.4" and cells[6] == "82.0 ± 1.4"
    assert cells[7] == "+3.0, -1.0" and cells[8] == "+1.0, +2.0"
    first = next(line for line in text.splitlines() if line.startswith("| hippocampus | supervised_small | 1.0 |"))
    assert [c.strip() for c in first.split("|")[4:6]] == ["71.0 ± 1.4", "77.0 ± 1.4"]
