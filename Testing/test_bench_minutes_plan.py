"""The --minutes planning check's arithmetic (bench/minutes_plan.py): the plan against the training's wall time,
and the seconds per step of the warm start's supervised phase and of the semi-supervised phase."""

from __future__ import annotations

import json
import sys
import time

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def _log():
    """A stamped --progress json log: 2 s before training, 4 supervised steps of 0.5 s, then 2 of 2 s."""
    lines = ["0.5 not json: skipped",
             "1.000 " + json.dumps({"event": "warning", "message": "training these minutes supervised-only for the first 4"}),
             "1.500 " + json.dumps({"event": "summary", "method": "cpcl", "iterations": 6, "estimated_time_s": 5.0}),
             "2.000 " + json.dumps({"event": "start", "iterations": 6})]
    t = 2.0
    for it in range(1, 7):
        t += 0.5 if it <= 4 else 2.0
        loss = {"supervised": 0.1, "total": 0.1} if it <= 4 else {"supervised": 0.1, "forward": 0.2, "total": 0.3}
        lines.append(f"{t:.3f} " + json.dumps({"event": "progress", "iteration": it, "loss": loss}))
    lines.append(f"{t + 1:.3f} " + json.dumps({"event": "done", "iterations": 6}))
    return lines


def test_the_plan_is_compared_with_the_training_wall_time_per_phase():
    import minutes_plan as M

    events = M.stamped_events(_log())
    assert len(events) == 10  # the unstamped line is skipped
    r = M.summarize(events)
    assert r["method"] == "cpcl" and r["iterations"] == 6 and r["planned_s"] == 5.0
    assert r["trained_s"] == 6.0 and r["trained_over_planned"] == 1.2 and r["before_training_s"] == 2.0
    assert r["whole_run_s"] == 9.0
    assert r["seconds_per_step"] == {"supervised": 0.5, "semi_supervised": 2.0}
    assert r["steps_per_phase"] == {"supervised": 4, "semi_supervised": 2}
    assert r["recipe_message"].startswith("training these minutes")
    assert len(r["seconds_per_step_by_tenth"]) == 10


def test_the_command_is_the_users_cli_with_labeled_then_unlabeled(tmp_path):
    import minutes_plan as M

    cmd = M.command(tmp_path, ["a", "b", "c"], 2, 5, tmp_path / "out")
    assert cmd[1:4] == ["-m", "CPCLSegmentLib.cli", "train"]
    assert cmd.count("--labeled") == 2 and cmd[cmd.index("--unlabeled") + 1].endswith("c.nii.gz")
    assert cmd[cmd.index("--minutes") + 1] == "5" and "json" in cmd


def test_a_plan_only_record_reads_the_default_recipes_iterations_from_the_plan_fields():
    """``--plan-only``: the run's planned iterations and the default recipe's (before a switch to a warm start; its
    timed step: minutes · 60 / iterations) from the ``plan`` fields of the info event that ends planning."""
    import minutes_plan as M

    def info(minutes, iterations, requested, switched):
        plan = {"minutes": minutes, "method": "cpcl", "iterations": iterations, "warm_start_iterations": 0,
                "requested_iterations": requested, "switched": switched}
        return json.dumps({"event": "info", "message": f"training for about {minutes} min: {iterations} " + M.PLANNED, "plan": plan})

    switched = M.stamped_events(["3.0 " + json.dumps({"event": "warning", "message": "5 min plan only 600 iterations"}),
                                 "3.1 " + info(5, 900, 600, True)])
    r = M.plan_of(switched, 5)
    assert r["planned_iterations"] == 900 and r["default_recipe_iterations"] == 600 and r["switched"]
    assert r["default_step_s"] == 0.5 and r["planning_s"] == 3.1
    r = M.plan_of(M.stamped_events(["2.0 " + info(20, 2400, 2400, False)]), 20)
    assert r["default_recipe_iterations"] == 2400 and not r["switched"] and r["default_step_s"] == 0.5


def test_a_run_is_stopped_at_the_line_asked_for(tmp_path):
    import minutes_plan as M

    script = "import time\nprint('one', flush=True)\nprint('stop here', flush=True)\ntime.sleep(60)\nprint('never')"
    t = time.perf_counter()
    lines = M.run([sys.executable, "-c", script], 1, until="stop here")
    assert [line.split(" ", 1)[1] for line in lines] == ["one\n", "stop here\n"]
    assert time.perf_counter() - t < 30
