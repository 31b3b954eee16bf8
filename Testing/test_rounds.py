"""The label -> train loop's decisions (CPCLSegmentModuleLib/rounds.py; no Slicer needed)."""

from CPCLSegmentModuleLib import rounds


def test_a_round_records_the_held_out_dice_only_with_a_held_out_case():
    assert rounds.round_record({"validation_mean_dice": 0.81234}, "case 9", 4) == {"held_out": "case 9", "held_out_dice": 0.8123, "labeled": 4}
    assert rounds.round_record({"validation_mean_dice": None}, None, 3)["held_out_dice"] is None
    assert rounds.round_record({}, "case 9", 3)["held_out_dice"] is None


def test_the_dice_change_is_said_only_between_rounds_on_the_same_held_out_case():
    first = {"held_out": "case 9", "held_out_dice": 0.70, "labeled": 3}
    second = {"held_out": "case 9", "held_out_dice": 0.745, "labeled": 4}
    assert rounds.dice_change(None, first) == "held-out Dice (case 9): 0.700 (first round with this held-out case)"
    assert rounds.dice_change(first, second) == "held-out Dice (case 9): 0.745 (+0.045 since the last round, 3 → 4 labeled cases)"
    worse = dict(second, held_out_dice=0.69, labeled=3)
    assert "-0.010 since the last round)" in rounds.dice_change(first, worse)
    other = dict(second, held_out="case 4")
    assert "not comparable" in rounds.dice_change(first, other)
    assert rounds.dice_change(first, {"held_out": None, "held_out_dice": None, "labeled": 4}) is None


def test_an_added_case_goes_before_the_held_out_case():
    assert rounds.order_cases(["1", "2", "3"], "4", hold_out_last=True) == ["1", "2", "4", "3"]
    assert rounds.order_cases(["1", "2", "3"], "4", hold_out_last=False) == ["1", "2", "3", "4"]
    assert rounds.order_cases(["1"], "2", hold_out_last=True) == ["1", "2"]
