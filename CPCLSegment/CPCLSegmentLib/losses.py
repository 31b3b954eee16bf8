"""The CPCL losses (``../shared/design.md`` §The method), one function per equation.

Notation: K classes (0 = background), labeled batch ``(X_l, Y_l)``, unlabeled batch ``X_u``, student f_θ,
EMA teacher f_θ̃, F(·) the decoder feature map returned by the network, s the cosine scale (20).

Sparse labels (every function that sees ``Y_l``): voxels with ``Y_l(x) = IGNORE_INDEX`` (-1) are unknown
and contribute nothing. ``class_known`` ``(B, K)`` marks segments not annotated in a case (partial
segments); for such a case the probability of every unknown class is merged into background
(the *marginal* loss): ``log P'_0 = log Σ_{k ∈ {0} ∪ U_b} P_k``, and unknown classes get no Dice term.
This makes the loss of a case with a missing segment equal the loss of a model without that class.

Gradient fidelity: ``cpcl_loss_terms`` never detaches the student's features. The forward loss reaches
the student through the labeled prototypes p_l and through the student's own unlabeled prediction P_u;
the backward loss reaches it through the student's labeled features F_l. The teacher runs under
``torch.no_grad`` and gets nothing. (The public reference code detaches every feature map, which makes
both prototype losses constants; ``detach_features=True`` reproduces that for the ablation.)
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .prototypes import (
    DEFAULT_SCALE,
    IGNORE_INDEX,
    NEG,
    Sync,
    class_masks,
    downsample_masks,
    expand_valid,
    masked_average_pooling,
    prototype_logits,
    to_label_resolution,
)

_DICE_SMOOTH = 1e-5  # MONAI DiceLoss smooth_nr = smooth_dr = 1e-5


def merged_log_probabilities(logits: torch.Tensor, class_known: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``log softmax_k(logits)``, with unknown classes of each case merged into background.

    ``logits`` ``(B, K, ...)``; ``class_known`` ``(B, K)`` bool or None. Returns ``(B, K, ...)`` where, for
    case b with unknown set U_b, channel 0 holds ``log Σ_{k ∈ {0} ∪ U_b} P_k`` and channels in U_b hold
    ``-inf`` (they are never a target).
    """
    logp = torch.log_softmax(logits.float(), dim=1)
    if class_known is None or bool(class_known.all()):
        return logp
    unknown = ~class_known.to(torch.bool)
    unknown = unknown.clone()
    unknown[:, 0] = False
    shape = unknown.shape + (1,) * (logits.dim() - 2)
    merge = unknown.clone()
    merge[:, 0] = True
    bg = torch.logsumexp(logp.masked_fill(~merge.view(shape), float("-inf")), dim=1)
    out = logp.masked_fill(unknown.view(shape), float("-inf"))
    return torch.cat([bg.unsqueeze(1), out[:, 1:]], dim=1)


def global_mean(total: torch.Tensor, count: torch.Tensor, sync: Sync = None) -> torch.Tensor:
    """``total / count``; with DDP (``sync`` = differentiable all-reduce) both are summed over ranks, so
    every rank gets the global batch's mean and DDP's gradient averaging yields its exact gradient.
    Never branches on rank-local data (that would desynchronise the collectives)."""
    if sync is not None:
        total, count = sync(total), sync(count)
    return total / count.clamp_min(1)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, class_known: Optional[torch.Tensor] = None, sync: Sync = None
) -> torch.Tensor:
    """``CE = -mean_{x known} log P'_{Y(x)}(x)``; logits ``(B, K, D, H, W)``, labels ``(B, D, H, W)``."""
    logp = merged_log_probabilities(logits, class_known)
    total = F.nll_loss(logp, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().to(total.dtype)
    return global_mean(total, count, sync)


def soft_dice_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_known: Optional[torch.Tensor] = None, sync: Sync = None
) -> torch.Tensor:
    """``Dice = mean_k [1 - (2 Σ w P'_k Y_k + ε) / (Σ w P'_k + Σ w Y_k + ε)]``, sums over batch and voxels.

    ``w(b, k, x) = [Y_b(x) known] · [k known in case b]``; ε = 1e-5. Without masks this equals MONAI's
    ``DiceLoss(softmax=True, to_onehot_y=True, batch=True)`` (tested). Classes with no weight anywhere
    are left out of the mean. ``sync`` (DDP) sums the statistics over ranks, so the Dice is the global
    batch's.
    """
    probs = merged_log_probabilities(logits, class_known).exp()
    k = logits.shape[1]
    known = (labels != IGNORE_INDEX).unsqueeze(1).float()
    onehot = F.one_hot(labels.clamp_min(0), k).permute(0, 4, 1, 2, 3).float() * known
    w = known.expand(-1, k, *known.shape[2:])
    if class_known is not None:
        w = w * class_known.float()[:, :, None, None, None]
    dims = (0, 2, 3, 4)
    stats = torch.stack([(w * probs * onehot).sum(dims), (w * probs).sum(dims) + (w * onehot).sum(dims), w.sum(dims)])
    if sync is not None:
        stats = sync(stats)
    inter, denom, wsum = stats[0], stats[1], stats[2]
    dice = (2 * inter + _DICE_SMOOTH) / (denom + _DICE_SMOOTH)
    used = wsum > 0
    if not bool(used.any()):
        return logits.sum() * 0.0
    return (1 - dice)[used].mean()


