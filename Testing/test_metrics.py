"""Dice by counting: the numbers of MONAI's one-hot ``compute_dice``, without building one-hot volumes (validation
at CT size would need several GB per case for them)."""

from __future__ import annotations

import numpy as np
import torch

from CPCLSegmentLib import metrics


def _monai_dice(pred, target, k):
    """The reference: MONAI on one-hot volumes (unknown target voxels left out of both), as the engine computed it."""
    from monai.metrics import compute_dice

    known = target >= 0

    def onehot(a):
        t = torch.as_tensor(np.where(known, a, 0).astype(np.int64))
        return torch.nn.functional.one_hot(t, k).permute(3, 0, 1, 2)[None].float() * torch.as_tensor(known)[None, None]

    return [float(v) for v in compute_dice(onehot(pred), onehot(target), include_background=False, ignore_empty=True)[0]]


def test_dice_by_counting_matches_monai_and_builds_no_one_hot(monkeypatch):
    rng = np.random.RandomState(0)
    k = 14
    target = rng.randint(0, k - 2, size=(24, 40, 32)).astype(np.int16)  # classes 12 and 13 absent: NaN
    target[:3] = -1  # unknown voxels (sparse labels)
    pred = np.where(rng.rand(*target.shape) < 0.7, np.clip(target, 0, None), rng.randint(0, k, size=target.shape)).astype(np.uint8)
    pred[pred == 5] = 0  # class 5 predicted nowhere: Dice 0
    expected = _monai_dice(pred, target, k)

    def no_one_hot(*a, **kw):
        raise AssertionError("Dice must not build one-hot volumes")

    monkeypatch.setattr(torch.nn.functional, "one_hot", no_one_hot)
    monkeypatch.setattr(metrics, "_CHUNK", 1000)  # several chunks
    got = metrics.dice_per_class(pred, target, k)
    assert np.allclose(got, expected, equal_nan=True, atol=1e-6)
    assert got[4] == 0.0 and np.isnan(got[11]) and np.isnan(got[12])
    assert metrics.dice_per_class(target.clip(0), target.clip(0), k)[:11] == [1.0] * 11


def test_hd95_per_class_is_monais_per_class():
    from monai.metrics import compute_hausdorff_distance

    target = np.zeros((16, 16, 16), np.uint8)
    target[4:10, 4:10, 4:10] = 1
    target[11:14, 2:5, 2:5] = 2
    pred = np.roll(target, 2, axis=0)
    pred[pred == 2] = 0
    got = metrics.hd95_per_class(pred, target, 4, spacing=(2.0, 1.0, 1.0))
    p = torch.from_numpy(pred == 1)[None, None].float()
    t = torch.from_numpy(target == 1)[None, None].float()
    ref = float(compute_hausdorff_distance(p, t, include_background=True, percentile=95, spacing=[2.0, 1.0, 1.0]).flatten()[0])
    assert abs(got[0] - ref) < 1e-6
    assert got[1] == float(np.linalg.norm(np.array([16, 16, 16]) * np.array([2.0, 1.0, 1.0])))  # predicted nowhere
    assert np.isnan(got[2])  # absent from the target
