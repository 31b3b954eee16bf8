"""The CPCL losses (``../shared/design.md`` §The method), one function per equation.

Notation: K classes (0 = background), labeled batch ``(X_l, Y_l)``, unlabeled batch ``X_u``, student f_θ,
EMA teacher f_θ̃, F(·) the decoder feature map returned by the network, s the cosine scale (20).

Sparse labels (every function that sees ``Y_l``): voxels with ``Y_l(x) = IGNORE_INDEX`` (-1) are unknown
and contribute nothing. ``class_known`` ``(B, K)`` marks segments not annotated in a case (partial
segments); for such a case the probability of every unknown class is merged into background
(the *marginal* loss): ``log P'_0 = log Σ_{k ∈ {0} ∪ U_b} P_k``, and unknown classes get no Dice term.
This makes the loss of a case with a missing segment equal the loss of a model without that class.

Per method, one function computes the loss terms of a step from the networks, the step's tensors
(``StepInputs``) and the ``TrainConfig``: ``LOSS_TERMS[method](student, teacher, inputs, cfg, sync)``;
``total_loss`` combines them with the config's weights. The trainer calls exactly these.

Gradient fidelity: ``cpcl_terms`` never detaches the student's features. The forward loss reaches
the student through the labeled prototypes p_l and through the student's own unlabeled prediction P_u;
the backward loss reaches it through the student's labeled features F_l. The teacher runs under
``torch.no_grad`` and gets nothing. (The public reference code detaches every feature map, which makes
both prototype losses constants; ``detach_features=True`` reproduces that for the ablation.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .prototypes import (
    IGNORE_INDEX,
    NEG,
    Sync,
    as_float,
    class_masks,
    expand_valid,
    feature_masks,
    masked_average_pooling,
    prototype_logits,
    to_label_resolution,
)
from .settings import TrainConfig

_DICE_SMOOTH = 1e-5  # MONAI DiceLoss smooth_nr = smooth_dr = 1e-5


def merged_log_probabilities(logits: torch.Tensor, class_known: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``log softmax_k(logits)``, with unknown classes of each case merged into background.

    ``logits`` ``(B, K, ...)``; ``class_known`` ``(B, K)`` bool or None. Returns ``(B, K, ...)`` where, for
    case b with unknown set U_b, channel 0 holds ``log Σ_{k ∈ {0} ∪ U_b} P_k`` and channels in U_b hold
    ``-inf`` (they are never a target).
    """
    logp = torch.log_softmax(as_float(logits), dim=1)
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


def _nll(logp: torch.Tensor, labels: torch.Tensor, sync: Sync) -> torch.Tensor:
    total = F.nll_loss(logp, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return global_mean(total, (labels != IGNORE_INDEX).sum().to(total.dtype), sync)


def _dice(probs: torch.Tensor, labels: torch.Tensor, class_known: Optional[torch.Tensor], sync: Sync) -> torch.Tensor:
    k = probs.shape[1]
    known = (labels != IGNORE_INDEX).unsqueeze(1).to(probs.dtype)
    onehot = class_masks(labels, k, dtype=probs.dtype)  # zero at unknown voxels
    w = known if class_known is None else known * class_known.to(probs.dtype)[:, :, None, None, None]
    w = w.expand_as(probs)
    dims = (0, 2, 3, 4)
    wp = w * probs
    stats = torch.stack([(wp * onehot).sum(dims), wp.sum(dims) + (w * onehot).sum(dims), w.sum(dims)])
    if sync is not None:
        stats = sync(stats)
    inter, denom, wsum = stats[0], stats[1], stats[2]
    dice = (2 * inter + _DICE_SMOOTH) / (denom + _DICE_SMOOTH)
    used = wsum > 0
    # classes with no weight anywhere are left out of the mean (no host sync: a masked mean)
    return ((1 - dice) * used).sum() / used.sum().clamp_min(1)


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, class_known: Optional[torch.Tensor] = None, sync: Sync = None
) -> torch.Tensor:
    """``CE = -mean_{x known} log P'_{Y(x)}(x)``; logits ``(B, K, D, H, W)``, labels ``(B, D, H, W)``."""
    return _nll(merged_log_probabilities(logits, class_known), labels, sync)


def soft_dice_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_known: Optional[torch.Tensor] = None, sync: Sync = None
) -> torch.Tensor:
    """``Dice = mean_k [1 - (2 Σ w P'_k Y_k + ε) / (Σ w P'_k + Σ w Y_k + ε)]``, sums over batch and voxels.

    ``w(b, k, x) = [Y_b(x) known] · [k known in case b]``; ε = 1e-5. Without masks this equals MONAI's
    ``DiceLoss(softmax=True, to_onehot_y=True, batch=True)`` (tested). Classes with no weight anywhere
    are left out of the mean. ``sync`` (DDP) sums the statistics over ranks, so the Dice is the global
    batch's.
    """
    return _dice(merged_log_probabilities(logits, class_known).exp(), labels, class_known, sync)


