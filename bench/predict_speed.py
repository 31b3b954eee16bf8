"""The whole predict path vs MONAI's ``sliding_window_inference`` alone.

A 256×256×128 CT is synthesised from real data (slicerio's ``CTChest4.nrrd`` resampled linearly over the
same physical extent, int16, gzip NRRD as Slicer writes it) into a temporary folder; nothing is downloaded.
The model is trained by ``pipeline.train`` itself (engine defaults: VNet width 16, depth 4, planned patch,
CT normalisation; the demo's three segments of slicerio's ``Segmentation.seg.nrrd``, resampled by the
engine onto the synthesised CT), supervised, for ``--train-iterations`` (default 40) iterations: enough for a
smooth, plausible label map. This matters for the write stage: the ``.seg.nrrd`` is gzip-compressed (level
``writers.SEG_NRRD_COMPRESSION`` = 6; slicerio's default is 9), which at level 9 takes 0.4 s for a real segmentation
of this volume but 7–30 s for the noisy map of an untrained network. The write time of the ground-truth
labels, and of the prediction at levels 6 and 9, are reported beside it.

Timed, in the order ``prediction.predict`` runs them (the same functions it calls):

1. ``load_model``: ``prediction.Predictor(model)`` (``torch.load(weights_only=True)``, build the network).
2. ``read``: ``io.read_image``.
3. ``preprocess``: ``Predictor.preprocess`` (``preparation.model_input``: ``to_model_grid`` = reorientation
   [+ resampling], then ``normalize``).
4. ``sliding_window``: ``inference.predict_probabilities`` (MONAI sliding window, overlap 0.5, Gaussian
   blending, softmax per window, accumulation on the CPU).
5. ``to_image_grid``: ``prediction.back_to_image_grid`` (argmax [or per-class resampling] back onto the image).
6. ``write``: ``writers.write_prediction`` to ``.seg.nrrd`` (slicerio, atomic).

plus ``prediction.predict`` end to end (in-process, one call) and the CLI (``python -m CPCLSegmentLib.cli
predict``, a child process: interpreter start and imports included), against the baseline: MONAI
``sliding_window_inference(x, patch, sw_batch_size=2, lambda t: net(t)[0], overlap=0.5, mode="gaussian")``
on the already-normalised tensor, same network, ``torch.no_grad``. Stages and baseline are interleaved
(``--repeats``), medians reported.

Scenarios (``--scenarios``): ``same-spacing`` (the model's spacing equals the image's: only reorientation)
and ``resampled`` (the model was trained at 2×2×3 mm: the image is resampled to it and the K probability
maps are resampled back).

Usage::

    python bench/predict_speed.py --threads 1
    python bench/predict_speed.py --smoke     # CI: a 64×64×32 volume, width 4
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from speed_common import (  # noqa: E402
    RESULTS_DIR,
    ROOT,
    Clock,
    fmt_s,
    load_average,
    machine_info,
    median,
    set_threads,
    slicerio_data_dir,
    synth_ct,
    write_json,
)

from CPCLSegmentLib import io as cio  # noqa: E402
from CPCLSegmentLib.labels import build_label_array  # noqa: E402
from CPCLSegmentLib import pipeline, prediction, preparation, writers  # noqa: E402
from CPCLSegmentLib.inference import predict_probabilities  # noqa: E402
from CPCLSegmentLib.modelfile import load_model  # noqa: E402
from CPCLSegmentLib.planning import shape_at_spacing  # noqa: E402

STAGES = ["load_model", "read", "preprocess", "sliding_window", "to_image_grid", "write"]
RESAMPLED_SPACING = (2.0, 2.0, 3.0)


def count_windows(shape: Sequence[int], patch: Sequence[int], overlap: float) -> int:
    """Windows MONAI's sliding window visits: per axis 1 if the volume fits, else ceil((L - p) / step) + 1
    with step = int(p (1 - overlap))."""
    n = 1
    for size, p in zip(shape, patch):
        step = max(1, int(p * (1 - overlap)))
        n *= 1 if size <= p else -(-(size - p) // step) + 1
    return n


def monai_alone(net: torch.nn.Module, arr, patch: Sequence[int], overlap: float) -> torch.Tensor:
    from monai.inferers import sliding_window_inference

    x = torch.as_tensor(arr)[None, None]
    net.eval()
    with torch.no_grad():
        return sliding_window_inference(x, tuple(int(p) for p in patch), 2, lambda t: net(t)[0], overlap=overlap, mode="gaussian")


def run_stages(model: str, image_path: str, out_path: str, overlap: float) -> Dict[str, Any]:
    t: Dict[str, Any] = {}
    with Clock() as c:
        pred = prediction.Predictor(model, device="cpu")
    t["load_model"] = c
    with Clock() as c:
        image = cio.read_image(image_path)
    t["read"] = c
    with Clock() as c:
        grid, arr = pred.preprocess(image)
    t["preprocess"] = c
    with Clock() as c:
        probs = predict_probabilities(pred.net, arr, pred.patch, pred.device, overlap=overlap)
    t["sliding_window"] = c
    with Clock() as c:
        labels = prediction.back_to_image_grid(probs, grid, image)
    t["to_image_grid"] = c
    with Clock() as c:
        writers.write_prediction(out_path, labels, image, pred.classes)
    t["write"] = c
    return {"clocks": t, "net": pred.net, "arr": arr, "patch": pred.patch, "grid_size_xyz": list(grid.GetSize()),
            "labels": labels, "image": image, "classes": pred.classes}


def compression_levels(labels, image, classes, out: str, levels: Sequence[int] = (6, 9)) -> Dict[str, Dict[str, float]]:
    """The write stage at each gzip level (the engine writes ``writers.SEG_NRRD_COMPRESSION``; slicerio's default is 9)."""
    res = {}
    for level in levels:
        with Clock() as c:
            writers.write_seg_nrrd(out, labels, image, classes, compression_level=level)
        res[str(level)] = {"wall_s": c.wall, "cpu_s": c.cpu, "bytes": os.path.getsize(out)}
    return res


def cli_time(model: str, image_path: str, out_path: str, threads: int) -> Dict[str, float]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "CPCLSegment") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "CPCLSegmentLib.cli", "predict", "--model", model, "--image", image_path, "--out", out_path,
           "--device", "cpu", "--progress", "none"]
    with Clock() as c:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, _, ru = os.wait4(proc.pid, 0)
    proc.returncode = 0  # reaped by wait4
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if not os.path.exists(out_path):
        raise RuntimeError(f"CLI predict wrote nothing: {err[-2000:]}")
    return {"wall_s": c.wall, "cpu_s": ru.ru_utime + ru.ru_stime, "max_rss_mib": ru.ru_maxrss / 1024.0}


