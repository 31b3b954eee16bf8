"""Reading images and segmentations, verified (damage checks: ``integrity``; onto the image grid: ``labels``;
writing: ``writers``).

- Images: SimpleITK (NIfTI, NRRD, MHA/MHD, DICOM series folders). Always 3-D scalar; vector / RGB / 4-D
  images are refused with a message naming the file.
- Segmentations: ``.seg.nrrd`` through slicerio (segment names, colours, terminology, label values,
  overlapping layers), or label maps (NIfTI / NRRD / MHA) whose non-zero values are the segments.
- Every read is verified (``integrity.integrity_problem``) and a failed one gives ITK's whole reason
  (``integrity.error_reason``).

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
from .integrity import error_reason, itk_read, native_messages, nifti_has_nonfinite


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


def check_exists(path: str, what: str, folder_ok: bool = False) -> None:
    """An ``InputError`` naming ``what`` when ``path`` is missing, empty or (unless ``folder_ok``) a folder."""
    if not str(path):
        raise InputError(f"{what} path is empty")
    if not os.path.exists(path):
        raise InputError(f"{what} not found: {path}")
    if not folder_ok and os.path.isdir(path):
        raise InputError(f"{what} {path} is a folder; give a file")


def read_header(path: str) -> Optional[Tuple[Tuple[int, ...], Tuple[float, ...]]]:
    """``(size, spacing)`` (x, y, z) of an image file from its header alone; None for a DICOM folder or a header
    ITK cannot read (the full read then reports why)."""
    path = str(path)
    if os.path.isdir(path) or not os.path.isfile(path):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    with native_messages():
        try:
            reader.ReadImageInformation()
        except Exception:
            return None
    size, spacing = tuple(reader.GetSize()), tuple(reader.GetSpacing())
    return (size[:3], spacing[:3]) if len(size) >= 3 else None


def read_image(path: str) -> sitk.Image:
    """Reads a 3-D scalar image (file or DICOM series folder) as float32, keeping its geometry; the file's
    bytes are verified (``integrity_problem``)."""
    path = str(path)
    check_exists(path, "image", folder_ok=True)
    if os.path.isdir(path):
        try:
            with native_messages() as native:
                reader = sitk.ImageSeriesReader()
                series = reader.GetGDCMSeriesIDs(path)
                if len(series) == 1:
                    reader.SetFileNames(reader.GetGDCMSeriesFileNames(path, series[0]))
                    image = reader.Execute()
        except Exception as e:
            raise InputError(f"cannot read the DICOM series in folder {path}: {error_reason(e, native.lines, path)}") from None
        if not series:
            raise InputError(f"image {path} is a folder without a DICOM series; give an image file or a DICOM series folder")
        if len(series) > 1:
            raise InputError(f"folder {path} holds {len(series)} DICOM series; give one series per folder")
    else:
        image = itk_read(path, "image")
        if has_extension(path, (".nii", ".nii.gz")) and nifti_has_nonfinite(path):  # ITK read them as 0
            raise InputError(f"{path} contains NaN or infinite voxel values (in the file; its reader would show them as 0)")
    return as_scalar_3d(image, path)


def check_not_one_slice(name: str, size: Sequence[int]) -> None:
    """Refuses an image of a single slice (size x, y, z with an axis of 1 voxel): a 2-D image in a 3-D file, which
    3-D patches would pad to many times its size and segment for minutes without learning anything 3-D."""
    if min(int(v) for v in size) == 1:
        raise InputError(f"{name} is one slice ({'x'.join(str(int(v)) for v in size)} voxels): CPCLSegment trains on and "
                         "segments 3-D volumes; give the whole volume (a series of slices), not a single 2-D image")


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
    check_not_one_slice(name, image.GetSize())
    geometry = list(image.GetSpacing()) + list(image.GetOrigin()) + list(image.GetDirection())
    if not np.isfinite(geometry).all() or min(image.GetSpacing()) <= 0:
        raise InputError(f"{name} has an invalid geometry in its header (spacing {list(image.GetSpacing())}, origin "
                         f"{list(image.GetOrigin())}): spacings must be finite numbers > 0 mm")
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
    # segments (by the key asked for) that have voxels in the file but none on the image grid of the last
    # ``build_label_array``: the segmentation lies (partly) outside its image
    outside: Dict[Any, int] = field(default_factory=dict, repr=False)

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
    image = itk_read(path, "segmentation")
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
        raise InputError(f"cannot read segmentation {path}: {_seg_nrrd_reason(path, e)}") from None
    voxels = seg.get("voxels")
    if voxels is None or voxels.ndim not in (3, 4):
        raise InputError(f"segmentation {path} holds no 3-D voxel data")
    ijk_to_lps = np.asarray(seg["ijkToLPS"], dtype=float)
    layers_ijk = voxels if voxels.ndim == 4 else voxels[np.newaxis]
    layers = [_image_from_ijk(layer, ijk_to_lps, path) for layer in layers_ijk]
    segments = _segment_infos(seg, path)
    for s in segments:
        if s.layer >= len(layers):
            raise InputError(f"segmentation {path}: segment {s.name!r} refers to missing layer {s.layer}")
    return Segmentation(path, segments, layers, False)


def _seg_nrrd_reason(path: str, e: BaseException) -> str:
    """Why slicerio could not read a ``.seg.nrrd``: ITK's NRRD reader checks the byte count and the gzip
    stream and says what is wrong in plain words (pynrrd's own message is often cryptic)."""
    with native_messages() as native:
        try:
            sitk.ReadImage(path)
        except Exception as itk_error:
            return error_reason(itk_error, native.lines, path)
    return f"{type(e).__name__}: {error_reason(e)}"


def _segment_infos(seg: Dict[str, Any], path: str) -> List[SegmentInfo]:
    try:
        return [_segment_info(s, i) for i, s in enumerate(seg.get("segments") or [])]
    except (ValueError, TypeError, AttributeError) as e:
        raise InputError(f"segmentation {path} has an invalid segment description in its header ({e})") from None


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
        raise InputError(f"cannot read segmentation {path}: {type(e).__name__}: {error_reason(e)}") from None
    if not isinstance(seg, dict) or not isinstance(seg.get("segments", []), list):
        raise InputError(f"cannot read segmentation {path}: its header lists no segments")
    return Segmentation(path, _segment_infos(seg, path), [], False)


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


def strip_extension(name: str) -> str:
    base = os.path.basename(str(name).rstrip("/\\"))
    for ext in (SEG_EXTENSION,) + IMAGE_EXTENSIONS:
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]
