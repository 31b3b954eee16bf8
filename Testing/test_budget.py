"""The recipe a time budget can afford (``budget``): never a semi-supervised run too short to pay off."""

from __future__ import annotations

from CPCLSegmentLib.budget import (
    WARM_START_BELOW_LINE,
    WARM_START_MEASURED_FROM,
    minutes_for_warm_start,
    minutes_to_pay_off,
    recipe_for_minutes,
    short_run_warning,
)
from CPCLSegmentLib.settings import SHORT_COPY_PASTE_RUN, TrainConfig


def _planner(seen, warm=4000, sup=4321):
    """``iterations_for``: ``warm`` iterations for a warm-start recipe, ``sup`` for supervised-only."""
    def plan(cfg):
        seen.append(cfg)
        return sup if cfg.method == "supervised" else warm

    return plan


def test_a_budget_too_short_for_the_default_recipe_gets_a_supervised_warm_start_for_the_same_minutes():
    seen = []
    cfg = TrainConfig(minutes=10)
    new, message = recipe_for_minutes(cfg, 230, _planner(seen), has_unlabeled=True, compare_supervised=False)
    assert new.method == "cpcl" and new.uses_copy_paste() and new.warm_start == WARM_START_BELOW_LINE == 0.5
    assert new.iterations == 4000 and new.warm_start_iterations() == 2000 and new.minutes == 10
    assert [c.warm_start for c in seen] == [0.5]  # the warm start's paces plan its iterations
    assert cfg.method == "cpcl" and cfg.warm_start == 0  # the caller's config is not modified
    assert "230 iterations" in message and "supervised-only for the first 2000 iterations" in message
    assert "unlabeled volumes for 2000" in message
    assert f"about {minutes_to_pay_off(10, 230)} minutes" in message and minutes_to_pay_off(10, 230) == 66


def test_a_budget_too_short_even_for_the_warm_start_trains_supervised_only_for_the_same_minutes():
    seen = []
    new, message = recipe_for_minutes(TrainConfig(minutes=2), 50, _planner(seen, warm=WARM_START_MEASURED_FROM - 1),
                                      has_unlabeled=True, compare_supervised=False)
    assert new.method == "supervised" and not new.uses_copy_paste() and new.warm_start == 0
    assert new.iterations == 4321 and seen[-1].method == "supervised"  # the supervised pace plans the supervised run
    assert "supervised-only for these minutes instead (4321 iterations" in message and "Hold out the last case" in message
    # how many minutes would bring the unlabeled volumes in: the warm start's pace to its measured length, and the default's
    assert minutes_for_warm_start(2, WARM_START_MEASURED_FROM - 1) == 3 and minutes_for_warm_start(3, 440) == 5
    assert "about 3 minutes or more to use them (a supervised warm start" in message
    assert f"about {minutes_to_pay_off(2, 50)} to train the default recipe" in message and minutes_to_pay_off(2, 50) == 60


def test_a_warm_start_given_is_kept():
    new, message = recipe_for_minutes(TrainConfig(minutes=10, warm_start=0.25), 230, _planner([]), has_unlabeled=True,
                                      compare_supervised=False)
    assert message is None and new.warm_start == 0.25 and new.method == "cpcl" and new.iterations == 230


def test_a_budget_long_enough_keeps_the_recipe():
    cfg = TrainConfig(minutes=10)
    new, message = recipe_for_minutes(cfg, SHORT_COPY_PASTE_RUN, _planner([]), has_unlabeled=True, compare_supervised=False)
    assert message is None and new.method == "cpcl" and new.iterations == SHORT_COPY_PASTE_RUN


def test_no_switch_without_unlabeled_data_with_a_held_out_comparison_or_without_copy_paste():
    for kwargs, cfg in (
        (dict(has_unlabeled=False, compare_supervised=False), TrainConfig(minutes=5)),
        (dict(has_unlabeled=True, compare_supervised=True), TrainConfig(minutes=5)),
        (dict(has_unlabeled=True, compare_supervised=False), TrainConfig(minutes=5, copy_paste=False)),
        (dict(has_unlabeled=True, compare_supervised=False), TrainConfig(minutes=5, method="mean_teacher")),
    ):
        new, message = recipe_for_minutes(cfg, 100, _planner([]), **kwargs)
        assert message is None and new.method == cfg.method and new.iterations == 100


def test_iterations_given_explicitly_are_kept_with_a_warning():
    # the defaults never warn about themselves: the CLI's iteration count is the length measured safe
    assert TrainConfig().iterations >= SHORT_COPY_PASTE_RUN and short_run_warning(TrainConfig(), True, False) is None
    msg = short_run_warning(TrainConfig(iterations=300), True, False)
    assert msg.startswith("300 iterations is short") and "--compare-supervised" in msg and "Hold out the last case" in msg
    assert "train longer (--iterations 1500" in short_run_warning(TrainConfig(iterations=300), True, False)
    assert short_run_warning(TrainConfig(iterations=SHORT_COPY_PASTE_RUN), True, False) is None
    assert short_run_warning(TrainConfig(iterations=300), False, False) is None
    assert short_run_warning(TrainConfig(iterations=300), True, True) is None
    assert short_run_warning(TrainConfig(iterations=300, method="supervised"), True, False) is None