def train_model(model: Path, image: Dict[str, Any], spacing: Optional[Sequence[float]], width: int, iterations: int) -> Dict[str, Any]:
    """A real model file from ``pipeline.train`` (supervised, the demo's segments, engine defaults otherwise)."""
    from CPCLSegmentLib.demo import DEMO_SEGMENTS
    from CPCLSegmentLib.settings import RunOptions
    from CPCLSegmentLib.trainer import TrainConfig

    cfg = TrainConfig(method="supervised", iterations=iterations, width=width, device="cpu", seed=0)
    request = preparation.TrainRequest(
        labeled=[preparation.LabeledInput(image["path"], str(slicerio_data_dir() / "Segmentation.seg.nrrd"))],
        out=str(model), segments=list(DEMO_SEGMENTS), config=cfg, options=RunOptions(spacing=list(spacing) if spacing else None))
    with Clock() as c:
        summary = pipeline.train(request)
    rec = load_model(str(model))
    return {"network": rec["network"], "patch_dhw": rec["patch_size"], "spacing_xyz": rec["spacing"], "iterations": iterations,
            "method": "supervised", "train_wall_s": c.wall, "status": summary["status"]}


def ground_truth_write(image_path: str, classes, out: str) -> Dict[str, float]:
    """Write time of the real segmentation's labels on the image grid (what a trained model's output resembles)."""
    seg = cio.read_segmentation(str(slicerio_data_dir() / "Segmentation.seg.nrrd"))
    image = cio.read_image(image_path)
    labels, _ = build_label_array(seg, [c["name"] for c in classes[1:]], image, image_path)
    with Clock() as c:
        writers.write_prediction(out, labels.astype("uint8"), image, classes)
    return {"wall_s": c.wall, "cpu_s": c.cpu, "bytes": os.path.getsize(out)}


