"""Preprocessing cache: the first and the second run's time to the first training iteration.

Each data set is trained through ``pipeline.train`` (the path of ``cpcl-segment train``) for one iteration,
twice on the same files with the same cache folder; the first run starts from an empty cache. Times are measured
from the call: to the ``summary`` event (labeled cases inspected, run planned; preprocessing comes next), to the
``start`` event (the trainer is about to run iteration 1) and to the first ``progress`` event (iteration 1 done).

- ``hippocampus-40``: 40 hippocampus MRIs (``../shared/data/msd-hippocampus``, the first 40 subjects of
  ``splits.json``'s train list): 4 labeled, 36 unlabeled. The first run is measured with one preprocessing
  process and with two (``CPCL_SEGMENT_PREPROCESS_WORKERS``), each from an empty cache.
- ``chest-ct``: slicerio's CTChest4.nrrd with its two lungs, at its own spacing.

Writes ``bench/results/preprocess_cache.json`` and ``.md``. The machine's load is recorded: on a shared
machine the absolute times move with it, the ratio between the runs much less.

    python bench/preprocess_cache.py [--quick]
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "CPCLSegment") not in sys.path:
    sys.path.insert(0, str(ROOT / "CPCLSegment"))

from CPCLSegmentLib import pipeline  # noqa: E402
from CPCLSegmentLib.preparation import LabeledInput, TrainRequest  # noqa: E402
from CPCLSegmentLib.preprocessing import WORKERS_ENV  # noqa: E402
from CPCLSegmentLib.settings import RunOptions, TrainConfig  # noqa: E402

HIPPO = ROOT.parent / "shared" / "data" / "msd-hippocampus"
RESULTS = ROOT / "bench" / "results"


def hippocampus_request(out: str, cache: str) -> TrainRequest:
    with open(HIPPO / "splits.json", encoding="utf-8") as f:
        names = json.load(f)["train"][:40]
    image = [str(HIPPO / "imagesTr" / (n if n.endswith(".nii.gz") else f"{n}.nii.gz")) for n in names]
    label = [str(HIPPO / "labelsTr" / os.path.basename(p)) for p in image]
    cfg = TrainConfig(iterations=1, patch_size=(32, 32, 32), width=8, device="cpu", copy_paste=False, validation_every=0)
    return TrainRequest(labeled=[LabeledInput(i, s) for i, s in zip(image[:4], label[:4])], unlabeled=image[4:], out=out,
                        config=cfg, options=RunOptions(cache_dir=cache))


def chest_request(out: str, cache: str) -> TrainRequest:
    import slicerio

    data = Path(slicerio.__file__).parent / "data"
    cfg = TrainConfig(iterations=1, patch_size=(16, 64, 64), width=8, device="cpu", copy_paste=False, validation_every=0)
    return TrainRequest(labeled=[LabeledInput(str(data / "CTChest4.nrrd"), str(data / "Segmentation.seg.nrrd"))], out=out,
                        segments=["right lung", "left lung"], config=cfg, options=RunOptions(cache_dir=cache))


def timed_run(request: TrainRequest) -> Dict[str, Any]:
    """Seconds from the call to the first iteration's start and end, cases preprocessed, cases reused."""
    t0 = time.perf_counter()
    marks: Dict[str, Any] = {"preprocessed": 0, "reused": 0}

    def emit(event: Dict[str, Any]) -> None:
        t = round(time.perf_counter() - t0, 2)
        kind = event.get("event")
        if kind == "summary":  # cases inspected, run planned: preprocessing comes next
            marks.setdefault("to_plan_s", t)
        elif kind == "start":
            marks.setdefault("to_first_iteration_start_s", t)
        elif kind == "progress":
            marks.setdefault("to_first_iteration_done_s", t)
        elif kind == "preprocess":
            marks["preprocessed"] += 1
        elif kind == "info" and "are reused from the preprocessing cache" in event.get("message", ""):
            marks["reused"] = int(event["message"].split()[0])

    pipeline.train(request, emit)
    marks["total_s"] = round(time.perf_counter() - t0, 2)
    return marks


