"""What a run's length can afford: the recipe for a time budget, and the warning for a short run.

The default semi-supervised recipe (CPCL with copy-paste) was measured below supervised-only when it trains for
fewer than ``SHORT_COPY_PASTE_RUN`` iterations (BENCHMARKS.md, short runs and equal time), and one of its steps
costs several supervised steps. So a budget given in minutes (the Slicer panel, ``--minutes``) that cannot pay
for that many semi-supervised iterations trains supervised-only for the same minutes instead, and says so: the
product never silently trains a recipe that loses to the simpler one in the time the user gave. A length given
in iterations is the user's explicit choice: it is kept, with a warning. A run that compares both recipes on
held-out cases (``--compare-supervised``) already keeps the better one and is left alone.

Torch-free (the Slicer process reads it).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional, Tuple

from .settings import SHORT_COPY_PASTE_RUN, TrainConfig


def needs_long_run(cfg: TrainConfig, has_unlabeled: bool, compare_supervised: bool) -> bool:
    """Whether ``cfg`` is a recipe that only pays off from ``SHORT_COPY_PASTE_RUN`` iterations on: semi-supervised
    with copy-paste, unlabeled cases given, and no held-out comparison to fall back on."""
    return has_unlabeled and cfg.uses_copy_paste() and not compare_supervised


def minutes_to_pay_off(minutes: float, planned_iterations: int) -> int:
    """The minutes that reach ``SHORT_COPY_PASTE_RUN`` iterations at the pace that plans ``planned_iterations``
    in ``minutes``."""
    return int(math.ceil(minutes * SHORT_COPY_PASTE_RUN / max(planned_iterations, 1)))


def recipe_for_minutes(
    cfg: TrainConfig, planned_iterations: int, supervised_iterations: Callable[[TrainConfig], int], has_unlabeled: bool,
    compare_supervised: bool,
) -> Tuple[TrainConfig, Optional[str]]:
    """The configuration to train for ``cfg.minutes`` and what to tell the user (None: nothing changed).

    ``planned_iterations``: the iterations of ``cfg``'s recipe that fit the minutes. Below ``SHORT_COPY_PASTE_RUN``
    (and ``needs_long_run``) the run becomes supervised-only for the same minutes, its iteration count planned by
    ``supervised_iterations(new_cfg)`` (a supervised step is cheaper, so the minutes buy more of them).
    """
    if cfg.minutes is None or planned_iterations >= SHORT_COPY_PASTE_RUN or not needs_long_run(cfg, has_unlabeled, compare_supervised):
        return replace(cfg, iterations=planned_iterations), None
    sup = replace(cfg, method="supervised", copy_paste=None)
    sup.iterations = supervised_iterations(sup)
    message = (
        f"{cfg.minutes:g} min plan only {planned_iterations} iterations of semi-supervised training, and below "
        f"{SHORT_COPY_PASTE_RUN} it scored under supervised-only on the benchmarks (BENCHMARKS.md): training "
        f"supervised-only for these minutes instead ({sup.iterations} iterations; the unlabeled volumes are not used). "
        f"Give about {minutes_to_pay_off(cfg.minutes, planned_iterations)} minutes or more to use them, or hold out a "
        "case to compare both (--validation CASES --compare-supervised; in Slicer: \"Hold out the last case\")"
    )
    return sup, message


def short_run_warning(cfg: TrainConfig, has_unlabeled: bool, compare_supervised: bool) -> Optional[str]:
    """The warning for a semi-supervised copy-paste run given fewer than ``SHORT_COPY_PASTE_RUN`` iterations
    explicitly (``--iterations``), or None. Minute budgets never reach it: ``recipe_for_minutes`` switches them."""
    if not needs_long_run(cfg, has_unlabeled, compare_supervised) or cfg.iterations >= SHORT_COPY_PASTE_RUN:
        return None
    return (f"{cfg.iterations} iterations is short for semi-supervised training with copy-paste: below {SHORT_COPY_PASTE_RUN} "
            f"it scored under supervised-only on the benchmarks (BENCHMARKS.md, short runs); train longer (--iterations "
            f"{SHORT_COPY_PASTE_RUN} or more), or compare on held-out cases (--validation CASES --compare-supervised; "
            "in Slicer: tick \"Hold out the last case\")")