def supervised_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_known: Optional[torch.Tensor] = None, sync: Sync = None
) -> torch.Tensor:
    """``L_s = ½ (CE(f_θ(X_l), Y_l) + Dice(softmax f_θ(X_l), Y_l))``.

    logits ``(B, K, D, H, W)``, labels ``(B, D, H, W)`` int64 with ``IGNORE_INDEX`` for unknown voxels.
    """
    return 0.5 * (cross_entropy(logits, labels, class_known, sync) + soft_dice_loss(logits, labels, class_known, sync))


def forward_prototype_loss(
    l2u_logits: torch.Tensor, unlabeled_logits: torch.Tensor, valid: torch.Tensor, sync: Sync = None
) -> torch.Tensor:
    """Forward (L2U) loss ``L_fpc = MSE(P_l2u, P_u)`` over the classes that have a labeled prototype.

    Args:
        l2u_logits: ``(B, K, D, H, W)`` cosine logits ``s · cos(F_u(x), p_l^k)`` at label resolution.
        unlabeled_logits: ``(B, K, D, H, W)`` network logits on X_u; ``P_u`` is their softmax restricted
            to the valid classes (a class with no labeled prototype is masked out of both sides).
        valid: ``(K,)`` or ``(B_p, K)`` labeled-prototype validity.
    Returns the mean of ``(P_l2u^k(x) - P_u^k(x))²`` over samples, valid classes and voxels.
    """
    b = l2u_logits.shape[0]
    v = expand_valid(valid, b)
    vm = v[:, :, None, None, None]
    p_l2u = torch.softmax(l2u_logits.float(), dim=1)
    p_u = torch.softmax(unlabeled_logits.float().masked_fill(~vm, NEG), dim=1)
    sq = ((p_l2u - p_u) ** 2) * vm
    count = (v.sum() * l2u_logits[0, 0].numel()).to(sq.dtype)
    return global_mean(sq.sum(), count, sync)


