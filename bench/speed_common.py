"""Shared helpers for the speed / memory benchmarks (``step_time.py``, ``predict_speed.py``, ``memory.py``,
``gpu_step.py``).

- ``machine_info()``: CPU model, cores, GPU, library versions and the load average (the machine these numbers
  were produced on is shared, so the load is recorded with every result).
- ``blob_labels``: deterministic label patches with one ellipsoid per foreground class, so every class is
  present in every labeled patch (prototypes exist, as in a real foreground-oversampled batch).
- ``StepRunner``: a real ``trainer.Trainer`` (the product's own object) whose ``Trainer.step`` is timed on batches
  given by the caller (patch sampling, ``Trainer.sample``, is left out); benchmark-only step variants (the
  reference implementation's costs) replace the trainer's loss-term function, nothing else.
- ``Clock``: wall time and process CPU time of a region (CPU time is far less sensitive to other processes
  competing for the cores than wall time).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "CPCLSegment") not in sys.path:
    sys.path.insert(0, str(ROOT / "CPCLSegment"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from CPCLSegmentLib.data import make_case, paste_masks  # noqa: E402
from CPCLSegmentLib.losses import StepInputs  # noqa: E402
from CPCLSegmentLib.settings import TrainConfig  # noqa: E402
from CPCLSegmentLib.trainer import Trainer  # noqa: E402

RESULTS_DIR = ROOT / "bench" / "results"


# ------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def load_average() -> Optional[List[float]]:
    with contextlib.suppress(OSError, AttributeError):
        return [round(v, 2) for v in os.getloadavg()]
    return None


def machine_info() -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_1_5_15min": load_average(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(Exception):
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 1024**3, 1)
    for mod in ("torch", "monai", "numpy", "SimpleITK", "slicerio"):
        with contextlib.suppress(Exception):
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", None) or getattr(m, "Version", lambda: "?")()
    from CPCLSegmentLib import __version__

    info["cpcl-segment"] = __version__
    return info


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` as indented JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, default=_default)
        f.write("\n")
    os.replace(tmp, path)


def _default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def set_threads(n: Optional[int]) -> int:
    if n:
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


# -------------------------------------------------------------------------------------------- timing


class Clock:
    """``with Clock(sync) as c: ...`` then ``c.wall`` / ``c.cpu`` in seconds (``sync`` e.g. cuda.synchronize)."""

    def __init__(self, sync: Optional[Callable[[], None]] = None) -> None:
        self.sync = sync
        self.wall = self.cpu = 0.0

    def __enter__(self) -> "Clock":
        if self.sync:
            self.sync()
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.sync:
            self.sync()
        self.wall = time.perf_counter() - self._w
        self.cpu = time.process_time() - self._c


def median(values: Sequence[float]) -> float:
    return float(np.median(np.asarray(values, dtype=float))) if len(values) else float("nan")


def quartiles(values: Sequence[float]) -> Tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return (float(np.percentile(v, 25)), float(np.percentile(v, 75))) if v.size else (float("nan"), float("nan"))


# ---------------------------------------------------------------------------------------------- data


def blob_labels(batch: int, patch: Sequence[int], num_classes: int, seed: int = 0) -> torch.Tensor:
    """``(batch, D, H, W)`` int64 labels: background plus one solid ellipsoid per foreground class, at a
    random centre with radii a quarter to a sixth of the patch (every class present in every sample)."""
    rng = np.random.RandomState(seed)
    d, h, w = (int(p) for p in patch)
    zz, yy, xx = np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij")
    out = np.zeros((batch, d, h, w), dtype=np.int64)
    for b in range(batch):
        for k in range(1, num_classes):
            r = np.array([d, h, w]) / rng.uniform(4.0, 6.0, size=3)
            c = [rng.uniform(0.3, 0.7) * s for s in (d, h, w)]
            inside = ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1.0
            out[b][inside] = k
    return torch.from_numpy(out)


def make_batches(n: int, labeled: int, unlabeled: int, patch: Sequence[int], num_classes: int, seed: int = 0,
                 device: torch.device = torch.device("cpu")) -> List[Dict[str, torch.Tensor]]:
    """``n`` distinct batches (rotated through while timing, never zeros): images N(0, 1) with the label's
    class index added (so the classes differ in intensity, like anatomy), labels from ``blob_labels``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        y = blob_labels(labeled, patch, num_classes, seed * 1000 + i)
        x_l = torch.randn(labeled, 1, *patch, generator=g) + y.unsqueeze(1).float()
        y_u = blob_labels(unlabeled, patch, num_classes, seed * 1000 + 500 + i) if unlabeled else None
        x_u = torch.randn(unlabeled, 1, *patch, generator=g) + (y_u.unsqueeze(1).float() if unlabeled else 0.0)
        out.append({"x_l": x_l.to(device), "y_l": y.to(device), "x_u": x_u.to(device)})
    return out


# ------------------------------------------------------------------------------------------ the step


