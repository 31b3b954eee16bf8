"""Peak training memory, measured vs ``planning.estimate_memory``.

Every measurement runs in a **fresh child process** so its peak is its own:

- ``cli``: the default Slicer / CLI settings. ``python -m CPCLSegmentLib.cli train`` with nothing but the
  data, ``--iterations``, ``--device cpu`` (so width 16, depth 4, batch 2 + 2, the planned patch) on
  (a) slicerio's real chest CT with its Slicer-written segmentation (all 7 segments; the CT is also the
  unlabeled case), (b) the same CT synthesised at 256×256×128 (labels resampled onto it by the engine) and
  (c) (b) with ``STUDY_SIZE`` more CTs of that size unlabeled (a study: does the process grow with the number
  of volumes?), (d) the CT synthesised at 512×512×300 (a real CT's size), plus ``cli predict`` on (b). The runs
  share one preprocessing cache folder, empty at the start, as a user's first runs: (c) reads (b)'s CT from it
  and preprocesses its others. Peak RSS of the child from ``os.wait4`` (the kernel's ``ru_maxrss``), and the
  largest anonymous and file-backed parts seen while polling (``wait_polling_rss``); the estimate is the one
  the CLI prints in its ``summary`` event. ``--match`` picks CLI runs by name, as it picks grid settings.
- ``grid``: training steps (``speed_common.StepRunner``: the trainer's exact step on random batches) for
  several patch / batch / width / method settings. The child records its RSS after imports (``base``:
  interpreter + torch + MONAI), then builds the networks and runs ``--steps`` steps; peak RSS − base is what
  ``estimate_memory`` models (tensors), and on CUDA ``torch.cuda.max_memory_allocated`` is recorded too.

For each run: peak / estimate, where the estimate is ``planning.estimate_memory`` for the device (CPU: the
process base ``planning.CPU_PROCESS_BASE`` + 1.0 × the tensor estimate; it must stay an upper bound of the
measured peaks, for the planner and the panel's warning), and a least-squares fit of peak vs the tensor
estimate (BENCHMARKS.md, "Speed and memory").

Usage::

    python bench/memory.py                 # CLI runs + the grid, results/memory.json
    python bench/memory.py --only grid
    python bench/memory.py --smoke         # CI: two tiny grid settings, one step each
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_common import RESULTS_DIR, ROOT, load_average, machine_info, slicerio_data_dir, synth_ct, write_json  # noqa: E402

MIB = 1024.0**2
STUDY_SIZE = 8  # the CLI's study run: this many more 256x256x~128 CTs in the unlabeled stream

# (name, method, patch (D, H, W), labeled batch, unlabeled batch, width, K)
GRID = [
    ("cpcl 48x64x64 w16 2+2 (reference)", "cpcl", (48, 64, 64), 2, 2, 16, 2),
    ("mean_teacher 48x64x64 w16 2+2", "mean_teacher", (48, 64, 64), 2, 2, 16, 2),
    ("supervised 48x64x64 w16 2", "supervised", (48, 64, 64), 2, 2, 16, 2),
    ("cpcl 48x64x64 w16 1+1", "cpcl", (48, 64, 64), 1, 1, 16, 2),
    ("cpcl 48x64x48 w16 2+2 (hippocampus, width 16)", "cpcl", (48, 64, 48), 2, 2, 16, 3),
    ("cpcl 32x48x32 w8 2+2 copy-paste (hippocampus CPU plan)", "cpcl", (32, 48, 32), 2, 2, 8, 3, True),
    ("cpcl 32x64x80 w8 2+2 copy-paste (left atrium CPU plan)", "cpcl", (32, 64, 80), 2, 2, 8, 2, True),
    ("cpcl 16x96x96 w16 2+2 K8 (CTChest4 CPU plan)", "cpcl", (16, 96, 96), 2, 2, 16, 8),
    ("cpcl 64x64x64 w16 2+2 (CPU patch cap)", "cpcl", (64, 64, 64), 2, 2, 16, 4),
    ("cpcl 48x64x64 w32 2+2", "cpcl", (48, 64, 64), 2, 2, 32, 2),
    ("cpcl 16x64x64 w8 2+2 K4 (demo)", "cpcl", (16, 64, 64), 2, 2, 8, 4),
    ("cpcl 64x128x128 w16 2+2", "cpcl", (64, 128, 128), 2, 2, 16, 2),
]
SMOKE_GRID = [
    ("smoke cpcl 16x32x32 w4", "cpcl", (16, 32, 32), 2, 2, 4, 2),
    ("smoke supervised 16x32x32 w4", "supervised", (16, 32, 32), 2, 2, 4, 2),
]


def peak_rss_bytes() -> float:
    """This process's peak resident set size (Linux ru_maxrss is KiB, macOS bytes; Windows: peak working set)."""
    try:
        import resource

        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return float(v if sys.platform == "darwin" else v * 1024)
    except ImportError:
        import psutil

        return float(psutil.Process().memory_info().peak_wset)


