"""What a run's length can afford: the recipe for a time budget, and the warning for a short run.

The default semi-supervised recipe (CPCL with copy-paste) was measured below supervised-only when it trains for
fewer than ``SHORT_COPY_PASTE_RUN`` iterations (BENCHMARKS.md, short runs and equal time), and one of its steps
costs several supervised steps. So a budget given in minutes (the Slicer panel, ``--minutes``) that cannot pay
for that many semi-supervised iterations trains the same minutes with a **supervised warm start** instead: the
first half of its iterations supervised-only (cheap steps), then the unlabeled terms (``WARM_START_BELOW_LINE``),
which was measured at equal minutes at or above both supervised-only and the default recipe there
(docs/benchmarks/equal-time.md). Where even that plans fewer iterations than it was measured at
(``WARM_START_MEASURED_FROM``), the run is supervised-only. Either way it says so: the product never silently
trains a recipe that loses to the simpler one in the time the user gave. A length given in iterations is the
user's explicit choice: it is kept, with a warning. A run that compares both recipes on held-out cases
(``--compare-supervised``) already keeps the better one and is left alone.

Torch-free (the Slicer process reads it).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Optional, Tuple

from .settings import SHORT_COPY_PASTE_RUN, TrainConfig

# Below the line, the first half of the iterations supervised-only (TrainConfig.warm_start), then the unlabeled terms.
WARM_START_BELOW_LINE = 0.5
# Fewer iterations of the warm-start recipe train supervised-only: at equal minutes it was at or above supervised-only
# from 647 iterations on (left atrium, 10 min; hippocampus 5 and 10 min) and level at 323 (left atrium, 5 min: +0.9 test,
# -0.4 validation; docs/benchmarks/equal-time.md).
WARM_START_MEASURED_FROM = 600


def supervised_only(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` as supervised-only: no unlabeled terms, no copy-paste, no warm start (what the planner times and trains
    where the minutes cannot pay for more)."""
    return replace(cfg, method="supervised", copy_paste=None, warm_start=0.0)


def needs_long_run(cfg: TrainConfig, has_unlabeled: bool, compare_supervised: bool) -> bool:
    """Whether ``cfg`` is a recipe that only pays off from ``SHORT_COPY_PASTE_RUN`` iterations on: semi-supervised
    with copy-paste and no warm start given (a recipe measured on its own), unlabeled cases given, and no held-out
    comparison to fall back on."""
    return has_unlabeled and cfg.uses_copy_paste() and cfg.warm_start <= 0 and not compare_supervised


def minutes_to_pay_off(minutes: float, planned_iterations: int) -> int:
    """The minutes that reach ``SHORT_COPY_PASTE_RUN`` iterations at the pace that plans ``planned_iterations``
    in ``minutes``."""
    return int(math.ceil(minutes * SHORT_COPY_PASTE_RUN / max(planned_iterations, 1)))


def minutes_for_warm_start(minutes: float, warm_iterations: int) -> int:
    """The minutes that reach ``WARM_START_MEASURED_FROM`` iterations of the warm-start recipe at the pace that plans
    ``warm_iterations`` of it in ``minutes``."""
    return int(math.ceil(minutes * WARM_START_MEASURED_FROM / max(warm_iterations, 1)))


def recipe_for_minutes(
    cfg: TrainConfig, planned_iterations: int, iterations_for: Callable[[TrainConfig], int], has_unlabeled: bool,
    compare_supervised: bool,
) -> Tuple[TrainConfig, Optional[str]]:
    """The configuration to train for ``cfg.minutes`` and what to tell the user (None: nothing changed).

    ``planned_iterations``: the iterations of ``cfg``'s recipe that fit the minutes. Below ``SHORT_COPY_PASTE_RUN``
    (and ``needs_long_run``) the run gets a supervised warm start for the same minutes, or, where that would plan
    fewer than ``WARM_START_MEASURED_FROM`` iterations, becomes supervised-only; ``iterations_for(new_cfg)`` plans
    the new recipe's iterations (a supervised step is cheaper, so the minutes buy more of them).
    """
    if cfg.minutes is None or planned_iterations >= SHORT_COPY_PASTE_RUN or not needs_long_run(cfg, has_unlabeled, compare_supervised):
        return replace(cfg, iterations=planned_iterations), None
    short = (f"{cfg.minutes:g} min plan only {planned_iterations} iterations of semi-supervised training, and below "
             f"{SHORT_COPY_PASTE_RUN} it scored under supervised-only on the benchmarks (BENCHMARKS.md)")
    more = f"Give about {minutes_to_pay_off(cfg.minutes, planned_iterations)} minutes or more to train the default recipe"
    warm = replace(cfg, warm_start=WARM_START_BELOW_LINE)
    warm.iterations = iterations_for(warm)
    if warm.iterations >= WARM_START_MEASURED_FROM:
        return warm, (f"{short}: training these minutes supervised-only for the first {warm.warm_start_iterations()} "
                      f"iterations, then with the unlabeled volumes for {warm.iterations - warm.warm_start_iterations()} "
                      f"(a supervised warm start: at or above both on the benchmarks at equal minutes). {more}.")
    sup = supervised_only(cfg)
    sup.iterations = iterations_for(sup)
    message = (
        f"{short}: training supervised-only for these minutes instead ({sup.iterations} iterations; the unlabeled "
        f"volumes are not used). Give about {minutes_for_warm_start(cfg.minutes, warm.iterations)} minutes or more to "
        f"use them (a supervised warm start, then the unlabeled volumes), about {minutes_to_pay_off(cfg.minutes, planned_iterations)} "
        "to train the default recipe, or hold out a case to compare both (--validation CASES --compare-supervised; "
        "in Slicer: \"Hold out the last case\")"
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
