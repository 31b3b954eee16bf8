"""The equal-time benchmark's arithmetic (bench/equal_time.py): minutes to iterations per recipe, and tables
that compare each recipe with supervised-only of the same plan on the same seeds."""

from __future__ import annotations

import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


def _record(recipe, seed, test, val, iterations, minutes=10):
    return {"key": f"{recipe}{seed}{minutes}", "experiment": "equal_time", "dataset": "hippocampus", "budget": 4, "minutes": minutes,
            "variant": recipe, "seed": seed, "config": {"iterations": iterations},
            "test_last": {"mean_dice": test}, "validation_last": {"mean_dice": val}}


def test_minutes_become_iterations_at_each_recipes_pace():
    import equal_time as E

    pace = {"default": {"seconds_per_iteration": 2.5}, "supervised": {"seconds_per_iteration": 0.5}}
    assert E.iterations_for(10, pace, "default") == 240 and E.iterations_for(10, pace, "supervised") == 1200
    assert E.iterations_for(0.001, pace, "default") == 1  # never zero
    # a supervised warm start of half the iterations: T (0.5 × 0.5 + 0.5 × 2.5) = 600
    small = {"default_small": {"seconds_per_iteration": 2.5}, "supervised_small": {"seconds_per_iteration": 0.5}}
    assert E.iterations_for(10, small, "warm_small") == 400
    # the fraction as a lever: a quarter, T (0.25 × 0.5 + 0.75 × 2.5) = 600 -> 300; three quarters, T · 1 = 600 -> 600
    assert E.iterations_for(10, small, "warm25_small") == 300 and E.iterations_for(10, small, "warm75_small") == 600
    # a learning-rate warm-up costs no time: the warm start's iterations, one setting more
    assert E.iterations_for(10, small, "warmlr_small") == 400
    assert E.iterations_for(10, small, "cpramp_small") == 240  # copy-paste ramped in: the default recipe's steps
    assert E.RECIPES["cpramp_small"] == dict(E.RECIPES["default_small"], copy_paste_ramp=True)
    assert {k: v for k, v in E.RECIPES["warmlr_small"].items() if k != "lr_warmup"} == E.RECIPES["warm_small"]
    assert set(E.STYLE) == set(E.RECIPES) == set(E.LABELS)
    # the levers run when named; the default grid is the study's recipes
    assert E.parse_args([]).recipes == E.DEFAULT_RECIPES and "warm75_small" not in E.DEFAULT_RECIPES
    assert E.parse_args(["--recipes", "warm75_small"]).recipes == ["warm75_small"]


def test_tables_compare_with_supervised_only_of_the_same_plan_per_seed():
    import equal_time as E

    recs = [_record("supervised", 0, 0.776, 0.764, 997), _record("supervised_small", 0, 0.815, 0.811, 4800),
            _record("default_small", 0, 0.849, 0.845, 1538), _record("supervised_small", 1, 0.80, 0.80, 4800),
            _record("default_small", 1, 0.83, 0.82, 1538)]
    table = E.tables(recs, None)
    row = next(line for line in table.splitlines() if line.startswith("| 10 | default recipe (CPU plan"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[2] == "1538" and cells[3] == "0,1"
    assert cells[6] == "+3.4, +3.0"  # test vs supervised_small, per seed
    assert cells[7] == "+3.4, +2.0"  # validation
    assert cells[8] == "+7.3"  # vs the width-16 supervised run, on the seed it has


def test_the_plot_has_one_panel_per_setting_and_every_budget_of_the_grid_on_its_axis(tmp_path, monkeypatch):
    import equal_time as E
    import matplotlib.figure

    seen = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: seen.update(fig=fig, path=path))
    records = [_record(r, s, 0.8, 0.8, 100, minutes=m) for r in ("supervised_small", "warm_small") for s in (0, 1) for m in (5, 10)]
    assert E.plot(records, tmp_path / "p.png") and seen["path"] == tmp_path / "p.png"
    (ax,) = seen["fig"].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["5", "10", "20", "40"]  # budgets not run show as gaps
    colours = {c.get_label(): c.lines[0].get_color() for c in ax.containers}  # one colour per recipe, as in STYLE
    assert colours == {E.LABELS[r]: E.STYLE[r]["color"] for r in ("supervised_small", "warm_small")}
    assert len(seen["fig"].legends) == 1 and E.plot([], tmp_path / "none.png") is False


def test_the_all_labeled_bound_is_a_line_in_its_data_set_s_panels_not_a_panel(tmp_path, monkeypatch):
    import equal_time as E
    import matplotlib.figure

    seen = {}
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: seen.update(fig=fig))
    la = [dict(_record(r, s, 0.85, 0.85, 100), dataset="la", budget=8, key=f"la{r}{s}") for r in ("supervised_small", "warm_small")
          for s in (0, 1)]
    bound = [dict(_record("supervised_small", 0, 0.915, 0.91, 100), dataset="la", budget=E.BOUND_LABELED["la"], key="bound")]
    assert E.plot(la + bound, tmp_path / "p.png")
    (ax,) = seen["fig"].axes  # one panel: the 8-labeled one
    assert "8 labeled" in ax.get_title()
    assert [line.get_ydata()[0] for line in ax.lines if line.get_linestyle() == ":"] == [91.5]
    assert E.BOUND_LABEL.format(minutes=10) in [t.get_text() for t in seen["fig"].legends[0].get_texts()]
