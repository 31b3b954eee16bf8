"""Shared fixtures: real data paths and ONE trained model reused by many tests (keeps the suite fast).

The shared model is trained once per session through the pipeline (the same path as ``cpcl-segment
train``) on slicerio's chest CT (two lung segments), resampled to 6 mm in-plane so a 16×64×64 patch sees a
whole slice: about 30 s on two CPU cores.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
HIPPO = SHARED_DATA / "msd-hippocampus"
TOTALSEG = SHARED_DATA / "totalsegmentator-example"

LUNGS = ["right lung", "left lung"]
COARSE_SPACING = [6.09375190734864, 6.09375190734864, 10.0]


def slicerio_data_dir() -> Path:
    import slicerio

    return Path(slicerio.__file__).parent / "data"


@pytest.fixture(scope="session", autouse=True)
def preprocessing_cache(tmp_path_factory):
    """The suite's runs (here and in child processes) share one preprocessing cache of their own, never the user's."""
    folder = tmp_path_factory.mktemp("preprocessing-cache")
    before = os.environ.get("CPCL_SEGMENT_CACHE_DIR")
    os.environ["CPCL_SEGMENT_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("CPCL_SEGMENT_CACHE_DIR", None)
    else:
        os.environ["CPCL_SEGMENT_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def ct_path() -> str:
    return str(slicerio_data_dir() / "CTChest4.nrrd")


@pytest.fixture(scope="session")
def seg_path() -> str:
    return str(slicerio_data_dir() / "Segmentation.seg.nrrd")


@pytest.fixture(scope="session")
def overlapping_seg_path() -> str:
    return str(slicerio_data_dir() / "SegmentationOverlapping.seg.nrrd")


def small_config(**overrides):
    from CPCLSegmentLib.trainer import TrainConfig

    # copy_paste off: these short runs test the pipeline, not the recipe (test_method_fidelity.py pins and tests it)
    cfg = dict(iterations=120, patch_size=(16, 64, 64), width=8, optimizer="adamw", lr=3e-3, seed=0, device="cpu",
               validation_every=60, checkpoint_every=60, copy_paste=False)
    cfg.update(overrides)
    return TrainConfig(**cfg)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, ct_path, seg_path):
    """(model path, events, result) of one short CPCL run on the chest CT, lungs only."""
    from CPCLSegmentLib import pipeline
    from CPCLSegmentLib.preparation import LabeledInput, TrainRequest
    from CPCLSegmentLib.settings import RunOptions

    out = tmp_path_factory.mktemp("shared-model") / "lungs.pt"
    events = []
    request = TrainRequest(
        labeled=[LabeledInput(ct_path, seg_path)],
        unlabeled=[ct_path],
        out=str(out),
        segments=list(LUNGS),
        config=small_config(),
        options=RunOptions(spacing=list(COARSE_SPACING)),
    )
    result = pipeline.train(request, events.append)
    return str(out), events, result


def user_folder(folder: Path, ct_path: str, seg_path: str) -> Path:
    """A user's folder of inputs: the chest CT as ``ct.nii.gz`` and ``ct.nrrd`` and its ``ct.seg.nrrd``."""
    import shutil

    import SimpleITK as sitk

    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.ReadImage(ct_path), str(folder / "ct.nii.gz"))
    shutil.copy(ct_path, folder / "ct.nrrd")
    shutil.copy(seg_path, folder / "ct.seg.nrrd")
    return folder


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cli_command(*args) -> list:
    return [sys.executable, "-m", "CPCLSegmentLib.cli", *[str(a) for a in args]]


def needs_shared(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is not present (it lives beside the project, in ../shared/data)")


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "CPCLSegment") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def timing_trainer(trainer) -> bool:
    """Whether ``trainer`` is the one ``pace.step_seconds`` builds to time steps for the estimate (not the run):
    tests that patch ``Trainer.step`` to act at an iteration of the run leave it alone."""
    return any(c.name == "timing" for c in trainer.labeled)
