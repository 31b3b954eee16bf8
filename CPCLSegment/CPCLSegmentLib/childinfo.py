"""What the Slicer module asks a child process (so Slicer's own process never imports torch): the PyTorch build and
devices (``probe_environment``), what a model file holds (``model_info``), installed package versions from their
metadata (``installed_versions``, also safe in Slicer's process) and the NVIDIA driver's GPUs (``nvidia_gpus``).

``python -m CPCLSegmentLib.childinfo probe | model-info MODEL`` prints one JSON ``done`` (or ``error``) line;
``jobs.probe_job`` / ``jobs.model_info_job`` run it in the background.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

from .errors import CPCLError
from .jsonout import strict_json


def nvidia_gpus(timeout: float = 5.0) -> Optional[List[Dict[str, Any]]]:
    """GPUs the NVIDIA driver reports (``nvidia-smi``), or None when there is no driver / tool."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total,memory.free,driver_version", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    gpus = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            try:
                gpus.append({"name": parts[0], "memory_gb": float(parts[1]) / 1024, "free_gb": float(parts[2]) / 1024, "driver": parts[3]})
            except ValueError:
                continue
    return gpus


def installed_versions(distributions: Sequence[str]) -> Dict[str, Optional[str]]:
    """Installed version of each distribution (package metadata only: nothing is imported)."""
    from importlib import metadata

    out: Dict[str, Optional[str]] = {}
    for dist in distributions:
        version = None
        for candidate in (dist, dist.lower(), dist.replace("-", "_"), dist.lower().replace("_", "-")):
            try:
                version = metadata.version(candidate)
                break
            except metadata.PackageNotFoundError:
                continue
        out[dist] = version
    return out


def probe_environment() -> Dict[str, Any]:
    """What the child's Python computes on: PyTorch build and version, CUDA / MPS devices, NVIDIA driver."""
    info: Dict[str, Any] = {"python": platform.python_version(), "nvidia": nvidia_gpus()}
    try:
        import torch
    except Exception as e:  # not installed, or broken
        info["torch"] = {"error": f"{type(e).__name__}: {e}"}
        return info
    t: Dict[str, Any] = {"version": torch.__version__, "cuda_build": getattr(torch.version, "cuda", None),
                         "threads": torch.get_num_threads(), "cuda": [], "mps": False}
    try:
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                t["cuda"].append({"name": props.name, "memory_gb": props.total_memory / 2**30})
        mps = getattr(torch.backends, "mps", None)
        t["mps"] = bool(mps is not None and mps.is_available())
    except Exception as e:
        t["gpu_error"] = f"{type(e).__name__}: {e}"
    info["torch"] = t
    return info


def model_info(path: str) -> Dict[str, Any]:
    """What a model file holds, without its weights (raises ``ModelFileError`` on a bad file)."""
    from .modelfile import load_model

    record = load_model(str(path))
    training = record.get("training") or {}
    return {"classes": [{k: v for k, v in c.items()} for c in record["classes"]], "network": record.get("network"),
            "patch_size": record.get("patch_size"), "spacing": record.get("spacing"), "engine_version": record.get("engine_version"),
            "method": training.get("method"), "status": training.get("status"), "iterations": training.get("iterations"),
            "best": record.get("best")}


def _main(argv: Sequence[str]) -> int:
    """``python -m CPCLSegmentLib.childinfo probe | model-info MODEL``: one JSON ``done`` (or ``error``) line."""
    try:
        if list(argv[:1]) == ["probe"]:
            payload = probe_environment()
        elif len(argv) == 2 and argv[0] == "model-info":
            payload = model_info(argv[1])
        else:
            print(json.dumps({"event": "error", "message": "usage: python -m CPCLSegmentLib.childinfo probe | model-info MODEL"}))
            return 2
    except CPCLError as e:
        print(json.dumps({"event": "error", "message": str(e), "exit_code": e.exit_code}), flush=True)
        return e.exit_code
    print(strict_json({"event": "done", **payload}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