def supervised_loss(
    logits: torch.Tensor, labels: torch.Tensor, class_known: Optional[torch.Tensor] = None, sync: Sync = None
) -> torch.Tensor:
    """``L_s = ½ (CE(f_θ(X_l), Y_l) + Dice(softmax f_θ(X_l), Y_l))`` (one log-softmax shared by both).

    logits ``(B, K, D, H, W)``, labels ``(B, D, H, W)`` int64 with ``IGNORE_INDEX`` for unknown voxels.
    """
    logp = merged_log_probabilities(logits, class_known)
    return 0.5 * (_nll(logp, labels, sync) + _dice(logp.exp(), labels, class_known, sync))


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
    vm = expand_valid(valid, b)[:, :, None, None, None]
    p_l2u = torch.softmax(as_float(l2u_logits), dim=1)
    p_u = torch.softmax(as_float(unlabeled_logits).masked_fill(~vm, NEG), dim=1)
    sq = ((p_l2u - p_u) ** 2) * vm
    count = (vm.sum() * l2u_logits[0, 0].numel()).to(sq.dtype)
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
    return _nll(merged_log_probabilities(u2l_logits, class_known), target, sync)


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     teacher_probs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean-teacher consistency ``L_mt = MSE(softmax f_θ(X_u), softmax f_θ̃(X_u))`` (SSL4MIS / UA-MT);
    ``teacher_probs``: the teacher's softmax when the caller has it already."""
    if teacher_probs is None:
        teacher_probs = torch.softmax(as_float(teacher_logits), 1)
    return F.mse_loss(torch.softmax(as_float(student_logits), 1), teacher_probs)


def sigmoid_rampup(step: float, length: float) -> float:
    """``r(t) = exp(-5 (1 - t/T)²)`` for ``t < T``, 1 after (Laine & Aila; Curious AI mean teacher);
    ``step`` t and ``length`` T in iterations."""
    if length <= 0:
        return 1.0
    t = min(max(step, 0.0), length) / length
    return float(torch.exp(torch.tensor(-5.0 * (1.0 - t) ** 2)))


def learning_rate(step: int, iterations: int, base: float, power: float, warmup: float = 0.0) -> float:
    """``lr(t) = lr_0 · min(1, (t + 1) / W) · (1 - t/T)^p``: nnU-Net's poly decay over the T iterations (power p),
    after a linear warm-up over the first W iterations (``warmup`` W = 0: none); ``step`` t counts from 0."""
    rise = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return base * rise * (1.0 - step / iterations) ** power


def total_loss(terms: Dict[str, torch.Tensor], ramp: float, cfg: TrainConfig) -> torch.Tensor:
    """``L = L_s + λ(t)(L_fpc + β L_bpc) + w_mt · r(t) · L_mt [+ w_p(t) · L_cp + w_cp · r(t) · L_cp~]`` with
    ``λ(t) = λ_max · r(t)``, ``r`` the ramp-up (``sigmoid_rampup``), λ_max, β, w_mt (``cfg.mt_weight()``) and w_cp
    (``cfg.copy_paste_weight``) from the config, w_p(t) = r(t) with ``cfg.copy_paste_ramp`` (copy-paste ramped in),
    else 1; absent terms count 0."""
    loss = terms["supervised"]
    if "forward" in terms:
        loss = loss + cfg.lambda_max * ramp * (terms["forward"] + cfg.beta * terms["backward"])
    w_mt = cfg.mt_weight()
    if "consistency" in terms and w_mt:
        loss = loss + w_mt * ramp * terms["consistency"]
    if "paste" in terms:  # copy-paste: ground truth at weight 1 (or r(t)), the teacher's pseudo-labels at w_cp · r(t)
        w_p = ramp if cfg.copy_paste_ramp else 1.0
        loss = loss + w_p * terms["paste"] + cfg.copy_paste_weight * ramp * terms["paste_pseudo"]
    return loss


# ------------------------------------------------------------------------------ the terms of a step


@dataclass
class StepInputs:
    """One step's tensors, on the training device.

    labeled ``(B_l, 1, D, H, W)``; labels ``(B_l, D, H, W)`` int64 (-1 = unknown); unlabeled ``(B_u, 1, D, H, W)``
    the student's view of X_u (None for supervised-only); teacher_view the teacher's view of the same patches
    (defaults to ``unlabeled``); class_known ``(B_l, K)`` bool or None (every segment annotated); paste_mask the
    copy-paste boxes of pairs (labeled i, unlabeled i), i < P = min(B_l, B_u).
    """

    labeled: torch.Tensor
    labels: torch.Tensor
    unlabeled: Optional[torch.Tensor] = None
    teacher_view: Optional[torch.Tensor] = None
    class_known: Optional[torch.Tensor] = None
    paste_mask: Optional[torch.Tensor] = None  # (P, D, H, W) bool, True: from the unlabeled patch (``copy_paste``), else None

    @property
    def teacher_input(self) -> torch.Tensor:
        return self.unlabeled if self.teacher_view is None else self.teacher_view


