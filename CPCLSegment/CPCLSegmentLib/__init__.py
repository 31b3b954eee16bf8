"""CPCLSegmentLib: the CPCL semi-supervised segmentation engine.

Pure engine: torch, numpy, MONAI, SimpleITK and slicerio only. It never imports slicer, qt, vtk or ctk,
so it runs inside Slicer's Python, in a child process started by the Slicer module, and from a terminal.
"""

from __future__ import annotations

__version__ = "0.1.0"

# Version of the model-file layout written by modelfile.save_model. Bump when fields change meaning.
MODEL_FORMAT = "cpcl-segment-model"
MODEL_FORMAT_VERSION = 1
