"""The module's console API, ``CPCLSegmentLogic``: Slicer's scripted-module logic class, whose ``train``,
``segment`` and ``rank`` are ``LogicCore``'s (the same the panel runs). ``CPCLSegment.py`` exposes it under its
own name, where ``slicer.util.getModuleLogic("CPCLSegment")`` and the console find it::

    logic = slicer.util.getModuleLogic("CPCLSegment")   # or CPCLSegmentLogic()
    model = logic.train(labeled=[(volumeNode, segmentationNode)], unlabeled=[otherVolumeNode],
                        segments=["right lung", "left lung"], minutes=10)
    segmentationNode = logic.segment(model, newVolumeNode)
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from CPCLSegmentLib import jobs
from CPCLSegmentModuleLib import environment
from CPCLSegmentModuleLib.logic import LogicCore

from .installer import SlicerInstaller


class CPCLSegmentLogic(ScriptedLoadableModuleLogic):
    """Console / scripting API: ``train``, ``segment`` and ``rank`` are ``LogicCore``'s (the panel runs the same).

    They block by default (console, scripts, tests) while keeping Slicer's window painted; with
    ``wait=False`` they return the running ``jobs.Job`` (``poll()``, ``finished``, ``stop()``, ``cancel()``,
    ``result()``). Each first makes sure the packages are installed (asking first; a declined install is an
    error, nothing starts).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        work_root = os.path.join(slicer.app.temporaryPath, "CPCLSegment")
        # PythonSlicer sets up Slicer's Python environment for the child (PythonSlicer.exe on Windows).
        self.core = LogicCore(slicer.mrmlScene, python=jobs.default_python(inside_slicer=True), work_root=work_root,
                              ensure_dependencies=self.ensureDependencies, tick=slicer.app.processEvents)

    def train(self, labeled: Sequence[Any], unlabeled: Sequence[Any] = (), segments: Optional[Sequence[str]] = None,
              wait: bool = True, on_event=None, out: Optional[str] = None, **settings: Any):
        """Trains a model from ``labeled`` = [(volumeNode, segmentationNode[, onlyPaintedSlices]), ...] and
        ``unlabeled`` = [volumeNode, ...]; returns the model node (saved with the scene). Settings: any
        TrainConfig field by name (``minutes``, ``iterations``, ``patch_size=[X, Y, Z]``, ``lr``, ...) and
        ``device``, ``init``, ``spacing``, ``partial_segments``, ``hold_out_last``, ``compare_supervised`` (with a
        held-out case: also train supervised-only, keep the better; off unless asked), ``later_wins``."""
        return self.core.train(labeled, unlabeled, segments, wait=wait, on_event=on_event, out=out, **settings)

    def segment(self, model, volume, wait: bool = True, on_event=None, weights: str = "teacher", device: str = "auto",
                name: Optional[str] = None):
        """Segments ``volume`` (a node or a list) into NEW segmentation node(s) named after it."""
        return self.core.segment(model, volume, wait=wait, on_event=on_event, weights=weights, device=device, name=name)

    def rank(self, model, volumes: Sequence[Any], wait: bool = True, on_event=None, score: str = "auto", device: str = "auto"):
        """Ranks volumes by the model's uncertainty (most useful to label first): a list of
        ``{rank, volume, score, uncertainty}``; ``self.core.show_uncertainty(row)`` shows a map."""
        return self.core.rank(model, volumes, wait=wait, on_event=on_event, score=score, device=device)

    def ensureDependencies(self, ask: Optional[bool] = None) -> None:
        """Installs what is missing or too old (``Resources/requirements.txt``), asking first; raises
        ``environment.DependencyError`` when declined or failed."""
        environment.ensure_dependencies(SlicerInstaller(), ask=not slicer.app.testingEnabled() if ask is None else ask)
