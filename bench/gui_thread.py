"""GUI-thread time per click in the Slicer module, on slicer-core's scene (no Qt): what one **Train** click and one
**Segment** click keep the GUI thread busy for, with 1, 5 and 20 volumes of 512 x 512 x 300 int16.

Each click is the panel's own action (``PanelController.train`` / ``.segment``, the code the buttons run, the
dependency check left out), timed from the call until it returns: what runs after it (files written from a worker
thread, the child process) is timed separately, as the time until the child process runs. Then the job is cancelled.

- Train: volume 0 is the labeled case (a segmentation with 3 box segments drawn on it); every volume is unlabeled.
- Segment: every volume is segmented. The model file is a placeholder: the click does not read it (the child
  would), so the job is cancelled before it matters.
- Volumes are synthetic; "loaded" volumes were written to ``.nrrd`` files and read back through Slicer's storage
  node (unchanged since loading: the child is handed the files themselves); "in memory" volumes exist only in the
  scene (written from a worker: from a view of their voxels, compared with the node once written; copied on the
  GUI thread at the click by the code before that). The labeled case's segmentation is
  loaded from a ``.seg.nrrd`` in the "loaded" rows and made in the scene (as Segment Editor leaves it: rasterised on
  the GUI thread before segmentations made or edited in the scene were handed over as a copy of their labelmap layer)
  in the "in memory" rows. "loaded, segmentation edited": loaded volumes, and the loaded segmentation then painted
  (a box added to one segment as Segment Editor's Paint adds it: modified since read).
- Result import: one 512 x 512 x 300 ``.seg.nrrd`` with 3 segments read into a new segmentation node, the GUI-thread
  work each finished volume costs (imported as the child reports it, one per poll; where the code reads it on a worker
  thread first, that read is timed apart and the GUI thread's part is building the node from it).

    python bench/gui_thread.py [--small] [--code DIR] [--label NAME] [--rows all|made]

``--code DIR``: import the module from another checkout's ``CPCLSegment/`` (the code before a change), ``--label``
names that run in ``bench/results/gui_thread.json`` (runs with other labels are kept) and ``.md``. ``--rows made``:
only the rows whose segmentation is made or edited in the scene (1 and 5 volumes, loaded and edited, in memory);
``--rows memory``: only volumes made in the scene (1, 5 and 20).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FULL = (300, 512, 512)  # numpy (k, j, i)
SMALL = (24, 48, 40)


def setup_path(code: str) -> None:
    sys.path.insert(0, str(Path(code).resolve()))
    sys.path.insert(0, str(ROOT / "Testing"))


def new_volume(scene: Any, name: str, shape: Any, seed: int) -> Any:
    import vtk
    from vtk.util import numpy_support

    rng = np.random.default_rng(seed)
    voxels = np.full(shape, -1000, dtype=np.int16)
    k, j, i = shape
    voxels[k // 8:7 * k // 8, j // 6:5 * j // 6, i // 6:5 * i // 6] = rng.integers(-100, 200, dtype=np.int16)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(voxels.ravel(), deep=True, array_type=vtk.VTK_SHORT))
    node.SetAndObserveImageData(image)
    node.SetSpacing(0.8, 0.8, 1.5)
    node.CreateDefaultDisplayNodes()
    return node


def loaded_volume(scene: Any, name: str, shape: Any, seed: int, folder: str) -> Any:
    """A volume written to a file and read back through a storage node of its own, as File > Add data does."""
    import slicer

    made = new_volume(scene, f"{name} (to file)", shape, seed)
    path = os.path.join(folder, f"{name}.nrrd")
    writer = slicer.vtkMRMLVolumeArchetypeStorageNode()
    writer.SetFileName(path)
    writer.UseCompressionOff()
    assert writer.WriteData(made)
    scene.RemoveNode(made)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node)
    node.CreateDefaultDisplayNodes()
    return node


def box_segmentation(scene: Any, volume: Any, shape: Any) -> Any:
    import slicer
    import vtk
    from vtk.util import numpy_support

    from CPCLSegmentModuleLib.nodes import ensure_converter_rules

    labels = np.zeros(shape, dtype=np.uint8)
    k, j, i = shape
    for s in range(3):
        lo = s * k // 10
        labels[k // 6 + lo:k // 2 + lo, j // 4 + lo:3 * j // 4, i // 4 + lo:3 * i // 4] = s + 1
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(labels.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR))
    labelmap.SetAndObserveImageData(image)
    labelmap.SetSpacing(*volume.GetSpacing())
    ensure_converter_rules()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    scene.RemoveNode(labelmap)
    return segmentation


def loaded_segmentation(scene: Any, volume: Any, shape: Any, folder: str) -> Any:
    """``box_segmentation`` saved to a ``.seg.nrrd`` (compressed, as Slicer saves it) and read back through a storage node
    of its own, as File > Add data does: unchanged since loading."""
    import slicer

    made = box_segmentation(scene, volume, shape)
    path = os.path.join(folder, f"{volume.GetName()}.seg.nrrd")
    writer = slicer.vtkMRMLSegmentationStorageNode()
    writer.SetFileName(path)
    assert writer.WriteData(made)
    scene.RemoveNode(made)
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(path)
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    return node


def edited_segmentation(scene: Any, volume: Any, shape: Any, folder: str) -> Any:
    """``loaded_segmentation`` then painted as Segment Editor's Paint adds to a segment by default (``MODE_MERGE_MASK``,
    every other segment overwritten): a box added to the first segment, so the node is modified since read."""
    import slicer
    from vtk.util import numpy_support

    node = loaded_segmentation(scene, volume, shape, folder)
    seg = node.GetSegmentation()
    sid = seg.GetNthSegmentID(0)
    modifier = slicer.vtkOrientedImageData()
    modifier.DeepCopy(seg.GetLayerDataObject(seg.GetLayerIndex(sid)))
    e = modifier.GetExtent()
    grid = numpy_support.vtk_to_numpy(modifier.GetPointData().GetScalars()).reshape(e[5] - e[4] + 1, e[3] - e[2] + 1, e[1] - e[0] + 1)
    grid[...] = 0
    grid[:grid.shape[0] // 3, :grid.shape[1] // 3, :grid.shape[2] // 3] = 1
    modifier.Modified()
    others = [seg.GetNthSegmentID(n) for n in range(seg.GetNumberOfSegments())]
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic.SetBinaryLabelmapToSegment(modifier, node, sid, logic.MODE_MERGE_MASK, None, False, others)
    assert node.GetModifiedSinceRead()
    return node


def settle(c: Any, kind: str, job: Any, timeout: float = 600.0) -> float:
    """Seconds from now until the job's child process runs (or the job ended); then cancels it and waits for the end."""
    t0 = time.perf_counter()
    while job.proc is None and not job.finished and time.perf_counter() - t0 < timeout:
        c.poll()
        time.sleep(0.02)
    until_child = time.perf_counter() - t0
    job.cancel(block=True)
    while c.busy(kind) or c._discarded:
        c.poll()
        time.sleep(0.05)
    return until_child


