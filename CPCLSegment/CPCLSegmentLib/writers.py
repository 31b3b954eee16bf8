"""Writing files atomically: label maps, Slicer ``.seg.nrrd`` segmentations, images, and ``atomic_path``
for anything else (model files, run records, CSV).

Every output goes to a temporary file in the same folder first and replaces the target with ``os.replace``
only once complete, so a crash or a full disk leaves any previous file intact.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Dict, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from .errors import InputError, OutputError
from .io import IMAGE_EXTENSIONS, SEG_EXTENSION, default_color, first_line, has_extension, ijk_to_lps_matrix, is_seg_nrrd



@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path`` (same extension); on success it replaces ``path``.

    On any failure (including ENOSPC) the temporary file is removed and ``path`` is untouched.
    """
    from . import cleanup

    path = str(path)
    folder = os.path.dirname(os.path.abspath(path)) or "."
    base = os.path.basename(path)
    suffix = SEG_EXTENSION if base.lower().endswith(SEG_EXTENSION) else next(
        (e for e in IMAGE_EXTENSIONS + (".pt", ".json", ".csv") if base.lower().endswith(e)), ""
    )
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-" + base[: 40 - len(suffix)] + "-", suffix=suffix, dir=folder)
        os.close(fd)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}") from None
    cleanup.register(tmp)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e} (any previous {base} is unchanged)") from None
    except RuntimeError as e:  # torch.save / SimpleITK wrap write failures (e.g. a full disk) in RuntimeError
        raise OutputError(f"cannot write {path}: {first_line(e)} (any previous {base} is unchanged)") from None
    finally:
        if os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)
        cleanup.unregister(tmp)


def _fsync(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_label_image(path: str, labels: np.ndarray, reference: sitk.Image, label_values: Sequence[int]) -> None:
    """Writes class indices as a label map (NIfTI / NRRD / MHA) with ``label_values[c]`` for class c."""
    lut = np.asarray(label_values, dtype=np.int32)
    out = lut[labels.astype(np.int64)]
    dtype = np.uint8 if out.max(initial=0) < 256 else np.uint16
    img = sitk.GetImageFromArray(out.astype(dtype))
    img.CopyInformation(reference)
    with atomic_path(path) as tmp:
        sitk.WriteImage(img, tmp, useCompression=True)


# gzip level of written .seg.nrrd files; slicerio's default is 9. Level 6 is much faster for slightly larger
# files (bench/predict_speed.py measures both; BENCHMARKS.md, "Speed and memory").
SEG_NRRD_COMPRESSION = 6


def write_seg_nrrd(
    path: str, labels: np.ndarray, reference: sitk.Image, classes: Sequence[Dict[str, Any]],
    compression_level: int = SEG_NRRD_COMPRESSION,
) -> None:
    """Writes class indices as a Slicer ``.seg.nrrd``: one segment per class 1..K-1 (names, colours,
    terminology from ``classes``), each listed even when empty, on the reference image's grid, gzip level
    ``compression_level``."""
    import slicerio

    if labels.shape != tuple(reversed(reference.GetSize())):
        raise ValueError(f"label array {labels.shape} does not match the reference grid {tuple(reversed(reference.GetSize()))}")
    values = [int(c.get("label_value", i)) for i, c in enumerate(classes)]
    if len(set(values[1:])) != len(values) - 1 or 0 in values[1:] or max(values) > 255:
        values = list(range(len(classes)))
    lut = np.asarray(values, dtype=np.uint8)
    voxels = lut[labels.astype(np.int64)].transpose(2, 1, 0)
    segments = []
    for i, c in enumerate(classes[1:], start=1):
        mask_idx = np.nonzero(labels == i)
        if mask_idx[0].size:
            # labels are (k, j, i); extent is i-min i-max j-min j-max k-min k-max
            extent = [int(v) for axis in (2, 1, 0) for v in (mask_idx[axis].min(), mask_idx[axis].max())]
        else:
            extent = [0, -1, 0, -1, 0, -1]
        seg: Dict[str, Any] = {
            "id": str(c.get("segment_id") or f"Segment_{i}"),
            "name": str(c["name"]),
            "color": [float(v) for v in c.get("color", default_color(i))],
            "labelValue": int(values[i]),
            "layer": 0,
            "extent": extent,
            "status": "completed",
        }
        if c.get("terminology"):
            seg["terminology"] = c["terminology"]
        segments.append(seg)
    ids = [s["id"] for s in segments]
    if len(set(ids)) != len(ids):
        for i, s in enumerate(segments, start=1):
            s["id"] = f"Segment_{i}"
    seg_dict = {
        "voxels": np.ascontiguousarray(voxels),
        "ijkToLPS": ijk_to_lps_matrix(reference),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
    }
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(tmp, seg_dict, compression_level=compression_level)


def write_prediction(path: str, labels: np.ndarray, reference: sitk.Image, classes: Sequence[Dict[str, Any]]) -> None:
    """Writes a prediction by the extension of ``path``: ``.seg.nrrd`` or a label map with the model's values."""
    if is_seg_nrrd(path):
        write_seg_nrrd(path, labels, reference, classes)
    elif has_extension(path, IMAGE_EXTENSIONS):
        write_label_image(path, labels, reference, [int(c.get("label_value", i)) for i, c in enumerate(classes)])
    else:
        raise InputError(f"unknown output format for {path}: use .seg.nrrd, .nii.gz, .nii, .nrrd or .mha")


def write_image(path: str, image: sitk.Image) -> None:
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, tmp, useCompression=True)
