"""Checks of a training request before any work: paths and values (nothing read or written yet), every case's
grid at the target spacing, and an estimate of the disk space the run needs.

- ``check_request``: the config, the model path (``.pt``), every output against every input (no output may
  replace an input), writable folders, values (``--spacing``, ``--freeze-encoder`` needs ``--init``), the
  resume checkpoint's presence. Errors name the flag and the file.
- ``check_case_grids``: nothing collapses to a few voxels or explodes past memory at the target spacing.
- ``check_disk_space``: the model file, its checkpoint and the preprocessed cases fit on their disks.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import io as cio
from .errors import InputError
from .companions import checkpoint_path, companion_paths
from .planning import check_grids, count_params, shape_at_spacing
from .preflight import check_free_space, check_outputs, check_spacing, same_file
from .prepcache import canonical_path
from .preparation import CaseInfo, Emit, TrainRequest
from .preprocessing import cache_folder
from .settings import TrainConfig


def check_request(request: TrainRequest, say: Emit) -> TrainConfig:
    """Everything about a request that can be checked without reading images: the config, the model path,
    every output against every input, writable folders, values. Errors name the flag and the file."""
    if not request.labeled:
        raise InputError("give at least one labeled case (an image and its segmentation)")
    cfg = request.config.validate()
    out = str(request.out)
    if not out.strip():
        raise InputError("--out is empty: give the model file to write, e.g. --out model.pt")
    if os.path.isdir(out):
        raise InputError(f"--out {out} is a folder; give the model file to write, e.g. --out {os.path.join(out, 'model.pt')}")
    if not out.lower().endswith(".pt"):
        raise InputError(f"--out {out}: a model file name ends in .pt (e.g. --out {cio.strip_extension(out) or 'model'}.pt)")
    if cfg.freeze_encoder and not request.options.init:
        raise InputError("--freeze-encoder keeps the encoder of a starting model fixed: it needs --init MODEL "
                         "(without one it would freeze randomly initialised weights)")
    request.options.spacing = check_spacing(request.options.spacing)
    if request.options.compare_supervised and not request.validation:
        raise InputError("--compare-supervised needs --validation cases to compare on")
    inputs: List[Tuple[str, str]] = []
    for role, items in (("labeled", request.labeled), ("validation", request.validation)):
        for item in items:
            cio.check_exists(item.image, f"{role} image", folder_ok=True)
            cio.check_exists(item.segmentation, f"segmentation of {role} image {item.image}")
            if same_file(item.image, item.segmentation):
                raise InputError(f"the same file {item.image} is given as the image and as the segmentation of a {role} case; "
                                 "give the image and its segmentation (a .seg.nrrd or a label map)")
            inputs += [(f"{role} image", item.image), (f"segmentation of {item.image}", item.segmentation)]
    for u in request.unlabeled:
        cio.check_exists(u, "unlabeled image", folder_ok=True)
        inputs.append(("unlabeled image", u))
    if request.options.init:
        inputs.append(("--init model", request.options.init))
    inputs += list(request.other_inputs)
    outputs = [("--out", out)] + [(f"its {what}", path) for what, path in companion_paths(out).items()]
    folder = request.options.cache_dir or request.options.work_dir
    by_old_name = bool(request.options.work_dir) and os.path.abspath(request.options.work_dir) == os.path.abspath(folder)
    given_cache = [("--work-dir" if by_old_name else "--cache-dir", folder)]  # the flag the user typed
    check_outputs(outputs, inputs, given_cache if given_cache[0][1] else [])
    if request.options.resume and not os.path.exists(checkpoint_path(out)):
        raise InputError(f"--resume: no checkpoint {checkpoint_path(out)} to resume from (start without --resume)")
    if not request.options.resume and os.path.exists(checkpoint_path(out)):
        say({"event": "warning", "message": f"{checkpoint_path(out)} (an interrupted run's checkpoint) will be replaced by this "
             "run's; to continue that run instead, give --resume"})
    check_each_case_once(request, say)
    labeled_images = {canonical_path(i.image) for i in request.labeled}
    dup = [u for u in request.unlabeled if canonical_path(u) in labeled_images]
    if dup:
        say({"event": "warning", "message": f"{len(dup)} image(s) are given both as labeled and unlabeled (e.g. {dup[0]}); "
             "they are used in both streams"})
    return cfg


def check_each_case_once(request: TrainRequest, say: Emit) -> None:
    """Refuses an image given twice in one role (it would count twice) and a validation image that is also a
    labeled case (its score would not say how the model does on new cases), naming it; a validation image
    also given as unlabeled is held out of the unlabeled cases, with a warning. Paths are compared absolute and
    link-resolved. An image both labeled and unlabeled is allowed (``check_request`` warns)."""
    held_out = {canonical_path(v.image) for v in request.validation}
    kept = [u for u in request.unlabeled if canonical_path(u) not in held_out]
    if len(kept) < len(request.unlabeled):
        dropped = [u for u in request.unlabeled if canonical_path(u) in held_out]
        say({"event": "warning", "message": f"{len(dropped)} validation image(s) are also given as unlabeled (e.g. {dropped[0]}): "
             "held out of the unlabeled cases too, so the validation Dice says how the model does on new cases"})
        request.unlabeled = kept
    seen: Dict[str, Tuple[str, str]] = {}
    roles = (("labeled", [i.image for i in request.labeled]), ("validation", [v.image for v in request.validation]),
             ("unlabeled", list(request.unlabeled)))
    for role, paths in roles:
        for path in paths:
            first = seen.setdefault(canonical_path(path), (role, path))
            if first == (role, path) and paths.count(path) == 1:
                continue
            if first[0] == role:
                also = f" (also as {first[1]})" if first[1] != path else ""
                raise InputError(f"{path} is given twice as a{'n' if role[0] in 'aeiou' else ''} {role} case{also}: it would count "
                                 "twice; give each case once")
            if role == "validation":
                raise InputError(f"{path} is both a labeled and a validation case: a validation case must be held out of training "
                                 "(its Dice would not say how the model does on new cases); give it in one role only")


def unlabeled_grids(request: TrainRequest) -> List[Tuple[str, Any, Any]]:
    """``(path, size xyz, spacing xyz)`` of the unlabeled and validation images, from their headers (those whose
    header cannot be read alone are left out: reading them whole says what is wrong)."""
    grids = []
    for path in list(request.unlabeled) + [v.image for v in request.validation]:
        header = cio.read_header(path)
        if header is not None:
            grids.append((path, header[0], header[1]))
    return grids


def check_case_grids(infos: Sequence[CaseInfo], others: Sequence[Tuple[str, Any, Any]], spacing: Optional[Sequence[float]],
                     say: Emit, planned: bool) -> None:
    """Every case at the target spacing: nothing collapses to a few voxels or explodes past memory
    (``planning.check_grids``); ``others``: the unlabeled and validation images (``unlabeled_grids``). ``planned``:
    the spacing was planned here (not given, nor fixed by a model)."""
    cases = [(i.name, i.size, i.spacing, True) for i in infos]
    cases += [(path, size, sp, False) for path, size, sp in others]
    check_grids(spacing, cases, say, planned)


def check_disk_space(request: TrainRequest, cfg: TrainConfig, classes: Sequence[Dict[str, Any]], infos: Sequence[CaseInfo],
                     spacing: Optional[Sequence[float]], unlabeled_paths: Sequence[str]) -> None:
    """The model file, its checkpoint and the preprocessed cases fit on their disks (estimated)."""
    params = count_params(cfg.width, cfg.depth, len(classes)) * 4.0
    work_bytes = 0.0
    for info in infos:
        work_bytes += 6.0 * float(np.prod(shape_at_spacing(info.size, info.spacing, spacing or info.spacing)))
    for path in list(unlabeled_paths) + [v.image for v in request.validation]:
        header = cio.read_header(path)
        if header is not None:
            work_bytes += 6.0 * float(np.prod(shape_at_spacing(header[0], header[1], spacing or header[1])))
    cache = cache_folder(request)
    check_free_space([(str(request.out), params * 9, "the model file and its resume checkpoint"),
                      (cache, work_bytes, f"the preprocessed cases (in the preprocessing cache {cache})")])
