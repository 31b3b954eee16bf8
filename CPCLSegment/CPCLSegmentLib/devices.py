"""Where the networks run: device choice and description, mixed precision, out-of-memory detection."""

from __future__ import annotations

import torch

from .errors import InputError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA if usable, else Apple MPS, else CPU. Explicit names are checked."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch cannot use a CUDA GPU here (CPU-only torch build or no driver)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InputError("device 'mps' requested but Apple MPS is not available")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        return f"CUDA: {torch.cuda.get_device_name(idx)}"
    if device.type == "mps":
        return "Apple MPS"
    return f"CPU ({torch.get_num_threads()} threads)"


def is_oom(e: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(e, oom_type)) or "out of memory" in str(e).lower()


def autocast_context(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when supported (fp16 otherwise); a no-op elsewhere."""
    if enabled and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)