def bench(name: str, make_request, runs: List[Dict[str, Any]], workdir: str) -> List[Dict[str, Any]]:
    rows = []
    for n, spec in enumerate(runs):
        cache = os.path.join(workdir, f"{name}-cache-{spec['cache']}")
        if spec["fresh"]:
            shutil.rmtree(cache, ignore_errors=True)
        os.environ[WORKERS_ENV] = str(spec["workers"]) if spec["workers"] else ""
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        row = {"data": name, "run": spec["run"], "cache": "empty" if spec["fresh"] else "filled by the previous run",
               "workers": spec["workers"] or "auto", "load_before": load, **timed_run(make_request(os.path.join(workdir, f"{name}-{n}.pt"), cache))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def write_markdown(result: Dict[str, Any], path: Path) -> None:
    lines = ["# Preprocessing cache: time to the first iteration", "",
             f"`python bench/preprocess_cache.py` on {result['machine']} ({result['cpus']} CPUs, shared; load average "
             f"{result['load_start']:.1f} at the start, {result['load_end']:.1f} at the end). One training iteration per run; "
             "the first run of each data set starts from an empty preprocessing cache, the second reuses it.", "",
             "Columns: seconds from the call to the run planned (labeled cases inspected; the planning includes timing "
             "three training steps for the time estimate), then the preprocessing (cache lookups, and the preprocessing "
             "of what is missing), then the first iteration's start and end.", "",
             "| data | run | cache | preprocessing processes | cases preprocessed | cases reused | planned (s) | "
             "preprocessing (s) | to first iteration (s) | first iteration done (s) | load before |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        prep = round(r["to_first_iteration_start_s"] - r["to_plan_s"], 2) if "to_plan_s" in r and "to_first_iteration_start_s" in r else None
        lines.append(f"| {r['data']} | {r['run']} | {r['cache']} | {r['workers']} | {r['preprocessed']} | {r['reused']} | "
                     f"{r.get('to_plan_s')} | {prep} | {r.get('to_first_iteration_start_s')} | {r.get('to_first_iteration_done_s')} | "
                     f"{round(r['load_before'], 1) if r['load_before'] is not None else None} |")
    lines += ["", "Summary (the second run against the first run that filled its cache):", ""]
    for data in dict.fromkeys(r["data"] for r in result["runs"]):
        rows = [r for r in result["runs"] if r["data"] == data]
        second = next((r for r in rows if r["run"] == "second"), None)
        first = [r for r in rows if r["run"] == "first"][-1:]
        if second is None or not first or "to_plan_s" not in second:
            continue
        f, g = first[0], second

        def prep(r: Dict[str, Any]) -> float:
            return round(r["to_first_iteration_start_s"] - r["to_plan_s"], 1)

        lines.append(f"- {data}: preprocessing {prep(f)} s -> {prep(g)} s ({g['reused']} cases reused, {g['preprocessed']} "
                     f"preprocessed); time to the first iteration {f['to_first_iteration_start_s']} s -> "
                     f"{g['to_first_iteration_start_s']} s, the rest being inspection and planning ({f['to_plan_s']} s and "
                     f"{g['to_plan_s']} s).")
    lines += ["", "Reading the numbers: a second run's preprocessing is only the cache lookups (each input identified by path, "
              "size and modification time, each entry verified against its manifest). On a loaded machine the time to the "
              "first iteration is dominated by what comes before preprocessing: reading the labeled cases and timing "
              "three training steps for the estimate. Two worker processes on the small hippocampus volumes cost more "
              "(starting them) than they save, which is why the default preprocesses small data sets (under 3e7 voxels "
              "in all) in the training process itself.", "",
              "Raw numbers: [preprocess_cache.json](preprocess_cache.json)."]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the chest CT only")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json, measure nothing")
    args = parser.parse_args()
    if args.markdown_only:
        write_markdown(json.loads((RESULTS / "preprocess_cache.json").read_text(encoding="utf-8")), RESULTS / "preprocess_cache.md")
        return 0
    workdir = tempfile.mkdtemp(prefix="cpcl-bench-cache-")
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows: List[Dict[str, Any]] = []
    try:
        first_second = [{"run": "first", "cache": "a", "fresh": True, "workers": None},
                        {"run": "second", "cache": "a", "fresh": False, "workers": None}]
        rows += bench("chest-ct", chest_request, first_second, workdir)
        if not args.quick and HIPPO.exists():
            rows += bench("hippocampus-40", hippocampus_request, [
                {"run": "first", "cache": "a", "fresh": True, "workers": 1},
                {"run": "first", "cache": "b", "fresh": True, "workers": 2},
                {"run": "second", "cache": "b", "fresh": False, "workers": None}], workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result = {"machine": f"{platform.machine()} {platform.system()}", "cpus": os.cpu_count(), "python": platform.python_version(),
              "load_start": load_start, "load_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "runs": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "preprocess_cache.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    write_markdown(result, RESULTS / "preprocess_cache.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
