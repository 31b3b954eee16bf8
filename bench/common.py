"""Shared helpers for the accuracy benchmarks (``bench/accuracy.py``, ``bench/sparse_labels.py``).

- ``Dataset`` / ``DATASETS``: the benchmark data sets (hippocampus, left atrium); ``load_subjects`` reads subjects once and preprocesses them **exactly as
  ``pipeline.train`` / ``prediction.Predictor`` do** (``preparation.read_labeled`` for the label map,
  ``preparation.model_input`` at the median spacing of the training pool, per-volume z-score, ``labels_to_grid``),
  keeping both the model-grid arrays (for training) and the original image + label (for evaluation).
- ``evaluate``: segments each subject the way ``Predictor.segment`` does (model grid → MONAI sliding window
  with overlap 0.5 → ``back_to_image_grid``) and scores Dice and HD95 (mm) per class on the **original**
  label, with ``CPCLSegmentLib.metrics``.
- ``Results``: a JSON-lines results file; finished run keys are skipped (resumable), appends are locked so
  several shards can write to one file.
- ``split_train``: fixed validation set, then per-seed labeled draws, from ``splits.json``'s ``train`` only.

The engine is used directly (``trainer.Trainer`` on in-memory ``Case`` objects) instead of going through
files for every run; the preprocessing and prediction code paths are the engine's own functions.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "CPCLSegment") not in sys.path:
    sys.path.insert(0, str(ROOT / "CPCLSegment"))

import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from CPCLSegmentLib import io as cio  # noqa: E402
from CPCLSegmentLib.data import Case, make_case  # noqa: E402
from CPCLSegmentLib.inference import predict_probabilities  # noqa: E402
from CPCLSegmentLib.metrics import dice_per_class, hd95_per_class, nanmean  # noqa: E402
from CPCLSegmentLib.modelfile import plain  # noqa: E402
from CPCLSegmentLib.planning import median_spacing  # noqa: E402
from CPCLSegmentLib.prediction import back_to_image_grid  # noqa: E402
from CPCLSegmentLib.preparation import LabeledInput, labels_to_grid, looks_like_ct, model_input, plan_normalization, read_labeled  # noqa: E402
from CPCLSegmentLib.prototypes import IGNORE_INDEX  # noqa: E402

SHARED_DATA = ROOT.parent / "shared" / "data"
RESULTS_DIR = ROOT / "bench" / "results"
VALIDATION_SIZE = 10
VALIDATION_SEED = 1234


@dataclass(frozen=True)
class Dataset:
    """A benchmark data set beside the project (``../shared/data/<folder>``) with a ``splits.json`` of
    ``train`` / ``test`` subject names; images and label maps are NIfTI files named after the subject."""

    key: str  # --dataset value
    folder: str
    env: str  # environment variable that overrides the folder
    images: str  # sub-folder of the images
    labels: str  # sub-folder of the label maps
    class_names: Tuple[str, ...]  # label value i + 1 -> class_names[i]
    unlabeled_extra: str = ""  # sub-folder of extra images without labels ("" = none)
    title: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names) + 1

    @property
    def segments(self) -> List[str]:
        """What ``preparation.resolve_classes`` names the label-map values."""
        return [f"Label {i}" for i in range(1, self.num_classes)]

    def files(self, d: Path, name: str) -> Tuple[str, str]:
        return str(d / self.images / f"{name}.nii.gz"), str(d / self.labels / f"{name}.nii.gz")


DATASETS: Dict[str, Dataset] = {
    # label 1 = anterior hippocampus (head), 2 = posterior (body)
    "hippocampus": Dataset("hippocampus", "msd-hippocampus", "CPCL_HIPPO_DIR", "imagesTr", "labelsTr",
                           ("anterior", "posterior"), "imagesTs", "MSD hippocampus"),
    "la": Dataset("la", "la2018-halfres", "CPCL_LA_DIR", "images", "labels", ("atrium",), "", "left atrium (LA2018, half resolution)"),
}
HIPPOCAMPUS = DATASETS["hippocampus"]
DEFAULT_DATA = SHARED_DATA / HIPPOCAMPUS.folder
CLASS_NAMES = list(HIPPOCAMPUS.class_names)  # the hippocampus benchmarks' classes
NUM_CLASSES = HIPPOCAMPUS.num_classes


def data_dir(path: Optional[str] = None, dataset: Dataset = HIPPOCAMPUS) -> Path:
    d = Path(path or os.environ.get(dataset.env) or SHARED_DATA / dataset.folder)
    if not (d / "splits.json").exists():
        raise SystemExit(f"{dataset.title or dataset.key} data not found at {d} (it lives beside the project in "
                         f"../shared/data; or set {dataset.env} / --data)")
    return d


def read_splits(d: Path) -> Dict[str, List[str]]:
    with open(d / "splits.json", encoding="utf-8") as f:
        s = json.load(f)
    return {"train": list(s["train"]), "test": list(s["test"])}


# ------------------------------------------------------------------------------------------- subjects


@dataclass
class Subject:
    """One hippocampus subject: original image + label (evaluation) and model-grid arrays (training)."""

    name: str
    image: sitk.Image  # original, as read by io.read_image
    label: np.ndarray  # (D, H, W) class indices on the original grid
    grid: sitk.Image  # model grid (canonical orientation, target spacing)
    array: np.ndarray  # normalised image on the model grid
    grid_label: np.ndarray  # labels on the model grid

    def case(self, label: Optional[np.ndarray] = None, labeled: bool = True, seed: int = 0) -> Case:
        """An engine Case (in memory); ``label`` overrides the model-grid label (sparse labels)."""
        if not labeled:
            return make_case(self.name, self.array, None)
        return make_case(self.name, self.array, self.grid_label if label is None else label, None, seed=seed)


def plan_for(d: Path, names: Sequence[str], dataset: Dataset = HIPPOCAMPUS) -> Dict[str, Any]:
    """What ``planning.plan_run`` would choose for these labeled cases: median spacing, MR z-score."""
    spacings, ct_votes = [], []
    for n in names:
        img = sitk.ReadImage(dataset.files(d, n)[0])
        spacings.append(list(img.GetSpacing()))
        ct_votes.append(looks_like_ct(sitk.GetArrayViewFromImage(img)))
    modality = "ct" if sum(ct_votes) > len(ct_votes) / 2 else "mr"
    if modality != "mr":
        raise RuntimeError(f"{dataset.key} MR detected as CT: the benchmark's preprocessing assumption is wrong")
    norm = plan_normalization("mr", [])
    norm["modality"] = "mr"
    return {"spacing": median_spacing(spacings), "normalization": norm}


def load_subject(d: Path, name: str, plan: Dict[str, Any], dataset: Dataset = HIPPOCAMPUS) -> Subject:
    img_path, lab_path = dataset.files(d, name)
    image, labels, _ = read_labeled(LabeledInput(img_path, lab_path), dataset.segments, None, False, lambda e: None)
    grid, arr = model_input(image, plan["spacing"], plan["normalization"])
    lab = labels_to_grid(labels, image, grid)
    return Subject(name, image, labels.astype(np.int16), grid, arr, lab)


def load_unlabeled_extra(d: Path, plan: Dict[str, Any], dataset: Dataset = HIPPOCAMPUS) -> List[Case]:
    """Extra images without labels (hippocampus ``imagesTs``: one subject), preprocessed as the pipeline does."""
    out = []
    folder = d / dataset.unlabeled_extra if dataset.unlabeled_extra else None
    for p in sorted(folder.glob("*.nii.gz")) if folder is not None and folder.exists() else []:
        _, arr = model_input(cio.read_image(str(p)), plan["spacing"], plan["normalization"])
        out.append(make_case(p.name.split(".")[0], arr, None))
    return out


def load_subjects(d: Path, names: Iterable[str], plan: Dict[str, Any], dataset: Dataset = HIPPOCAMPUS) -> Dict[str, Subject]:
    return {n: load_subject(d, n, plan, dataset) for n in names}


def split_train(train: Sequence[str], budget: Optional[int], seed: int, validation_size: int = VALIDATION_SIZE) -> Dict[str, List[str]]:
    """Validation (fixed across seeds and budgets), labeled (``budget`` cases drawn with ``seed``; None = all)
    and unlabeled (the rest of the pool), all from ``train``."""
    pool = sorted(train)
    rng = np.random.RandomState(VALIDATION_SEED)
    val = sorted(rng.choice(pool, validation_size, replace=False).tolist())
    rest = [n for n in pool if n not in val]
    if budget is None or budget >= len(rest):
        return {"validation": val, "labeled": rest, "unlabeled": []}
    lab = sorted(np.random.RandomState(1000 + seed).choice(rest, budget, replace=False).tolist())
    return {"validation": val, "labeled": lab, "unlabeled": [n for n in rest if n not in lab]}


# ----------------------------------------------------------------------------------------- evaluation


def segment(net: torch.nn.Module, subject: Subject, patch: Sequence[int], device: torch.device, overlap: float = 0.5) -> np.ndarray:
    """What ``Predictor.segment`` returns (labels on the original grid) for an in-memory network."""
    probs = predict_probabilities(net, subject.array, patch, device, overlap=overlap)
    return back_to_image_grid(probs, subject.grid, subject.image)


def evaluate(net: torch.nn.Module, subjects: Sequence[Subject], patch: Sequence[int], device: torch.device,
             hd95: bool = True, class_names: Sequence[str] = CLASS_NAMES) -> Dict[str, Any]:
    """Per-class mean Dice / HD95 (mm) over ``subjects`` plus the per-case values."""
    k = len(class_names) + 1
    per_dice, per_hd = [], []
    for s in subjects:
        pred = segment(net, s, patch, device)
        per_dice.append(dice_per_class(pred, s.label, k))
        if hd95:
            per_hd.append(hd95_per_class(pred, s.label, k, spacing=list(s.image.GetSpacing())[::-1]))
    out: Dict[str, Any] = {
        "dice": {c: nanmean([d[i] for d in per_dice]) for i, c in enumerate(class_names)},
        "per_case_dice": [[round(v, 5) for v in d] for d in per_dice],
    }
    out["mean_dice"] = nanmean(list(out["dice"].values()))
    if hd95:
        out["hd95"] = {c: nanmean([h[i] for h in per_hd]) for i, c in enumerate(class_names)}
        out["mean_hd95"] = nanmean(list(out["hd95"].values()))
        out["per_case_hd95"] = [[round(v, 3) for v in h] for h in per_hd]
    return out


def sparse_label(label: np.ndarray, every: int, axis: int = 0, offset: Optional[int] = None) -> np.ndarray:
    """Keeps every ``every``-th slice along ``axis`` (numpy axis of the model-grid array; 0 = axial for an
    LPS grid), the rest becomes ``IGNORE_INDEX``. Slices are placed so that the kept set starts inside the
    labeled extent (``offset`` = first labeled slice + every // 2 by default), like a clinician painting
    every N-th slice through the structure."""
    if every <= 1:
        return label.copy()
    fg = np.nonzero((label > 0).any(axis=tuple(a for a in range(3) if a != axis)))[0]
    first = int(fg.min()) if fg.size else 0
    off = (first + every // 2) if offset is None else offset
    keep = np.zeros(label.shape[axis], dtype=bool)
    keep[off % every :: every] = True
    shape = [1, 1, 1]
    shape[axis] = -1
    mask = np.broadcast_to(keep.reshape(shape), label.shape)
    return np.where(mask, label, IGNORE_INDEX).astype(np.int16)


# -------------------------------------------------------------------------------------------- results


class Results:
    """JSON-lines file of finished runs keyed by ``record["key"]`` (resumable, shard-safe appends)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def records(self) -> List[Dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line:
                    with contextlib.suppress(json.JSONDecodeError):
                        out.append(json.loads(line))
        return out

    def done(self) -> set:
        return {r["key"] for r in self.records()}

    def append(self, record: Dict[str, Any]) -> None:
        line = json.dumps(plain(record, nan_as_none=True), sort_keys=True) + "\n"
        with open(self.path, "a", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(line)
            f.flush()
            fcntl.flock(f, fcntl.LOCK_UN)


def machine() -> str:
    """Short description of where a number was produced."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (GPU)"
    return f"CPU {os.cpu_count()} cores, {torch.get_num_threads()} torch threads ({platform.machine()}, {socket.gethostname()[:12]})"


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "monai", "numpy", "SimpleITK"):
        with contextlib.suppress(Exception):
            out[mod] = __import__(mod).__version__
    from CPCLSegmentLib import __version__

    out["cpcl-segment"] = __version__
    return out


def parse_shard(text: Optional[str]) -> Tuple[int, int]:
    if not text:
        return 0, 1
    i, n = text.split("/")
    i, n = int(i), int(n)
    if not 0 <= i < n:
        raise SystemExit(f"--shard {text}: need i/n with 0 <= i < n")
    return i, n


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation of the finite values; the std is NaN for one value (no spread to
    report: tables print the mean alone), both are NaN for none."""
    v = np.asarray([x for x in values if x is not None and x == x], dtype=float)
    if not v.size:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


class Timer:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t


def finish_figure(fig: Any, axes: Iterable[Any], path: Path) -> None:
    """Grid and legend on every panel, then the figure written to ``path`` (PNG, 110 dpi) and closed."""
    import matplotlib.pyplot as plt

    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
