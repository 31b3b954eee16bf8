"""Class prototypes by masked average pooling, and cosine-similarity probability maps.

Resolution choice (documented, tested in ``Testing/test_prototypes.py``): prototypes are computed at the
**feature map's** resolution. Labels (one-hot, optionally confidence-weighted) are brought down to the
feature grid by average pooling, which gives *soft* masks ``m^k(x') = mean_{x in cell(x')} [Y(x)=k]``.
Then

    p^k = Σ_x' F(x') m^k(x') / Σ_x' m^k(x')

is **exactly** the full-resolution formula ``Σ_x ↑F(x)[Y(x)=k] / Σ_x [Y(x)=k]`` when ``↑`` is
nearest-neighbour upsampling, and close to it for the reference's trilinear upsampling, while never
materialising a many-channel feature map at full resolution (the reference's main cost). Only the
K-channel similarity logits are brought back to label resolution, which is cheap because K ≪ C.

Absent classes: a class with zero mask mass in the pooled set has no prototype. ``valid`` marks which
prototypes exist; similarity logits of invalid classes are set to ``NEG`` (probability 0 after softmax)
and losses skip them, so nothing divides by zero and nothing is NaN.

Unknown voxels (sparse labels) carry the label ``IGNORE_INDEX`` (-1) and have zero mass in every mask.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .data import Augmenter, Case, PatchSampler
from .settings import COSINE_SCALE, IGNORE_INDEX

NEG = -1.0e4  # logit of a class with no prototype: exp(NEG - max) underflows to exactly 0 in float32
DEFAULT_SCALE = COSINE_SCALE  # s = 20 (settings.COSINE_SCALE, also TrainConfig.scale's default)
_TINY = 1e-6


def as_float(t: torch.Tensor) -> torch.Tensor:
    """``t`` in float32 unless it already is float32 or float64 (no copy then; bf16 / fp16 are upcast)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def class_masks(
    labels: torch.Tensor,
    num_classes: int,
    weights: Optional[torch.Tensor] = None,
    class_known: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """One-hot masks ``m^k(x) = [Y(x)=k] · w(x)``.

    Args:
        labels: ``(B, D, H, W)`` int64 class indices; ``IGNORE_INDEX`` voxels get all-zero masks.
        num_classes: K.
        weights: optional ``(B, D, H, W)`` per-voxel weights (e.g. the teacher's confidence).
        class_known: optional ``(B, K)`` bool; ``False`` marks a class not annotated in that case
            (partial segments). Its channel is zero for that case, and so is the case's background
            channel, because there "background" may hide the unannotated class.
        dtype: of the masks (the features' float type).
    Returns:
        ``(B, K, D, H, W)`` masks.
    """
    classes = torch.arange(num_classes, device=labels.device).view(1, num_classes, *([1] * (labels.dim() - 1)))
    masks = (labels.unsqueeze(1) == classes).to(dtype)  # IGNORE_INDEX matches no class
    if weights is not None:
        masks = masks * weights.unsqueeze(1).to(dtype)
    if class_known is not None:
        ck = class_known.to(dtype).clone()
        ck[:, 0] = ck[:, 0] * class_known[:, 1:].all(dim=1).to(dtype)
        masks = masks * ck.view(*ck.shape, *([1] * (labels.dim() - 1)))
    return masks


def downsample_masks(masks: torch.Tensor, feature_shape: Sequence[int]) -> torch.Tensor:
    """Average-pools ``(B, K, D, H, W)`` masks onto the feature grid ``(d, h, w)`` (integer factors)."""
    size = masks.shape[2:]
    if tuple(size) == tuple(feature_shape):
        return masks
    factors = []
    for s, f in zip(size, feature_shape):
        if s % f:
            raise ValueError(f"label grid {tuple(size)} is not an integer multiple of feature grid {tuple(feature_shape)}")
        factors.append(s // f)
    b, k = masks.shape[:2]
    (d, fd), (h, fh), (w, fw) = [(int(f), s // int(f)) for s, f in zip(size, feature_shape)]
    # average pooling as a reshape and a mean: the same numbers as avg_pool3d, and an operator every backend has
    return masks.reshape(b, k, d, fd, h, fh, w, fw).mean(dim=(3, 5, 7))


def feature_masks(
    labels: torch.Tensor,
    num_classes: int,
    feature_shape: Sequence[int],
    weights: Optional[torch.Tensor] = None,
    class_known: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``downsample_masks(class_masks(...), feature_shape)``: the soft masks ``m^k(x')`` on the feature grid."""
    return downsample_masks(class_masks(labels, num_classes, weights, class_known, dtype), feature_shape)


Sync = Optional[Callable[[torch.Tensor], torch.Tensor]]


def masked_average_pooling(
    features: torch.Tensor, masks: torch.Tensor, per_sample: bool = False, sync: Sync = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prototypes ``p^k = Σ_{b,x} F_b(x) m_b^k(x) / Σ_{b,x} m_b^k(x)``.

    Args:
        features: ``(B, C, d, h, w)``.
        masks: ``(B, K, d, h, w)`` on the same grid (see ``downsample_masks``).
        per_sample: pool each sample separately (the reference) instead of over the whole batch.
        sync: with DDP, a differentiable all-reduce (sum) applied to numerator and denominator so every
            rank pools over the **global** batch (batch mode only).
    Returns:
        ``prototypes`` ``(K, C)`` (or ``(B, K, C)`` per sample) in float32, zero where invalid, and
        ``valid`` ``(K,)`` (or ``(B, K)``) bool: the class has mask mass.
    """
    if features.shape[0] != masks.shape[0] or features.shape[2:] != masks.shape[2:]:
        raise ValueError(f"features {tuple(features.shape)} and masks {tuple(masks.shape)} do not match")
    f = as_float(features)
    m = masks.to(f.dtype)
    if per_sample:
        num = torch.einsum("bkdhw,bcdhw->bkc", m, f)
        den = m.sum(dim=(2, 3, 4))
    else:
        num = torch.einsum("bkdhw,bcdhw->kc", m, f)
        den = m.sum(dim=(0, 2, 3, 4))
        if sync is not None:
            num, den = sync(num), sync(den)
    valid = den > _TINY
    protos = num / den.clamp_min(_TINY).unsqueeze(-1)
    protos = protos * valid.unsqueeze(-1)
    return protos, valid


def prototype_logits(
    features: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor, scale: float = DEFAULT_SCALE
) -> torch.Tensor:
    """Cosine logits ``s^k(x) = scale · cos(F(x), p^k)``; ``NEG`` for classes without a prototype.

    Args:
        features: ``(B, C, d, h, w)``.
        prototypes: ``(K, C)`` shared by the batch, or ``(B_p, K, C)`` per sample; sample ``b`` of
            ``features`` uses prototype set ``b % B_p`` (the reference pairs labeled i with unlabeled i).
        valid: ``(K,)`` or ``(B_p, K)`` bool.
    Returns:
        ``(B, K, d, h, w)`` float32 logits. ``softmax`` over K gives ``P^k(x)``.
    """
    f = as_float(features)
    b = f.shape[0]
    if prototypes.dim() == 2:
        prototypes = prototypes.unsqueeze(0)
        valid = valid.unsqueeze(0)
    idx = torch.arange(b, device=f.device) % prototypes.shape[0]
    p = F.normalize(prototypes.to(f.dtype), dim=-1, eps=1e-8)[idx]  # (B, K, C)
    v = valid[idx]  # (B, K)
    # cos(F(x), p^k) = <F(x), p̂^k> / ||F(x)||: the division is done on the K-channel map, not the C-channel features
    # clamp before sqrt: a zero feature vector gets a zero gradient, not 0/0; 20x faster than linalg.vector_norm(dim=1) on CPU
    norm = (f * f).sum(dim=1, keepdim=True).clamp_min(1e-16).sqrt()
    logits = torch.einsum("bcdhw,bkc->bkdhw", f, p) * (scale / norm)
    return logits.masked_fill(~v[:, :, None, None, None], NEG)


def prototype_probabilities(
    features: torch.Tensor, prototypes: torch.Tensor, valid: torch.Tensor, scale: float = DEFAULT_SCALE
) -> torch.Tensor:
    """``P^k(x) = softmax_k(scale · cos(F(x), p^k))``, shape ``(B, K, d, h, w)``; 0 for invalid classes."""
    return torch.softmax(prototype_logits(features, prototypes, valid, scale), dim=1)


def to_label_resolution(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Trilinear resize of K-channel logits ``(B, K, d, h, w)`` to the label grid ``size`` (``align_corners=False``).

    Integer factors (the feature grid of a patch) are resized axis by axis with ``upsample_axis``: the numbers of
    ``F.interpolate(mode="trilinear")`` without its operator, which Apple MPS lacks (backward); other sizes use it."""
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    if all(s % n == 0 and s >= n for s, n in zip(size, logits.shape[2:])):
        out = logits
        for axis, (s, n) in enumerate(zip(size, logits.shape[2:])):
            out = upsample_axis(out, 2 + axis, s // n)
        return out
    return F.interpolate(logits, size=tuple(size), mode="trilinear", align_corners=False)


def upsample_axis(x: torch.Tensor, dim: int, factor: int) -> torch.Tensor:
    """Linear upsampling of ``x`` by an integer ``factor`` along ``dim`` (``align_corners=False``, edges clamped).

    Output ``factor·j + r`` samples the input at ``j + t_r``, ``t_r = (r + ½)/factor − ½`` ∈ (−½, ½):
    ``x[j] + t_r·(x[j] − x[j−1])`` for ``t_r < 0``, ``x[j] + t_r·(x[j+1] − x[j])`` otherwise, with ``x[−1] = x[0]``
    and ``x[n] = x[n−1]`` (PyTorch's clamping). Shape: ``(…, n, …)`` → ``(…, factor·n, …)``."""
    if factor == 1:
        return x
    n = x.shape[dim]
    prev = torch.cat([x.narrow(dim, 0, 1), x.narrow(dim, 0, n - 1)], dim)
    nxt = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 1, 1)], dim)
    down, up = x - prev, nxt - x
    parts = []
    for r in range(factor):
        t = (r + 0.5) / factor - 0.5
        parts.append(x + t * down if t < 0 else (x + t * up if t > 0 else x))
    return torch.stack(parts, dim + 1).flatten(dim, dim + 1)


def expand_valid(valid: torch.Tensor, batch: int) -> torch.Tensor:
    """``(K,)`` or ``(B_p, K)`` validity → ``(batch, K)``, pairing sample b with set ``b % B_p``."""
    if valid.dim() == 1:
        return valid.unsqueeze(0).expand(batch, -1)
    idx = torch.arange(batch, device=valid.device) % valid.shape[0]
    return valid[idx]


@torch.no_grad()
def labeled_prototypes(
    net: nn.Module, cases: Sequence[Case], patch: Sequence[int], num_classes: int, device: torch.device,
    patches_per_case: int = 2, max_patches: int = 64, seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Class prototypes ``(K, C)`` of ``net``'s features pooled over foreground-centred patches of the
    labeled cases (stored in the model file for prototype-based uncertainty scores)."""
    net.eval()
    aug = Augmenter(patch, flip=False, rot90=False)
    sampler = PatchSampler(cases, patch, num_classes, aug, seed, 3, foreground_oversample=0.66)
    n = min(max_patches, patches_per_case * len(cases))
    num, den = None, None
    for i in range(n):
        b = sampler.sample(0, [i])
        _, feats = net(torch.from_numpy(b.images).to(device, dtype=next(net.parameters()).dtype))
        feats = as_float(feats)
        masks = feature_masks(torch.from_numpy(b.labels).to(device), num_classes, feats.shape[2:], dtype=feats.dtype)
        nn_ = torch.einsum("bkdhw,bcdhw->kc", masks, feats)
        dn = masks.sum(dim=(0, 2, 3, 4))
        num = nn_ if num is None else num + nn_
        den = dn if den is None else den + dn
    valid = den > 1e-6
    protos = (num / den.clamp_min(1e-6).unsqueeze(1)) * valid.unsqueeze(1)
    return protos.cpu(), valid.cpu()