def scenario(name: str, tmp: Path, image: Dict[str, Any], width: int, repeats: int, overlap: float, threads: int,
             with_cli: bool, train_iterations: int, log) -> Dict[str, Any]:
    spacing = None if name == "same-spacing" else list(RESAMPLED_SPACING)
    model = tmp / f"model-{name}.pt"
    info = train_model(model, image, spacing, width, train_iterations)
    patch = info["patch_dhw"]
    grid_dhw = shape_at_spacing(image["size_xyz"], image["spacing_xyz"], spacing or image["spacing_xyz"])
    log(f"[{name}] trained {train_iterations} iterations in {info['train_wall_s']:.0f} s: patch {patch}, model grid (D, H, W) {list(grid_dhw)}")
    stage_wall: Dict[str, List[float]] = {s: [] for s in STAGES}
    stage_cpu: Dict[str, List[float]] = {s: [] for s in STAGES}
    base_wall, base_cpu, e2e_wall, e2e_cpu, cli = [], [], [], [], []
    windows = None
    for rep in range(repeats):
        r = run_stages(str(model), image["path"], str(tmp / f"stages-{name}.seg.nrrd"), overlap)
        for s in STAGES:
            stage_wall[s].append(r["clocks"][s].wall)
            stage_cpu[s].append(r["clocks"][s].cpu)
        with Clock() as c:
            base = monai_alone(r["net"], r["arr"], r["patch"], overlap)
        base_wall.append(c.wall)
        base_cpu.append(c.cpu)
        if windows is None:
            windows = count_windows(r["arr"].shape, r["patch"], overlap)
            grid_dhw = tuple(r["arr"].shape)
            gt_write = ground_truth_write(image["path"], load_model(str(model))["classes"], str(tmp / f"gt-{name}.seg.nrrd"))
            levels = compression_levels(r["labels"], r["image"], r["classes"], str(tmp / f"levels-{name}.seg.nrrd"))
        with Clock() as c:
            prediction.predict(str(model), [image["path"]], str(tmp / f"e2e-{name}.seg.nrrd"), device="cpu")
        e2e_wall.append(c.wall)
        e2e_cpu.append(c.cpu)
        if with_cli:
            cli.append(cli_time(str(model), image["path"], str(tmp / f"cli-{name}-{rep}.seg.nrrd"), threads))
        log(f"[{name}] repeat {rep + 1}: stages " + ", ".join(f"{s} {stage_wall[s][-1]:.2f}" for s in STAGES)
            + f"; MONAI alone {base_wall[-1]:.2f}; pipeline.predict {e2e_wall[-1]:.2f}"
            + (f"; CLI {cli[-1]['wall_s']:.2f}" if cli else "") + " (wall s)")
        del base, r
    total_wall = sum(median(stage_wall[s]) for s in STAGES)
    out: Dict[str, Any] = {
        "model": info, "grid_dhw": list(grid_dhw), "patch_dhw": list(patch), "overlap": overlap, "sw_batch_size": 2,
        "windows": windows, "repeats": repeats, "write_ground_truth_labels": gt_write, "write_by_gzip_level": levels,
        "output_bytes": os.path.getsize(tmp / f"stages-{name}.seg.nrrd"),
        "stages": {s: {"median_wall_s": median(stage_wall[s]), "median_cpu_s": median(stage_cpu[s]),
                       "wall_s": stage_wall[s], "cpu_s": stage_cpu[s],
                       "share_of_stages": median(stage_wall[s]) / total_wall} for s in STAGES},
        "stages_total_wall_s": total_wall,
        "monai_alone": {"median_wall_s": median(base_wall), "median_cpu_s": median(base_cpu), "wall_s": base_wall, "cpu_s": base_cpu},
        "pipeline_predict": {"median_wall_s": median(e2e_wall), "median_cpu_s": median(e2e_cpu), "wall_s": e2e_wall},
    }
    out["ratio_sliding_window_to_monai"] = out["stages"]["sliding_window"]["median_wall_s"] / out["monai_alone"]["median_wall_s"]
    out["ratio_pipeline_to_monai"] = out["pipeline_predict"]["median_wall_s"] / out["monai_alone"]["median_wall_s"]
    if cli:
        out["cli"] = {"median_wall_s": median([c["wall_s"] for c in cli]), "median_cpu_s": median([c["cpu_s"] for c in cli]),
                      "max_rss_mib": max(c["max_rss_mib"] for c in cli), "runs": cli, "threads": threads}
        out["ratio_cli_to_monai"] = out["cli"]["median_wall_s"] / out["monai_alone"]["median_wall_s"]
    return out