def clicks(n: int, shape: Any, loaded: bool, folder: str, edited: bool = False) -> Dict[str, Any]:
    import slicer

    from CPCLSegmentModuleLib import panel
    from CPCLSegmentModuleLib.logic import LogicCore
    from slicer_scene import new_scene

    scene = new_scene()
    volumes = [loaded_volume(scene, f"CT {v}", shape, v, folder) if loaded else new_volume(scene, f"CT {v}", shape, v)
               for v in range(n)]
    if edited:
        segmentation = edited_segmentation(scene, volumes[0], shape, folder)
    elif loaded:
        segmentation = loaded_segmentation(scene, volumes[0], shape, folder)
    else:
        segmentation = box_segmentation(scene, volumes[0], shape)
    work = os.path.join(folder, "work")
    c = panel.PanelController(LogicCore(scene, work_root=work))
    c.set_unlabeled(volumes)
    c.set_setting("device", "cpu")
    assert [case.volume for case in c.cases()] == [volumes[0]] and len(c.checked_segments()) == 3
    t0 = time.perf_counter()
    job = c.train()
    train_s = time.perf_counter() - t0
    train_child_s = settle(c, "train", job)
    model = os.path.join(folder, "placeholder-model.pt")
    Path(model).write_bytes(b"placeholder")
    c.model = lambda: model  # the click reads no model: the child would
    from CPCLSegmentModuleLib import logic as logic_module

    nested = logic_module.model_nested  # the code before this change took a model node only here (a path raised)
    logic_module.model_nested = lambda m: {} if isinstance(m, str) else nested(m)
    c.set_segment_volumes(volumes)
    t0 = time.perf_counter()
    job = c.segment()
    segment_s = time.perf_counter() - t0
    segment_child_s = settle(c, "segment", job)
    c.close()
    del c, volumes, segmentation
    scene.Clear(1)
    slicer.mrmlScene = slicer.vtkMRMLScene()
    return {"train_click_s": round(train_s, 3), "train_until_child_s": round(train_child_s, 3),
            "segment_click_s": round(segment_s, 3), "segment_until_child_s": round(segment_child_s, 3)}


