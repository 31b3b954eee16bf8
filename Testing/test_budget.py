"""The recipe a time budget can afford (``budget``): never a semi-supervised run too short to pay off."""

from __future__ import annotations

from CPCLSegmentLib.budget import minutes_to_pay_off, recipe_for_minutes, short_run_warning
from CPCLSegmentLib.settings import SHORT_COPY_PASTE_RUN, TrainConfig


def _sup_iterations(seen):
    def plan(cfg):
        seen.append(cfg)
        return 4321

    return plan


def test_a_budget_too_short_for_the_default_recipe_trains_supervised_only_for_the_same_minutes():
    seen = []
    cfg = TrainConfig(minutes=10)
    new, message = recipe_for_minutes(cfg, 230, _sup_iterations(seen), has_unlabeled=True, compare_supervised=False)
    assert new.method == "supervised" and not new.uses_copy_paste()
    assert new.iterations == 4321 and new.minutes == 10
    assert seen and seen[0].method == "supervised"  # the supervised pace plans the supervised run
    assert cfg.method == "cpcl"  # the caller's config is not modified
    assert "230 iterations" in message and "supervised-only" in message
    assert f"about {minutes_to_pay_off(10, 230)} minutes" in message and minutes_to_pay_off(10, 230) == 66


def test_a_budget_long_enough_keeps_the_recipe():
    cfg = TrainConfig(minutes=10)
    new, message = recipe_for_minutes(cfg, SHORT_COPY_PASTE_RUN, _sup_iterations([]), has_unlabeled=True, compare_supervised=False)
    assert message is None and new.method == "cpcl" and new.iterations == SHORT_COPY_PASTE_RUN


def test_no_switch_without_unlabeled_data_with_a_held_out_comparison_or_without_copy_paste():
    for kwargs, cfg in (
        (dict(has_unlabeled=False, compare_supervised=False), TrainConfig(minutes=5)),
        (dict(has_unlabeled=True, compare_supervised=True), TrainConfig(minutes=5)),
        (dict(has_unlabeled=True, compare_supervised=False), TrainConfig(minutes=5, copy_paste=False)),
        (dict(has_unlabeled=True, compare_supervised=False), TrainConfig(minutes=5, method="mean_teacher")),
    ):
        new, message = recipe_for_minutes(cfg, 100, _sup_iterations([]), **kwargs)
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
