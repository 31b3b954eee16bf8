"""The preprocessing cache's keys: what identifies an input file, and a preprocessed case.

A preprocessed case is named by its inputs' **identity**, never by their file names: two files
``a/img.nii.gz`` and ``b/img.nii.gz`` of the same size are two cases. The identity of a file is its
absolute, link-resolved path, its size and its modification time in nanoseconds (``os.stat``): free to
compute (no file is read, which matters for a thousand CTs of hundreds of MB each) and changed by any
ordinary rewrite of the file. A content hash would survive a copy of the data set to another folder, but
costs a full read of every input on every run, which is most of what the cache saves. A DICOM folder's
identity is its path plus the name, size and time of every file in it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List

# Bump when preprocessing changes what it writes for the same inputs and plan (reorientation, resampling,
# normalisation, label mapping, array dtypes): every older cache entry then stops matching.
PREPROCESSING_VERSION = 1


def canonical_path(path: str) -> str:
    """The absolute, link-resolved form of a path: the same file given as ``a.nrrd``, ``./a.nrrd`` or
    ``/data/a.nrrd`` is the same file."""
    return os.path.normcase(os.path.realpath(os.path.abspath(str(path))))


def file_identity(path: str) -> List[Any]:
    """``[canonical path, size, mtime_ns]`` of a file; for a folder (a DICOM series) its path and a digest of
    the name, size and mtime_ns of every file directly inside it."""
    path = canonical_path(path)
    st = os.stat(path)
    if not os.path.isdir(path):
        return [path, int(st.st_size), int(st.st_mtime_ns)]
    listing = []
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_file():
                est = entry.stat()
                listing.append([entry.name, int(est.st_size), int(est.st_mtime_ns)])
    listing.sort()
    return [path, "folder", hashlib.sha256(json.dumps(listing).encode("utf-8")).hexdigest()]


def case_key(parts: Dict[str, Any]) -> str:
    """A short hexadecimal key for everything that determines a preprocessed case (inputs' identities, plan,
    preprocessing version): equal parts give equal keys, any difference another key."""
    text = json.dumps({"version": PREPROCESSING_VERSION, **parts}, sort_keys=True, allow_nan=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]
