"""Reading images and segmentations; putting a segmentation onto its image's grid (writing: ``writers``).

- Images: SimpleITK (NIfTI, NRRD, MHA/MHD, DICOM series folders). Always 3-D scalar; vector / RGB / 4-D
  images are refused with a message naming the file.
- Segmentations: ``.seg.nrrd`` through slicerio (segment names, colours, terminology, label values,
  overlapping layers), or label maps (NIfTI / NRRD / MHA) whose non-zero values are the segments.
- A segmentation on another grid than its image (Slicer allows it) is resampled onto the image grid with
  nearest-neighbour interpolation; no physical overlap at all is an error naming both files.
- Every read is verified (``integrity_problem``): a gzip stream (``.nii.gz``, ``.gz``) is read to its end, its
  CRC and length checked, and a NIfTI file must hold the bytes its header promises (ITK reads a truncated
  NIfTI without a word, the missing voxels as zeros). ITK's own reason for a failed read is kept whole
  (``error_reason``), including what its readers print on stderr (``native_messages``); HDF5's probing
  diagnostics are dropped.

Array convention everywhere in the engine: numpy ``(k, j, i)`` = ``(D, H, W)``, as returned by
``sitk.GetArrayFromImage`` and ``slicer.util.arrayFromVolume``. slicerio's voxels are ``(i, j, k)`` and are
transposed on the way in and out. Physical space is LPS (ITK, slicerio, DICOM).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import sys
import tempfile
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

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


def check_exists(path: str, what: str, folder_ok: bool = False) -> None:
    """An ``InputError`` naming ``what`` when ``path`` is missing, empty or (unless ``folder_ok``) a folder."""
    if not str(path):
        raise InputError(f"{what} path is empty")
    if not os.path.exists(path):
        raise InputError(f"{what} not found: {path}")
    if not folder_ok and os.path.isdir(path):
        raise InputError(f"{what} {path} is a folder; give a file")


# ------------------------------------------------------------------------------------ verified reading


class NativeMessages:
    """What native code (ITK's readers, HDF5) printed on the process's stderr inside ``native_messages``."""

    def __init__(self) -> None:
        self.lines: List[str] = []

    def replay(self) -> None:
        """Prints the captured lines (after a successful read: warnings stay visible)."""
        if self.lines:
            with contextlib.suppress(Exception):
                sys.stderr.write("\n".join(self.lines) + "\n")
                sys.stderr.flush()


_capture_lock = threading.Lock()


def _drop_hdf5(lines: Sequence[str]) -> List[str]:
    """Without HDF5's diagnostic blocks (printed when ITK probes a file that is not HDF5)."""
    out, skipping = [], False
    for line in lines:
        if line.startswith("HDF5-DIAG"):
            skipping = True
            continue
        if skipping and (line.startswith((" ", "\t", ",")) or not line.strip()):
            continue
        skipping = False
        out.append(line)
    return out


@contextlib.contextmanager
def native_messages() -> Iterator[NativeMessages]:
    """Captures file descriptor 2 (where ITK's C++ readers print) while a file is read."""
    holder = NativeMessages()
    with _capture_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):
            yield holder
            return
        with tempfile.TemporaryFile() as tmp:
            try:
                os.dup2(tmp.fileno(), 2)
                try:
                    yield holder
                finally:
                    os.dup2(saved, 2)
                    os.close(saved)
            finally:
                tmp.seek(0)
                text = tmp.read().decode("utf-8", errors="replace")
                holder.lines = [line for line in _drop_hdf5(text.splitlines()) if line.strip()]


_SOURCE_LINE = re.compile(r"^\S*\.(?:cxx|hxx|cpp|txx|h|c):\d+:?\s*$")
_PREFIX = re.compile(r"^(?:ITK ERROR|sitk::ERROR|ERROR)\s*:\s*(?:[\w:]+\(0x[0-9a-fA-F]+\):\s*)?")


def error_reason(e: BaseException, native: Sequence[str] = (), path: Optional[str] = None, limit: int = 600) -> str:
    """The whole reason of a failed read or write: ITK's message without its source location and class
    prefixes, NRRD's chain of "trouble" lines reduced to the cause, plus what the reader printed natively."""
    lines: List[str] = []
    for raw in list(str(e).splitlines()) + list(native):
        line = raw.strip()
        if not line or line.startswith("Exception thrown in SimpleITK") or _SOURCE_LINE.match(line):
            continue
        line = _PREFIX.sub("", line)
        line = re.sub(r"^\[nrrd\]\s*", "", line)
        if "trouble" in line or line.endswith(":"):
            continue  # NRRD's chain down to the cause: "nrrdRead: trouble", "_nrrdFormatNRRD_read:"
        if path and "No such file or directory" in line and os.path.exists(path):
            continue  # errno left over from an earlier call: misleading when the file is there
        if line not in lines:
            lines.append(line)
    text = "; ".join(lines) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(e: BaseException) -> str:
    """Kept for callers of earlier versions: the whole reason (``error_reason``)."""
    return error_reason(e)


