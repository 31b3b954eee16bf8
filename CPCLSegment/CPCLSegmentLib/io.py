"""Reading images and segmentations; putting a segmentation onto its image's grid (writing: ``writers``).

- Images: SimpleITK (NIfTI, NRRD, MHA/MHD, DICOM series folders). Always 3-D scalar; vector / RGB / 4-D
  images are refused with a message naming the file.
- Segmentations: ``.seg.nrrd`` through slicerio (segment names, colours, terminology, label values,
  overlapping layers), or label maps (NIfTI / NRRD / MHA) whose non-zero values are the segments.
- A segmentation on another grid than its image (Slicer allows it) is resampled onto the image grid with
  nearest-neighbour interpolation; no physical overlap at all is an error naming both files.

Array convention everywhere in the engine: numpy ``(k, j, i)`` = ``(D, H, W)``, as returned by
``sitk.GetArrayFromImage`` and ``slicer.util.arrayFromVolume``. slicerio's voxels are ``(i, j, k)`` and are
transposed on the way in and out. Physical space is LPS (ITK, slicerio, DICOM).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from .errors import InputError

IMAGE_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SEG_EXTENSION = ".seg.nrrd"

# Colours for segments that come without one (label maps): Slicer's GenericAnatomyColors first entries.
_PALETTE = [
    (0.502, 0.682, 0.502), (0.945, 0.839, 0.569), (0.694, 0.478, 0.396), (0.435, 0.722, 0.824),
    (0.847, 0.396, 0.310), (0.867, 0.510, 0.396), (0.565, 0.933, 0.565), (0.753, 0.408, 0.345),
    (0.863, 0.961, 0.078), (0.306, 0.247, 0.000), (1.000, 0.980, 0.863), (0.902, 0.863, 0.275),
    (0.784, 0.784, 0.922), (0.980, 0.980, 0.824), (0.957, 0.839, 0.443), (0.000, 0.592, 0.808),
]


def default_color(index: int) -> List[float]:
    return [float(c) for c in _PALETTE[(index - 1) % len(_PALETTE)]]


def has_extension(path: str, exts: Sequence[str]) -> bool:
    low = str(path).lower()
    return any(low.endswith(e) for e in exts)


def is_seg_nrrd(path: str) -> bool:
    return str(path).lower().endswith(SEG_EXTENSION)


# ----------------------------------------------------------------------------------------------- images


def check_exists(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{what} not found: {path}")


def read_image(path: str) -> sitk.Image:
    """Reads a 3-D scalar image (file or DICOM series folder) as float32, keeping its geometry."""
    path = str(path)
    check_exists(path, "image")
    try:
        if os.path.isdir(path):
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(path)
            if not series:
                raise InputError(f"no DICOM series found in folder {path}")
            if len(series) > 1:
                raise InputError(f"folder {path} holds {len(series)} DICOM series; give one series per folder")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(path, series[0]))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(path)
    except InputError:
        raise
    except Exception as e:  # SimpleITK raises RuntimeError with ITK's text
        raise InputError(f"cannot read image {path}: {first_line(e)}") from None
    return as_scalar_3d(image, path)


def as_scalar_3d(image: sitk.Image, name: str) -> sitk.Image:
    """Checks an image is 3-D and scalar, and converts it to float32 (with a clear error otherwise)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{name} has {image.GetNumberOfComponentsPerPixel()} components per voxel (RGB / vector image); "
            "CPCLSegment needs a scalar (grayscale) volume: convert it first, e.g. to luminance"
        )
    if image.GetDimension() == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise InputError(f"{name} is 4-D ({size[3]} frames); give one 3-D frame")
        image = image[:, :, :, 0]
    if image.GetDimension() == 2:
        raise InputError(f"{name} is 2-D; CPCLSegment segments 3-D volumes")
    if image.GetDimension() != 3:
        raise InputError(f"{name} has {image.GetDimension()} dimensions; expected 3")
    if min(image.GetSize()) < 1:
        raise InputError(f"{name} is empty (size {image.GetSize()})")
    # float32 holds every integer type up to 2^24 exactly and larger ones (int32 / uint32 / int64 CT
    # exports) to 7 significant digits, which is far below any imaging noise: the documented conversion.
    try:
        image = sitk.Cast(image, sitk.sitkFloat32)
    except RuntimeError:
        raise InputError(f"{name} has voxel type {image.GetPixelIDTypeAsString()}, which cannot be converted to a scalar volume") from None
    arr = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite voxel values")
    return image


def first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    for line in text:
        if "ERROR" in line or "Exception" in line or "error" in line:
            return line.strip()[:300]
    return (text[-1] if text else type(e).__name__)[:300]


# -------------------------------------------------------------------------------------------- segments


@dataclass
class SegmentInfo:
    """One segment of a segmentation file (or one value of a label map)."""

    name: str
    label_value: int
    color: List[float]
    layer: int = 0
    terminology: Optional[Dict[str, Any]] = None
    segment_id: str = ""


@dataclass
class Segmentation:
    """A segmentation as read from a file: one label image per layer plus the segment list."""

    path: str
    segments: List[SegmentInfo]
    layers: List[sitk.Image]
    from_labelmap: bool
    _arrays: Dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def names(self) -> List[str]:
        return [s.name for s in self.segments]


