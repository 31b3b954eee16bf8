"""Sampling in DataLoader workers: the batches are bit-identical to in-process sampling, also from a resumed
iteration, and the loop overlaps sampling with the step (seconds per iteration ~ max, not sum)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from CPCLSegmentLib.data import make_case
from CPCLSegmentLib.loader import host_batches
from CPCLSegmentLib.trainer import TrainConfig, Trainer


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core machine two spinning OpenMP threads made a 4-iteration run of this size
    take 17 s instead of 1.4 s, and the whole-run comparison below (two runs) did not finish in the slow tier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _trainer(**overrides):
    rng = np.random.RandomState(0)
    img = rng.randn(24, 40, 40).astype(np.float32)
    lab = (img > 0.8).astype(np.int16) + (img > 1.6)
    settings = dict(iterations=6, patch_size=(16, 32, 32), width=2, depth=2, seed=3, device="cpu", intensity_prob=1.0)
    settings.update(overrides)
    unl = [make_case(f"u{i}", rng.randn(24, 40, 40).astype(np.float32)) for i in range(2)]
    return Trainer(TrainConfig(**settings), [make_case("a", img, lab), make_case("b", img[::-1].copy(), lab[::-1].copy())], unl, 3)


def _same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def test_worker_batches_are_bit_identical_to_in_process_sampling_also_after_a_resume():
    maker = _trainer().maker
    assert "paste_mask" in maker(0) and "teacher_view" in maker(0)  # the default recipe's whole batch
    for start in (0, 4):  # 4: a run resumed at iteration 4
        got = list(host_batches(maker, start, 7, workers=2))
        assert len(got) == 7 - start
        for it, batch in zip(range(start, 7), got):
            _same({k: v.numpy() for k, v in batch.items()}, maker(it))


@pytest.mark.slow
def test_a_run_with_workers_trains_exactly_as_one_without():
    seen = {0: [], 2: []}
    for workers in (0, 2):
        t = _trainer(sampling_workers=workers, iterations=4)
        step = t.step
        t.step = lambda inputs, it, _s=step, _w=workers: (seen[_w].append(inputs.labeled.clone()), _s(inputs, it))[1]
        t.run()
        seen[workers].append(t.student.state_dict())
    for a, b in zip(seen[0][:-1], seen[2][:-1]):
        assert torch.equal(a, b)
    assert all(torch.equal(v, seen[2][-1][k]) for k, v in seen[0][-1].items())


class _SlowMaker:
    """A sampler that takes 0.4 s per batch (picklable: it runs in the worker)."""

    def __call__(self, it):
        time.sleep(0.4)
        return {"labeled": np.full((1, 1, 2, 2, 2), it, np.float32)}


def test_sampling_overlaps_the_step():
    """With a fake 0.4 s step and 0.4 s sampling, one worker gives ~0.4 s per iteration, not their 0.8 s sum (nearer
    the max than the sum: a busy machine's scheduling and pickling add up to 0.2 s per iteration)."""
    n = 6
    for workers, bound in ((0, None), (1, 0.6)):
        batches = host_batches(_SlowMaker(), 0, n + 1, workers=workers)
        next(batches)  # worker start-up, as the run's first iteration
        t = time.perf_counter()
        for _ in range(n):
            batch = next(batches)
            time.sleep(0.4)  # the step
        per_it = (time.perf_counter() - t) / n
        batches.close()
        if bound is None:
            assert per_it >= 0.79  # in process: sampling + step
        else:
            assert per_it < bound, per_it
    assert float(np.asarray(batch["labeled"]).flat[0]) == n
