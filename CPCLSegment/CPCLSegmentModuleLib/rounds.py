"""The label -> train loop in rounds: rank, correct the pre-filled segmentation, add it as a labeled case,
train again, and see how the held-out case's Dice changed from the last round.

Qt-free and Slicer-free (plain values): what a round records with its model (``round_record``), how two
rounds compare (``dice_change``) and where a newly added case goes so that the held-out case stays the same
from round to round (``order_cases``)."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence


def round_record(done: Dict[str, Any], held_out: Optional[str], labeled: int) -> Dict[str, Any]:
    """What a training round keeps in its model's summary: the held-out case (its volume's name, or None when
    nothing was held out), the teacher's mean Dice on it (``done["validation_mean_dice"]`` of the CLI's done
    event; None without a held-out case) and how many labeled cases it trained on."""
    dice = done.get("validation_mean_dice") if held_out else None
    return {"held_out": held_out, "held_out_dice": None if dice is None else round(float(dice), 4), "labeled": int(labeled)}


def dice_change(previous: Optional[Dict[str, Any]], current: Dict[str, Any]) -> Optional[str]:
    """One line for the panel: the held-out Dice of this round and its change from the previous round, when
    both rounds scored the same held-out case; None when this round held nothing out."""
    dice = current.get("held_out_dice")
    if dice is None:
        return None
    text = f"held-out Dice ({current.get('held_out')}): {dice:.3f}"
    if not previous or previous.get("held_out_dice") is None:
        return text + " (first round with this held-out case)"
    if previous.get("held_out") != current.get("held_out"):
        return text + f" (the last round held out '{previous.get('held_out')}': not comparable)"
    delta = dice - float(previous["held_out_dice"])
    cases = f", {previous.get('labeled')} → {current.get('labeled')} labeled cases" if previous.get("labeled") != current.get("labeled") else ""
    return text + f" ({delta:+.3f} since the last round{cases})"


def order_cases(keys: Sequence[str], new_key: str, hold_out_last: bool) -> List[str]:
    """The case order after adding ``new_key``: at the end, or, when the last case is held out for validation,
    just before it, so that every round scores the same held-out case."""
    keys = [k for k in keys if k != new_key]
    if hold_out_last and len(keys) >= 2:
        return keys[:-1] + [new_key, keys[-1]]
    return keys + [new_key]
