"""Prediction: a model file and images in, segmentations on each image's own grid out.

``Predictor`` loads a model file once (``modelfile.load_model``: ``weights_only=True``) and segments images:
the image is brought onto the model grid exactly as at training time (``preparation.model_input``), MONAI's
sliding window gives class probabilities (``inference.predict_probabilities``), and ``back_to_image_grid``
maps them back onto the **original** grid (size, spacing, origin, direction). ``predict`` does this for a list
of files and writes one output per image (``writers.write_prediction``, atomically).
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
from .inference import predict_probabilities
from .modelfile import build_from_record, load_model
from .preparation import Emit, model_input
from .devices import resolve_device
from .writers import write_prediction


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
        lab = sitk.GetImageFromArray(probs.numpy().argmax(0).astype(np.uint8))
        lab.CopyInformation(grid)
        # the exact inverse of the canonical reorientation (an axis permutation / flip, no interpolation)
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
        back = sitk.DICOMOrient(lab, code)
        if cio.same_grid(back, image):
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


def output_paths(images: Sequence[str], out: str, default_ext: str = ".seg.nrrd") -> List[str]:
    """One output per image: ``out`` itself for one image (unless a folder), else ``out/<input name><ext>``."""
    out = str(out)
    is_file_target = cio.has_extension(out, cio.IMAGE_EXTENSIONS + (cio.SEG_EXTENSION,)) and not os.path.isdir(out)
    if len(images) == 1 and is_file_target:
        return [out]
    if is_file_target:
        raise InputError(f"several images were given, so --out must be a folder, not the file name {out}")
    names = [cio.strip_extension(p) for p in images]
    if len(set(names)) != len(names):
        names = [f"{n}-{i + 1}" for i, n in enumerate(names)]
    return [os.path.join(out, n + default_ext) for n in names]


def predict(model_path: str, images: Sequence[str], out: str, weights: str = "teacher", device: str = "auto",
            largest_component: bool = False, output_format: str = ".seg.nrrd", emit: Optional[Emit] = None,
            should_stop: Optional[Callable[[], bool]] = None) -> List[str]:
    """Segments each image with the model and writes one output per image (atomically)."""
    emit = emit or (lambda e: None)
    if not images:
        raise InputError("give at least one image to segment")
    for p in images:
        cio.check_exists(p, "image")
    predictor = Predictor(model_path, weights, device)
    targets = output_paths(images, out, output_format)
    written = []
    for n, (path, target) in enumerate(zip(images, targets)):
        if should_stop and should_stop():
            break
        t = time.perf_counter()
        image = cio.read_image(path)
        labels = predictor.segment(image, largest_component)
        write_prediction(target, labels, image, predictor.classes)
        written.append(target)
        emit({"event": "predict", "index": n + 1, "of": len(images), "image": path, "output": target,
              "seconds": round(time.perf_counter() - t, 2)})
    return written
