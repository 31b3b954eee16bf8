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


def test_registering_once_and_clicking_the_sample_loads_it_into_the_scene(monkeypatch):
    monkeypatch.setattr(sampledata, "_registered", False)
    registered = []

    class SampleDataLogic:  # SampleData.SampleDataLogic's one static method the module calls
        @staticmethod
        def registerCustomSampleDataSource(**kwargs):
            registered.append(kwargs)

    assert sampledata.register(SampleDataLogic, "icon.png")
    assert not sampledata.register(SampleDataLogic)  # after an install the module registers again: no duplicate
    assert len(registered) == 1 and registered[0]["sampleName"] == sampledata.SAMPLE_NAME
    scene = new_scene()  # the scene the Sample Data module's click loads into (slicer.mrmlScene)
    volume, segmentation = registered[0]["customDownloader"](object())  # SampleData calls customDownloader(source)
    assert scene.GetNodeByID(volume.GetID()) is volume and scene.GetNodeByID(segmentation.GetID()) is segmentation
    monkeypatch.setattr(sampledata, "_registered", False)
    monkeypatch.setattr(sampledata, "sample_files", lambda: None)
    assert not sampledata.register(SampleDataLogic) and len(registered) == 1  # slicerio not installed: not offered


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
