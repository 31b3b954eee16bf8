"""The models of ``logic.LogicCore``: model files for the child (a node's cached file, a path, a starting folder),
reading a model file in a child process (no torch here), model nodes from files and back, and a model's classes."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Union

from CPCLSegmentLib import jobs
from CPCLSegmentLib.errors import InputError

from .models import is_model_node, model_classes_of, model_file_of, model_node_from_file, save_model_file, set_model_classes
from .results import empty_segmentation

ModelRef = Union[str, Any]  # a model node (the scene's) or a model file path


class ModelAPI:
    """Model methods of ``logic.LogicCore`` (which sets the attributes below)."""

    scene: Any
    python: Optional[str]
    env: Optional[Dict[str, str]]
    work_root: str
    _wait: Callable[..., Any]

    def model_file(self, model: ModelRef) -> str:
        """A model file path for the child: a path as given (checked), or the model node's cached file,
        written again from the node when the temporary folder lost it."""
        if model is None or model == "":
            raise InputError("no model: train one or load a model file")
        if not isinstance(model, str) and hasattr(model, "GetAttribute"):
            return model_file_of(model, self.work_root)
        path = os.path.abspath(str(model))
        if not os.path.isfile(path):
            raise InputError(f"model file not found: {model}")
        return path

    def starting_point(self, init: ModelRef) -> str:
        """``--init`` for a run: a model node's file, a model file, or a folder (MONAI bundle / Auto3DSeg model)."""
        if isinstance(init, str) and os.path.isdir(init):
            return os.path.abspath(init)
        return self.model_file(init)

    def inspect_model(self, path: str) -> jobs.Job:
        """A started job whose result is what the model file holds (read by the child: no torch here)."""
        return jobs.model_info_job(os.path.abspath(str(path)), python=self.python, env=self.env).start()

    def load_model(self, path: str, info: Optional[Dict[str, Any]] = None, name: Optional[str] = None) -> Any:
        """A NEW model node from a model file. ``info``: what ``inspect_model`` found (read now, blocking,
        when not given), so a bad file is refused before a node is made."""
        path = self.model_file(str(path))
        if info is None:
            info = self._wait(self.inspect_model(path), None)
        return model_node_from_file(self.scene, path, info, name)

    def save_model(self, model: Any, target: str) -> str:
        """Writes the model node's file to ``target`` (atomically) with its run record beside it; the run
        record also keeps the overlap nesting (``slicer.nested``) for ``load_model``."""
        return save_model_file(model, self.model_file(model), target)

    def model_classes(self, model: ModelRef) -> List[Dict[str, Any]]:
        """The model's classes (background first): from the node, else read by a child process."""
        classes = model_classes_of(model) if is_model_node(model) else None
        if classes:
            return classes
        info = self._wait(self.inspect_model(self.model_file(model)), None)
        if is_model_node(model):
            set_model_classes(model, info["classes"])
        return info["classes"]

    def empty_segmentation_for(self, model: ModelRef, volume: Any, name: Optional[str] = None) -> Any:
        """A NEW empty segmentation with the model's segment names / colours / terminology on ``volume``."""
        return empty_segmentation(self.scene, volume, self.model_classes(model), name)