_verified: Dict[Tuple[str, int, int], None] = {}
_verified_lock = threading.Lock()


def gzip_problem(path: str, offset: int = 0) -> Tuple[Optional[str], int]:
    """Reads the gzip stream starting at byte ``offset`` to its end, checking every member's CRC and length;
    ``(what is wrong or None, uncompressed bytes read)``."""
    n = 0
    try:
        with open(path, "rb") as raw:
            raw.seek(offset)
            with gzip.GzipFile(fileobj=raw, mode="rb") as f:
                while True:
                    chunk = f.read(1 << 16)
                    if not chunk:
                        break
                    n += len(chunk)
    except EOFError:
        return "the compressed data ends early (a truncated file)", n
    except (OSError, zlib.error) as e:  # gzip.BadGzipFile is an OSError: CRC or length check failed, bad header
        return f"the compressed data is damaged ({e})", n
    return None, n


def _is_gzip(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"\x1f\x8b"
    except OSError:
        return False


def _nifti_meta(path: str, image: Optional[sitk.Image]) -> Dict[str, str]:
    if image is not None and image.HasMetaDataKey("vox_offset"):
        return {k: image.GetMetaData(k) for k in image.GetMetaDataKeys()}
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with native_messages():
        reader.ReadImageInformation()
    return {k: reader.GetMetaData(k) for k in reader.GetMetaDataKeys()}


def integrity_problem(path: str, image: Optional[sitk.Image] = None) -> Optional[str]:
    """What is wrong with the bytes of an image file, or None: a gzip-compressed file (``.nii.gz``, ``.gz``)
    is read to its end (CRC and length of every member), a NIfTI file must hold the bytes its header
    promises (``vox_offset`` + voxels × ``bitpix`` / 8). ``image``: the file as ITK read it (its header
    fields), if at hand. NRRD and MetaImage readers check their byte counts themselves."""
    path = str(path)
    try:
        st = os.stat(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if os.path.isdir(path):
        return None
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _verified_lock:
        if key in _verified:
            return None
    low = path.lower()
    compressed = _is_gzip(path)
    size = st.st_size
    if compressed:
        problem, size = gzip_problem(path)
        if problem:
            return problem
    if low.endswith((".nii", ".nii.gz")):
        try:
            meta = _nifti_meta(path, image)
            ndim = int(meta.get("dim[0]", "0"))
            voxels = 1
            for d in range(1, ndim + 1):
                voxels *= max(1, int(meta.get(f"dim[{d}]", "1")))
            need = int(float(meta.get("vox_offset", "352"))) + voxels * int(meta.get("bitpix", "8")) // 8
        except (RuntimeError, ValueError):
            need = 0  # header unreadable: ITK's own read fails with its reason
        if size < need:
            return (f"it holds {size} bytes{' (uncompressed)' if compressed else ''} but its header promises {need} "
                    f"({need - size} missing: a truncated or incompletely copied file)")
    with _verified_lock:
        if len(_verified) > 4096:
            _verified.clear()
        _verified[key] = None
    return None


def itk_read(path: str, what: str) -> sitk.Image:
    """``sitk.ReadImage`` with ITK's whole reason in the ``InputError`` and the file's bytes verified."""
    path = str(path)
    with native_messages() as native:
        try:
            image = sitk.ReadImage(path)
        except Exception as e:  # SimpleITK raises RuntimeError with ITK's text
            err: Optional[BaseException] = e
        else:
            err = None
    if err is not None:
        raise InputError(f"cannot read {what} {path}: {error_reason(err, native.lines, path)}") from None
    native.replay()
    problem = integrity_problem(path, image)
    if problem:
        raise InputError(f"{what} {path} is damaged: {problem}")
    return image


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


def strip_extension(name: str) -> str:
    base = os.path.basename(str(name).rstrip("/\\"))
    for ext in (SEG_EXTENSION,) + IMAGE_EXTENSIONS:
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]
