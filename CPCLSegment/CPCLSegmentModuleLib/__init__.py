"""CPCLSegmentModuleLib: the Slicer module's Qt-free logic (imports ``slicer`` and ``vtk``, never ``qt``, ``ctk`` or
``torch``), tested with pytest against slicer-core.

- ``core``: nodes <-> files, the one train / segment / rank API (``LogicCore``), models stored in the scene.
- ``panel``: ``PanelController``, every decision the panel makes (the widget maps its ``view()`` to Qt).
- ``environment``: package versions from metadata, the child's device report, installing dependencies.

A package, not top-level files: Slicer loads every top-level ``.py`` of a module folder as a module.
"""
