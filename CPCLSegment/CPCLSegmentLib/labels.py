"""A segmentation onto its image's grid: the class-index label array of the wanted segments.

A segmentation on another grid than its image (Slicer allows it) is resampled onto the image grid with
nearest-neighbour interpolation; no physical overlap at all is an error naming both files. Selected segments
that overlap are an error naming them.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .io import Segmentation, SegmentInfo, ijk_to_lps_matrix


def physical_bounds(image: sitk.Image) -> Tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS bounding box of the image's voxel *cells* (half a voxel beyond the centres)."""
    size = np.array(image.GetSize(), dtype=float)
    corners = np.array([[x, y, z] for x in (-0.5, size[0] - 0.5) for y in (-0.5, size[1] - 0.5) for z in (-0.5, size[2] - 0.5)])
    m = ijk_to_lps_matrix(image)
    pts = corners @ m[:3, :3].T + m[:3, 3]
    return pts.min(axis=0), pts.max(axis=0)


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-4) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol, rtol=tol)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tol * 10, rtol=0)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol)
    )


def geometry_difference(a: sitk.Image, b: sitk.Image) -> str:
    """How the grids of ``a`` and ``b`` differ, in words ("" when they are the same grid)."""
    parts = []
    if a.GetSize() != b.GetSize():
        parts.append(f"size {list(a.GetSize())} vs {list(b.GetSize())} voxels")
    if not np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-4, atol=1e-4):
        parts.append(f"spacing {[round(v, 4) for v in a.GetSpacing()]} vs {[round(v, 4) for v in b.GetSpacing()]} mm")
    shift = float(np.linalg.norm(np.subtract(a.GetOrigin(), b.GetOrigin())))
    if shift > 1e-3:
        parts.append(f"origin {[round(v, 2) for v in a.GetOrigin()]} vs {[round(v, 2) for v in b.GetOrigin()]} mm ({shift:.1f} mm apart)")
    if not np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4):
        parts.append("a different orientation (direction matrix)")
    return "; ".join(parts)


def resample_label_to(label: sitk.Image, reference: sitk.Image, label_name: str, reference_name: str) -> np.ndarray:
    """The label image on the reference grid (nearest neighbour), as an int16 ``(D, H, W)`` array.

    Raises InputError naming both when their physical extents do not overlap at all.
    """
    if same_grid(label, reference):
        return sitk.GetArrayFromImage(label).astype(np.int16)
    lo1, hi1 = physical_bounds(label)
    lo2, hi2 = physical_bounds(reference)
    if (np.minimum(hi1, hi2) <= np.maximum(lo1, lo2)).any():
        raise InputError(
            f"segmentation {label_name} and image {reference_name} do not overlap in space "
            f"(segmentation spans {np.round(lo1, 1).tolist()}..{np.round(hi1, 1).tolist()} mm, "
            f"image {np.round(lo2, 1).tolist()}..{np.round(hi2, 1).tolist()} mm, LPS); "
            "are they from the same patient and scan?"
        )
    out = sitk.Resample(label, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkInt16)
    return sitk.GetArrayFromImage(out)


# ------------------------------------------------------------------------------------- label building


def build_label_array(
    segmentation: Segmentation,
    wanted: Sequence[Any],
    image: sitk.Image,
    image_name: str,
) -> Tuple[np.ndarray, List[int]]:
    """Class-index label array on the image grid for the wanted segments.

    Args:
        segmentation: as read by ``read_segmentation``.
        wanted: for each class 1..K-1, the key that identifies it: a segment **name** (``.seg.nrrd``) or
            a **label value** (label maps).
        image: the image whose grid the labels must be on.
    Returns:
        ``(labels, missing)``: int16 ``(D, H, W)`` with 0 = background and c = ``wanted[c-1]``; ``missing``
        lists the class indices (1-based) whose segment is absent or empty in this segmentation.
    Raises:
        InputError when selected segments overlap (naming them).
    """
    shape = tuple(reversed(image.GetSize()))
    labels = np.zeros(shape, dtype=np.int16)
    owner = np.zeros(shape, dtype=np.int16)
    missing = []
    segmentation.outside = {}
    for c, key in enumerate(wanted, start=1):
        seg = find_segment(segmentation, key)
        if seg is None:
            missing.append(c)
            continue
        layer = segmentation._arrays.get(seg.layer)
        if layer is None:
            layer = resample_label_to(segmentation.layers[seg.layer], image, segmentation.path, image_name)
            segmentation._arrays[seg.layer] = layer
        mask = layer == seg.label_value
        if not mask.any():
            missing.append(c)
            in_file = int((sitk.GetArrayViewFromImage(segmentation.layers[seg.layer]) == seg.label_value).sum())
            if in_file:
                segmentation.outside[key] = in_file
            continue
        clash = mask & (owner > 0)
        if clash.any():
            other = wanted[int(np.bincount(owner[clash]).argmax()) - 1]
            raise InputError(
                f"segments {other!r} and {key!r} overlap in {segmentation.path} ({int(clash.sum())} voxels); "
                "a voxel can belong to one selected segment only: select non-overlapping segments"
            )
        labels[mask] = c
        owner[mask] = c
    segmentation._arrays.clear()
    return labels, missing


def find_segment(segmentation: Segmentation, key: Any) -> Optional[SegmentInfo]:
    if segmentation.from_labelmap:
        for s in segmentation.segments:
            if (isinstance(key, int) and s.label_value == key) or s.name == str(key):
                return s
        return None
    for s in segmentation.segments:
        if s.name == str(key):
            return s
    lowered = [s for s in segmentation.segments if s.name.lower() == str(key).lower()]
    return lowered[0] if len(lowered) == 1 else None
