"""Writing files atomically and checked: label maps, Slicer ``.seg.nrrd`` segmentations, images, and
``atomic_path`` for anything else (model files, run records, CSV).

Every output goes through ``atomic_path``: a temporary file in the same folder (named ``.tmp-p<pid>-…`` so a
later run can sweep it if this process dies, ``cleanup.sweep``), written, flushed to disk (``fsync``, whose
errors count), **verified** (``verify_written``: a model file's zip CRCs, an image re-read by ITK, a NIfTI's
gzip stream and byte count), given normal permissions (the replaced file's, or ``0666 & ~umask``) and only then
moved over the target (``cleanup.commit``: ``os.replace``, never after a cancel). A crash, a full disk or a
cancel therefore leaves any previous file intact, and a full disk is reported as "no space left on <disk>".
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import zipfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from . import cleanup
from .errors import InputError, OutputError
from .integrity import error_reason, integrity_problem, itk_read
from .io import IMAGE_EXTENSIONS, SEG_EXTENSION, default_color, has_extension, ijk_to_lps_matrix, is_seg_nrrd

MIN_FREE_BYTES = 1 << 20  # below this a disk counts as full whatever the write


def format_bytes(n: float) -> str:
    """A size for people: "512 B", "3.4 MiB", "1.2 GiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def mount_point(path: str) -> str:
    """The mount point (disk) that holds ``path`` (or would hold it)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    while not os.path.ismount(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def free_bytes(path: str) -> Optional[int]:
    """Free bytes on the disk that holds ``path`` (None if unknown)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    try:
        return int(shutil.disk_usage(p).free)
    except OSError:
        return None


def no_space_message(path: str, need: Optional[int] = None) -> str:
    """"no space left on <disk> (N free[, about M needed])" for the disk of ``path``."""
    free = free_bytes(path)
    text = f"no space left on {mount_point(path)}"
    details = []
    if free is not None:
        details.append(f"{format_bytes(free)} free")
    if need:
        details.append(f"about {format_bytes(need)} needed")
    return text + (f" ({', '.join(details)})" if details else "")


def check_free_space(path: str, need: int, what: str) -> None:
    """``OutputError`` naming the disk when it has less than ``need`` bytes free for ``what`` at ``path``."""
    free = free_bytes(path)
    if free is not None and free < need + MIN_FREE_BYTES:
        raise OutputError(f"cannot write {what}: {no_space_message(path, need)}; free some space or write elsewhere")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_mode(tmp: str, target: str) -> None:
    """The permissions the output should have: those of the file it replaces, else ``0666 & ~umask``
    (``mkstemp`` creates 0600, which a shared lab folder cannot read)."""
    try:
        mode = os.stat(target).st_mode & 0o777 if os.path.exists(target) else 0o666 & ~_umask()
        os.chmod(tmp, mode)
    except OSError:
        pass


