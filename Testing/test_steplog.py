"""The training loop reads a step's logged values one step late (``steplog``): the host never waits for the device
just to log, the logged numbers are the ones an immediate read gives, and validation, checkpoints and a non-finite
loss still see the iteration they belong to."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

import CPCLSegmentLib
from CPCLSegmentLib.data import make_case
from CPCLSegmentLib.errors import TrainingDiverged
from CPCLSegmentLib.trainer import TrainConfig, Trainer


def _trainer(events, **overrides):
    rng = np.random.RandomState(0)
    img = rng.randn(20, 32, 32).astype(np.float32)
    lab = (img > 0.8).astype(np.int16) + (img > 1.6)
    settings = dict(iterations=6, patch_size=(16, 16, 16), width=2, depth=2, seed=3, device="cpu")
    settings.update(overrides)
    cases = [make_case("a", img, lab), make_case("b", img[::-1].copy(), lab[::-1].copy())]
    validation = cases[:1] if settings.get("validation_every") else ()
    return Trainer(TrainConfig(**settings), cases, [make_case("u", rng.randn(20, 32, 32).astype(np.float32))], 3,
                   validation=validation, on_progress=events.append)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a loaded machine two spinning OpenMP threads make these small steps ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


HOST_ONLY = {"sigmoid_rampup"}  # engine functions that read tensors they made on the host (no device to wait for)


def _record_order(monkeypatch, trainer, log):
    """Logs ``forward`` when a step's loss terms start, ``read`` where the engine reads a tensor's value (what waits
    for the device on a GPU; torch's own host-side reads, e.g. AdamW's step counter, are not the engine's)."""
    terms = trainer.loss_terms
    trainer.loss_terms = lambda *a: (log.append("forward"), terms(*a))[1]
    engine = os.path.dirname(CPCLSegmentLib.__file__)

    def reading(real):
        def read(self):
            caller = sys._getframe(1)
            if os.path.dirname(caller.f_code.co_filename) == engine and caller.f_code.co_name not in HOST_ONLY:
                log.append("read")
            return real(self)
        return read

    for name in ("tolist", "item", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, reading(getattr(torch.Tensor, name)))


def test_step_n_is_logged_after_step_n_plus_1_is_dispatched_with_the_numbers_an_immediate_read_gives(monkeypatch):
    events, log = [], []
    trainer = _trainer(events)
    _record_order(monkeypatch, trainer, log)
    trainer._emit = lambda e: (events.append(e), log.append(e["iteration"]) if e["event"] == "progress" else None)
    trainer.run()
    monkeypatch.undo()
    forwards = [i for i, e in enumerate(log) if e == "forward"]
    progress = {e: i for i, e in enumerate(log) if isinstance(e, int)}
    assert len(forwards) == 6 and sorted(progress) == [1, 2, 3, 4, 5, 6]
    for n in range(1, 6):  # iteration n's values (step n - 1) are read once step n is on its way
        assert forwards[n] < progress[n], (n, log)
    assert log.count("read") == 6  # one read (synchronisation) per step: one between two steps, two at the end
    assert all(log[a:b].count("read") == 1 for a, b in zip(forwards[1:], forwards[2:])), log
    # the same numbers as reading each step's values at once
    ref = _trainer([])
    for it in range(6):
        values = ref.step(ref.sample(it), it)
        assert {k: round(v, 6) for k, v in values.items()} == {k: v for k, v in trainer.history[it].items() if k != "iteration"}
    assert [e["iteration"] for e in events if e["event"] == "progress"] == [1, 2, 3, 4, 5, 6]


def test_validation_sees_its_iteration_and_a_stopped_run_logs_every_step_it_took(monkeypatch):
    events, log = [], []
    trainer = _trainer(events, validation_every=3)
    _record_order(monkeypatch, trainer, log)
    validate = trainer.validate
    trainer.validate = lambda: (log.append(("validate", trainer.iteration)), validate())[1]
    trainer._emit = lambda e: (events.append(e), log.append(e["iteration"]) if e["event"] == "progress" else None)
    trainer.run()
    monkeypatch.undo()
    forwards = [i for i, e in enumerate(log) if e == "forward"]
    at = log.index(("validate", 3))
    assert log.index(3) < at < forwards[3]  # iteration 3 logged, then validated on its weights, before step 4
    stops = iter([False, False, False, True])
    stopped = _trainer(events)
    stopped.should_stop = lambda: next(stops)
    result = stopped.run()
    assert result.status == "stopped" and [h["iteration"] for h in stopped.history] == [1, 2, 3]


def test_a_non_finite_loss_still_names_its_iteration():
    events = []
    trainer = _trainer(events)
    sample = trainer.sample

    def bad_sample(it):
        inputs = sample(it)
        if it == 2:
            inputs.labeled = inputs.labeled * float("nan")
        return inputs

    trainer.sample = bad_sample
    with pytest.raises(TrainingDiverged, match="non-finite at iteration 3.*NaN or infinite values"):
        trainer.run()
    assert [h["iteration"] for h in trainer.history] == [1, 2]
