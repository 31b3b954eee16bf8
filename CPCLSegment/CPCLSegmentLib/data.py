"""Cases (preprocessed volumes on the model grid, in memory or memory-mapped), patch sampling and augmentation.

How a file becomes a Case (reorientation, spacing, intensity normalisation) is ``preparation``'s part.

Sampling is driven by one random stream **per sample**, seeded by ``(seed, stream, iteration, global
sample index)``. A run is therefore reproducible, resumes exactly from any iteration without saving sampler
state, and gives the same global batch whatever the number of DDP ranks (each rank draws only its slice).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError
from .settings import IGNORE_INDEX

_MAX_LOCATIONS = 20000  # foreground voxel coordinates kept per class and case for oversampling


# -------------------------------------------------------------------------------------------- cases


@functools.lru_cache(maxsize=64)
def _open_npy(path: str) -> np.ndarray:
    """Memory-mapped ``.npy`` (bounded: at most 64 open at once; pages are read on demand)."""
    return np.load(path, mmap_mode="r")


@dataclass
class Case:
    """One preprocessed volume on the model grid, held in memory or as ``.npy`` files read on demand.

    ``label`` uses class indices with ``IGNORE_INDEX`` (-1) for unknown voxels; ``class_known`` (K,) marks
    segments annotated in this case (None: all). ``locations[c]`` holds up to 20 000 voxel coordinates of
    class c for foreground oversampling; ``annotated`` holds coordinates of known voxels when the case
    has unknown voxels (sparse labels), so patches can be drawn where the labels are.
    """

    name: str
    shape: Tuple[int, int, int]
    image_source: Any
    label_source: Any = None
    class_known: Optional[np.ndarray] = None
    locations: Dict[int, np.ndarray] = field(default_factory=dict)
    annotated: Optional[np.ndarray] = None
    pad_value: float = 0.0  # the volume's minimum: what lies outside it (air, empty background)

    @property
    def image(self) -> np.ndarray:
        return _open_npy(self.image_source) if isinstance(self.image_source, str) else self.image_source

    @property
    def label(self) -> Optional[np.ndarray]:
        if self.label_source is None:
            return None
        return _open_npy(self.label_source) if isinstance(self.label_source, str) else self.label_source

    @property
    def is_labeled(self) -> bool:
        return self.label_source is not None


def make_case(
    name: str,
    image: np.ndarray,
    label: Optional[np.ndarray] = None,
    class_known: Optional[np.ndarray] = None,
    seed: int = 0,
) -> Case:
    """Builds a Case held in memory from preprocessed arrays."""
    image = np.ascontiguousarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise InputError(f"case {name}: image must be 3-D, got shape {image.shape}")
    if label is not None:
        label = np.ascontiguousarray(label, dtype=np.int16)
        if label.shape != image.shape:
            raise InputError(f"case {name}: label shape {label.shape} differs from image shape {image.shape}")
    locations, annotated = sample_locations(label, seed)
    return Case(name, tuple(int(s) for s in image.shape), image, label, class_known, locations, annotated, float(image.min()))


def cached_case(name: str, image_path: str, label_path: Optional[str], class_known: Optional[np.ndarray], pad_value: float,
                seed: int = 0) -> Case:
    """A Case whose arrays are ``.npy`` files (the preprocessing cache), read memory-mapped on demand."""
    image = _open_npy(image_path)
    label = _open_npy(label_path) if label_path is not None else None
    if label is not None and label.shape != image.shape:
        raise InputError(f"case {name}: label shape {label.shape} differs from image shape {image.shape}")
    locations, annotated = sample_locations(label, seed)
    return Case(name, tuple(int(s) for s in image.shape), image_path, label_path, class_known, locations, annotated, pad_value)


def sample_locations(label: Optional[np.ndarray], seed: int) -> Tuple[Dict[int, np.ndarray], Optional[np.ndarray]]:
    """``(locations, annotated)`` of a label array: up to ``_MAX_LOCATIONS`` voxel coordinates per class present
    (for foreground oversampling) and, when some voxels are unknown (``IGNORE_INDEX``), of known voxels."""
    locations: Dict[int, np.ndarray] = {}
    annotated = None
    if label is None:
        return locations, annotated
    rng = np.random.RandomState(seed)
    for c in np.unique(label):
        if c <= 0:
            continue
        idx = np.argwhere(label == c)
        if len(idx) > _MAX_LOCATIONS:
            idx = idx[rng.choice(len(idx), _MAX_LOCATIONS, replace=False)]
        locations[int(c)] = idx.astype(np.int32)
    if (label == IGNORE_INDEX).any():
        idx = np.argwhere(label != IGNORE_INDEX)
        if len(idx) > _MAX_LOCATIONS:
            idx = idx[rng.choice(len(idx), _MAX_LOCATIONS, replace=False)]
        annotated = idx.astype(np.int32)
    return locations, annotated


# ----------------------------------------------------------------------------------------- sampling


def sample_rng(seed: int, stream: int, iteration: int, index: int) -> np.random.RandomState:
    """The random stream of one sample: a pure function of its global position."""
    return np.random.RandomState([seed % 2**32, stream, iteration, index])


def crop(array: np.ndarray, start: Sequence[int], size: Sequence[int], pad_value: float) -> np.ndarray:
    """``array[start:start+size]`` with out-of-volume parts filled with ``pad_value``."""
    out = np.full(tuple(size), pad_value, dtype=array.dtype)
    src, dst = [], []
    for s, n, dim in zip(start, size, array.shape):
        a, b = max(s, 0), min(s + n, dim)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


def choose_start(case: Case, patch: Sequence[int], rng: np.random.RandomState, foreground_oversample: float) -> List[int]:
    """Patch origin: around a random voxel of a random present class with probability
    ``foreground_oversample`` (nnU-Net's oversampling); else around an annotated voxel (sparse labels) or
    uniformly inside the volume (patches larger than the volume are centred, the rest padded)."""
    shape = case.shape
    centre = None
    if case.locations and rng.rand() < foreground_oversample:
        cls = sorted(case.locations)[rng.randint(len(case.locations))]
        locs = case.locations[cls]
        centre = locs[rng.randint(len(locs))]
    elif case.annotated is not None and len(case.annotated):
        centre = case.annotated[rng.randint(len(case.annotated))]
    start = []
    for ax, (s, p) in enumerate(zip(shape, patch)):
        if centre is not None:
            # keep the chosen voxel inside the patch, at a random position within its central half
            lo = int(centre[ax]) - p + p // 4 + 1
            hi = int(centre[ax]) - p // 4
            lo, hi = min(lo, hi), max(lo, hi)
            st = rng.randint(lo, hi + 1)
            start.append(int(np.clip(st, min(0, s - p), max(0, s - p))) if s >= p else (s - p) // 2)
        elif s > p:
            start.append(int(rng.randint(0, s - p + 1)))
        else:
            start.append((s - p) // 2)
    return start


class Augmenter:
    """Per-sample augmentation with MONAI transforms, driven by the sample's own random stream.

    Spatial (image and label together): flips on each axis, rot90 in the planes whose patch sides are
    equal. Intensity ("strong" view): random scale / shift, contrast (gamma) and Gaussian noise, each with
    probability ``intensity_prob``.
    """

    def __init__(self, patch: Sequence[int], flip: bool = True, rot90: bool = True, intensity_prob: float = 0.0) -> None:
        from monai.data import set_track_meta
        from monai.transforms import (
            Compose,
            RandAdjustContrastd,
            RandFlipd,
            RandGaussianNoised,
            RandRotate90d,
            RandScaleIntensityd,
            RandShiftIntensityd,
        )

        set_track_meta(False)
        keys = ["image", "label"]
        spatial = []
        if flip:
            spatial += [RandFlipd(keys, prob=0.5, spatial_axis=a, allow_missing_keys=True) for a in range(3)]
        if rot90:
            for axes in ((1, 2), (0, 2), (0, 1)):
                if patch[axes[0]] == patch[axes[1]]:
                    spatial.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=axes, allow_missing_keys=True))
                    break
        self.spatial = Compose(spatial) if spatial else None
        self.intensity = None
        if intensity_prob > 0:
            p = intensity_prob
            self.intensity = Compose(
                [
                    RandScaleIntensityd(["image"], factors=0.25, prob=p),
                    RandShiftIntensityd(["image"], offsets=0.25, prob=p),
                    RandAdjustContrastd(["image"], gamma=(0.7, 1.5), prob=p),
                    RandGaussianNoised(["image"], std=0.1, prob=p),
                ]
            )

    @staticmethod
    def _seed(compose, rng: np.random.RandomState) -> None:
        # Compose draws one seed per child transform from ``rng``: deterministic per sample.
        compose.set_random_state(state=rng)

    def spatial_transform(self, sample: Dict[str, np.ndarray], rng: np.random.RandomState) -> Dict[str, np.ndarray]:
        if self.spatial is None:
            return sample
        self._seed(self.spatial, rng)
        out = self.spatial(sample)
        return {k: np.ascontiguousarray(np.asarray(v)) for k, v in out.items()}

    def intensity_transform(self, image: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        if self.intensity is None:
            return image
        self._seed(self.intensity, rng)
        return np.ascontiguousarray(np.asarray(self.intensity({"image": image})["image"]), dtype=np.float32)


@dataclass
class Batch:
    """Numpy batch: images ``(B, 1, D, H, W)`` float32; labels ``(B, D, H, W)`` int64 (labeled stream);
    ``teacher_images`` the teacher's view (unlabeled stream); ``class_known`` ``(B, K)`` bool."""

    images: np.ndarray
    labels: Optional[np.ndarray] = None
    teacher_images: Optional[np.ndarray] = None
    class_known: Optional[np.ndarray] = None
    names: List[str] = field(default_factory=list)


class PatchSampler:
    """Draws augmented patches from a list of cases (labeled or unlabeled stream)."""

    def __init__(
        self,
        cases: Sequence[Case],
        patch: Sequence[int],
        num_classes: int,
        augmenter: Augmenter,
        seed: int,
        stream: int,
        foreground_oversample: float = 0.33,
        teacher_noise: float = 0.0,
        strong_student: bool = False,
    ) -> None:
        if not cases:
            raise InputError("no cases to sample from")
        self.cases = list(cases)
        self.patch = tuple(int(p) for p in patch)
        self.num_classes = num_classes
        self.aug = augmenter
        self.seed, self.stream = seed, stream
        self.fg = foreground_oversample
        self.teacher_noise = teacher_noise
        self.strong_student = strong_student

    def sample(self, iteration: int, indices: Sequence[int]) -> Batch:
        """The samples at global positions ``indices`` of ``iteration``."""
        imgs, labs, teach, known, names = [], [], [], [], []
        for gi in indices:
            rng = sample_rng(self.seed, self.stream, iteration, gi)
            case = self.cases[rng.randint(len(self.cases))]
            start = choose_start(case, self.patch, rng, self.fg if case.is_labeled else 0.0)
            sample = {"image": crop(case.image, start, self.patch, case.pad_value)[None].astype(np.float32)}
            label = case.label
            if label is not None:
                sample["label"] = crop(label, start, self.patch, 0)[None]
            sample = self.aug.spatial_transform(sample, rng)
            image = sample["image"]
            names.append(case.name)
            if label is not None:
                imgs.append(self.aug.intensity_transform(image, rng))
                labs.append(sample["label"][0].astype(np.int64))
                ck = case.class_known if case.class_known is not None else np.ones(self.num_classes, dtype=bool)
                known.append(ck)
            else:
                t_img = image
                if self.teacher_noise > 0:
                    noise = np.clip(rng.normal(0, self.teacher_noise, image.shape), -2 * self.teacher_noise, 2 * self.teacher_noise)
                    t_img = (image + noise).astype(np.float32)
                teach.append(t_img)
                imgs.append(self.aug.intensity_transform(image, rng) if self.strong_student else image)
        batch = Batch(np.stack(imgs), names=names)
        if labs:
            batch.labels = np.stack(labs)
            batch.class_known = np.stack(known)
        if teach:
            batch.teacher_images = np.stack(teach)
        return batch


def paste_masks(patch: Sequence[int], fraction: float, seed: int, iteration: int, indices: Sequence[int]) -> np.ndarray:
    """Cross-image copy-paste boxes (bidirectional copy-paste, Bai et al. CVPR 2023): for each global pair index,
    a box of ``fraction`` of the patch along every axis at a uniformly random position, from the pair's own random
    stream (reproducible, resumable, the same whatever the number of DDP ranks). Returns ``(P, D, H, W)`` bool:
    True where the mixed image takes the UNLABELED patch — inside the box for an even global pair index
    ("inward": the unlabeled box pasted into the labeled patch), outside it for an odd one ("outward"). The
    direction follows the global index, so a rank holding one pair mixes it as a single process would."""
    out = np.zeros((len(indices), *patch), dtype=bool)
    for n, gi in enumerate(indices):
        rng = sample_rng(seed, 4, iteration, gi)
        size = [max(1, int(round(p * fraction))) for p in patch]
        start = [int(rng.randint(0, p - s + 1)) for p, s in zip(patch, size)]
        out[n][tuple(slice(a, a + s) for a, s in zip(start, size))] = True
        if gi % 2:
            out[n] = ~out[n]
    return out