def backward_prototype_loss(
    u2l_logits: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    class_known: Optional[torch.Tensor] = None,
    sync: Sync = None,
) -> torch.Tensor:
    """Backward (U2L) loss ``L_bpc = NLL(log softmax_k(s · cos(F_l(x), p_u^k)), Y_l)``.

    The cosine logits go through **one** log-softmax (the reference applies softmax twice). Voxels whose
    true class has no unlabeled prototype, and unknown voxels, are left out; samples with fewer than two
    valid prototypes contribute nothing (every voxel would be trivially right), so the loss is then 0.

    Args:
        u2l_logits: ``(B, K, D, H, W)`` at label resolution.
        labels: ``(B, D, H, W)`` int64.
        valid: ``(K,)`` or ``(B_p, K)`` unlabeled-prototype validity.
    """
    b = u2l_logits.shape[0]
    v = expand_valid(valid, b)
    has_proto = torch.gather(v, 1, labels.clamp_min(0).view(b, -1)).view_as(labels)
    sample_ok = (v.sum(dim=1) >= 2).view(b, *([1] * (labels.dim() - 1)))
    target = labels.masked_fill(~(has_proto & sample_ok), IGNORE_INDEX)
    logp = merged_log_probabilities(u2l_logits, class_known)
    total = F.nll_loss(logp, target, ignore_index=IGNORE_INDEX, reduction="sum")
    return global_mean(total, (target != IGNORE_INDEX).sum().to(total.dtype), sync)


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean-teacher consistency ``MSE(softmax f_θ(X_u), softmax f_θ̃(X_u))`` (SSL4MIS / UA-MT)."""
    return F.mse_loss(torch.softmax(student_logits.float(), 1), torch.softmax(teacher_logits.float(), 1))


def sigmoid_rampup(step: float, length: float) -> float:
    """``exp(-5 (1 - t/T)²)`` for ``t < T``, 1 after (Laine & Aila; Curious AI mean teacher)."""
    if length <= 0:
        return 1.0
    t = min(max(step, 0.0), length) / length
    return float(torch.exp(torch.tensor(-5.0 * (1.0 - t) ** 2)))


def total_loss(
    terms: Dict[str, torch.Tensor], ramp: float, lambda_max: float, beta: float, consistency_weight: float = 0.0
) -> torch.Tensor:
    """``L = L_s + λ(t)(L_fpc + β L_bpc) [+ λ_mt(t) L_mt]`` with ``λ(t) = λ_max · ramp``."""
    lam = lambda_max * ramp
    loss = terms["supervised"]
    if "forward" in terms:
        loss = loss + lam * (terms["forward"] + beta * terms["backward"])
    if "consistency" in terms and consistency_weight:
        loss = loss + consistency_weight * ramp * terms["consistency"]
    return loss


def _features_to_masks(
    labels: torch.Tensor, num_classes: int, feature_shape, weights=None, class_known=None
) -> torch.Tensor:
    return downsample_masks(class_masks(labels, num_classes, weights, class_known), feature_shape)


def cpcl_loss_terms(
    student: nn.Module,
    teacher: nn.Module,
    labeled_images: torch.Tensor,
    labels: torch.Tensor,
    unlabeled_images: torch.Tensor,
    *,
    teacher_images: Optional[torch.Tensor] = None,
    class_known: Optional[torch.Tensor] = None,
    scale: float = DEFAULT_SCALE,
    per_sample_prototypes: bool = False,
    forward_prediction: str = "student",
    confidence_weighting: bool = True,
    detach_features: bool = False,
    use_forward: bool = True,
    use_backward: bool = True,
    consistency: bool = False,
    sync: Sync = None,
    return_details: bool = False,
):
    """Runs the student once on ``[X_l; X_u]`` and the teacher once on X_u, and returns the loss terms.

    Args:
        labeled_images: ``(B_l, 1, D, H, W)`` float. labels: ``(B_l, D, H, W)`` int64 (-1 = unknown).
        unlabeled_images: ``(B_u, 1, D, H, W)``: the student's view of X_u.
        teacher_images: the teacher's view of X_u (same geometry, e.g. without intensity noise);
            defaults to ``unlabeled_images``.
        class_known: ``(B_l, K)`` bool, see module docstring.
        forward_prediction: whose softmax is P_u in ``L_fpc``: "student" (default; gradient reaches the
            student through P_u and p_l) or "teacher" (the patent's wording; gradient only through p_l).
        confidence_weighting: weight the pseudo-mask by the teacher's max probability when pooling p_u.
        detach_features: ablation; detach every feature map (the public reference's behaviour).
        consistency: also return the mean-teacher term ``"consistency"``.
        sync: DDP only: differentiable all-reduce so Dice statistics and batch prototypes are global.
    Returns:
        dict of scalar tensors ``"supervised"``, ``"forward"``, ``"backward"`` (and ``"consistency"``);
        with ``return_details`` a second dict with ``labeled_prototypes``, ``labeled_valid``,
        ``student_logits_l``, ``teacher_logits_u``.
    """
    if forward_prediction not in ("student", "teacher"):
        raise ValueError(f"forward_prediction must be 'student' or 'teacher', got {forward_prediction!r}")
    bl = labeled_images.shape[0]
    has_u = unlabeled_images is not None and unlabeled_images.shape[0] > 0
    x = torch.cat([labeled_images, unlabeled_images], 0) if has_u else labeled_images
    logits, feats = student(x)
    logits_l, feats_l = logits[:bl], feats[:bl]
    k = logits.shape[1]
    terms: Dict[str, torch.Tensor] = {"supervised": supervised_loss(logits_l, labels, class_known, sync)}
    zero = logits.sum() * 0.0
    details: Dict[str, torch.Tensor] = {"student_logits_l": logits_l.detach()}
    need_protos = has_u and (use_forward or use_backward)
    if need_protos or return_details:
        fl = feats_l.detach() if detach_features else feats_l
        masks_l = _features_to_masks(labels, k, fl.shape[2:], class_known=class_known)
        p_l, valid_l = masked_average_pooling(fl, masks_l, per_sample_prototypes, sync)
        details["labeled_prototypes"] = p_l.detach()
        details["labeled_valid"] = valid_l
    if not has_u:
        terms["forward"] = zero
        terms["backward"] = zero
        if consistency:
            terms["consistency"] = zero
        return (terms, details) if return_details else terms

    logits_u = logits[bl:]
    with torch.no_grad():
        t_logits, t_feats = teacher(unlabeled_images if teacher_images is None else teacher_images)
        t_logits, t_feats = t_logits.float(), t_feats.float()
    details["teacher_logits_u"] = t_logits
    size = labels.shape[1:]

    if use_forward:
        l2u = to_label_resolution(prototype_logits(t_feats, p_l, valid_l, scale), size)
        p_u_logits = logits_u if forward_prediction == "student" and not detach_features else t_logits
        terms["forward"] = forward_prototype_loss(l2u, p_u_logits, valid_l, sync)
    else:
        terms["forward"] = zero

    if use_backward:
        t_probs = torch.softmax(t_logits, dim=1)
        conf, pseudo = t_probs.max(dim=1)
        masks_u = _features_to_masks(pseudo, k, t_feats.shape[2:], weights=conf if confidence_weighting else None)
        p_u, valid_u = masked_average_pooling(t_feats, masks_u, per_sample_prototypes, sync)
        fl = feats_l.detach() if detach_features else feats_l
        u2l = to_label_resolution(prototype_logits(fl, p_u, valid_u, scale), size)
        terms["backward"] = backward_prototype_loss(u2l, labels, valid_u, class_known, sync)
    else:
        terms["backward"] = zero

    if consistency:
        terms["consistency"] = consistency_loss(logits_u, t_logits)
    return (terms, details) if return_details else terms


def mean_teacher_loss_terms(
    student: nn.Module,
    teacher: nn.Module,
    labeled_images: torch.Tensor,
    labels: torch.Tensor,
    unlabeled_images: torch.Tensor,
    *,
    teacher_images: Optional[torch.Tensor] = None,
    class_known: Optional[torch.Tensor] = None,
    sync: Sync = None,
) -> Dict[str, torch.Tensor]:
    """Plain mean teacher (the baseline): ``"supervised"`` and ``"consistency"`` terms only."""
    bl = labeled_images.shape[0]
    logits, _ = student(torch.cat([labeled_images, unlabeled_images], 0))
    with torch.no_grad():
        t_logits, _ = teacher(unlabeled_images if teacher_images is None else teacher_images)
    return {
        "supervised": supervised_loss(logits[:bl], labels, class_known, sync),
        "consistency": consistency_loss(logits[bl:], t_logits),
    }


def supervised_loss_terms(
    student: nn.Module,
    labeled_images: torch.Tensor,
    labels: torch.Tensor,
    class_known: Optional[torch.Tensor] = None,
    sync: Sync = None,
) -> Dict[str, torch.Tensor]:
    """Supervised-only training: the student on the labeled batch."""
    logits, _ = student(labeled_images)
    return {"supervised": supervised_loss(logits, labels, class_known, sync)}


def split_terms(terms: Dict[str, torch.Tensor]) -> Tuple[Dict[str, float], bool]:
    """Scalar floats for logging and whether every term is finite."""
    values = {k: float(v.detach()) for k, v in terms.items()}
    finite = all(v == v and abs(v) != float("inf") for v in values.values())
    return values, finite
