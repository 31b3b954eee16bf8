"""Scene -> files: volumes as ``.nrrd`` with their IJK-to-RAS geometry (a linear transform hardened), segments
as the engine's ``.seg.nrrd`` (names, colours, IDs, terminology kept), and a training run's inputs checked and
written in one pass (``export_inputs``: each case's segments rasterised once)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

import slicer
from CPCLSegmentLib.errors import InputError

from .handoff import Handoff, write_seg_nrrd_kji
from .inputcheck import CheckResult, check_inputs
from .nodes import (  # RAS_TO_LPS: also imported from here by results.py
    RAS_TO_LPS,
    check_volume,
    find_segment_id,
    matrix_to_array,
    node_name,
    segment_masks,
    segment_record,
    world_copy,
    world_ijk_to_ras,
)
from .scene import LabeledCase
from .segsnapshot import SegmentationSnapshot, hand_over



def export_volume(volume_node: Any, path: str) -> str:
    """Writes the volume (transform hardened, voxels and scalar type as they are) to ``path`` (.nrrd)."""
    copy = world_copy(volume_node)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.UseCompressionOff()  # fast; the file lives only as long as the job
    if not storage.WriteData(copy):
        raise InputError(f"cannot write volume '{node_name(volume_node)}' to {path}")
    return str(path)


def write_segments(path: str, masks: Dict[str, np.ndarray], records: Sequence[Dict[str, Any]], ijk_to_ras: np.ndarray,
                   later_wins: bool = False, compression_level: int = 1) -> None:
    """Writes the masks (``(k, j, i)``, one per record, in the records' order) as a ``.seg.nrrd`` with the
    records' names, colours, IDs and terminology. ``later_wins``: one layer, a later segment overwrites an
    earlier one where they overlap; otherwise overlapping segments go to separate layers.

    The layers are built and written in numpy's (k, j, i) order (no transposed copy of a large volume); each
    segment's extent is the whole grid (what slicerio writes by default; Slicer accepts a larger extent)."""
    shape = next(iter(masks.values())).shape if masks else None
    layers: List[np.ndarray] = []
    segments = []
    value_in_layer: List[int] = []
    for record in [r for r in records if r["name"] in masks]:
        mask = masks[record["name"]]
        if later_wins:
            layer = 0
        else:
            layer = next((n for n, lay in enumerate(layers) if not lay[mask].any()), None)
            layer = len(layers) if layer is None else layer
        if layer == len(layers):
            layers.append(np.zeros(shape, dtype=np.uint8))
            value_in_layer.append(0)
        value_in_layer[layer] += 1
        value = value_in_layer[layer]
        if value > 255:
            raise InputError(f"too many segments to write to {path} (more than 255 in a layer)")
        layers[layer][mask] = value
        seg = {"id": record.get("id") or record.get("segment_id") or f"Segment_{len(segments) + 1}", "name": record["name"],
               "color": [float(c) for c in record.get("color", (0.5, 0.5, 0.5))][:3], "labelValue": value, "layer": layer,
               "status": "completed", "extent": [0, shape[2] - 1, 0, shape[1] - 1, 0, shape[0] - 1]}
        term = record.get("terminology")
        if isinstance(term, dict):
            term = terminology_to_string(term)
        if term:
            seg["tags"] = {"TerminologyEntry": term}
        segments.append(seg)
    if not layers:
        if shape is None:
            raise InputError(f"nothing to write to {path}: no segment")
        layers.append(np.zeros(shape, dtype=np.uint8))
    # numpy (k, j, i) [, layer] in C order is NRRD's ([layer,] i, j, k): written as it is
    voxels = layers[0] if len(layers) == 1 else np.stack(layers, axis=-1)
    header = {
        "ijkToLPS": RAS_TO_LPS @ np.asarray(ijk_to_ras, dtype=float),
        "segments": segments,
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
    }
    write_seg_nrrd_kji(str(path), header, voxels, compression_level)


def terminology_to_string(term: Dict[str, Any]) -> str:
    """A terminology dict (as slicerio reads it) back to Slicer's ``TerminologyEntry`` tag string."""
    try:
        from slicerio.segmentation import terminology_entry_to_string

        return terminology_entry_to_string(term)
    except ImportError:
        code = lambda key: "^".join(term.get(key) or ["", "", ""])  # noqa: E731
        return "~".join([term.get("contextName", ""), code("category"), code("type"), code("typeModifier"),
                         term.get("anatomicContextName", ""), code("anatomicRegion"), code("anatomicRegionModifier")])


def export_segmentation(volume_node: Any, segmentation_node: Any, names: Sequence[str], path: str,
                        later_wins: bool = False) -> Dict[str, Any]:
    """Writes the named segments, rasterised on the volume's grid, as a ``.seg.nrrd`` (see ``write_segments``).
    Returns ``{"found": [...], "counts": {name: voxels}}``."""
    check_volume(volume_node)
    masks = segment_masks(volume_node, segmentation_node, names)
    records = [segment_record(segmentation_node, find_segment_id(segmentation_node, n)) for n in names if n in masks]
    shape = tuple(volume_node.GetImageData().GetDimensions()[::-1])
    if not masks:
        masks = {"": np.zeros(shape, dtype=bool)}
    write_segments(path, masks, records, matrix_to_array(world_ijk_to_ras(volume_node)), later_wins)
    return {"found": [r["name"] for r in records], "counts": {n: int(m.sum()) for n, m in masks.items() if n}}


@dataclass
class ExportedInputs:
    """The engine's input files of a training run: ``labeled`` (image, segmentation, sparse) per case in order, and
    ``handoff``: each volume's file (its original file, or one still to write) and the writes still to do."""

    handoff: Handoff
    labeled: List[Tuple[str, str, bool]] = field(default_factory=list)

    @property
    def volume_files(self) -> Dict[str, str]:
        """Volume ID -> the file the child reads it from."""
        return self.handoff.files

    def volume(self, volume: Any, stem: str) -> str:
        return self.handoff.volume(volume, stem)


def export_inputs(labeled: Sequence[Any], segments: Sequence[str], unlabeled: Sequence[Any], partial_segments: bool,
                  hold_out_last: bool, later_wins: bool, export_dir: str, write: bool = True) -> Tuple[CheckResult, ExportedInputs]:
    """Checks the inputs (``inputcheck.check_inputs``) and, in the same pass (each case's segments rasterised
    once, on the calling thread: it reads the nodes; a segmentation unchanged since read from a .seg.nrrd is handed over
    as that file, one whose selected segments share a labelmap layer as a copy of that layer), decides the engine's input files in ``export_dir``: each volume's
    original file or a snapshot, each case's segments as a one-layer .seg.nrrd (a later segment wins overlaps). The
    files are written by ``files.handoff.write_all()`` (from a worker thread); nothing is planned after an error."""
    files = ExportedInputs(Handoff(export_dir))

    def on_case(index: int, case: LabeledCase, masks: Optional[Dict[str, np.ndarray]], records: List[Dict[str, Any]],
                source: Optional[Union[str, SegmentationSnapshot]]) -> None:
        image = files.volume(case.volume, f"labeled-{index:03d}")
        seg_path = os.path.join(export_dir, f"labeled-{index:03d}.seg.nrrd")
        ijk_to_ras = matrix_to_array(world_ijk_to_ras(case.volume))
        if isinstance(source, SegmentationSnapshot):  # its labelmap layer as stored: the child resamples it
            hand_over(files.handoff, source, seg_path)  # written from its layers' views, compared before the child starts
        elif source is not None:  # unchanged since read from this .seg.nrrd: the child reads it
            seg_path = source
        elif masks:
            files.handoff.later(lambda: write_segments(seg_path, masks, records, ijk_to_ras, later_wins=True))
        else:
            shape = tuple(case.volume.GetImageData().GetDimensions()[::-1])
            files.handoff.later(lambda: write_segments(seg_path, {"": np.zeros(shape, dtype=bool)}, [], ijk_to_ras))
        files.labeled.append((image, seg_path, case.sparse))

    def on_unlabeled(index: int, volume: Any) -> None:
        files.volume(volume, f"unlabeled-{index:03d}")

    check = check_inputs(labeled, segments, unlabeled, partial_segments, hold_out_last, later_wins, on_case, on_unlabeled,
                         hand_over=True)
    if write and check.ok:  # else the caller has ``files.handoff.write_all()`` run later (from a worker thread)
        files.handoff.write_all()
    return check, files
