"""Intensity normalisation: the schemes a model file can name, planned and applied identically at training and
prediction time.

- ``"ct"``: clip to the labeled foreground's [0.5, 99.5] percentiles, then z-score with the foreground mean / std
  (nnU-Net's CT scheme; statistics fixed at planning time, stored in the model file);
- ``"zscore"``: each volume with its own mean / std (MR and other modalities); with ``nonzero`` over the non-zero
  voxels only, zeros staying zero (MONAI's ``NormalizeIntensity(nonzero=True)``), optionally followed by
  ``tanh`` · tanh(x / ``tanh``) (Auto3DSeg's ``meanstdtanh``);
- ``"range"``: MONAI's ``ScaleIntensityRange`` ([low, high] → [out_low, out_high], optionally clipped), optionally
  followed by a sigmoid (Auto3DSeg's CT mode);
- ``"pet"``: sigmoid((x − min) / std) (Auto3DSeg's PET mode);
- ``"none"``.

The last three come with a starting model from another tool (``pretrained``).
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import numpy as np

from .errors import InputError


def looks_like_ct(array: np.ndarray) -> bool:
    """CT in Hounsfield units has air near -1000; MR intensities are non-negative."""
    return float(np.percentile(array, 0.5)) <= -500.0


def foreground_intensity_sample(image: np.ndarray, labels: np.ndarray, rng: np.random.RandomState, n: int = 10000) -> np.ndarray:
    vals = image[labels > 0]
    if vals.size > n:
        vals = vals[rng.choice(vals.size, n, replace=False)]
    return vals.astype(np.float32)


def plan_normalization(modality: str, foreground_samples: Sequence[np.ndarray]) -> Dict[str, Any]:
    """Normalisation parameters stored in the model file. ``modality`` is "ct", "mr" or "other"."""
    if modality == "ct":
        vals = np.concatenate([v for v in foreground_samples if v.size]) if foreground_samples else np.zeros(0)
        if vals.size < 10:
            raise InputError("CT normalisation needs labeled foreground voxels; none were found")
        lo, hi = np.percentile(vals, [0.5, 99.5])
        clipped = np.clip(vals, lo, hi)
        return {"scheme": "ct", "clip": [float(lo), float(hi)], "mean": float(clipped.mean()), "std": float(max(clipped.std(), 1e-3))}
    return {"scheme": "zscore"}


def normalize(array: np.ndarray, norm: Dict[str, Any]) -> np.ndarray:
    """Applies a normalisation dict (see ``plan_normalization``); returns float32."""
    a = array.astype(np.float32, copy=True)
    scheme = norm.get("scheme", "zscore")
    if scheme == "ct":
        lo, hi = norm["clip"]
        np.clip(a, lo, hi, out=a)
        a -= norm["mean"]
        a /= norm["std"]
    elif scheme == "zscore":
        _zscore(a, bool(norm.get("nonzero")))
        if norm.get("tanh"):
            t = float(norm["tanh"])
            np.tanh(a / t, out=a)
            a *= t
    elif scheme == "range":  # MONAI's ScaleIntensityRange (+ Auto3DSeg's sigmoid for CT)
        a -= norm["low"]
        a *= (norm["out_high"] - norm["out_low"]) / (norm["high"] - norm["low"])
        a += norm["out_low"]
        if norm.get("clip"):
            np.clip(a, min(norm["out_low"], norm["out_high"]), max(norm["out_low"], norm["out_high"]), out=a)
        if norm.get("sigmoid"):
            _sigmoid(a)
    elif scheme == "pet":  # Auto3DSeg's PET mode: sigmoid((x - min) / std)
        a -= a.min()
        a /= max(float(a.std()), 1e-6)
        _sigmoid(a)
    elif scheme != "none":
        raise InputError(f"unknown normalisation scheme {scheme!r}")
    return a


def _sigmoid(a: np.ndarray) -> None:
    """In place, without overflow: 1 / (1 + exp(-x)) = (1 + tanh(x / 2)) / 2."""
    a *= 0.5
    np.tanh(a, out=a)
    a += 1.0
    a *= 0.5


def _zscore(a: np.ndarray, nonzero: bool) -> None:
    """In place: (x - mean) / std over all voxels, or (MONAI's ``NormalizeIntensity(nonzero=True)``) over the
    non-zero voxels only, zeros staying zero."""
    if nonzero:
        mask = a != 0
        if mask.any():
            v = a[mask]
            s = float(v.std())
            a[mask] = (v - float(v.mean())) / (s if s > 0 else 1.0)
        return
    m, s = float(a.mean()), float(a.std())
    a -= m
    a /= max(s, 1e-6)