def current_rss_bytes() -> float:
    import psutil

    return float(psutil.Process().memory_info().rss)


# ----------------------------------------------------------------------------------------------- child


def child(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Runs in the child process: build, step, report."""
    import torch

    from speed_common import StepRunner, config, make_batches  # imports everything the trainer imports

    from CPCLSegmentLib.planning import estimate_memory

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    base = current_rss_bytes()
    base_peak = peak_rss_bytes()
    device = torch.device(spec.get("device", "cpu"))
    patch, k, width = tuple(spec["patch"]), int(spec["K"]), int(spec["width"])
    lb, ub = int(spec["labeled"]), int(spec["unlabeled"])
    amp = device.type == "cuda" and bool(spec.get("amp", False))
    cfg = config(spec["method"], patch, width, labeled_batch=lb, unlabeled_batch=ub, device=str(device), amp=amp,
                 copy_paste=bool(spec.get("copy_paste")), channels_last=bool(spec.get("channels_last", True)))
    est = estimate_memory(patch, lb, ub, width, 4, k, spec["method"], cfg.optimizer, amp, device_type=device.type,
                          copy_paste=cfg.uses_copy_paste())
    batches = make_batches(1, lb, ub, patch, k, 0, device)
    runner = StepRunner(cfg, k)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    after_build = current_rss_bytes()
    for _ in range(int(spec.get("steps", 2))):
        runner.step(batches[0])
    out = {
        "base_rss_bytes": base, "base_peak_bytes": base_peak, "after_build_rss_bytes": after_build,
        "peak_rss_bytes": peak_rss_bytes(), "estimate": est,
    }
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = float(torch.cuda.max_memory_allocated())
        out["cuda_max_reserved_bytes"] = float(torch.cuda.max_memory_reserved())
    return out


def run_child(spec: Dict[str, Any]) -> Dict[str, Any]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "CPCLSegment") + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed for {spec}: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def grid(settings: List[Any], steps: int, device: str, threads: Optional[int], log, channels_last: bool = True,
         match: Optional[str] = None) -> List[Dict[str, Any]]:
    """One child per setting ``(name, method, patch, labeled, unlabeled, width, K[, copy-paste])`` whose name
    contains ``match``; ``channels_last``: the engine's memory-format setting (default on, as in the product)."""
    rows = []
    for name, method, patch, lb, ub, width, k, *cp in settings:
        if match and match not in name:
            continue
        spec = {"method": method, "patch": list(patch), "labeled": lb, "unlabeled": ub, "width": width, "K": k,
                "steps": steps, "device": device, "threads": threads, "amp": device.startswith("cuda"),
                "copy_paste": bool(cp and cp[0]), "channels_last": channels_last}
        r = run_child(spec)
        est = r["estimate"]["total"]
        training = r["peak_rss_bytes"] - r["base_rss_bytes"]
        row = {"name": name, **spec, **r, "training_peak_bytes": training, "raw_estimate_bytes": _raw(r["estimate"]),
               "ratio_peak_to_estimate": r["peak_rss_bytes"] / est,
               "ratio_training_to_raw_estimate": training / _raw(r["estimate"])}
        if "cuda_max_allocated_bytes" in r:
            row["ratio_cuda_allocated_to_estimate"] = r["cuda_max_allocated_bytes"] / est
        rows.append(row)
        log(f"[grid] {name}: peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB (base {r['base_rss_bytes'] / MIB:.0f}), "
            f"training {training / MIB:.0f} MiB, estimate {est / MIB:.0f} MiB, peak/estimate {r['peak_rss_bytes'] / est:.2f}")
    return rows


def _raw(estimate: Dict[str, float]) -> float:
    """The estimate's tensor part (activations, teacher, losses, parameters + optimizer state), without the
    CPU process base or the GPU overhead factor."""
    return float(sum(estimate[k] for k in ("activations", "teacher", "losses", "parameters")))


# ------------------------------------------------------------------------------------------------- CLI


def cli_run(args: Sequence[str], threads: Optional[int], cache_dir: Optional[str] = None) -> Dict[str, Any]:
    env = dict(os.environ)
    if cache_dir:  # the preprocessing cache (prepcache): the benchmark's own, cold at its start
        env["CPCL_SEGMENT_CACHE_DIR"] = cache_dir
    env["PYTHONPATH"] = str(ROOT / "CPCLSegment") + os.pathsep + env.get("PYTHONPATH", "")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "CPCLSegmentLib.cli", *args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err)
        status, ru, split = wait_polling_rss(proc.pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr[-3000:]}")
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    return {"command": "cpcl-segment " + " ".join(args), "peak_rss_bytes": ru.ru_maxrss * (1 if sys.platform == "darwin" else 1024.0),
            "cpu_s": ru.ru_utime + ru.ru_stime, "events": events, **split}


