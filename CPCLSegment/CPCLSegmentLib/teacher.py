"""EMA teacher (mean teacher, Tarvainen & Valpola 2017; CPCL claims 1, 9-11).

``θ̃_t = α θ̃_{t-1} + (1 - α) θ_t`` with ``α = min(1 - 1/(t + 1), decay)``: early on the teacher follows the
student closely (α = 0 at t = 0 copies it), later it averages over roughly ``1 / (1 - decay)`` steps.

Buffers, explicitly: floating-point buffers (BatchNorm ``running_mean`` / ``running_var``) are averaged
with the same α as the parameters, so the teacher's normalisation statistics match its averaged weights;
integer buffers (``num_batches_tracked``) are copied. With the default instance norm there are no
buffers. The teacher is never in an optimizer and never receives gradients (``requires_grad_(False)``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A deep copy of the student with gradients switched off, in eval mode."""
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    return teacher


def ema_alpha(step: int, decay: float = 0.99) -> float:
    """``α = min(1 - 1/(step + 1), decay)``."""
    return min(1.0 - 1.0 / (step + 1), decay)


@torch.no_grad()
def update_teacher(teacher: nn.Module, student: nn.Module, step: int, decay: float = 0.99) -> float:
    """In place ``θ̃ ← α θ̃ + (1 - α) θ`` for parameters and floating buffers; returns α.

    Uses ``torch._foreach_*`` (one fused kernel launch per list, not one per tensor).
    """
    alpha = ema_alpha(step, decay)
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError("teacher and student have different parameter lists")
    if t_params:
        torch._foreach_mul_(t_params, alpha)
        torch._foreach_add_(t_params, s_params, alpha=1.0 - alpha)
    t_float, s_float = [], []
    for tb, sb in zip(teacher.buffers(), student.buffers()):
        if tb.dtype.is_floating_point:
            t_float.append(tb)
            s_float.append(sb.detach())
        else:
            tb.copy_(sb)
    if t_float:
        torch._foreach_mul_(t_float, alpha)
        torch._foreach_add_(t_float, s_float, alpha=1.0 - alpha)
    return alpha