def read_segmentation(path: str, segment_names: Optional[Dict[int, str]] = None) -> Segmentation:
    """Reads a ``.seg.nrrd`` (slicerio) or a label map (SimpleITK).

    Label maps name their segments "Label N" unless ``segment_names`` maps values to names.
    """
    path = str(path)
    check_exists(path, "segmentation")
    if is_seg_nrrd(path):
        return _read_seg_nrrd(path)
    try:
        image = sitk.ReadImage(path)
    except Exception as e:
        raise InputError(f"cannot read segmentation {path}: {first_line(e)}") from None
    if image.GetNumberOfComponentsPerPixel() != 1 or image.GetDimension() not in (3, 4):
        raise InputError(f"segmentation {path} must be a 3-D label map with one value per voxel")
    if image.GetDimension() == 4:
        if image.GetSize()[3] != 1:
            raise InputError(f"segmentation {path} is 4-D; give a 3-D label map or a .seg.nrrd")
        image = image[:, :, :, 0]
    arr = sitk.GetArrayViewFromImage(image)
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not np.array_equal(arr, np.round(arr)):
            raise InputError(f"segmentation {path} has non-integer voxel values; a label map holds whole numbers")
    if arr.min() < 0:
        raise InputError(f"segmentation {path} has negative label values; label maps use 0 for background")
    values = [int(v) for v in np.unique(arr) if v != 0]
    if arr.max() > 32767:
        raise InputError(f"segmentation {path} has label values above 32767")
    names = segment_names or {}
    segments = [SegmentInfo(names.get(v, f"Label {v}"), v, default_color(v), 0, None, f"Label_{v}") for v in values]
    label = sitk.Cast(image, sitk.sitkInt16)
    return Segmentation(path, segments, [label], True)


def _read_seg_nrrd(path: str) -> Segmentation:
    import slicerio

    try:
        seg = slicerio.read_segmentation(path)
    except Exception as e:
        raise InputError(f"cannot read segmentation {path}: {type(e).__name__}: {first_line(e)}") from None
    voxels = seg.get("voxels")
    if voxels is None or voxels.ndim not in (3, 4):
        raise InputError(f"segmentation {path} holds no 3-D voxel data")
    ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    layers_ijk = voxels if voxels.ndim == 4 else voxels[np.newaxis]
    layers = [_image_from_ijk(layer, ijk_to_lps, path) for layer in layers_ijk]
    segments = [_segment_info(s, i) for i, s in enumerate(seg.get("segments", []))]
    for s in segments:
        if s.layer >= len(layers):
            raise InputError(f"segmentation {path}: segment {s.name!r} refers to missing layer {s.layer}")
    return Segmentation(path, segments, layers, False)


def _segment_info(s: Dict[str, Any], index: int) -> SegmentInfo:
    """A slicerio segment dict (the ``index``-th of its file) as a SegmentInfo."""
    return SegmentInfo(
        name=str(s.get("name", s.get("id", f"Segment {index + 1}"))),
        label_value=int(s.get("labelValue", index + 1)),
        color=[float(c) for c in s.get("color", default_color(index + 1))][:3],
        layer=int(s.get("layer", 0) or 0),
        terminology=s.get("terminology"),
        segment_id=str(s.get("id", "")),
    )


def read_segment_list(path: str, segment_names: Optional[Dict[int, str]] = None) -> Segmentation:
    """The segments of a segmentation file; a ``.seg.nrrd``'s header only (its voxels are not read)."""
    import slicerio

    path = str(path)
    if not is_seg_nrrd(path):
        return read_segmentation(path, segment_names)
    check_exists(path, "segmentation")
    try:
        seg = slicerio.read_segmentation(path, skip_voxels=True)
    except Exception as e:
        raise InputError(f"cannot read segmentation {path}: {type(e).__name__}: {first_line(e)}") from None
    return Segmentation(path, [_segment_info(s, i) for i, s in enumerate(seg.get("segments", []))], [], False)


def _image_from_ijk(voxels_ijk: np.ndarray, ijk_to_lps: np.ndarray, name: str) -> sitk.Image:
    """sitk image from an (i, j, k) voxel array and its 4x4 IJK→LPS matrix."""
    if not np.isfinite(ijk_to_lps).all():
        raise InputError(f"segmentation {name} has an invalid geometry (space directions / origin)")
    m = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if (spacing <= 0).any():
        raise InputError(f"segmentation {name} has a zero voxel spacing")
    direction = m / spacing
    if abs(abs(np.linalg.det(direction)) - 1) > 1e-3:
        raise InputError(f"segmentation {name} has a non-orthogonal voxel grid")
    arr = np.ascontiguousarray(np.asarray(voxels_ijk).transpose(2, 1, 0))
    if arr.dtype.kind not in "iub":
        arr = arr.astype(np.int16)
    image = sitk.GetImageFromArray(arr.astype(np.int16))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(v) for v in ijk_to_lps[:3, 3]])
    image.SetDirection([float(v) for v in direction.flatten()])
    return image


def ijk_to_lps_matrix(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from voxel (i, j, k) to LPS millimetres."""
    d = np.array(image.GetDirection(), dtype=float).reshape(3, 3)
    m = np.eye(4)
    m[:3, :3] = d @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


# --------------------------------------------------------------------------------------------- geometry


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


def strip_extension(name: str) -> str:
    base = os.path.basename(str(name).rstrip("/\\"))
    for ext in (SEG_EXTENSION,) + IMAGE_EXTENSIONS:
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]
