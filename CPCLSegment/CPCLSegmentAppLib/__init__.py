"""CPCLSegmentAppLib: the Slicer module's classes that need the running Slicer application (Qt, the scripted-module
base classes, the PyTorch extension): the panel widget, the console logic class, the installers and the in-Slicer
self-test. They decide nothing: each maps ``CPCLSegmentModuleLib`` onto Slicer. ``CPCLSegment.py`` exposes the
classes Slicer looks up by the module's name. Not importable outside Slicer (there is no ``qt``);
``Testing/test_slicer_widget.py`` runs it with stand-ins for Qt and the scripted-module base classes.

Modules, bottom-up: each imports only modules listed above it (``Testing/test_layout.py`` checks that the
``imports:`` lists below are exactly what each module imports from this package).

- ``installer``: the installers Slicer provides: PyTorch through the PyTorch extension, the other packages through
  ``slicer.packaging`` or pip (``SlicerInstaller``). imports: none.
- ``consolelogic``: the console API as Slicer's scripted-module logic class, whose train, segment and rank are the
  core logic's (``CPCLSegmentLogic``). imports: installer.
- ``widgetview``: ``PanelController.view()`` shown on the ``.ui`` widgets, the settings widgets read back by the
  setting they name, the effects the controller queues (``WidgetViewMixin``). imports: none.
- ``widget``: the panel widget: signals to the controller's actions, the poll timer, Reload and exit asking first
  while jobs run (``CPCLSegmentWidget``, ``ExitGuard``). imports: consolelogic, widgetview.
- ``selftest``: the in-Slicer self-test: the console API and the panel flow on the chest CT (``CPCLSegmentTest``).
  imports: consolelogic.
"""
