"""Damage checks for every file read: ITK's whole reason on failure, gzip streams and byte counts verified.

- ``integrity_problem``: a gzip stream (``.nii.gz``, ``.gz``) is read to its end, its CRC and length checked,
  and a NIfTI file must hold the bytes its header promises (ITK reads a truncated NIfTI without a word, the
  missing voxels as zeros).
- ``error_reason``: ITK's own reason for a failed read is kept whole, including what its readers print on
  stderr (``native_messages``); HDF5's probing diagnostics are dropped.
- ``itk_read``: ``sitk.ReadImage`` with both of the above.
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
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import SimpleITK as sitk

from .errors import InputError


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


_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 / float64 voxels


def nifti_has_nonfinite(path: str, chunk: int = 1 << 24) -> bool:
    """Whether a ``.nii`` / ``.nii.gz`` file of float voxels holds NaN or infinite values, read from its own bytes
    (NIfTI-1 or -2, either byte order), a chunk at a time. ITK's NIfTI reader turns them into 0 without a word, so
    a check of what ITK read cannot see them. False for integer types, other formats or an unreadable header."""
    import numpy as np

    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rb") as f:
            head = f.read(540)
            layout = _nifti_layout(head)
            if layout is None:
                return False
            dtype, offset = layout
            tail = head[offset:]  # voxels that came with the header read
            f.read(max(0, offset - len(head)))
            step = chunk - chunk % dtype.itemsize
            while True:
                block = tail + f.read(step)
                if not block:
                    return False
                usable = len(block) - len(block) % dtype.itemsize
                if not np.isfinite(np.frombuffer(block[:usable], dtype=dtype)).all():
                    return True
                tail = block[usable:]
                if len(block) < step:
                    return False
    except (OSError, EOFError, zlib.error, ValueError):
        return False  # a damaged file: ``integrity_problem`` says what is wrong with it


def _nifti_layout(head: bytes):
    """(numpy dtype, voxel offset) of a float NIfTI header, or None (not NIfTI, not float voxels)."""
    import numpy as np

    if len(head) < 348:
        return None
    for order in ("<", ">"):
        size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
        if size == 348:  # NIfTI-1: datatype at 70, vox_offset (float32) at 108
            code = int(np.frombuffer(head[70:72], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(head[108:112], dtype=f"{order}f4")[0])
        elif size == 540 and len(head) >= 540:  # NIfTI-2: datatype at 12, vox_offset (int64) at 168
            code = int(np.frombuffer(head[12:14], dtype=f"{order}i2")[0])
            offset = int(np.frombuffer(head[168:176], dtype=f"{order}i8")[0])
        else:
            continue
        kind = _NIFTI_FLOATS.get(code)
        return (np.dtype(order + kind), max(offset, size)) if kind else None
    return None
