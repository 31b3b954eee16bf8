"""Outputs, models and run folders in the panel, as users of TotalSegmentator / MONAIAuto3DSeg expect.

- **Output segmentation**: "Create new segmentation" (the default: a new node named "<volume> segmentation" per
  volume) or an existing segmentation node, overwritten by the next Segment. Overwriting needs one volume to
  segment, and never touches a labeled case's segmentation nor the one being labeled (user data).
- **Show in 3D**: the chosen output, else the last segmentation the panel made.
- **Models**: the scene's models as a table (name, size, date, segments; ``modellist.model_rows``); selecting a row
  makes it the panel's model; rename, delete, keep only the latest.
- **Run folders**: the module's work folder's ``train-…`` / ``segment-…`` / ``rank-…`` folders (exported inputs,
  model files, a stopped run's checkpoint and inputs) with their sizes, listed on request (``list_run_folders``:
  it walks the disk) and removable; a folder a running job, the ranking's uncertainty maps or the last run's
  Resume uses is never removed.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence

from CPCLSegmentLib.errors import InputError

from . import modellist
from .nodes import node_name

OUTPUT_ROLE, LAST_SEGMENTATION_ROLE = "OutputSegmentation", "LastSegmentation"


def size_text(n_bytes: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("kB", 2**10)):
        if n_bytes >= size:
            return f"{n_bytes / size:.1f} {unit}"
    return f"{int(n_bytes)} B"


def run_note(row: Dict[str, Any]) -> str:
    notes = (["in use"] if row.get("in_use") else []) + (["stopped: Resume continues it"] if row.get("resumable") else [])
    return ", ".join(notes)


class PanelManage:
    """Outputs, models and run folders for ``panel.PanelController`` (uses ``scene``, ``node``, ``core``, ``jobs``,
    ``_discarded``, ``rank_rows``, ``log``, ``cases``, ``labeling``, ``model``, ``set_model``, ``segment_volumes``)."""

    scene: Any
    node: Any
    core: Any
    jobs: Dict[str, Optional[Any]]
    _discarded: List[Any]
    rank_rows: List[Dict[str, Any]]
    log: List[str]
    _run_rows: Optional[List[Dict[str, Any]]] = None

    # ---------------------------------------------------------------------------------- output

    def output_segmentation(self) -> Optional[Any]:
        """The segmentation the next Segment overwrites (None: new nodes)."""
        return self.node.GetNodeReference(OUTPUT_ROLE)

    def set_output_segmentation(self, node: Optional[Any]) -> None:
        if node is not None and not node.IsA("vtkMRMLSegmentationNode"):
            raise InputError(f"'{node_name(node)}' is not a segmentation")
        self.node.SetNodeReferenceID(OUTPUT_ROLE, node.GetID() if node is not None else None)

    def output_targets(self, volumes: Sequence[Any]) -> Optional[List[Any]]:
        """The nodes Segment writes into (one per volume), or None for new nodes; ``InputError`` when the chosen
        output cannot take this run's result."""
        target = self.output_segmentation()
        if target is None:
            return None
        name = node_name(target)
        if len(volumes) != 1:
            raise InputError(f"the output '{name}' holds one volume's segmentation: check one volume to segment, "
                             "or choose 'Create new segmentation' as the output")
        if any(c.segmentation is target for c in self.cases()) or target is self.labeling():  # type: ignore[attr-defined]
            raise InputError(f"'{name}' is a labeled case's segmentation (or the one being labeled): it is never overwritten; "
                             "choose another output or 'Create new segmentation'")
        return [target]

    def output_base_name(self) -> str:
        """The name a new output gets: "<volume> segmentation" for the first volume to segment."""
        volumes = self.segment_volumes()  # type: ignore[attr-defined]
        return f"{node_name(volumes[0])} segmentation" if volumes else "segmentation"

    def segmentation_done(self, nodes: Sequence[Any]) -> None:
        """A Segment run made (or overwrote) ``nodes``: the last one is what Show in 3D shows without an output."""
        if nodes:
            self.node.SetNodeReferenceID(LAST_SEGMENTATION_ROLE, nodes[-1].GetID())

    def shown_in_3d(self) -> Optional[Any]:
        return self.output_segmentation() or self.node.GetNodeReference(LAST_SEGMENTATION_ROLE)

    # ---------------------------------------------------------------------------------- models

    def model_table(self) -> List[Dict[str, Any]]:
        return modellist.model_rows(self.scene)

    def _model_at(self, row: int) -> Any:
        rows = self.model_table()
        if not 0 <= row < len(rows):
            raise InputError("select a model in the list first")
        return rows[row]["node"]

    def select_model_row(self, row: Optional[int]) -> None:
        """Selecting a model in the list makes it the panel's model."""
        if row is not None:
            self.set_model(self._model_at(row))  # type: ignore[attr-defined]

    def rename_model(self, row: int, name: str) -> None:
        try:
            modellist.rename_model(self._model_at(row), name)
        except ValueError as e:
            raise InputError(str(e)) from None

    def delete_models(self, rows: Sequence[int]) -> List[str]:
        """Removes the models in ``rows`` (and their data nodes); returns their names."""
        nodes = [self._model_at(r) for r in sorted(set(rows))]
        names = [n.GetName() for n in nodes]
        for n in nodes:
            modellist.modelnode.remove_model(self.scene, n)
        if names:
            self.log.append("models removed: " + ", ".join(names))
        return names

    def keep_latest_model(self) -> List[str]:
        """Removes every model but the newest, which becomes the panel's model; returns the names removed."""
        removed = modellist.keep_latest(self.scene)
        rows = self.model_table()
        if rows:
            self.set_model(rows[-1]["node"])  # type: ignore[attr-defined]
        if removed:
            self.log.append("models removed: " + ", ".join(removed))
        return removed

    # ----------------------------------------------------------------------------- run folders

    def folders_in_use(self) -> List[str]:
        """Run folders that must stay: running (or cancelling) jobs', the ranking's maps, the last run's (Resume)."""
        jobs = [j for j in self.jobs.values() if j is not None] + list(self._discarded)
        used = [j.work_dir for j in jobs if getattr(j, "work_dir", None)]
        used += [r.get("run_dir") for r in self.rank_rows if r.get("run_dir")]
        return used + [self.node.GetParameter("LastRunDir") or ""]

    def list_run_folders(self) -> List[Dict[str, Any]]:
        self._run_rows = modellist.run_folders(self.core.work_root, self.folders_in_use())
        return list(self._run_rows)

    def run_folder_rows(self) -> List[Dict[str, Any]]:
        """The run folders as last listed (``list_run_folders`` looks at the disk)."""
        return list(self._run_rows or [])

    def remove_run_folders(self, rows: Sequence[int]) -> List[str]:
        """Removes the listed folders in ``rows`` that are not in use; returns the removed paths."""
        chosen = [r for i, r in enumerate(self.run_folder_rows()) if i in set(rows)]  # the rows as shown
        listed = self.list_run_folders()  # whether a folder is in use is decided now, not when the list was shown
        paths = {os.path.realpath(r["path"]) for r in chosen}
        removed = modellist.remove_run_folders([r for r in listed if os.path.realpath(r["path"]) in paths], self.core.work_root)
        kept = [r["name"] for r in chosen if r["path"] not in removed]
        self.log.append(f"removed {len(removed)} run folder(s)" + (f"; kept (in use): {', '.join(kept)}" if kept else ""))
        self.list_run_folders()
        return removed

    # ------------------------------------------------------------------------------------ view

    def manage_display(self) -> Dict[str, Any]:
        """What the panel shows for outputs, models and run folders."""
        models = self.model_table()
        current = self.model()  # type: ignore[attr-defined]
        runs = self.run_folder_rows()
        shown = self.shown_in_3d()
        output = self.output_segmentation()
        return {
            "model_rows": [(r["name"], f"{r['megabytes']:.1f} MB", r["created"], ", ".join(r["segments"])) for r in models],
            "model_row": next((i for i, r in enumerate(models) if r["node"] is current), None),
            "run_rows": [(r["name"], r["kind"], size_text(r["bytes"]), r["modified"], run_note(r)) for r in runs],
            "output_segmentation": output.GetID() if output is not None else None,
            "output_base_name": self.output_base_name(),
            "shown_in_3d": shown.GetID() if shown is not None else None,
            "enabled": {"renameModelButton": bool(models), "deleteModelButton": bool(models), "keepLatestModelButton": len(models) > 1,
                        "removeRunFoldersButton": any(not r["in_use"] for r in runs)},
            "text": {"runFoldersLabel": (f"{len(runs)} run folder(s), {size_text(sum(r['bytes'] for r in runs))} in "
                                         f"{self.core.work_root}") if self._run_rows is not None else "Press List to see the run folders."},
        }

