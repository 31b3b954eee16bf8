"""The supervised warm start (``TrainConfig.warm_start``): its first iterations are supervised-only steps (no
unlabeled patches sampled, L_s alone), the unlabeled terms then switch on with their ramp-up counted from there, and
``--minutes`` charges the warm-start iterations the supervised pace; and the learning-rate warm-up
(``TrainConfig.lr_warmup``) the trainer steps with."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from CPCLSegmentLib import pace
from CPCLSegmentLib.data import make_case
from CPCLSegmentLib.losses import learning_rate, sigmoid_rampup
from CPCLSegmentLib.settings import TrainConfig
from CPCLSegmentLib.trainer import Trainer


def _trainer(**kw):
    rng = np.random.RandomState(0)
    img = rng.randn(16, 32, 32).astype(np.float32)
    cases = [make_case("a", img, (img > 0.5).astype(np.int16))]
    unl = [make_case("u", rng.randn(16, 32, 32).astype(np.float32))]
    cfg = TrainConfig(patch_size=(16, 16, 16), width=4, depth=2, device="cpu", **kw)
    return Trainer(cfg, cases, unl, 2)


@pytest.mark.parametrize("warm_start, expected", [(0.0, 0), (0.5, 5), (0.25, 2), (3, 3), (50, 10)])
def test_warm_start_is_a_fraction_or_a_number_of_the_iterations(warm_start, expected):
    assert TrainConfig(iterations=10, warm_start=warm_start).warm_start_iterations() == expected
    assert TrainConfig(iterations=10, warm_start=warm_start, method="supervised").warm_start_iterations() == 0


def test_the_ramp_up_counts_from_the_end_of_the_warm_start():
    cfg = TrainConfig(iterations=1000, warm_start=0.5, rampup=0.4)
    assert cfg.rampup_iterations() == pytest.approx(200)  # 0.4 of the 500 semi-supervised iterations
    assert TrainConfig(iterations=1000, rampup=0.4).rampup_iterations() == pytest.approx(400)  # unchanged without


def test_warm_start_steps_are_supervised_only_then_the_unlabeled_terms_switch_on():
    t = _trainer(iterations=6, warm_start=3)
    for it in range(6):
        host = t.maker(it)
        assert ("unlabeled" in host) == (it >= 3)  # no unlabeled patch is sampled in the warm start
        values = t.step(t.to_device(host), it).read()
        if it < 3:
            assert values["ramp"] == 0.0 and "forward" not in values and "paste" not in values
            assert values["total"] == pytest.approx(values["supervised"])
        else:  # the ramp-up starts at the end of the warm start: r(t - W) over T = 0.4 × (6 - 3)
            assert {"forward", "backward", "paste"} <= set(values)
            assert values["ramp"] == pytest.approx(sigmoid_rampup(it - 3, 0.4 * 3))


def test_the_warm_start_trains_like_supervised_only_until_it_ends():
    """Same seed: after the warm start's iterations the student equals a supervised-only run's of that length."""
    warm, sup = _trainer(iterations=8, warm_start=4, seed=3), _trainer(iterations=8, method="supervised", seed=3)
    for it in range(4):
        warm.step(warm.sample(it), it).read()
        sup.step(sup.sample(it), it).read()
    a, b = warm.student.state_dict(), sup.student.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_trainer_steps_with_the_learning_rate_warm_up():
    t = _trainer(method="supervised", iterations=8, lr=0.01, lr_warmup=0.5)
    assert t.cfg.lr_warmup_iterations() == 4 and TrainConfig(iterations=8, lr_warmup=3).lr_warmup_iterations() == 3
    for it in range(8):
        values = t.step(t.sample(it), it).read()
        assert values["lr"] == pytest.approx(learning_rate(it, 8, 0.01, 0.9, 4))
        assert t.opt.param_groups[0]["lr"] == pytest.approx(values["lr"])
    assert [learning_rate(i, 8, 0.01, 0.9, 4) for i in range(3)] == pytest.approx([0.0025, 0.005 * 0.875 ** 0.9, 0.0075 * 0.75 ** 0.9])


def test_minutes_charge_the_warm_start_the_supervised_pace(monkeypatch):
    seconds = {"supervised": 1.0, "cpcl": 4.0}
    monkeypatch.setattr(pace, "step_seconds", lambda cfg, k, d: seconds[cfg.method])
    cpu = torch.device("cpu")
    # a fraction f of T: T (f 1 + (1 - f) 4) = 600
    assert pace.iterations_for_minutes(TrainConfig(minutes=10, warm_start=0.5), 2, cpu) == 240
    assert pace.iterations_for_minutes(TrainConfig(minutes=10), 2, cpu) == 150
    # a number W: W supervised iterations first, the rest at the semi-supervised pace; or all of it supervised
    assert pace.iterations_for_minutes(TrainConfig(minutes=10, warm_start=200), 2, cpu) == 300
    assert pace.iterations_for_minutes(TrainConfig(minutes=10, warm_start=1000), 2, cpu) == 600
    # the trainer's own W = floor(f T): 193 iterations at f = 0.3 would be 57 + 136 × 4 = 601 s (T (f + (1 - f) 4) = 600
    # gives 193.5); 192 are 57 + 135 × 4 = 597 s
    assert pace.iterations_for_minutes(TrainConfig(minutes=10, warm_start=0.3), 2, cpu) == 192
    assert pace.estimate_seconds(TrainConfig(iterations=193, warm_start=0.3), 2, cpu) == 601
    cfg = TrainConfig(iterations=240, warm_start=0.5)
    assert pace.estimate_seconds(cfg, 2, cpu) == 600  # 120 × 1 s + 120 × 4 s
