"""Evaluation metrics: Dice and 95th-percentile Hausdorff distance per class (MONAI's implementations), and
the mean Dice per class over cases that validation, ``--compare-supervised`` and the demo report."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .inference import predict_labels


_CHUNK = 1 << 22  # voxels counted at a time: memory stays a few tens of MB whatever the volume


def confusion_counts(pred: np.ndarray, target: np.ndarray, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 voxel counts ``[target class, predicted class]`` of two ``(D, H, W)`` class-index arrays,
    counted in chunks with ``np.bincount`` (no one-hot volumes). Target voxels < 0 (unknown) are left out."""
    pred = np.asarray(pred).reshape(-1)
    target = np.asarray(target).reshape(-1)
    if pred.shape != target.shape:
        raise ValueError(f"prediction and target differ in size ({pred.size} vs {target.size} voxels)")
    k = int(num_classes)
    counts = np.zeros(k * k, dtype=np.int64)
    for a in range(0, target.size, _CHUNK):
        t = target[a:a + _CHUNK].astype(np.int64)
        p = np.clip(pred[a:a + _CHUNK].astype(np.int64), 0, k - 1)
        known = (t >= 0) & (t < k)
        counts += np.bincount(t[known] * k + p[known], minlength=k * k)
    return counts.reshape(k, k)


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> List[float]:
    """Dice ``2·TP / (2·TP + FP + FN)`` of classes 1..K-1 between two ``(D, H, W)`` class-index arrays, from the
    voxel counts of ``confusion_counts`` (the numbers of MONAI's ``compute_dice`` without its one-hot volumes).

    NaN where the class is absent from the target (MONAI ``ignore_empty``): such a case says nothing about
    that class. Target voxels equal to -1 (unknown) are left out of both arrays.
    """
    cm = confusion_counts(pred, target, num_classes)
    out = []
    for c in range(1, num_classes):
        tp, in_target, in_pred = cm[c, c], cm[c, :].sum(), cm[:, c].sum()
        out.append(float("nan") if in_target == 0 else float(2.0 * tp / (in_target + in_pred)))
    return out


def hd95_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int, spacing: Optional[Sequence[float]] = None) -> List[float]:
    """95% Hausdorff distance (mm when ``spacing`` (D, H, W order) is given) for classes 1..K-1 (MONAI's), one
    class's masks at a time.

    NaN where the class is absent from the target; the image diagonal where it is predicted nowhere.
    """
    from monai.metrics import compute_hausdorff_distance

    pred, target = np.asarray(pred), np.asarray(target)
    sp = list(spacing) if spacing is not None else None
    out = []
    diag = float(np.linalg.norm(np.array(pred.shape) * (np.array(sp) if sp else 1.0)))
    for c in range(1, num_classes):
        t = target == c
        if not t.any():
            out.append(float("nan"))
            continue
        p = pred == c
        if not p.any():
            out.append(diag)
            continue
        d = compute_hausdorff_distance(torch.from_numpy(p)[None, None], torch.from_numpy(t)[None, None],
                                       include_background=True, percentile=95, spacing=sp)
        out.append(float(d.flatten()[0]))
    return out


def nanmean(values: Sequence[float]) -> float:
    arr = np.asarray([v for v in values if v == v], dtype=float)
    return float(arr.mean()) if arr.size else float("nan")


def mean_dice(per_case: Sequence[Sequence[float]], num_classes: int) -> Tuple[float, List[float]]:
    """``(mean over classes, [mean over cases of class 1..K-1])`` of per-case ``dice_per_class`` lists.

    Cases where a class is absent (NaN) are left out of that class's mean; a class absent everywhere is NaN
    and left out of the overall mean."""
    dice = [nanmean([d[k] for d in per_case]) for k in range(num_classes - 1)]
    return nanmean(dice), dice


def dice_sums(net: torch.nn.Module, cases: Sequence[Any], patch: Sequence[int], device: torch.device, num_classes: int,
              overlap: float, amp: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Per class 1..K-1: the sum of ``dice_per_class`` over ``cases`` (preprocessed ``data.Case``s, ``net``'s
    sliding-window prediction on the model grid) and the number of cases where the class is present. Sums over
    shards of the cases add up (distributed validation all-reduces them)."""
    sums, counts = np.zeros(num_classes - 1), np.zeros(num_classes - 1)
    for case in cases:
        pred, _ = predict_labels(net, case.image, patch, device, overlap=overlap, amp=amp)
        d = np.asarray(dice_per_class(pred, np.asarray(case.label), num_classes))
        present = d == d
        sums[present] += d[present]
        counts[present] += 1
    return sums, counts


def mean_from_sums(sums: np.ndarray, counts: np.ndarray) -> Tuple[float, List[float]]:
    """``mean_dice``'s ``(mean over classes, per-class means)`` from ``dice_sums``."""
    dice = [float(s / c) if c else float("nan") for s, c in zip(sums, counts)]
    return nanmean(dice), dice


def mean_dice_over_cases(net: torch.nn.Module, cases: Sequence[Any], patch: Sequence[int], device: torch.device,
                         num_classes: int, overlap: float, amp: bool = True) -> Tuple[float, List[float]]:
    """``mean_dice`` of ``net``'s sliding-window prediction on preprocessed labeled cases (``data.Case``:
    ``image`` and ``label`` on the model grid), scored on the model grid."""
    return mean_from_sums(*dice_sums(net, cases, patch, device, num_classes, overlap, amp))
