"""A volume that exists only in the scene, handed to the child without copying its voxels on the GUI thread.

At the click the volume is *captured* (``capture``, GUI thread, no copy): the ``vtkImageData`` the node holds and its
scalars array are kept (so they stay alive if the node is deleted or given new image data), a zero-copy numpy view of
the scalars is taken, and so are the image data's modification time (``vtkObject::GetMTime``: ``vtkDataSet`` includes
its point data and their arrays, so an edit followed by ``Modified()``, as ``slicer.util.arrayFromVolumeModified``
does, raises it) and the hardened IJK-to-RAS. A worker thread writes the file from the view
(``handoff.write_snapshot``). Once every file is written, the GUI thread compares (``unchanged``): the same image data
object, the same modification time and the same geometry. A volume that changed meanwhile is captured again and
written again (``Handoff.verify``); the child starts only once every volume's file matches its node, so no file is
ever a mix of the voxels before and after an edit.

Assumed, as Slicer's own code does: voxels are edited in place only on the GUI thread, followed by ``Modified()``;
an image data that must change size is replaced (``SetAndObserveImageData``), not reallocated in place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from vtk.util import numpy_support

from .nodes import check_volume, matrix_to_array, node_name, world_ijk_to_ras


@dataclass
class LiveVolume:
    """A volume's voxels as a zero-copy numpy ``(k, j, i)`` view, to be written to ``path``, with what the GUI thread
    compares once it is written: ``image`` (kept alive with its ``scalars``), its ``mtime`` and ``ijk_to_ras``."""

    path: str
    voxels: np.ndarray
    ijk_to_ras: np.ndarray
    name: str
    node: Any
    image: Any
    scalars: Any
    mtime: int


def capture(node: Any, path: str) -> LiveVolume:
    """``node`` as it is now, without copying its voxels (GUI thread); ``InputError`` naming the node when it is not a
    3-D scalar volume with voxels."""
    check_volume(node)
    image = node.GetImageData()
    scalars = image.GetPointData().GetScalars()
    voxels = numpy_support.vtk_to_numpy(scalars).reshape(image.GetDimensions()[::-1])
    return LiveVolume(str(path), voxels, matrix_to_array(world_ijk_to_ras(node)), node_name(node), node, image, scalars,
                      int(image.GetMTime()))


def unchanged(live: LiveVolume) -> bool:
    """Whether the node still holds the voxels and geometry ``live`` was captured with (GUI thread)."""
    node = live.node
    image = node.GetImageData()
    if image is not live.image or image.GetPointData().GetScalars() is not live.scalars:
        return False
    if int(image.GetMTime()) != live.mtime:
        return False
    return bool(np.array_equal(matrix_to_array(world_ijk_to_ras(node)), live.ijk_to_ras))
