"""First contact: the chest CT and its segmentation (what ``cpcl-segment demo`` trains on) as Slicer Sample Data,
so a first-time user can load a labeled case and press Train.

The files ship inside slicerio (``slicerio/data/CTChest4.nrrd``, ``Segmentation.seg.nrrd``: 128×128×34 CT,
7 segments), one of the module's requirements; they are found without importing anything
(``importlib.util.find_spec``), so before the requirements are installed the sample is simply not offered.
Loading reads both files into the scene and references the segmentation to the CT, which is how the panel's
"Add all segmented volumes" pairs them (``segmented_volume_pairs``). Nothing is downloaded.

The registration arguments follow ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` (same
signature in Slicer 5.8, 5.10 and 5.12): the ``uris`` are the local files (``file://``) so that every list has
the same length, and ``customDownloader`` loads them (Slicer calls it instead of downloading).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import slicer

CATEGORY = "CPCLSegment"
SAMPLE_NAME = "CPCLSegmentChestCT"
VOLUME_NAME, SEGMENTATION_NAME = "CTChest", "CTChest segmentation"
FILES = ("CTChest4.nrrd", "Segmentation.seg.nrrd")


def sample_files() -> Optional[Tuple[str, str]]:
    """(CT, segmentation) paths inside the installed slicerio, or None when slicerio is not installed."""
    try:
        spec = importlib.util.find_spec("slicerio")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    data = os.path.join(os.path.dirname(spec.origin), "data")
    paths = tuple(os.path.join(data, f) for f in FILES)
    return paths if all(os.path.isfile(p) for p in paths) else None  # type: ignore[return-value]


def load_sample(scene: Any) -> Tuple[Any, Any]:
    """Loads the chest CT and its segmentation as NEW nodes; the segmentation references the CT."""
    paths = sample_files()
    if paths is None:
        raise FileNotFoundError("the chest CT sample comes with slicerio, which is not installed yet: "
                                "install CPCLSegment's dependencies first")
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(VOLUME_NAME))
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(paths[0])
    if not storage.ReadData(volume):
        scene.RemoveNode(volume)
        raise OSError(f"cannot read {paths[0]}")
    volume.CreateDefaultDisplayNodes()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(SEGMENTATION_NAME))
    seg_storage = slicer.vtkMRMLSegmentationStorageNode()
    seg_storage.SetFileName(paths[1])
    if not seg_storage.ReadData(segmentation):
        scene.RemoveNode(volume)
        scene.RemoveNode(segmentation)
        raise OSError(f"cannot read {paths[1]}")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    segmentation.SetNodeReferenceID(segmentation.GetReferenceImageGeometryReferenceRole(), volume.GetID())
    return volume, segmentation


_registered = False
ICON = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "Resources", "Icons", "CPCLSegment.png")


def register_with_slicer() -> bool:
    """Offers the sample in Slicer's Sample Data module (category "CPCLSegment"), with the module's icon; False in a
    Slicer built without the Sample Data module, while slicerio is not installed, or when it is registered already."""
    try:
        import SampleData
    except ImportError:
        return False
    return register(SampleData.SampleDataLogic, ICON)


def register(sample_data_logic: Any, thumbnail: Optional[str] = None) -> bool:
    """Registers the sample once with ``sample_data_logic`` (``SampleData.SampleDataLogic``); clicking it loads the
    files into ``slicer.mrmlScene``. False while slicerio is not installed (the module registers again after an
    install) or when it is registered already."""
    global _registered
    # SampleData calls customDownloader(source) (5.8-5.12; older releases called it without arguments)
    kwargs = registration(lambda source=None: load_sample(slicer.mrmlScene), thumbnail)
    if kwargs is None or _registered:
        return False
    sample_data_logic.registerCustomSampleDataSource(**kwargs)
    _registered = True
    return True


def registration(loader: Callable[[Any], Any], thumbnail: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Keyword arguments for ``SampleDataLogic.registerCustomSampleDataSource``, or None when the files are not
    there (slicerio not installed). ``loader(source)`` is called when the user clicks the sample."""
    paths = sample_files()
    if paths is None:
        return None
    return {
        "category": CATEGORY, "sampleName": SAMPLE_NAME, "thumbnailFileName": thumbnail,
        "uris": [Path(p).as_uri() for p in paths], "fileNames": list(FILES), "nodeNames": [VOLUME_NAME, SEGMENTATION_NAME],
        "loadFiles": [False, False], "customDownloader": loader,
    }
