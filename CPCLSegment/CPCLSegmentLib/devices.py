"""Where the networks run: device choice (with Apple MPS checked before it is used) and description,
out-of-memory detection. Precision per device is ``precision``.

Apple MPS needs torch >= ``MIN_MPS_TORCH`` (2.8: the first release whose MPS backend has ConvTranspose3d,
the network's upsampling). ``auto`` picks MPS only after ``device_self_test`` ran one default-recipe step
of a tiny network there and it agreed with the same step on the CPU; otherwise it picks the CPU and says why
(``choose_device``'s note). The engine's step avoids the operators MPS lacks (``MPS_MISSING_OPS``; pooling
and trilinear resizing are written as reshapes, means and weighted sums: ``prototypes``), which
``Testing/test_devices.py`` checks by recording the operators of a step.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .errors import InputError
from .losses import LOSS_TERMS, StepInputs, total_loss
from .network import VNet
from .precision import autocast_context  # noqa: F401  (re-exported: devices.autocast_context)
from .settings import TrainConfig
from .teacher import make_teacher

MIN_MPS_TORCH = (2, 8)
# aten operators that the MPS backend of torch 2.8 does not implement (forward or backward) among those a 3D
# segmentation step could reach: they would stop the step, or with PYTORCH_ENABLE_MPS_FALLBACK run on the CPU.
MPS_MISSING_OPS = frozenset({
    "aten.avg_pool3d", "aten.avg_pool3d_backward", "aten.upsample_trilinear3d", "aten.upsample_trilinear3d_backward",
    "aten.max_pool3d_with_indices", "aten.max_pool3d_with_indices_backward", "aten.adaptive_avg_pool3d",
    "aten._adaptive_avg_pool3d", "aten._adaptive_avg_pool3d_backward", "aten.grid_sampler_3d",
    "aten.grid_sampler_3d_backward", "aten.upsample_nearest3d_backward",
})


def torch_version() -> Tuple[int, int]:
    parts = torch.__version__.split("+")[0].split(".")
    return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


@functools.lru_cache(maxsize=4)
def device_self_test(device_name: str) -> Optional[str]:
    """Runs one default-recipe step (CPCL with copy-paste: student and teacher passes, prototypes, losses,
    backward) of a width-2 network on ``device_name`` and on the CPU from the same weights and inputs. None when
    it ran and the loss and gradient norm agree within 1 %; else why not (one line). Cached per process."""
    device = torch.device(device_name)
    cfg = TrainConfig(width=2, patch_size=(32, 32, 32), device="cpu", iterations=10).validate()
    g = torch.Generator().manual_seed(0)
    x_l = torch.randn(2, 1, 32, 32, 32, generator=g)
    x_u = torch.randn(2, 1, 32, 32, 32, generator=g)
    labels = (x_l[:, 0] > 0.5).long()
    paste = torch.zeros(2, 32, 32, 32, dtype=torch.bool)
    paste[:, 8:24, 8:24, 8:24] = True
    paste[1] = ~paste[1]
    torch.manual_seed(0)
    net0 = VNet(**cfg.network_config(2))
    results = []
    try:
        for dev in (torch.device("cpu"), device):
            net = VNet(**cfg.network_config(2))
            net.load_state_dict(net0.state_dict())
            net = net.to(dev)
            inputs = StepInputs(x_l.to(dev), labels.to(dev), x_u.to(dev), paste_mask=paste.to(dev))
            loss = total_loss(LOSS_TERMS["cpcl"](net, make_teacher(net), inputs, cfg, None), 1.0, cfg)
            loss.backward()
            grad = torch.stack([p.grad.detach().float().norm() for p in net.parameters() if p.grad is not None]).norm()
            results.append((float(loss.detach().cpu()), float(grad.cpu())))
    except Exception as e:  # an operator the backend lacks, a driver error: the reason is what the user needs
        return f"a training step failed there ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})"
    (loss_cpu, grad_cpu), (loss_dev, grad_dev) = results
    for what, a, b in (("loss", loss_cpu, loss_dev), ("gradient norm", grad_cpu, grad_dev)):
        if not (abs(a - b) <= 0.01 * max(abs(a), 1e-6)):
            return f"a training step there disagrees with the CPU ({what} {b:.6g} vs {a:.6g})"
    return None


def choose_device(name: str = "auto") -> Tuple[torch.device, Optional[str]]:
    """``(device, note)``. ``auto``: CUDA if usable, else Apple MPS if it passes ``mps_check``, else the CPU
    (``note`` says why MPS was passed over). Explicit names are checked; an ``mps`` that fails is an ``InputError``."""
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), None
        if mps_available():
            why = mps_check()
            if why is None:
                return torch.device("mps"), None
            return torch.device("cpu"), f"training on the CPU: Apple MPS is present but {why}"
        return torch.device("cpu"), None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device 'cuda' requested but torch cannot use a CUDA GPU here (CPU-only torch build or no driver)")
    if name == "mps":
        if not mps_available():
            raise InputError("device 'mps' requested but Apple MPS is not available")
        why = mps_check()
        if why is not None:
            raise InputError(f"device 'mps' requested but {why}; use --device cpu")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise InputError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return torch.device(name), None


def mps_check() -> Optional[str]:
    """None when MPS can train here (torch >= ``MIN_MPS_TORCH`` and ``device_self_test`` passes), else why not."""
    if torch_version() < MIN_MPS_TORCH:
        need = ".".join(str(v) for v in MIN_MPS_TORCH)
        return f"torch {torch.__version__} is too old to train there (3D transposed convolutions need torch >= {need})"
    return device_self_test("mps")


def resolve_device(name: str = "auto") -> torch.device:
    """``choose_device(name)``'s device."""
    return choose_device(name)[0]


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