def copy_paste_batch(x: StepInputs, pseudo: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bidirectional copy-paste (Bai et al., CVPR 2023) of pairs (labeled i, unlabeled i) through ``x.paste_mask``
    ``(P, D, H, W)``, True where the mixed image takes the unlabeled patch (``data.paste_masks``: the box for an even
    global pair index, "inward"; its complement for an odd one, "outward"). Returns the mixed images
    ``(P, 1, D, H, W)``, their ground-truth labels (``IGNORE_INDEX`` where the voxel came from the unlabeled patch)
    and pseudo-labels (the teacher's argmax ``pseudo`` ``(B_u, D, H, W)``, ``IGNORE_INDEX`` where the voxel came
    from the labeled patch).
    """
    from_unlabeled = x.paste_mask
    p = from_unlabeled.shape[0]
    images = torch.where(from_unlabeled.unsqueeze(1), x.unlabeled[:p], x.labeled[:p])
    truth = x.labels[:p].masked_fill(from_unlabeled, IGNORE_INDEX)
    guess = pseudo[:p].masked_fill(~from_unlabeled, IGNORE_INDEX)
    return images, truth, guess


def copy_paste_terms(logits: torch.Tensor, truth: torch.Tensor, guess: torch.Tensor, class_known: Optional[torch.Tensor],
                     sync: Sync = None) -> Dict[str, torch.Tensor]:
    """``"paste"``: L_s of the mixed images against the ground truth where it is known; ``"paste_pseudo"``: L_s against
    the teacher's pseudo-labels elsewhere (each voxel counts in exactly one of the two)."""
    known = None if class_known is None else class_known[: truth.shape[0]]
    return {"paste": supervised_loss(logits, truth, known, sync), "paste_pseudo": supervised_loss(logits, guess, None, sync)}


def _student_and_teacher(student: nn.Module, teacher: nn.Module, x: StepInputs, with_unlabeled: bool = True):
    """The teacher once on its view of X_u (no gradient), then the student once on ``[X_l; X_u; mixed]`` (the mixed
    copy-paste images only when ``x.paste_mask`` is set). Returns the student's (logits, features) split into
    labeled / unlabeled / mixed parts, the teacher's (logits, features) in float, and the copy-paste labels."""
    with torch.no_grad():
        t_logits, t_feats = teacher(x.teacher_input)
        t_logits, t_feats = as_float(t_logits), as_float(t_feats)
    none = x.labeled[:0]
    mixed, paste = none, None
    if x.paste_mask is not None:
        mixed, truth, guess = copy_paste_batch(x, t_logits.argmax(dim=1))
        paste = (truth, guess)
    parts = [x.labeled, x.unlabeled if with_unlabeled else none, mixed]
    sizes = [p.shape[0] for p in parts]
    logits, feats = student(torch.cat(parts, 0))
    return logits.split(sizes), feats.split(sizes), (t_logits, t_feats), paste


def supervised_terms(student: nn.Module, teacher: nn.Module, x: StepInputs, cfg: TrainConfig, sync: Sync = None
                     ) -> Dict[str, torch.Tensor]:
    """Supervised-only training: ``{"supervised": L_s}`` of the student on the labeled batch."""
    logits, _ = student(x.labeled)
    return {"supervised": supervised_loss(logits, x.labels, x.class_known, sync)}


def mean_teacher_terms(student: nn.Module, teacher: nn.Module, x: StepInputs, cfg: TrainConfig, sync: Sync = None
                       ) -> Dict[str, torch.Tensor]:
    """Plain mean teacher (the baseline): ``L_s`` and ``L_mt`` (student on ``[X_l; X_u]``, teacher on X_u); with
    copy-paste also its terms (and no student pass on the plain X_u when the mean-teacher weight is 0)."""
    use_mt = cfg.mt_weight() > 0
    (lg_l, lg_u, lg_m), _, (t_logits, _), paste = _student_and_teacher(student, teacher, x, with_unlabeled=use_mt)
    terms = {"supervised": supervised_loss(lg_l, x.labels, x.class_known, sync)}
    if use_mt:
        terms["consistency"] = consistency_loss(lg_u, t_logits)
    if paste is not None:
        terms.update(copy_paste_terms(lg_m, *paste, x.class_known, sync))
    return terms


def _prototype_maps_inputs(feats_l: torch.Tensor, t_feats: torch.Tensor, size, cfg: TrainConfig):
    """The features the prototypes and maps are computed from. ``map_resolution`` "feature": as they are
    (the K-channel cosine logits are brought to label resolution afterwards); "label": both feature maps
    upsampled trilinearly to the label grid first (the method's literal form, more memory and time)."""
    if cfg.map_resolution == "label":
        return to_label_resolution(feats_l, size), to_label_resolution(t_feats, size)
    return feats_l, t_feats


def cpcl_terms(student: nn.Module, teacher: nn.Module, x: StepInputs, cfg: TrainConfig, sync: Sync = None
               ) -> Dict[str, torch.Tensor]:
    """CPCL's terms: one student pass on ``[X_l; X_u]``, one teacher pass on X_u, then

    - ``"supervised"``: L_s on the labeled part;
    - ``"forward"`` (L2U): p_l^k from the **student's** labeled features F_l under Y_l, P_l2u = softmax(s · cos(F̃_u,
      p_l)) on the **teacher's** unlabeled features F̃_u, L_fpc = MSE(P_l2u, P_u) with P_u the softmax of the
      student's (``forward_prediction="student"``) or the teacher's (``"teacher"``) unlabeled logits;
    - ``"backward"`` (U2L): Ŷ_u = argmax of the teacher's P̃_u, p_u^k from F̃_u under Ŷ_u (weighted by the teacher's
      confidence max_k P̃_u when ``confidence_weighting``), P_u2l = softmax(s · cos(F_l, p_u)), L_bpc = NLL(log P_u2l, Y_l);
    - ``"consistency"`` (only when ``cfg.mt_weight() > 0``): L_mt = MSE(softmax student(X_u), softmax teacher(X_u));
    - ``"paste"``, ``"paste_pseudo"`` (only with ``cfg.copy_paste``): ``copy_paste_terms`` on the mixed images.

    Prototypes are pooled over the batch (``per_sample_prototypes``: per sample, labeled i with unlabeled i).
    ``detach_features`` (ablation) reproduces the reference code, whose prototype terms carry no gradient.
    """
    if x.unlabeled is None or x.unlabeled.shape[0] == 0:  # nothing unlabeled: the prototype terms are 0
        terms = supervised_terms(student, teacher, x, cfg, sync)
        zero = terms["supervised"] * 0.0
        return {**terms, "forward": zero, "backward": zero, **({"consistency": zero} if cfg.mt_weight() > 0 else {})}
    (logits_l, logits_u, logits_m), (feats_l, _, _), (t_logits, t_feats), paste = _student_and_teacher(student, teacher, x)
    k = logits_l.shape[1]
    terms: Dict[str, torch.Tensor] = {"supervised": supervised_loss(logits_l, x.labels, x.class_known, sync)}
    if cfg.detach_features:
        feats_l = feats_l.detach()
    size = x.labels.shape[1:]
    f_l, f_u = _prototype_maps_inputs(feats_l, t_feats, size, cfg)
    if cfg.use_forward:
        masks_l = feature_masks(x.labels, k, f_l.shape[2:], class_known=x.class_known, dtype=as_float(f_l).dtype)
        p_l, valid_l = masked_average_pooling(f_l, masks_l, cfg.per_sample_prototypes, sync)
        l2u = to_label_resolution(prototype_logits(f_u, p_l, valid_l, cfg.scale), size)
        use_student = cfg.forward_prediction == "student" and not cfg.detach_features
        terms["forward"] = forward_prototype_loss(l2u, logits_u if use_student else t_logits, valid_l, sync)
    else:
        terms["forward"] = logits_l.sum() * 0.0
    t_probs = torch.softmax(t_logits, dim=1)  # P̃_u, shared by the backward and the mean-teacher term
    if cfg.use_backward:
        conf, pseudo = t_probs.max(dim=1)
        masks_u = feature_masks(pseudo, k, f_u.shape[2:], weights=conf if cfg.confidence_weighting else None, dtype=f_u.dtype)
        p_u, valid_u = masked_average_pooling(f_u, masks_u, cfg.per_sample_prototypes, sync)
        u2l = to_label_resolution(prototype_logits(f_l, p_u, valid_u, cfg.scale), size)
        terms["backward"] = backward_prototype_loss(u2l, x.labels, valid_u, x.class_known, sync)
    else:
        terms["backward"] = logits_l.sum() * 0.0
    if cfg.mt_weight() > 0:
        terms["consistency"] = consistency_loss(logits_u, t_logits, t_probs)
    if paste is not None:
        terms.update(copy_paste_terms(logits_m, *paste, x.class_known, sync))
    return terms


TermsFn = Callable[[nn.Module, nn.Module, StepInputs, TrainConfig, Sync], Dict[str, torch.Tensor]]
LOSS_TERMS: Dict[str, TermsFn] = {"supervised": supervised_terms, "mean_teacher": mean_teacher_terms, "cpcl": cpcl_terms}