class StepRunner:
    """A ``Trainer`` built for timing: ``step(batch)`` is ``Trainer.step(inputs, it)`` on the caller's batch.

    ``terms_fn(runner, batch) -> dict`` replaces the trainer's loss-term function (benchmark-only variants such
    as the reference implementation's step); by default the trainer keeps the engine's own
    (``losses.LOSS_TERMS[cfg.method]``). ``cfg.device`` / ``amp`` / ``channels_last`` / ``compile`` are the
    trainer's own settings. The trainer's samplers are built on two tiny synthetic cases and never used.
    """

    def __init__(self, cfg: TrainConfig, num_classes: int, init_state: Optional[Dict[str, torch.Tensor]] = None,
                 terms_fn: Optional[Callable] = None) -> None:
        self.cfg = cfg
        self.K = num_classes
        patch = tuple(cfg.patch_size)
        case = make_case("synthetic", np.zeros(patch, np.float32), np.zeros(patch, np.int16))
        unl = [make_case("synthetic-u", np.zeros(patch, np.float32))] if cfg.method != "supervised" else []
        self.trainer = Trainer(cfg, [case], unl, num_classes,
                               init_state={"student": init_state} if init_state is not None else None)
        self.device = self.trainer.device
        if terms_fn is not None:
            self.trainer.loss_terms = lambda student, teacher, inputs, cfg, sync: terms_fn(self, _as_dict(inputs))
        self.it = 0
        self.student.train()

    # the trainer's networks (a profiler may wrap ``model`` / ``teacher`` to tag their forward passes)
    student = property(lambda self: self.trainer.student)
    model = property(lambda self: self.trainer.model, lambda self, m: setattr(self.trainer, "model", m))
    teacher = property(lambda self: self.trainer.teacher, lambda self, m: setattr(self.trainer, "teacher", m))
    opt = property(lambda self: self.trainer.opt)

    def inputs(self, batch: Dict[str, torch.Tensor]) -> StepInputs:
        t = self.trainer
        lab = batch["x_l"].to(t.device).contiguous(memory_format=t.memory_format)
        unl = batch["x_u"].to(t.device).contiguous(memory_format=t.memory_format) if self.cfg.method != "supervised" else None
        inputs = StepInputs(lab, batch["y_l"].to(t.device), unl)
        pairs = min(lab.shape[0], 0 if unl is None else unl.shape[0])
        if self.cfg.uses_copy_paste() and pairs:  # the trainer's own boxes for this iteration (Trainer.sample draws them so)
            boxes = paste_masks(self.cfg.patch_size, self.cfg.copy_paste_size, self.cfg.seed, self.it, range(pairs))
            inputs.paste_mask = torch.from_numpy(boxes).to(t.device)
        return inputs

    def step(self, batch: Dict[str, torch.Tensor]) -> Dict[str, float]:
        values = self.trainer.step(self.inputs(batch), self.it % self.cfg.iterations)
        self.it += 1
        return values


def timed_steps(runner: StepRunner, batches: List[Dict[str, torch.Tensor]], warmup: int, steps: int) -> List[float]:
    """Seconds of ``steps`` steps after ``warmup`` (CUDA events on a GPU, wall time on the CPU)."""
    cuda = runner.device.type == "cuda"
    for i in range(warmup):
        runner.step(batches[i % len(batches)])
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            runner.step(batches[i % len(batches)])
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            runner.step(batches[i % len(batches)])
            times.append(time.perf_counter() - t)
    return times


def _as_dict(inputs: StepInputs) -> Dict[str, torch.Tensor]:
    return {"x_l": inputs.labeled, "y_l": inputs.labels, "x_u": inputs.unlabeled}


def config(method: str, patch: Sequence[int], width: int, depth: int = 4, **overrides: Any) -> TrainConfig:
    """``TrainConfig`` with the engine's defaults (what the CLI and the Slicer panel use) for ``method``."""
    settings = dict(method=method, patch_size=tuple(int(p) for p in patch), width=width, depth=depth, device="cpu",
                    iterations=10000, copy_paste=False)  # the variants that time copy-paste turn it on
    settings.update(overrides)
    return TrainConfig(**settings).validate()


def fmt_s(v: float) -> str:
    if v != v:
        return "n/a"
    return f"{v:.3f} s" if v < 10 else f"{v:.1f} s"


def fmt_ratio(v: float) -> str:
    return "n/a" if v != v or math.isinf(v) else f"{v:.2f}×"


# ------------------------------------------------------------------------------- real data, synthesised


def slicerio_data_dir() -> Path:
    import slicerio

    return Path(slicerio.__file__).parent / "data"


def synth_ct(path: Path, size_xyz: Sequence[int] = (256, 256, 128)) -> Dict[str, Any]:
    """Writes slicerio's real chest CT (``CTChest4.nrrd``, 128×128×34 at 3.05×3.05×10 mm) resampled
    (linear) to ``size_xyz`` voxels over the same physical extent, as a gzip-compressed int16 NRRD (what
    Slicer writes), keeping its direction matrix (so the reorientation step runs as for the original)."""
    import SimpleITK as sitk

    src = sitk.ReadImage(str(slicerio_data_dir() / "CTChest4.nrrd"))
    old_size, old_sp = np.array(src.GetSize(), float), np.array(src.GetSpacing(), float)
    new_size = np.array(size_xyz, dtype=int)
    new_sp = old_sp * old_size / new_size
    img = sitk.Resample(src, [int(s) for s in new_size], sitk.Transform(), sitk.sitkLinear, src.GetOrigin(),
                        [float(s) for s in new_sp], src.GetDirection(), -1024.0, sitk.sitkInt16)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), useCompression=True)
    return {"path": str(path), "size_xyz": [int(s) for s in new_size], "spacing_xyz": [float(s) for s in new_sp],
            "source": "slicerio CTChest4.nrrd, linear resampling, int16, gzip NRRD", "bytes": path.stat().st_size}
