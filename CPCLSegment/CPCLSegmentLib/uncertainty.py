"""“Label this next”: per-voxel and per-case uncertainty of a trained model, and a ranking of images by it.

A trained model file holds the EMA **teacher** (used for prediction) and the class **prototypes**; the
**student** is no longer kept in model files (only in resume checkpoints), so the two student scores need a
model file from an older version that kept it, and ``--score auto`` ranks by ``entropy`` otherwise. The
class **prototypes** are ``p^k`` (``(K, C)``: the teacher's decoder features averaged per class over the labeled
cases; ``prototype_valid`` ``(K,)``). From one sliding-window pass over an image (both networks on the same
windows, MONAI's ``sliding_window_inference``, Gaussian blending) we get, per voxel ``x``:

* ``P_t(x)`` ``(K,)``: the teacher's softmax; ``P_s(x)``: the student's softmax;
* ``P_l2u(x) = softmax_k(s · cos(F_t(x), p^k))``: the CPCL *forward* (labeled→unlabeled) prototype
  prediction, i.e. "which labeled class does this voxel's feature resemble", s = the model's cosine scale
  (20), computed at the feature resolution and brought to the image resolution as logits (trilinear), exactly
  as during training.

Per-voxel scores, each in ``[0, 1]`` (``uncertainty_maps``):

==========================  ==========================================================================
``entropy``                 ``H(x) / log K`` with ``H(x) = -Σ_k P_t^k(x) log P_t^k(x)``: how spread the
                            teacher's own prediction is (0 = one class certain, 1 = uniform).
``student_teacher``         ``TV(P_s, P_t) = ½ Σ_k |P_s^k(x) - P_t^k(x)|``: how much the two networks of
                            the mean teacher disagree (0 = identical, 1 = disjoint).
``label_disagreement``      ``[argmax_k P_s^k(x) ≠ argmax_k P_t^k(x)]``: whether they assign a different
                            label (0 or 1 per voxel; its case mean is the fraction of flipped voxels).
``prototype``               ``TV(P_l2u, P̃_t)`` where ``P̃_t`` is the teacher's softmax restricted to
                            the classes that have a prototype: how far the voxel's feature-space
                            neighbour class is from what the teacher predicts there. This is the quantity
                            CPCL's forward loss ``L_fpc`` drives to zero on unlabeled images during
                            training, so it stays large where an image is unlike the labeled cases.
==========================  ==========================================================================

Per-case score (``case_scores``): the mean of a voxel map over the **region of interest**
``R = {x : max(1 - P_t^0(x), 1 - P_s^0(x)) ≥ REGION_THRESHOLD}``: voxels that the teacher or the student
gives at least a 10 % chance of being foreground. A plain mean over the whole volume would be dominated by the
(large, easy, certain) background and would mostly measure how big the field of view is; the region keeps the
predicted structures and their uncertain rim (where segmentation errors are). If no voxel reaches the
threshold (the model sees no structure at all), the whole volume is averaged and the row says so
(``region_voxels`` = 0). Scores are computed on the model's grid; the maps written for viewing are resampled
linearly onto each image's **own** grid (same size, spacing, origin and direction).

Which score ranks cases (``--score auto``): ``AUTO_SCORE``, the one whose ranking best matched the real
error (1 - mean Dice) on held-back labeled hippocampus cases in ``bench/uncertainty.py`` (BENCHMARKS.md,
"Label this next").
"""

from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from . import io as cio
from .errors import InputError, ModelFileError
from .modelfile import build_from_record
from .prediction import Predictor
from .preflight import check_outputs
from .preparation import Emit
from .prototypes import prototype_logits, to_label_resolution
from .settings import UNCERTAINTY_SCORES
from .writers import atomic_path, write_image

