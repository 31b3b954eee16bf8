"""Scene helpers shared by the slicer-core tests (a module, not a test file: imported after slicer-core is known
to be installed)."""

import hashlib

import slicer

from CPCLSegmentModuleLib.export import RAS_TO_LPS
from CPCLSegmentModuleLib.nodes import matrix_to_array, segment_ids, volume_array, world_ijk_to_ras
from CPCLSegmentLib import io as cio
from conftest import COARSE_SPACING, child_env


def one_thread_env():
    """The child's environment with one torch thread (stable timings on a shared 2-core machine)."""
    return dict(child_env(), OMP_NUM_THREADS="1")


TINY = dict(iterations=20, width=4, spacing=list(COARSE_SPACING), patch_size=[64, 64, 16], device="cpu", seed=0)


def new_scene(cache_dir=None):
    """A fresh scene as Slicer's application sets it up (a cache manager: reading an .mrb unpacks into its folder)."""
    scene = slicer.vtkMRMLScene()
    if cache_dir is not None:
        cache = slicer.vtkCacheManager()
        cache.SetRemoteCacheDirectory(str(cache_dir))
        io_manager = slicer.vtkDataIOManager()
        io_manager.SetCacheManager(cache)
        scene.SetCacheManager(cache)
        scene.SetDataIOManager(io_manager)
    slicer.mrmlScene = scene
    return scene


def _storage(scene, class_name, path, as_slicer_loads):
    """A storage node for ``path``: in the scene, as File > Add data makes it (then the node knows its file and whether
    it changed since: ``GetModifiedSinceRead``), or outside it (the node keeps no storage node)."""
    storage = scene.AddNewNodeByClass(class_name) if as_slicer_loads else getattr(slicer, class_name)()
    storage.SetFileName(str(path))
    return storage


def load_volume(scene, path, name="CTChest", as_slicer_loads=False):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = _storage(scene, "vtkMRMLVolumeArchetypeStorageNode", path, as_slicer_loads)
    assert storage.ReadData(node)
    node.CreateDefaultDisplayNodes()
    return node


def load_segmentation(scene, path, name="Segmentation", volume=None, as_slicer_loads=False):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    storage = _storage(scene, "vtkMRMLSegmentationStorageNode", path, as_slicer_loads)
    assert storage.ReadData(node)
    node.CreateDefaultDisplayNodes()
    if volume is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return node


def fingerprint(volume, segmentation):
    """Hash of everything a run must not change: voxels, geometry, transform, segments and their voxels."""
    from vtk.util import numpy_support

    h = hashlib.sha256()
    h.update(volume_array(volume).tobytes())
    h.update(matrix_to_array(world_ijk_to_ras(volume)).tobytes())
    h.update(str(volume.GetParentTransformNode() and volume.GetParentTransformNode().GetID()).encode())
    for sid in segment_ids(segmentation):
        seg = segmentation.GetSegmentation().GetSegment(sid)
        h.update(f"{sid}|{seg.GetName()}|{seg.GetColor()}".encode())
        image = slicer.vtkOrientedImageData()
        slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(segmentation, sid, image, False)
        h.update(str(image.GetExtent()).encode())
        if image.GetPointData().GetScalars() is not None:
            h.update(numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).tobytes())
    return h.hexdigest()


def ras_matrix_of(image):
    """IJK-to-RAS of a SimpleITK image (LPS)."""
    return RAS_TO_LPS @ cio.ijk_to_lps_matrix(image)


def synthetic_volume(scene, name, shape):
    """A new int16 scalar volume of ``shape`` (numpy ``(k, j, i)``) in ``scene``, voxels ``arange % 97``; identity
    geometry (the caller sets spacing or IJK-to-RAS)."""
    import numpy as np
    import vtk
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(shape[2], shape[1], shape[0])
    voxels = (np.arange(np.prod(shape)) % 97).astype(np.int16)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels, deep=True, array_type=vtk.VTK_SHORT))
    node.SetAndObserveImageData(image)
    return node