def _fsync(path: str) -> None:
    """Flushes ``path`` to the disk; an error (ENOSPC, EIO on network disks) is raised."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP if hasattr(errno, "ENOTSUP") else errno.EINVAL):
            raise
    finally:
        os.close(fd)


def verify_written(path: str) -> Optional[str]:
    """What is wrong with a file just written, or None: a model file's zip (every member's CRC), an image or
    segmentation re-read by ITK (NRRD, MetaImage check their byte counts) and verified (``integrity.integrity_problem``:
    gzip CRC and length, NIfTI byte count), a JSON file parsed."""
    low = str(path).lower()
    try:
        if os.path.getsize(path) == 0:
            return "the file is empty"
        if low.endswith(".pt"):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            return f"member {bad} is damaged" if bad else None
        if low.endswith((".nii", ".nii.gz")):
            return integrity_problem(path)
        if is_seg_nrrd(low) or has_extension(low, IMAGE_EXTENSIONS):
            itk_read(path, "written file")
            return None
        if low.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                json.load(f)
    except InputError as e:
        return str(e)
    except (OSError, ValueError, zipfile.BadZipFile, RuntimeError) as e:
        return f"{type(e).__name__}: {error_reason(e)}"
    return None


def _failure(path: str, reason: str, need: int) -> OutputError:
    base = os.path.basename(path)
    free = free_bytes(os.path.dirname(os.path.abspath(path)))
    if free is not None and free < max(need, 0) + MIN_FREE_BYTES:
        reason = no_space_message(os.path.dirname(os.path.abspath(path)), need or None) + f" ({reason})"
    return OutputError(f"cannot write {path}: {reason} (any previous {base} is unchanged)")


@contextlib.contextmanager
def atomic_path(path: str, expected_bytes: int = 0, note: str = "") -> Iterator[str]:
    """Yields a temporary path beside ``path`` (same extension); once the caller has written it, it is
    flushed, verified (``verify_written``), given normal permissions and moved over ``path``.

    ``expected_bytes``: about how large the file will be (checked against the free space first). On any
    failure (including a full disk, "no space left on <disk>") or a cancel the temporary file is removed and
    ``path`` is untouched. ``note``: how a cancel message names this output."""
    path = str(path)
    if not path.strip():
        raise OutputError("an output path is empty")
    if os.path.isdir(path):
        raise OutputError(f"cannot write {path}: it is a folder")
    folder = os.path.dirname(os.path.abspath(path)) or "."
    base = os.path.basename(path)
    suffix = SEG_EXTENSION if base.lower().endswith(SEG_EXTENSION) else next(
        (e for e in IMAGE_EXTENSIONS + (".pt", ".json", ".csv") if base.lower().endswith(e)), ""
    )
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot write {path}: cannot create its folder {folder} ({e.strerror or e})") from None
    check_free_space(folder, expected_bytes, path)
    try:
        prefix = cleanup.temp_prefix() + base[: max(1, 40 - len(suffix))] + "-"
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
        os.close(fd)
    except OSError as e:
        raise _failure(path, f"{e.strerror or e} in {folder}", expected_bytes) from None
    cleanup.register(tmp, target=path)
    try:
        try:
            yield tmp
            _fsync(tmp)
        except OSError as e:
            raise _failure(path, e.strerror or str(e), expected_bytes) from None
        except RuntimeError as e:  # torch.save / SimpleITK wrap write failures (e.g. a full disk) in RuntimeError
            raise _failure(path, error_reason(e), expected_bytes) from None
        problem = verify_written(tmp)
        if problem:
            raise _failure(path, f"the written file failed its check: {problem}", expected_bytes)
        _normal_mode(tmp, path)
        try:
            cleanup.commit(tmp, path, note)
        except OSError as e:
            raise _failure(path, e.strerror or str(e), expected_bytes) from None
    finally:
        if os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.remove(tmp)
        cleanup.unregister(tmp)


def write_bytes(path: str, data: bytes, note: str = "") -> None:
    """``data`` into ``path`` through ``atomic_path`` (flushed, verified by its extension, then moved into place)."""
    with atomic_path(path, len(data), note) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_json(path: str, data: Any, note: str = "") -> None:
    """``data`` as strict JSON (``allow_nan=False``, JSON types only: no NaN, no ``default=str``) through
    ``atomic_path``; a value JSON cannot hold is a ``ValueError`` / ``TypeError`` naming ``path``, nothing written."""
    try:
        text = json.dumps(data, indent=1, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise type(e)(f"cannot write {path}: {e}") from None
    write_bytes(path, text.encode("utf-8"), note)


def copy_file(source: str, target: str, note: str = "") -> None:
    """A copy of ``source`` at ``target`` through ``atomic_path`` (a previous ``target`` stays intact on failure)."""
    with atomic_path(target, os.path.getsize(source), note) as tmp:
        shutil.copyfile(source, tmp)


def _image_bytes(path: str, voxels: int, itemsize: int) -> int:
    """Free space to ask for before writing an image: its raw size when written uncompressed (``.nii``)."""
    return voxels * itemsize if str(path).lower().endswith(".nii") else 0


def write_label_image(path: str, labels: np.ndarray, reference: sitk.Image, label_values: Sequence[int]) -> None:
    """Writes class indices as a label map (NIfTI / NRRD / MHA) with ``label_values[c]`` for class c."""
    lut = np.asarray(label_values, dtype=np.int32)
    out = lut[labels.astype(np.int64)]
    dtype = np.uint8 if out.max(initial=0) < 256 else np.uint16
    img = sitk.GetImageFromArray(out.astype(dtype))
    img.CopyInformation(reference)
    with atomic_path(path, _image_bytes(path, out.size, np.dtype(dtype).itemsize)) as tmp:
        sitk.WriteImage(img, tmp, useCompression=True)


# gzip level of written .seg.nrrd files; slicerio's default is 9. Level 6 is much faster for slightly larger
# files (bench/predict_speed.py measures both; BENCHMARKS.md, "Speed and memory").
SEG_NRRD_COMPRESSION = 6


def segments_box(labels: np.ndarray) -> Tuple[List[int], List[int]]:
    """``(first, last)`` (k, j, i) of the box around the non-zero voxels of ``labels``, one pass per axis over a
    reduced array; the whole grid when nothing is labeled."""
    if not labels.any():
        return [0, 0, 0], [n - 1 for n in labels.shape]
    first, last = [], []
    for axis in range(3):
        hit = np.flatnonzero(labels.any(axis=tuple(a for a in range(3) if a != axis)))
        first.append(int(hit[0]))
        last.append(int(hit[-1]))
    return first, last


def write_seg_nrrd(
    path: str, labels: np.ndarray, reference: sitk.Image, classes: Sequence[Dict[str, Any]],
    compression_level: int = SEG_NRRD_COMPRESSION, crop: bool = False,
) -> None:
    """Writes class indices as a Slicer ``.seg.nrrd``: one segment per class 1..K-1 (names, colours,
    terminology from ``classes``), each listed even when empty, on the reference image's grid, gzip level
    ``compression_level``. ``crop``: only the box around the segments is stored, placed on the reference grid by
    ``referenceImageExtentOffset`` (and by its own origin, for readers that ignore the offset), as Slicer saves
    segmentations: Slicer reads only that box."""
    import slicerio

    if labels.shape != tuple(reversed(reference.GetSize())):
        raise ValueError(f"label array {labels.shape} does not match the reference grid {tuple(reversed(reference.GetSize()))}")
    values = [int(c.get("label_value", i)) for i, c in enumerate(classes)]
    if len(set(values[1:])) != len(values) - 1 or 0 in values[1:] or max(values) > 255:
        values = list(range(len(classes)))
    lut = np.asarray(values, dtype=np.uint8)
    first, last = segments_box(labels) if crop else ([0, 0, 0], [n - 1 for n in labels.shape])
    labels = labels[first[0]:last[0] + 1, first[1]:last[1] + 1, first[2]:last[2] + 1]
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
    ijk_to_lps = ijk_to_lps_matrix(reference)
    offset = first[::-1]  # (i, j, k) of the file's first voxel on the reference grid
    ijk_to_lps[:3, 3] += ijk_to_lps[:3, :3] @ np.asarray(offset, dtype=float)
    seg_dict = {
        "voxels": np.ascontiguousarray(voxels),
        "ijkToLPS": ijk_to_lps,
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": offset,
    }
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(tmp, seg_dict, compression_level=compression_level)


def write_prediction(path: str, labels: np.ndarray, reference: sitk.Image, classes: Sequence[Dict[str, Any]],
                     crop: bool = False) -> None:
    """Writes a prediction by the extension of ``path``: ``.seg.nrrd`` (``crop``: only the box around the segments,
    ``write_seg_nrrd``) or a label map with the model's values."""
    if is_seg_nrrd(path):
        write_seg_nrrd(path, labels, reference, classes, crop=crop)
    elif has_extension(path, IMAGE_EXTENSIONS):
        write_label_image(path, labels, reference, [int(c.get("label_value", i)) for i, c in enumerate(classes)])
    else:
        raise InputError(f"unknown output format for {path}: use .seg.nrrd, .nii.gz, .nii, .nrrd or .mha")


def write_image(path: str, image: sitk.Image) -> None:
    voxels = int(np.prod(image.GetSize())) * image.GetNumberOfComponentsPerPixel()
    with atomic_path(path, _image_bytes(path, voxels, image.GetSizeOfPixelComponent())) as tmp:
        sitk.WriteImage(image, tmp, useCompression=True)