def result_import(shape: Any, folder: str) -> float:
    """GUI-thread seconds to turn one finished volume's ``.seg.nrrd`` into a segmentation node. The file is written as the
    child of the code under test writes it (``writers.write_seg_nrrd``; cropped to its segments where that code's
    Segment asks the child to)."""
    import inspect

    import SimpleITK as sitk

    from CPCLSegmentLib.writers import write_seg_nrrd
    from CPCLSegmentModuleLib.export import export_volume
    from CPCLSegmentModuleLib.logic import LogicCore
    from CPCLSegmentModuleLib.results import import_segmentation
    from slicer_scene import new_scene

    scene = new_scene()
    volume = new_volume(scene, "CT", shape, 0)
    export_volume(volume, os.path.join(folder, "reference.nrrd"))
    reference = sitk.ReadImage(os.path.join(folder, "reference.nrrd"))
    labels = np.zeros(shape, dtype=np.int16)
    k, j, i = shape
    for s in range(3):  # the boxes of box_segmentation, as a prediction of them would be
        lo = s * k // 10
        labels[k // 6 + lo:k // 2 + lo, j // 4 + lo:3 * j // 4, i // 4 + lo:3 * i // 4] = s + 1
    classes = [{"name": "background", "label_value": 0}] + [
        {"name": f"segment {s}", "color": [0.2 * s, 0.5, 0.3], "label_value": s} for s in (1, 2, 3)]
    crop = "--crop-to-segments" in inspect.getsource(LogicCore.start_segmentation)
    path = os.path.join(folder, "result.seg.nrrd")
    write_seg_nrrd(path, labels, reference, classes, **({"crop": True} if crop else {}))
    from CPCLSegmentModuleLib import results

    read, worker_s = None, None
    if hasattr(results, "read_segmentation_result"):  # read on a worker thread as the child reports it (timed apart)
        t0 = time.perf_counter()
        read = results.read_segmentation_result(path)
        worker_s = round(time.perf_counter() - t0, 3)
    t0 = time.perf_counter()
    import_segmentation(scene, path, volume, **({"read": read} if read is not None else {}))
    return round(time.perf_counter() - t0, 4), worker_s


def markdown(runs: Dict[str, Any]) -> str:
    lines = ["# GUI-thread time per click", "",
             "`python bench/gui_thread.py` on slicer-core (no Qt). Each row: one Train click (volume 0 labeled with 3 "
             "segments, every volume unlabeled) and one Segment click (every volume), timed until the panel's action "
             "returns; 'until the child runs' is the time after that (files written from a worker thread, then the "
             "process start). Volumes are 512 x 512 x 300 int16 unless the run says otherwise.", ""]
    for label, run in runs.items():
        lines += [f"## {label}", "", f"{run['machine']}; load average {run['load'][0]:.1f} at the start, "
                  f"{run['load'][1]:.1f} at the end; volume shape (k, j, i) {run['shape']}.", "",
                  "| volumes | where they come from | Train click (s) | until the child runs (s) | Segment click (s) | "
                  "until the child runs (s) |", "|---|---|---|---|---|---|"]
        for row in run["rows"]:
            lines.append(f"| {row['volumes']} | {row['source']} | {row['train_click_s']} | {row['train_until_child_s']} | "
                         f"{row['segment_click_s']} | {row['segment_until_child_s']} |")
        worker = (f" (read before on a worker thread: {run['read_one_result_worker_s']} s)"
                  if run.get("read_one_result_worker_s") is not None else "")
        lines += ["", f"Importing one finished volume's result (3 segments) into a new segmentation node: "
                  f"{run['import_one_result_s']} s on the GUI thread{worker}.", ""]
    if any(label.startswith("before") for label in runs):
        lines += ['Reading the numbers: "before" is the code before the change the "after" run measures (this script with '
                  "`--code` pointing at that checkout), run right after it on the same machine. The latest pair has only "
                  "the volumes made in the scene (`--rows memory`, 1, 5 and 20 of them, the labeled segmentation made in the "
                  "scene too): after the change their voxels are not copied at the click (a view of them is written from the "
                  "worker, then compared with the node on the GUI thread), and each result is read on a worker thread, the "
                  "GUI thread only adding its segments to the new node. 'Until the child runs' is then mostly the worker "
                  "writing the volumes (about 3 GB for 20), while Slicer stays responsive. slicer-core has no views: in "
                  "Slicer, drawing a new node in the views comes on top of the import time shown. The pair before it has only "
                  "the rows whose labeled segmentation is made or edited in the scene (`--rows made`): loaded volumes with "
                  "the loaded segmentation then painted (\"loaded, segmentation edited\"), and volumes and segmentation "
                  "made in the scene (\"in memory\"): after the change the segmentation's labelmap layer is copied at "
                  "the click and written from the worker, before it was rasterised on the GUI thread. The in-memory "
                  "volumes' voxels are copied at the click in both: that copy is what remains of the \"in memory\" "
                  "Train click after the change (profiled once with 5 volumes: 13.6 of 13.8 s copying voxels, 0.07 s "
                  "copying the segmentation's layer). The machine is a shared 2-core one: seconds that are "
                  "Slicer's own work on the GUI thread move with the load.", ""]
    lines.append("Raw numbers: [gui_thread.json](gui_thread.json).")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny volumes, 1 and 2 of them (a smoke test)")
    parser.add_argument("--code", default=str(ROOT / "CPCLSegment"), help="the CPCLSegment/ folder to import")
    parser.add_argument("--label", default="after", help="the run's name in the results")
    parser.add_argument("--out", default=str(RESULTS), help="results folder")
    parser.add_argument("--rows", choices=("all", "made", "memory"), default="all",
                        help="made: only the rows whose segmentation is made or edited in the scene; memory: only volumes "
                             "made in the scene, 1, 5 and 20 of them")
    args = parser.parse_args()
    setup_path(args.code)
    shape = SMALL if args.small else FULL
    plan = [(1, True, False), (2, True, False), (1, False, False)] if args.small else [
        (1, True, False), (5, True, False), (20, True, False), (1, False, False), (5, False, False)]
    if args.rows == "made":
        plan = [(1, True, True), (1, False, False)] if args.small else [(1, True, True), (5, True, True), (1, False, False),
                                                                         (5, False, False)]
    elif args.rows == "memory":
        plan = [(1, False, False), (2, False, False)] if args.small else [(1, False, False), (5, False, False), (20, False, False)]
    elif not args.small:
        plan.insert(3, (1, True, True))
    load0 = os.getloadavg()[0]
    rows: List[Dict[str, Any]] = []
    folder = tempfile.mkdtemp(prefix="cpcl-gui-bench-")
    try:
        for n, loaded, edited in plan:
            row = {"volumes": n, "source": "loaded, segmentation edited" if edited else "loaded from files" if loaded else "in memory"}
            row.update(clicks(n, shape, loaded, folder, edited))
            print(json.dumps(row), flush=True)
            rows.append(row)
        imported, read_s = result_import(shape, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    run = {"shape": list(shape), "rows": rows, "import_one_result_s": imported, "read_one_result_worker_s": read_s, "code": "this checkout" if Path(args.code).resolve() == (ROOT / "CPCLSegment").resolve() else "another checkout (--code)",
           "machine": f"{platform.machine()} {platform.system()} ({os.cpu_count()} CPUs, shared)",
           "load": [load0, os.getloadavg()[0]], "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("gui_thread_small.json" if args.small else "gui_thread.json")
    runs = json.loads(path.read_text()) if path.exists() else {}
    runs[args.label] = run
    path.write_text(json.dumps(runs, indent=1, allow_nan=False) + "\n")
    path.with_suffix(".md").write_text(markdown(runs))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