def wait_polling_rss(pid: int, every: float = 0.2):
    """``os.wait4(pid)``, reading the child's ``/proc/<pid>/status`` meanwhile (Linux): the largest anonymous
    resident memory seen (``RssAnon``: what the process needs) and file-backed (``RssFile``: pages of the files
    it maps, e.g. the preprocessing cache's arrays, which the kernel can drop and re-read), polled every
    ``every`` seconds (a peak between two polls can be missed; ``ru_maxrss`` is the exact peak of their sum)."""
    import time

    peaks = {"RssAnon": 0.0, "RssFile": 0.0}
    status_file = f"/proc/{pid}/status"
    while True:
        done, status, ru = os.wait4(pid, os.WNOHANG)
        if done:
            break
        try:
            with open(status_file) as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], float(value.split()[0]) * 1024.0)
        except (OSError, ValueError, IndexError):
            pass
        time.sleep(every)
    polled = os.path.exists("/proc/self/status")
    return status, ru, {"peak_rss_anon_bytes": peaks["RssAnon"] if polled else None,
                        "peak_rss_file_bytes": peaks["RssFile"] if polled else None}


def cli_base(threads: Optional[int]) -> float:
    """Peak RSS of a child that only imports what the CLI imports (the process's fixed part)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "CPCLSegment") + os.pathsep + env.get("PYTHONPATH", "")
    code = "import CPCLSegmentLib.cli, CPCLSegmentLib.pipeline, torch, monai, SimpleITK, slicerio"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    _, _, ru = os.wait4(proc.pid, 0)
    return ru.ru_maxrss * (1 if sys.platform == "darwin" else 1024.0)


def parse_bytes(text: str) -> float:
    num, unit = text.split()
    return float(num) * {"B": 1, "KiB": 1024, "MiB": MIB, "GiB": 1024**3, "TiB": 1024**4}[unit]


def cli_runs(iterations: int, threads: Optional[int], log, channels_last: bool = True, match: Optional[str] = None) -> Dict[str, Any]:
    data = slicerio_data_dir()
    ct, seg = str(data / "CTChest4.nrrd"), str(data / "Segmentation.seg.nrrd")
    base = cli_base(threads)
    log(f"[cli] import-only child: peak RSS {base / MIB:.0f} MiB")
    out: Dict[str, Any] = {"import_only_peak_rss_bytes": base, "runs": []}
    with tempfile.TemporaryDirectory(prefix="cpcl-mem-bench-") as d:
        tmp = Path(d)
        big = str(tmp / "ct256.nrrd")

        def study():  # STUDY_SIZE more CTs of about (b)'s size, each of a different length from (b) and from each
            # other (different content: the preprocessing cache is keyed by content)
            return [synth_ct(tmp / f"study{i}.nrrd", (256, 256, 112 + 2 * i))["path"] for i in range(STUDY_SIZE)]

        def large():  # a CT of a real study's size
            return synth_ct(tmp / "ct512.nrrd", (512, 512, 300))["path"]

        cases = [  # (name, the arguments, made when the case runs: the synthetic CTs are written then)
            ("train CTChest4 (128x128x34), all 7 segments", lambda: ["--labeled", ct, seg, "--unlabeled", ct]),
            ("train CT 256x256x128, all 7 segments", lambda: ["--labeled", big, seg, "--unlabeled", big]),
            (f"train CT 256x256x128, all 7 segments, {STUDY_SIZE} more such CTs unlabeled",
             lambda: ["--labeled", big, seg, "--unlabeled", big, *study()]),
            ("train CT 512x512x300, all 7 segments", lambda: ["--labeled", large(), seg, "--unlabeled", str(tmp / "ct512.nrrd")]),
        ]
        synth_ct(tmp / "ct256.nrrd")
        extra: List[str] = []
        if not channels_last:  # the engine's setting, in a --config file as a user would
            (Path(d) / "contiguous.json").write_text('{"channels_last": false}')
            extra = ["--config", str(Path(d) / "contiguous.json")]
        for i, (name, a) in enumerate(cases):
            if match and match not in name:
                continue
            model = str(Path(d) / f"model{i}.pt")
            r = cli_run(["train", *a(), "--out", model, "--iterations", str(iterations), "--device", "cpu", "--progress", "json", *extra],
                        threads, str(Path(d) / "cache"))
            summary = next(e for e in r["events"] if e.get("event") == "summary")
            est = parse_bytes(summary["estimated_memory"])
            row = {"name": name, "command": r["command"].replace(d, "$TMP").replace(str(data), "$SLICERIO_DATA"),
                   "patch_dhw": summary["patch_size"], "estimate_bytes": est, "peak_rss_bytes": r["peak_rss_bytes"],
                   "training_peak_bytes": r["peak_rss_bytes"] - base, "ratio_peak_to_estimate": r["peak_rss_bytes"] / est,
                   "ratio_training_to_estimate": (r["peak_rss_bytes"] - base) / est, "cpu_s": r["cpu_s"],
                   "peak_rss_anon_bytes": r["peak_rss_anon_bytes"], "peak_rss_file_bytes": r["peak_rss_file_bytes"]}
            out["runs"].append(row)
            split = (f" (polled peaks: anonymous {row['peak_rss_anon_bytes'] / MIB:.0f} MiB, file-backed "
                     f"{row['peak_rss_file_bytes'] / MIB:.0f} MiB)") if row["peak_rss_anon_bytes"] is not None else ""
            log(f"[cli] {name}: patch {row['patch_dhw']}, peak RSS {row['peak_rss_bytes'] / MIB:.0f} MiB{split}, "
                f"estimate {est / MIB:.0f} MiB, peak / estimate {row['ratio_peak_to_estimate']:.2f}")
        model = str(Path(d) / "model1.pt")  # trained on (b)
        if not os.path.exists(model):
            return out
        r = cli_run(["predict", "--model", model, "--image", big, "--out", str(Path(d) / "pred.seg.nrrd"), "--device", "cpu",
                     "--progress", "none"], threads, str(Path(d) / "cache"))
        out["predict"] = {"name": "predict CT 256x256x128 with the model trained on it", "peak_rss_bytes": r["peak_rss_bytes"],
                          "cpu_s": r["cpu_s"], "command": r["command"].replace(d, "$TMP")}
        log(f"[cli] predict 256x256x128: peak RSS {r['peak_rss_bytes'] / MIB:.0f} MiB")
    return out


def proposal(rows: List[Dict[str, Any]], cli: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """Least-squares fit ``peak ≈ a + b · raw`` (raw = the estimate's tensor part) and the check of the CPU
    formula the planner uses, ``planning.CPU_PROCESS_BASE + 1.0 · raw``: measured peak / estimate must stay
    below 1 (the panel's warning relies on it)."""
    import numpy as np

    from CPCLSegmentLib.planning import CPU_PROCESS_BASE

    raw = np.array([r["raw_estimate_bytes"] for r in rows]) / MIB
    peak = np.array([r["peak_rss_bytes"] for r in rows]) / MIB
    tensors = np.array([r["training_peak_bytes"] for r in rows]) / MIB
    a = np.vstack([np.ones_like(raw), raw]).T
    fit_peak = np.linalg.lstsq(a, peak, rcond=None)[0]
    fit_tensors = np.linalg.lstsq(a, tensors, rcond=None)[0]
    out: Dict[str, Any] = {
        "cpu_formula": f"{CPU_PROCESS_BASE / MIB:.0f} MiB + 1.0 x raw",
        "fit_peak_mib": {"constant": float(fit_peak[0]), "per_raw_mib": float(fit_peak[1])},
        "fit_tensors_mib": {"constant": float(fit_tensors[0]), "per_raw_mib": float(fit_tensors[1])},
        "peak_over_estimate": [round(float(r["ratio_peak_to_estimate"]), 3) for r in rows],
    }
    if cli:
        out["cli_peak_over_estimate"] = [round(float(r["ratio_peak_to_estimate"]), 3) for r in cli.get("runs", [])]
        out["cli_import_only_peak_mib"] = cli["import_only_peak_rss_bytes"] / MIB
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--only", choices=["cli", "grid"], default=None)
    p.add_argument("--memory-format", choices=["channels_last", "contiguous"], default="channels_last",
                   help="the engine's channels_last setting (default on) for every run")
    p.add_argument("--match", help="only the grid settings and CLI runs whose name contains this")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--iterations", type=int, default=2, help="training iterations of the CLI runs")
    p.add_argument("--device", default="cpu", help="cpu or cuda (grid only)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return 0

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    result: Dict[str, Any] = {"benchmark": "memory", "command": " ".join(["python", "bench/memory.py", *(argv or sys.argv[1:])]),
                              "machine": machine_info()}
    channels_last = args.memory_format == "channels_last"
    if args.smoke:
        result["grid"] = grid(SMOKE_GRID, 1, args.device, args.threads, log, channels_last)
    else:
        if args.only in (None, "cli") and args.device == "cpu":
            result["cli"] = cli_runs(args.iterations, args.threads, log, channels_last, args.match)
        if args.only in (None, "grid"):
            result["grid"] = grid(GRID, args.steps, args.device, args.threads, log, channels_last, args.match)
    out = Path(args.out) if args.out else RESULTS_DIR / ("memory_smoke.json" if args.smoke else "memory.json")
    if result.get("grid"):
        result["proposal"] = proposal(result["grid"], result.get("cli"))
        text = table(result)
        print(text, flush=True)
        if not args.smoke:
            out.with_suffix(".md").write_text(text + "\n", encoding="utf-8")
    result["machine"]["load_average_at_end"] = load_average()
    write_json(out, result)
    log(f"wrote {out}")
    return 0


def table(result: Dict[str, Any]) -> str:
    rows = ["| setting | peak RSS | − imports | estimate (tensors) | peak / estimate |", "|---|---|---|---|---|"]
    for r in result.get("grid", []):
        rows.append(f"| {r['name']} | {r['peak_rss_bytes'] / MIB:.0f} MiB | {r['training_peak_bytes'] / MIB:.0f} MiB | "
                    f"{r['estimate']['total'] / MIB:.0f} MiB ({r['raw_estimate_bytes'] / MIB:.0f}) | {r['ratio_peak_to_estimate']:.2f} |")
    for r in (result.get("cli") or {}).get("runs", []):
        rows.append(f"| CLI {r['name']} (patch {r['patch_dhw']}) | {r['peak_rss_bytes'] / MIB:.0f} MiB | "
                    f"{r['training_peak_bytes'] / MIB:.0f} MiB | {r['estimate_bytes'] / MIB:.0f} MiB | {r['ratio_peak_to_estimate']:.2f} |")
    if "predict" in (result.get("cli") or {}):
        pr = result["cli"]["predict"]
        rows.append(f"| CLI {pr['name']} | {pr['peak_rss_bytes'] / MIB:.0f} MiB | | | |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
