"""Prediction: a model file and images in, segmentations on each image's own grid out.

``Predictor`` loads a model file once (``modelfile.load_model``: ``weights_only=True``) and segments images:
the image is brought onto the model grid exactly as at training time (``preparation.model_input``), MONAI's
sliding window gives class probabilities (``inference.predict_probabilities``), and ``back_to_image_grid``
maps them back onto the **original** grid (size, spacing, origin, direction). ``predict`` does this for a list
of files and writes one output per image (``writers.write_prediction``, atomically).

Before any work ``predict`` checks every output against every input (``preflight.check_outputs``: an output
that would replace an input image or the model, e.g. ``--out`` a folder holding the inputs with their own
format, is refused naming both). Per image it warns when the image looks unlike the model's training data (a
CT model on an image without air values, an MR model on a CT, a spacing far from the model's) and announces
each long phase (``phase`` events, so the CLI's heartbeat can say what is running).
"""

from __future__ import annotations

import os
import time
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from . import io as cio
from .errors import InputError
from .inference import class_argmax, predict_probabilities
from .labels import same_grid
from .modelfile import build_from_record, load_model
from .devices import resolve_device
from .preflight import check_outputs, sweep_leftovers
from .preparation import Emit, looks_like_ct, model_input
from .writers import write_prediction

MAX_MODEL_GRID = 2**31 - 1  # numpy / ITK index limits
SPACING_FACTOR_WARNING = 3.0  # an image whose spacing differs from the model's by more than this on an axis: warned



class Predictor:
    """A loaded model that segments images (the model file is read once)."""

    def __init__(self, model_path: str, weights: str = "teacher", device: str = "auto") -> None:
        self.path = str(model_path)
        self.record = load_model(self.path)
        self.device = resolve_device(device)
        self.net = build_from_record(self.record, weights).to(self.device)
        self.classes = self.record["classes"]
        self.patch = tuple(int(p) for p in self.record["patch_size"])

    def preprocess(self, image: sitk.Image) -> Tuple[sitk.Image, np.ndarray]:
        return model_input(image, self.record.get("spacing"), self.record["normalization"])

    def probabilities(self, image: sitk.Image, overlap: float = 0.5) -> Tuple[sitk.Image, torch.Tensor]:
        grid, arr = self.preprocess(image)
        return grid, predict_probabilities(self.net, arr, self.patch, self.device, overlap=overlap)

    def segment(self, image: sitk.Image, largest_component: bool = False, overlap: float = 0.5) -> np.ndarray:
        """Class-index labels ``(D, H, W)`` uint8 on the **original** image grid."""
        grid, probs = self.probabilities(image, overlap)
        return back_to_image_grid(probs, grid, image, largest_component)


