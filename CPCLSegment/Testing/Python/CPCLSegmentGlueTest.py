"""In-Slicer check of the Qt-free logic core (run by ctest: ``Slicer --testing``; seconds, no training).

The same functions are tested with pytest against slicer-core (Testing/test_slicer_glue.py); this test makes
sure the running Slicer (5.8 or later) has every API they use and that a labeled case exported for the
engine reads back identically.
"""

import os
import tempfile
import unittest

import slicer


class CPCLSegmentGlueTest(unittest.TestCase):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def test_slicer_has_every_api_the_core_uses(self):
        import CPCLSegmentLogicCore as core

        self.assertEqual(core.missing_slicer_api(), [])

    def test_export_reads_back_on_the_volume_grid(self):
        import numpy as np
        import slicerio

        import CPCLSegmentLogicCore as core
        from CPCLSegmentLib import io as cio

        folder = os.path.join(os.path.dirname(slicerio.__file__), "data")
        volume = slicer.util.loadVolume(os.path.join(folder, "CTChest4.nrrd"))
        segmentation = slicer.util.loadSegmentation(os.path.join(folder, "Segmentation.seg.nrrd"))
        names = ["right lung", "left lung"]
        with tempfile.TemporaryDirectory() as tmp:
            image_path = core.export_volume(volume, os.path.join(tmp, "v.nrrd"))
            seg_path = os.path.join(tmp, "s.seg.nrrd")
            core.export_segmentation(volume, segmentation, names, seg_path)
            image = cio.read_image(image_path)
            labels, missing = cio.build_label_array(cio.read_segmentation(seg_path), names, image, image_path)
        self.assertEqual(missing, [])
        arrays = core.labeled_arrays(volume, segmentation, names)
        self.assertTrue(np.array_equal(labels, arrays.labels(names)))
        self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(volume), arrays.volume))


if __name__ == "__main__":
    unittest.main()
