"""Evaluation metrics: Dice and 95th-percentile Hausdorff distance per class (MONAI's implementations), and
the mean Dice per class over cases that validation, ``--compare-supervised`` and the demo report."""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .inference import predict_labels


def _onehot(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    return torch.nn.functional.one_hot(t.clamp_min(0), num_classes).permute(3, 0, 1, 2).unsqueeze(0).float()


def dice_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int) -> List[float]:
    """Dice of classes 1..K-1 between two ``(D, H, W)`` class-index arrays.

    NaN where the class is absent from the target (MONAI ``ignore_empty``): such a case says nothing about
    that class. Target voxels equal to -1 (unknown) are left out of both arrays.
    """
    from monai.metrics import compute_dice

    pred = np.asarray(pred)
    target = np.asarray(target)
    known = target >= 0
    p = _onehot(np.where(known, pred, 0), num_classes) * torch.as_tensor(known)[None, None]
    t = _onehot(np.where(known, target, 0), num_classes) * torch.as_tensor(known)[None, None]
    d = compute_dice(p, t, include_background=False, ignore_empty=True)
    return [float(v) for v in d[0]]


def hd95_per_class(pred: np.ndarray, target: np.ndarray, num_classes: int, spacing: Optional[Sequence[float]] = None) -> List[float]:
    """95% Hausdorff distance (mm when ``spacing`` (D, H, W order) is given) for classes 1..K-1.

    NaN where the class is absent from the target; the image diagonal where it is predicted nowhere.
    """
    from monai.metrics import compute_hausdorff_distance

    p = _onehot(pred, num_classes)
    t = _onehot(target, num_classes)
    sp = list(spacing) if spacing is not None else None
    out = []
    diag = float(np.linalg.norm(np.array(pred.shape) * (np.array(sp) if sp else 1.0)))
    for c in range(1, num_classes):
        if not t[0, c].any():
            out.append(float("nan"))
            continue
        if not p[0, c].any():
            out.append(diag)
            continue
        d = compute_hausdorff_distance(p[:, c : c + 1], t[:, c : c + 1], include_background=True, percentile=95, spacing=sp)
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


def mean_dice_over_cases(net: torch.nn.Module, cases: Sequence[Any], patch: Sequence[int], device: torch.device,
                         num_classes: int, overlap: float, amp: bool = True) -> Tuple[float, List[float]]:
    """``mean_dice`` of ``net``'s sliding-window prediction on preprocessed labeled cases (``data.Case``:
    ``image`` and ``label`` on the model grid), scored on the model grid."""
    per_case = []
    for case in cases:
        pred, _ = predict_labels(net, case.image, patch, device, overlap=overlap, amp=amp)
        per_case.append(dice_per_class(pred, np.asarray(case.label), num_classes))
    return mean_dice(per_case, num_classes)