def back_to_image_grid(probs: torch.Tensor, grid: sitk.Image, image: sitk.Image, largest_component: bool = False) -> np.ndarray:
    """Maps model-grid probabilities ``(K, D, H, W)`` to labels on ``image``'s grid.

    Same spacing (only reoriented): argmax, then an exact axis permutation back. Other spacing: each
    class probability is resampled linearly onto the image grid, then argmax.
    """
    same_spacing = np.allclose(sorted(grid.GetSpacing()), sorted(image.GetSpacing()), rtol=1e-3) and sorted(grid.GetSize()) == sorted(image.GetSize())
    labels = None
    if same_spacing:
        lab = sitk.GetImageFromArray(class_argmax(probs))
        lab.CopyInformation(grid)
        # the exact inverse of the canonical reorientation (an axis permutation / flip, no interpolation)
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        back = sitk.DICOMOrient(lab, code)
        if same_grid(back, image):
            labels = sitk.GetArrayFromImage(back)
        else:
            out = sitk.Resample(lab, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            labels = sitk.GetArrayFromImage(out)
    else:
        best = None
        for k in range(probs.shape[0]):
            p = sitk.GetImageFromArray(probs[k].numpy())
            p.CopyInformation(grid)
            pk = sitk.GetArrayFromImage(sitk.Resample(p, image, sitk.Transform(), sitk.sitkLinear, 0.0 if k else 1.0, sitk.sitkFloat32))
            if best is None:
                best, labels = pk, np.zeros(pk.shape, dtype=np.uint8)
            else:
                upd = pk > best
                labels[upd] = k
                best = np.where(upd, pk, best)
    if largest_component:
        labels = keep_largest_components(labels)
    return labels.astype(np.uint8)


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Keeps, per class, only its largest connected component (26-connectivity)."""
    out = labels.copy()
    for c in np.unique(labels):
        if c == 0:
            continue
        mask = sitk.GetImageFromArray((labels == c).astype(np.uint8))
        cc = sitk.RelabelComponent(sitk.ConnectedComponent(mask, True), sortByObjectSize=True)
        arr = sitk.GetArrayFromImage(cc)
        out[(labels == c) & (arr != 1)] = 0
    return out


def compatibility_warnings(record: dict, image: sitk.Image, name: str) -> List[str]:
    """Why ``image`` may be unlike what the model was trained on: CT vs not CT, a very different spacing, a very
    large grid at the model's spacing. Empty when nothing stands out."""
    out = []
    norm = record.get("normalization") or {}
    modality = norm.get("modality") or ("ct" if norm.get("scheme") == "ct" else None)
    is_ct = looks_like_ct(sitk.GetArrayViewFromImage(image))
    if modality == "ct" and not is_ct:
        out.append(f"{name} has no air values (no voxel at or below -500): it does not look like a CT in Hounsfield units, "
                   "but the model was trained on CT; the result may be meaningless")
    elif modality in ("mr", "other") and is_ct:
        out.append(f"{name} looks like a CT (air at -1000) but the model was trained on {modality.upper()} images; "
                   "the result may be meaningless")
    spacing = record.get("spacing")
    if spacing:
        own = image.GetSpacing()
        ratio = max(max(a / b, b / a) for a, b in zip(own, spacing))
        voxels = model_grid_voxels(record, image)
        if ratio > SPACING_FACTOR_WARNING:
            out.append(f"{name} has a spacing of {[round(v, 3) for v in own]} mm, the model was trained at "
                       f"{[round(v, 3) for v in spacing]} mm: it is resampled to {voxels / 1e6:.1f} M voxels; a model "
                       "trained at a spacing closer to the image's would be faster and likely more accurate")
    return out


def model_grid_voxels(record: dict, image: sitk.Image) -> int:
    """Voxels of ``image`` once resampled to the model's spacing."""
    spacing = record.get("spacing") or image.GetSpacing()
    return int(np.prod([max(1, round(n * a / b)) for n, a, b in zip(image.GetSize(), image.GetSpacing(), spacing)]))


def output_paths(images: Sequence[str], out: str, default_ext: str = ".seg.nrrd") -> List[str]:
    """One output per image: ``out`` itself for one image (unless a folder), else ``out/<input name><ext>``."""
    out = str(out)
    if not out.strip():
        raise InputError("--out is empty: give an output file (.seg.nrrd, .nii.gz, .nrrd, .mha) or a folder")
    is_file_target = cio.has_extension(out, cio.IMAGE_EXTENSIONS + (cio.SEG_EXTENSION,)) and not os.path.isdir(out)
    if len(images) == 1 and is_file_target:
        return [out]
    if is_file_target:
        raise InputError(f"several images were given, so --out must be a folder, not the file name {out}")
    if os.path.isfile(out):
        raise InputError(f"--out {out} is an existing file of no segmentation format; give a .seg.nrrd, .nii.gz, .nrrd or .mha "
                         "file, or a folder")
    ext = os.path.splitext(os.path.basename(out.rstrip("/\\")))[1]
    if ext and not os.path.isdir(out) and not out.endswith(("/", os.sep)):
        raise InputError(f"--out {out}: {ext} is not a segmentation format; give a .seg.nrrd, .nii.gz, .nrrd or .mha file, or a "
                         f"folder (a new folder's name ends in {os.sep} when it has a dot: {out}{os.sep})")
    names = [cio.strip_extension(p) for p in images]
    if len(set(names)) != len(names):
        names = [f"{n}-{i + 1}" for i, n in enumerate(names)]
    return [os.path.join(out, n + default_ext) for n in names]


def predict(model_path: str, images: Sequence[str], out: str, weights: str = "teacher", device: str = "auto",
            largest_component: bool = False, output_format: str = ".seg.nrrd", emit: Optional[Emit] = None,
            should_stop: Optional[Callable[[], bool]] = None, crop: bool = False) -> List[str]:
    """Segments each image with the model and writes one output per image (atomically); ``crop``: a ``.seg.nrrd`` holds
    only the box around its segments (``writers.write_seg_nrrd``)."""
    emit = emit or (lambda e: None)
    images = [str(p) for p in images]
    if not images:
        raise InputError("give at least one image to segment")
    for p in images:
        cio.check_exists(p, "image", folder_ok=True)
    inputs = [("--model", str(model_path))] + [("--image", p) for p in images]
    if os.path.isfile(str(out)):
        check_outputs([("--out", str(out))], inputs)  # names the input an existing --out file is
    targets = output_paths(images, out, output_format)
    check_outputs([("--out", t) for t in targets], inputs)
    sweep_leftovers({os.path.dirname(os.path.abspath(t)) for t in targets}, emit, with_temp_dir=False)
    predictor = Predictor(model_path, weights, device)
    written = []
    for n, (path, target) in enumerate(zip(images, targets)):
        if should_stop and should_stop():
            break
        t = time.perf_counter()
        emit({"event": "phase", "phase": "reading", "index": n + 1, "of": len(images), "detail": path})
        image = cio.read_image(path)
        for message in compatibility_warnings(predictor.record, image, path):
            emit({"event": "warning", "message": message})
        voxels = model_grid_voxels(predictor.record, image)
        if voxels > MAX_MODEL_GRID:
            raise InputError(f"{path} would have {voxels:,} voxels at the model's spacing {predictor.record.get('spacing')} mm, "
                             "more than can be segmented at once: check the image's spacing, or use a model trained at a coarser one")
        emit({"event": "phase", "phase": "segmenting", "index": n + 1, "of": len(images),
              "detail": f"{path} ({voxels / 1e6:.1f} M voxels on the model grid)"})
        labels = predictor.segment(image, largest_component)
        emit({"event": "phase", "phase": "writing", "index": n + 1, "of": len(images), "detail": target})
        write_prediction(target, labels, image, predictor.classes, crop=crop)
        written.append(target)
        emit({"event": "predict", "index": n + 1, "of": len(images), "image": path, "output": target,
              "seconds": round(time.perf_counter() - t, 2)})
    return written
