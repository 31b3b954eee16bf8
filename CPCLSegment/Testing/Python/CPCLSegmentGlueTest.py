"""In-Slicer check of the Qt-free logic core (run by ctest: ``Slicer --testing``; seconds, no training).

The same functions are tested with pytest against slicer-core (Testing/test_slicer_glue.py,
Testing/test_slicer_panel.py); this test makes sure the running Slicer (5.8 or later) has every API they use,
that a labeled case exported for the engine reads back identically, that the panel's controller works on
the application's scene, and that entering the module did not import torch into Slicer's process.
"""

import os
import tempfile
import unittest

import slicer


class CPCLSegmentGlueTest(unittest.TestCase):
    def setUp(self):
        # Install what is missing first (slicerio, MONAI): the tests below import them.
        slicer.util.getModuleLogic("CPCLSegment").ensureDependencies(ask=False)
        slicer.mrmlScene.Clear()

    def test_slicer_has_every_api_the_core_uses(self):
        from CPCLSegmentModuleLib.slicer_api import missing_slicer_api

        self.assertEqual(missing_slicer_api(), [])

    def test_export_reads_back_on_the_volume_grid(self):
        import numpy as np
        import slicerio

        from CPCLSegmentLib import io as cio
        from CPCLSegmentLib.labels import build_label_array
        from CPCLSegmentModuleLib.export import export_segmentation, export_volume
        from CPCLSegmentModuleLib.nodes import labeled_arrays

        folder = os.path.join(os.path.dirname(slicerio.__file__), "data")
        volume = slicer.util.loadVolume(os.path.join(folder, "CTChest4.nrrd"))
        segmentation = slicer.util.loadSegmentation(os.path.join(folder, "Segmentation.seg.nrrd"))
        names = ["right lung", "left lung"]
        with tempfile.TemporaryDirectory() as tmp:
            image_path = export_volume(volume, os.path.join(tmp, "v.nrrd"))
            seg_path = os.path.join(tmp, "s.seg.nrrd")
            export_segmentation(volume, segmentation, names, seg_path)
            image = cio.read_image(image_path)
            labels, missing = build_label_array(cio.read_segmentation(seg_path), names, image, image_path)
        self.assertEqual(missing, [])
        arrays = labeled_arrays(volume, segmentation, names)
        self.assertTrue(np.array_equal(labels, arrays.labels(names)))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), arrays.volume))

    def test_panel_controller_on_the_application_scene(self):
        import slicerio

        from CPCLSegmentModuleLib import panel
        from CPCLSegmentModuleLib.logic import LogicCore

        folder = os.path.join(os.path.dirname(slicerio.__file__), "data")
        volume = slicer.util.loadVolume(os.path.join(folder, "CTChest4.nrrd"))
        segmentation = slicer.util.loadSegmentation(os.path.join(folder, "Segmentation.seg.nrrd"))
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        controller = panel.PanelController(LogicCore(slicer.mrmlScene, work_root=tempfile.mkdtemp()))
        try:
            self.assertEqual([(c.volume, c.segmentation) for c in controller.cases()], [(volume, segmentation)])
            self.assertTrue(controller.view().enabled["trainButton"])
            slicer.mrmlScene.RemoveNode(segmentation)
            self.assertEqual(controller.cases(), [])
        finally:
            controller.close()

    def test_entering_the_module_does_not_import_torch(self):
        import sys

        imported_before = "torch" in sys.modules  # another extension may have imported it; then nothing to check
        slicer.util.selectModule("CPCLSegment")
        for _ in range(20):
            slicer.app.processEvents()
        if not imported_before:
            self.assertNotIn("torch", sys.modules)


if __name__ == "__main__":
    unittest.main()
