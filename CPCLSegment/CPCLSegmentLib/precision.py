"""Compute precision per device: which autocast dtype a run uses (if any) and whether it needs a gradient scaler.

- **CUDA** by compute capability, never by ``torch.cuda.is_bf16_supported()`` (which also counts bf16 that the
  card only emulates): bf16 autocast at capability >= 8.0 (Ampere and newer: bf16 tensor cores), fp16 autocast
  with a ``GradScaler`` at >= 7.0 (Volta, Turing: fp16 tensor cores; T4, RTX 20xx), fp32 below (Pascal and
  older, e.g. an 8 GB GTX 10xx: no tensor cores, half precision would only add conversions).
- **Apple MPS**: fp32 and **no autocast object at all** (``torch.autocast("mps", enabled=False)`` raises on
  torch 2.3 / 2.4, and ConvTranspose3d refuses fp16 / bf16 on MPS).
- **CPU**: fp32, or bf16 autocast when the ``cpu_bf16`` setting asks for it and the processor computes bf16
  natively (AMX-BF16 or AVX512-BF16, and torch dispatching its AVX512 kernels); elsewhere bf16 would be
  emulated, slower than fp32, so the run falls back to fp32 and says why.

``autocast_context(device, precision)`` gives ``contextlib.nullcontext()`` whenever the precision is fp32.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Union

import torch

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


@dataclass(frozen=True)
class Precision:
    """``dtype``: the autocast dtype (None: fp32, no autocast); ``scaler``: fp16 needs a ``GradScaler``;
    ``reason``: one line for the user (why this precision)."""

    dtype: Optional[torch.dtype]
    scaler: bool
    reason: str

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")  # type: ignore[arg-type]

    @property
    def activation_bytes(self) -> float:
        """Bytes per stored activation (what the memory planner counts)."""
        return 4.0 if self.dtype is None else 2.0


FP32 = Precision(None, False, "fp32")


def cuda_precision(capability: Tuple[int, int]) -> Precision:
    """bf16 at compute capability >= 8.0, fp16 + GradScaler at >= 7.0, fp32 below."""
    cc = f"{capability[0]}.{capability[1]}"
    if tuple(capability) >= (8, 0):
        return Precision(torch.bfloat16, False, f"bf16 autocast (compute capability {cc}: native bf16)")
    if tuple(capability) >= (7, 0):
        return Precision(torch.float16, True, f"fp16 autocast with loss scaling (compute capability {cc}: no native bf16)")
    return Precision(None, False, f"fp32 (compute capability {cc}: no tensor cores)")


def _cpuinfo_flags() -> set:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def cpu_native_bf16() -> Tuple[bool, str]:
    """``(True, what)`` when this CPU computes bf16 natively and torch uses its AVX512 kernels, else
    ``(False, why not)``. Reads torch's own CPU feature checks when present, else ``/proc/cpuinfo``."""
    capability = str(torch.backends.cpu.get_cpu_capability())
    flags = set(_cpuinfo_flags())
    cpu = getattr(torch, "cpu", None)
    for flag, check in (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported")):
        fn = getattr(cpu, check, None)
        if fn is not None:
            try:
                if fn():
                    flags.add(flag)
            except Exception:  # a private helper that changed: /proc/cpuinfo decides
                pass
    native = [f for f in CPU_BF16_FLAGS if f in flags]
    if not native:
        return False, "this processor has no native bf16 (AMX-BF16 / AVX512-BF16)"
    if not capability.startswith("AVX512"):
        return False, f"torch uses its {capability} kernels here (ATEN_CPU_CAPABILITY?), not AVX512"
    return True, "/".join(native).upper().replace("_", "-")


def choose_precision(device: torch.device, amp: bool = True, cpu_bf16: str = "off",
                     capability: Optional[Tuple[int, int]] = None) -> Precision:
    """The precision of a run on ``device`` (module docstring). ``amp=False`` forces fp32 everywhere;
    ``cpu_bf16``: ``on`` / ``auto`` use bf16 on a CPU with native bf16, ``off`` never."""
    if not amp:
        return Precision(None, False, "fp32 (mixed precision off)")
    if device.type == "cuda":
        if capability is None:
            capability = torch.cuda.get_device_capability(device)
        return cuda_precision(capability)
    if device.type == "cpu" and cpu_bf16 in ("on", "auto"):
        native, what = cpu_native_bf16()
        if native:
            return Precision(torch.bfloat16, False, f"bf16 autocast on the CPU ({what})")
        return Precision(None, False, f"fp32: {what}")
    return FP32


def autocast_context(device: torch.device, precision: Union[Precision, bool, Any]) -> Any:
    """``torch.autocast`` for a bf16 / fp16 precision; ``contextlib.nullcontext()`` for fp32 (no autocast object
    is ever made on MPS). A bool means ``choose_precision(device, amp=that)`` (the CPU then stays fp32)."""
    if not isinstance(precision, Precision):
        precision = choose_precision(device, bool(precision))
    if precision.dtype is None or device.type not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=precision.dtype)