def table(name: str, r: Dict[str, Any]) -> str:
    mw = r["monai_alone"]["median_wall_s"]
    rows = [f"\n{name}: model grid (D, H, W) {r['grid_dhw']}, patch {r['patch_dhw']}, {r['windows']} windows, overlap {r['overlap']}, "
            f"median of {r['repeats']}", "| stage | wall | CPU | share | × MONAI alone |", "|---|---|---|---|---|"]
    for s in STAGES:
        st = r["stages"][s]
        rows.append(f"| {s} | {fmt_s(st['median_wall_s'])} | {fmt_s(st['median_cpu_s'])} | {st['share_of_stages']:.1%} | "
                    f"{st['median_wall_s'] / mw:.2f} |")
    rows.append(f"| **sum of stages** | {fmt_s(r['stages_total_wall_s'])} | | 100% | {r['stages_total_wall_s'] / mw:.2f} |")
    rows.append(f"| pipeline.predict (one call) | {fmt_s(r['pipeline_predict']['median_wall_s'])} | "
                f"{fmt_s(r['pipeline_predict']['median_cpu_s'])} | | {r['ratio_pipeline_to_monai']:.2f} |")
    if "cli" in r:
        rows.append(f"| CLI child process | {fmt_s(r['cli']['median_wall_s'])} | {fmt_s(r['cli']['median_cpu_s'])} | | "
                    f"{r['ratio_cli_to_monai']:.2f} |")
    gt = r["write_ground_truth_labels"]
    rows.append(f"| (write, ground-truth labels instead) | {fmt_s(gt['wall_s'])} | {fmt_s(gt['cpu_s'])} | | |")
    for level, w in r.get("write_by_gzip_level", {}).items():
        rows.append(f"| (write at gzip level {level}: {w['bytes'] / 2**20:.2f} MiB) | {fmt_s(w['wall_s'])} | {fmt_s(w['cpu_s'])} | | |")
    rows.append(f"| MONAI sliding_window_inference alone | {fmt_s(mw)} | {fmt_s(r['monai_alone']['median_cpu_s'])} | | 1.00 |")
    return "\n".join(rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", nargs=3, type=int, default=[256, 256, 128], metavar=("X", "Y", "Z"))
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--train-iterations", type=int, default=40, help="supervised iterations of the benchmark's model")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--scenarios", nargs="+", default=["same-spacing", "resampled"])
    p.add_argument("--no-cli", action="store_true", help="skip the CLI child-process timing")
    p.add_argument("--smoke", action="store_true", help="CI: 64×64×32 volume, width 4, 1 repeat, same-spacing only")
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    threads = set_threads(args.threads)
    if args.smoke:
        args.size, args.width, args.repeats, args.scenarios, args.train_iterations = [64, 64, 32], 4, 1, ["same-spacing"], 2
    result: Dict[str, Any] = {"benchmark": "predict_speed", "command": " ".join(["python", "bench/predict_speed.py", *(argv or sys.argv[1:])]),
                              "machine": machine_info(), "threads": threads, "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="cpcl-predict-bench-") as d:
        tmp = Path(d)
        image = synth_ct(tmp / "ct.nrrd", args.size)
        result["image"] = {k: v for k, v in image.items() if k != "path"}
        log(f"synthesised {image['size_xyz']} voxels at {[round(s, 3) for s in image['spacing_xyz']]} mm ({image['bytes'] / 1e6:.1f} MB)")
        for name in args.scenarios:
            if name not in ("same-spacing", "resampled"):
                p.error(f"unknown scenario {name!r}")
            res = scenario(name, tmp, image, args.width, args.repeats, args.overlap, threads, not args.no_cli,
                           args.train_iterations, log)
            result["scenarios"][name] = res
            print(table(name, res), flush=True)
    result["machine"]["load_average_at_end"] = load_average()
    out = Path(args.out) if args.out else RESULTS_DIR / ("predict_speed_smoke.json" if args.smoke else "predict_speed.json")
    write_json(out, result)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
