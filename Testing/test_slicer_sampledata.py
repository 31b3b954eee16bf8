"""The chest CT sample (slicer-core): offered when slicerio is installed, loaded as a labeled case that the
panel's "Add all segmented volumes" pairs in one click."""

import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core; Python >= 3.10)")

from CPCLSegmentModuleLib import sampledata  # noqa: E402

from slicer_scene import new_scene  # noqa: E402


def test_the_sample_loads_as_a_paired_labeled_case():
    scene = new_scene()
    volume, segmentation = sampledata.load_sample(scene)
    assert volume.GetImageData().GetDimensions() == (128, 128, 34)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 7
    ref = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
    assert ref is volume  # what pairs a segmentation with its volume in the panel


def test_the_registration_arguments_fit_slicers_sample_data_source(monkeypatch):
    calls = []
    kwargs = sampledata.registration(calls.append, "icon.png")
    # SampleDataSource (Modules/Scripted/SampleData/SampleData.py, 5.8-5.12) needs lists of one length
    lists = [kwargs[k] for k in ("uris", "fileNames", "nodeNames", "loadFiles")]
    assert len({len(x) for x in lists}) == 1 and all(u.startswith("file://") for u in kwargs["uris"])
    assert kwargs["customDownloader"] == calls.append and kwargs["category"] == "CPCLSegment"
    monkeypatch.setattr(sampledata, "sample_files", lambda: None)  # slicerio not installed yet: nothing offered
    assert sampledata.registration(calls.append) is None
    with pytest.raises(FileNotFoundError, match="install CPCLSegment's dependencies"):
        sampledata.load_sample(new_scene())