SCORES = UNCERTAINTY_SCORES
# Chosen by bench/uncertainty.py on MSD hippocampus (BENCHMARKS.md, "Label this next": Spearman rank
# correlation of each score with 1 - mean Dice on 30 held-back labeled cases per seed, 6 seeds: the highest
# mean rho and positive on every seed; see bench/results/uncertainty.md).
AUTO_SCORE = "label_disagreement"
AGGREGATION = "region"  # how a voxel map becomes a case score (bench/uncertainty.py compares the alternatives)
REGION_THRESHOLD = 0.1  # a voxel is "foreground or near it" when either network gives it >= 10 % foreground
_NEEDS = {"entropy": (), "student_teacher": ("student",), "label_disagreement": ("student",), "prototype": ("prototypes",)}
DESCRIPTIONS = {
    "entropy": "teacher's predictive entropy / log K",
    "student_teacher": "total variation between student and teacher softmax",
    "label_disagreement": "fraction of voxels where student and teacher labels differ",
    "prototype": "total variation between the forward prototype map P_l2u and the teacher's softmax",
}


# ------------------------------------------------------------------------------------ score functions
# All take probabilities with the class axis first: (K, *spatial); they return (*spatial) float32 maps.


def predictive_entropy(probs: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """``H(x) = -Σ_k P^k(x) log P^k(x)`` (nats; ``0 log 0 = 0``) of ``probs`` ``(K, *S)`` → ``(*S)``.

    ``normalize=True`` divides by ``log K`` so the result is in ``[0, 1]`` (1 = uniform over the K classes).
    """
    p = probs.float()
    h = -torch.special.xlogy(p, p).sum(dim=0)
    if normalize:
        h = h / math.log(p.shape[0])
    return h.clamp_min(0.0)


def total_variation(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``TV(x) = ½ Σ_k |p^k(x) - q^k(x)|`` ∈ [0, 1] of two ``(K, *S)`` probability maps → ``(*S)``."""
    if p.shape != q.shape:
        raise ValueError(f"probability maps differ in shape: {tuple(p.shape)} vs {tuple(q.shape)}")
    return 0.5 * (p.float() - q.float()).abs().sum(dim=0)


def label_disagreement(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``[argmax_k p^k(x) ≠ argmax_k q^k(x)]`` as float32 ``(*S)`` (0 or 1)."""
    if p.shape != q.shape:
        raise ValueError(f"probability maps differ in shape: {tuple(p.shape)} vs {tuple(q.shape)}")
    return (p.argmax(dim=0) != q.argmax(dim=0)).float()


def forward_prototype_probabilities(
    features: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor, size: Sequence[int], scale: float = 20.0
) -> torch.Tensor:
    """``P_l2u^k(x) = softmax_k(s · cos(F(x), p^k))`` at resolution ``size``.

    Args:
        features: ``(B, C, d, h, w)`` teacher features (any decoder level).
        prototypes: ``(K, C)`` stored labeled prototypes; valid: ``(K,)`` bool.
        size: output spatial size ``(D, H, W)``; the K cosine **logits** are resized trilinearly (as in
            training), then the softmax is taken.
    Returns:
        ``(B, K, D, H, W)``; classes without a prototype get probability 0.
    """
    logits = prototype_logits(features, prototypes.to(features.device), valid.to(features.device), scale)
    return torch.softmax(to_label_resolution(logits, size), dim=1)


def prototype_disagreement(p_l2u: torch.Tensor, p_teacher: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``TV(P_l2u, P̃_t)`` ``(*S)``, with ``P̃_t`` the teacher's ``(K, *S)`` softmax renormalised over the
    classes that have a prototype (``valid`` ``(K,)``), as the forward loss compares them."""
    v = valid.to(p_teacher.device).bool().view((-1,) + (1,) * (p_teacher.dim() - 1))
    pt = p_teacher.float() * v
    pt = pt / pt.sum(dim=0, keepdim=True).clamp_min(1e-12)
    return total_variation(p_l2u.float() * v, pt)


def foreground_region(p_teacher: torch.Tensor, p_student: Optional[torch.Tensor] = None,
                      threshold: float = REGION_THRESHOLD) -> torch.Tensor:
    """Bool ``(*S)``: voxels where the teacher (or the student) gives foreground probability
    ``1 - P^0(x) ≥ threshold`` (class 0 = background)."""
    fg = 1.0 - p_teacher[0].float()
    if p_student is not None:
        fg = torch.maximum(fg, 1.0 - p_student[0].float())
    return fg >= threshold


def uncertainty_maps(p_teacher: torch.Tensor, p_student: Optional[torch.Tensor] = None,
                     p_l2u: Optional[torch.Tensor] = None, valid: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Every per-voxel score that the given inputs allow (``(K, *S)`` maps) → ``{name: (*S) map}``."""
    maps = {"entropy": predictive_entropy(p_teacher, normalize=True)}
    if p_student is not None:
        maps["student_teacher"] = total_variation(p_student, p_teacher)
        maps["label_disagreement"] = label_disagreement(p_student, p_teacher)
    if p_l2u is not None:
        if valid is None:
            valid = torch.ones(p_teacher.shape[0], dtype=torch.bool)
        maps["prototype"] = prototype_disagreement(p_l2u, p_teacher, valid)
    return maps


def soft_dice_error(p: torch.Tensor, labels: torch.Tensor, valid: Optional[torch.Tensor] = None) -> float:
    """``1 - mean_k 2 Σ_x p^k(x) [y(x)=k] / (Σ_x p^k(x) + Σ_x [y(x)=k])`` over the foreground classes k ≥ 1
    (those with a non-zero denominator, and ``valid`` ones): the Dice error that the segmentation ``labels``
    ``(*S)`` would have if ``p`` ``(K, *S)`` (probabilities or one-hot) were the truth. 0 when no class is present."""
    p = p.float()
    total, n = 0.0, 0
    for k in range(1, p.shape[0]):
        if valid is not None and not bool(valid[k]):
            continue
        yk = labels == k
        den = float(p[k].sum()) + float(yk.sum())
        if den <= 0:
            continue
        total += 2.0 * float(p[k][yk].sum()) / den
        n += 1
    return 1.0 - total / n if n else 0.0


def case_scores(maps: Dict[str, torch.Tensor], region: Optional[torch.Tensor]) -> Tuple[Dict[str, float], int]:
    """Per-case scores: the mean of each map over ``region`` (bool, same shape); the whole volume when
    ``region`` is None or empty. Returns ``({name: score}, number of region voxels (0 = whole volume))``."""
    n = int(region.sum()) if region is not None else 0
    out = {}
    for name, m in maps.items():
        out[name] = float(m[region].double().mean()) if n else float(m.double().mean())
    return out, n


# ------------------------------------------------------------------------------------------- inference


@dataclass
class CaseUncertainty:
    """What one sliding-window pass over one image gives."""

    grid: sitk.Image  # the model grid (reoriented, resampled image) the maps live on
    teacher: torch.Tensor  # (K, D, H, W) teacher softmax on the model grid
    maps: Dict[str, torch.Tensor]  # per-voxel scores (D, H, W) on the model grid
    region: torch.Tensor  # bool (D, H, W): voxels averaged into the case scores
    scores: Dict[str, float]
    region_voxels: int
    seconds: float = 0.0
    probs: Dict[str, torch.Tensor] = field(default_factory=dict)  # {"teacher", "student"?, "prototype"?} (K, D, H, W)


class UncertaintyModel:
    """A model file loaded once: teacher + student networks and the stored prototypes."""

    def __init__(self, model_path: str, device: str = "auto", overlap: float = 0.5, sw_batch_size: int = 2) -> None:
        self.path = str(model_path)
        self.predictor = Predictor(self.path, "teacher", device)
        self.record = self.predictor.record
        self.device = self.predictor.device
        self.teacher = self.predictor.net
        self.num_classes = len(self.record["classes"])
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.student = None
        if self.record["weights"].get("student") is not None:
            self.student = build_from_record(self.record, "student").to(self.device)
        self.prototypes, self.valid = None, None
        protos = self.record.get("prototypes")
        if protos is not None:
            protos = torch.as_tensor(protos).float()
            valid = self.record.get("prototype_valid")
            valid = torch.ones(protos.shape[0], dtype=torch.bool) if valid is None else torch.as_tensor(valid).bool()
            if protos.dim() != 2 or protos.shape[0] != self.num_classes or valid.shape != (self.num_classes,):
                raise ModelFileError(f"{self.path}: stored prototypes have shape {tuple(protos.shape)}, expected "
                                     f"({self.num_classes}, C) with prototype_valid ({self.num_classes},)")
            if int(valid.sum()) >= 2:
                self.prototypes, self.valid = protos, valid
        self.scale = float(self.record.get("training", {}).get("config", {}).get("scale", 20.0))

    @property
    def available(self) -> Tuple[str, ...]:
        have = {"student": self.student is not None, "prototypes": self.prototypes is not None}
        return tuple(s for s in SCORES if all(have[n] for n in _NEEDS[s]))

    @torch.no_grad()
    def probabilities(self, array: np.ndarray) -> Dict[str, torch.Tensor]:
        """``{"teacher", "student"?, "prototype"?}`` → ``(K, D, H, W)`` CPU float32 maps of a preprocessed
        ``(D, H, W)`` volume (one sliding-window pass, both networks on every window)."""
        from monai.inferers import sliding_window_inference

        from .inference import autocast_context

        device = self.device
        x = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32))[None, None]
        nets = [self.teacher] + ([self.student] if self.student is not None else [])
        for n in nets:
            n.eval()

        def predictor(t: torch.Tensor) -> Dict[str, torch.Tensor]:
            t = t.to(device)
            out = {}
            with autocast_context(device, True):
                logits, feats = self.teacher(t)
                out["teacher"] = torch.softmax(logits.float(), dim=1)
                if self.student is not None:
                    out["student"] = torch.softmax(self.student(t)[0].float(), dim=1)
            if self.prototypes is not None:
                out["prototype"] = forward_prototype_probabilities(feats.float(), self.prototypes, self.valid, t.shape[2:], self.scale)
            return out

        probs = sliding_window_inference(
            x, tuple(int(p) for p in self.predictor.patch), self.sw_batch_size, predictor, overlap=self.overlap,
            mode="gaussian", cval=float(x.min()), sw_device=device, device=torch.device("cpu"),
        )
        return {k: v[0].float() for k, v in probs.items()}

    def analyze(self, image: sitk.Image) -> CaseUncertainty:
        """Scores one image (a 3-D sitk image as ``io.read_image`` returns it)."""
        t0 = time.perf_counter()
        grid, arr = self.predictor.preprocess(image)
        probs = self.probabilities(arr)
        pt, ps, pp = probs["teacher"], probs.get("student"), probs.get("prototype")
        maps = uncertainty_maps(pt, ps, pp, self.valid)
        region = foreground_region(pt, ps)
        scores, n = case_scores(maps, region)
        return CaseUncertainty(grid, pt, maps, region, scores, n, round(time.perf_counter() - t0, 3), probs)


def map_to_image_grid(voxel_map: torch.Tensor, grid: sitk.Image, image: sitk.Image) -> sitk.Image:
    """A ``(D, H, W)`` float map on the model ``grid`` → float32 image on ``image``'s own grid: exactly the
    image's size, spacing, origin and direction. Linear interpolation; image voxels that lie beyond the outermost
    grid voxel centres (up to half a coarse grid voxel at the volume's edges) take the nearest grid value.

    The map is first padded by one replicated voxel on every side: an image's outermost voxel centre often
    lies exactly half a grid voxel beyond the grid (a 2:1 resampling keeps the origin), where ITK's inside /
    outside test would otherwise be decided by floating-point noise."""
    m = sitk.GetImageFromArray(voxel_map.detach().cpu().numpy().astype(np.float32))
    m.CopyInformation(grid)
    m = sitk.ZeroFluxNeumannPad(m, [1, 1, 1], [1, 1, 1])
    return sitk.Resample(m, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32, True)


# ------------------------------------------------------------------------------------------ ranking


def resolve_score(score: str, available: Sequence[str] = SCORES) -> str:
    """``auto`` → ``AUTO_SCORE`` (``entropy`` when the model lacks what it needs); checks the name."""
    score = (score or "auto").strip().lower()
    if score == "auto":
        return AUTO_SCORE if AUTO_SCORE in available else "entropy"
    if score not in SCORES:
        raise InputError(f"unknown uncertainty score {score!r}: choose auto or one of {', '.join(SCORES)}")
    return score


def map_paths(images: Sequence[str], folder: str) -> List[str]:
    """``folder/<image stem>-uncertainty.nrrd`` per image (``<stem>-<n>-uncertainty.nrrd`` when stems repeat)."""
    stems = [cio.strip_extension(p) for p in images]
    if len(set(stems)) != len(stems):
        stems = [f"{s}-{i + 1}" for i, s in enumerate(stems)]
    return [os.path.join(folder, s + "-uncertainty.nrrd") for s in stems]


def _check_outputs(model: str, images: Sequence[str], out_csv: Optional[str], uncertainty_dir: Optional[str]) -> List[Optional[str]]:
    """Every output of a ranking against every input (``preflight.check_outputs``); returns the map paths."""
    if out_csv is not None:
        if os.path.isdir(out_csv):
            raise InputError(f"--out must be a CSV file name, but {out_csv} is a folder")
        if not str(out_csv).lower().endswith(".csv"):
            raise InputError(f"--out {out_csv}: the ranking is written as CSV; give a file name ending in .csv")
    if uncertainty_dir is not None and os.path.exists(uncertainty_dir) and not os.path.isdir(uncertainty_dir):
        raise InputError(f"--uncertainty-dir {uncertainty_dir} exists and is not a folder")
    if uncertainty_dir is not None and not str(uncertainty_dir).strip():
        raise InputError("--uncertainty-dir is empty: give a folder")
    targets: List[Optional[str]] = map_paths(images, uncertainty_dir) if uncertainty_dir else [None] * len(images)
    outputs = ([("--out", out_csv)] if out_csv is not None else []) + [("--uncertainty-dir map", t) for t in targets if t]
    check_outputs(outputs, [("--model", model)] + [("--images", p) for p in images])
    return targets


def rank_files(
    model: str,
    images: Sequence[str],
    out_csv: Optional[str] = None,
    score: str = "auto",
    device: str = "auto",
    uncertainty_dir: Optional[str] = None,
    emit: Optional[Emit] = None,
    should_stop: Optional[Callable[[], bool]] = None,
) -> List[Dict[str, Any]]:
    """Scores every image with the model (loaded once) and ranks them, most uncertain first.

    Emits ``{"event": "rank", "index", "of", "image", "score", "scores", "seconds"[, "uncertainty_map"]}`` per
    image. Writes ``out_csv`` (atomically; columns rank, image, score, every individual score, region_voxels,
    uncertainty_map) and, with ``uncertainty_dir``, ``<stem>-uncertainty.nrrd`` per image (float32 map of the
    ranking score on the image's own grid). A stop request (``should_stop()`` true) ranks the images done so
    far. Returns the rows ``{"rank", "image", "score", <score name>: value, ..., "region_voxels"}``.
    """
    emit = emit or (lambda e: None)
    images = [str(p) for p in images]
    if not images:
        raise InputError("give at least one image to rank")
    resolve_score(score)  # a bad name fails before the model is loaded
    for p in images:
        cio.check_exists(p, "image", folder_ok=True)
    targets = _check_outputs(str(model), images, out_csv, uncertainty_dir)
    um = UncertaintyModel(model, device)
    chosen = resolve_score(score, um.available)
    if chosen not in um.available:
        need = " and ".join(_NEEDS[chosen])
        raise ModelFileError(f"{model} has no {need}, which the {chosen!r} score needs; use --score entropy")
    if (score or "auto").lower() == "auto" and chosen != AUTO_SCORE:
        emit({"event": "info", "message": f"ranking by {chosen!r}: {model} has no student network, which the {AUTO_SCORE!r} "
              "score needs (model files keep only the teacher)"})
    rows: List[Dict[str, Any]] = []
    for n, (path, target) in enumerate(zip(images, targets)):
        if should_stop and should_stop():
            emit({"event": "warning", "message": f"stopped: ranking the {len(rows)} of {len(images)} image(s) scored so far"})
            break
        emit({"event": "phase", "phase": "ranking", "index": n + 1, "of": len(images), "detail": path})
        image = cio.read_image(path)
        res = um.analyze(image)
        if res.region_voxels == 0:
            emit({"event": "warning", "message": f"{path}: the model finds no structure (no voxel reaches "
                  f"{REGION_THRESHOLD:.0%} foreground probability); its scores average the whole volume"})
        row: Dict[str, Any] = {"image": path, "score": res.scores[chosen]}
        row.update({k: res.scores[k] for k in SCORES if k in res.scores})
        row["region_voxels"] = res.region_voxels
        if target is not None:
            write_image(target, map_to_image_grid(res.maps[chosen], res.grid, image))
            row["uncertainty_map"] = target
        rows.append(row)
        event = {"event": "rank", "index": n + 1, "of": len(images), "image": path, "score": row["score"],
                 "scores": {k: res.scores[k] for k in SCORES if k in res.scores}, "seconds": res.seconds}
        if target is not None:
            event["uncertainty_map"] = target
        emit(event)
    rows.sort(key=lambda r: -r["score"] if r["score"] == r["score"] else math.inf)
    for i, r in enumerate(rows, start=1):
        r["rank"] = i
    rows = [dict([("rank", r["rank"])] + [(k, v) for k, v in r.items() if k != "rank"]) for r in rows]
    if out_csv:
        write_csv(out_csv, rows, um.available)
    return rows


def write_csv(path: str, rows: Sequence[Dict[str, Any]], scores: Sequence[str] = SCORES) -> None:
    """``rank, image, score, <each score>, region_voxels[, uncertainty_map]``, written atomically."""
    columns = ["rank", "image", "score"] + [s for s in SCORES if s in scores] + ["region_voxels"]
    if any("uncertainty_map" in r for r in rows):
        columns.append("uncertainty_map")
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def format_ranking(rows: Sequence[Dict[str, Any]], score_name: Optional[str] = None) -> str:
    """A plain-text table, most uncertain first."""
    if not rows:
        return "no images were ranked"
    cols = [s for s in SCORES if any(s in r for r in rows)]
    head = f"{'rank':>4}  {'score':>7}  " + "  ".join(f"{c:>{max(len(c), 7)}}" for c in cols) + "  image"
    lines = [("ranked by " + score_name + f" ({DESCRIPTIONS.get(score_name, '')}); most uncertain first")] if score_name else []
    lines.append(head)
    for r in rows:
        vals = "  ".join(f"{r[c]:>{max(len(c), 7)}.4f}" if c in r else f"{'-':>{max(len(c), 7)}}" for c in cols)
        note = "  (no structure found)" if r.get("region_voxels") == 0 else ""
        lines.append(f"{r['rank']:>4}  {r['score']:>7.4f}  {vals}  {r['image']}{note}")
    return "\n".join(lines)
