"""Each loss on hand-made tensors; gradient fidelity of the CPCL terms; masks for sparse labels."""

import math

import pytest
import torch
import torch.nn.functional as F

from CPCLSegmentLib.losses import (
    StepInputs,
    backward_prototype_loss,
    consistency_loss,
    cpcl_terms,
    cross_entropy,
    forward_prototype_loss,
    learning_rate,
    sigmoid_rampup,
    soft_dice_loss,
    supervised_loss,
    total_loss,
)
from CPCLSegmentLib.network import VNet
from CPCLSegmentLib.prototypes import IGNORE_INDEX
from CPCLSegmentLib.settings import TrainConfig
from CPCLSegmentLib.teacher import make_teacher


def cpcl_loss_terms(student, teacher, xl, yl, xu, consistency=False, **settings):
    """The engine's CPCL terms with the default settings, overridden by ``settings``."""
    cfg = TrainConfig(consistency_weight=1.0 if consistency else 0.0, **settings)
    return cpcl_terms(student, teacher, StepInputs(xl, yl, xu), cfg)


def test_supervised_loss_matches_monai_dice_and_torch_ce():
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 4)
    labels = torch.randint(0, 3, (2, 4, 4, 4))
    dice = DiceLoss(softmax=True, to_onehot_y=True, batch=True)(logits, labels.unsqueeze(1))
    expected = 0.5 * (F.cross_entropy(logits, labels) + dice)
    assert torch.allclose(supervised_loss(logits, labels), expected, atol=1e-6)


def test_ignored_voxels_contribute_nothing():
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 2, 2, 4, requires_grad=True)
    labels = torch.randint(0, 3, (1, 2, 2, 4))
    sparse = labels.clone()
    sparse[..., 2:] = IGNORE_INDEX
    loss = supervised_loss(logits, sparse)
    # equal to the loss computed on the kept voxels only
    kept = supervised_loss(logits[..., :2], labels[..., :2])
    assert torch.allclose(loss, kept, atol=1e-6)
    loss.backward()
    assert logits.grad[..., 2:].abs().max() == 0  # no gradient from unknown voxels
    assert logits.grad[..., :2].abs().max() > 0


def test_missing_segment_equals_model_without_that_class():
    """Partial segments: class 2 not annotated in the case -> same loss as a 2-class model whose
    background logit is logsumexp(background, class 2)."""
    torch.manual_seed(2)
    logits = torch.randn(1, 3, 3, 3, 3)
    labels = torch.randint(0, 2, (1, 3, 3, 3))  # only background and class 1 are annotated
    known = torch.tensor([[True, True, False]])
    merged = torch.stack([torch.logsumexp(logits[:, [0, 2]], dim=1), logits[:, 1]], dim=1)
    assert torch.allclose(cross_entropy(logits, labels, known), F.cross_entropy(merged, labels), atol=1e-6)
    assert torch.allclose(soft_dice_loss(logits, labels, known), soft_dice_loss(merged, labels), atol=1e-6)
    assert torch.allclose(supervised_loss(logits, labels, known), supervised_loss(merged, labels), atol=1e-6)


def test_forward_loss_by_hand():
    l2u = torch.tensor([0.0, 0.0]).view(1, 2, 1, 1, 1)  # P_l2u = (0.5, 0.5)
    pu = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1, 1)  # P_u = (0.75, 0.25)
    loss = forward_prototype_loss(l2u, pu, torch.tensor([True, True]))
    assert torch.allclose(loss, torch.tensor((0.25**2 + 0.25**2) / 2))


def test_forward_loss_masks_classes_without_labeled_prototype():
    l2u = torch.tensor([0.0, 0.0, -1e4]).view(1, 3, 1, 1, 1)
    pu = torch.tensor([0.0, 0.0, 5.0]).view(1, 3, 1, 1, 1)  # mass on a class with no prototype
    loss = forward_prototype_loss(l2u, pu, torch.tensor([True, True, False]))
    assert torch.allclose(loss, torch.tensor(0.0), atol=1e-7)  # renormalised over the valid classes


def test_backward_loss_is_one_log_softmax_not_two():
    torch.manual_seed(3)
    u2l = torch.randn(2, 3, 2, 2, 2) * 10
    labels = torch.randint(0, 3, (2, 2, 2, 2))
    valid = torch.tensor([True, True, True])
    ours = backward_prototype_loss(u2l, labels, valid)
    assert torch.allclose(ours, F.cross_entropy(u2l, labels), atol=1e-6)
    reference_bug = F.cross_entropy(torch.softmax(u2l, 1), labels)  # softmax applied twice
    assert not torch.allclose(ours, reference_bug, atol=1e-3)


def test_backward_loss_skips_voxels_without_unlabeled_prototype_and_is_finite():
    u2l = torch.randn(1, 3, 2, 2, 2)
    u2l[:, 2] = -1e4
    labels = torch.full((1, 2, 2, 2), 2)
    labels[0, 0] = 1
    loss = backward_prototype_loss(u2l, labels, torch.tensor([True, True, False]))
    assert torch.isfinite(loss)
    assert torch.allclose(loss, F.cross_entropy(u2l[:, :2][..., :1, :, :].reshape(1, 2, 1, 2, 2), labels[:, :1]), atol=1e-5)
    # only background has a prototype: nothing to learn, exactly zero
    assert backward_prototype_loss(u2l, labels, torch.tensor([True, False, False])) == 0


def test_learning_rate_warms_up_linearly_then_decays_as_poly():
    assert learning_rate(0, 100, 1.0, 0.9) == 1.0  # no warm-up: nnU-Net's poly from the first step
    assert learning_rate(50, 100, 1.0, 0.9) == pytest.approx(0.5 ** 0.9)
    assert learning_rate(0, 100, 1.0, 0.9, warmup=10) == pytest.approx(0.1)  # (t + 1) / W
    assert learning_rate(4, 100, 2.0, 1.0, warmup=10) == pytest.approx(2.0 * 0.5 * 0.96)
    assert learning_rate(9, 100, 1.0, 0.9, warmup=10) == pytest.approx(0.91 ** 0.9)  # full height from step W - 1 on
    assert learning_rate(60, 100, 1.0, 0.9, warmup=10) == learning_rate(60, 100, 1.0, 0.9)


def test_consistency_and_rampup():
    a = torch.zeros(1, 2, 1, 1, 1)
    assert consistency_loss(a, a) == 0
    assert sigmoid_rampup(0, 100) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(50, 100) == pytest.approx(math.exp(-5 * 0.25))
    assert sigmoid_rampup(100, 100) == 1.0 and sigmoid_rampup(500, 100) == 1.0 and sigmoid_rampup(3, 0) == 1.0
    terms = {"supervised": torch.tensor(1.0), "forward": torch.tensor(2.0), "backward": torch.tensor(3.0)}
    cfg = TrainConfig(lambda_max=0.1, beta=10, consistency_weight=0.0)
    assert total_loss(terms, 0.5, cfg) == pytest.approx(1 + 0.05 * (2 + 30))
    terms["consistency"] = torch.tensor(4.0)
    cfg.consistency_weight = 2.0  # w_mt · r(t) · L_mt
    assert total_loss(terms, 0.5, cfg) == pytest.approx(1 + 0.05 * (2 + 30) + 2.0 * 0.5 * 4.0)


def _nets(k=3, seed=0):
    torch.manual_seed(seed)
    student = VNet(num_classes=k, width=4, depth=2)
    teacher = make_teacher(student)
    with torch.no_grad():  # make the teacher differ from the student, as after some training
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher


def _batch(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xl = torch.randn(2, 1, 8, 8, 8, generator=g)
    yl = torch.randint(0, k, (2, 8, 8, 8), generator=g)
    xu = torch.randn(2, 1, 8, 8, 8, generator=g)
    return xl, yl, xu


def _grad_norms(net):
    return [p.grad.abs().sum().item() if p.grad is not None else 0.0 for p in net.parameters()]


@pytest.mark.parametrize("term", ["forward", "backward"])
def test_each_prototype_loss_alone_trains_the_student_and_not_the_teacher(term):
    student, teacher = _nets()
    xl, yl, xu = _batch()
    terms = cpcl_loss_terms(student, teacher, xl, yl, xu)
    assert set(terms) >= {"supervised", "forward", "backward"}
    assert all(t.dim() == 0 for t in terms.values())
    assert terms[term].requires_grad
    terms[term].backward()
    assert sum(_grad_norms(student)) > 0, f"{term} gave no gradient to the student"
    assert all(p.grad is None for p in teacher.parameters()), f"{term} reached the teacher"
    assert not any(p.requires_grad for p in teacher.parameters())


def test_forward_reaches_student_through_prototypes_even_with_teacher_prediction():
    student, teacher = _nets()
    xl, yl, xu = _batch()
    terms = cpcl_loss_terms(student, teacher, xl, yl, xu, forward_prediction="teacher")
    terms["forward"].backward()
    assert sum(_grad_norms(student)) > 0


def test_detached_features_reproduce_the_reference_no_op():
    student, teacher = _nets()
    xl, yl, xu = _batch()
    terms = cpcl_loss_terms(student, teacher, xl, yl, xu, detach_features=True)
    assert not terms["forward"].requires_grad and not terms["backward"].requires_grad
    assert terms["supervised"].requires_grad


@pytest.mark.parametrize("labels_kind", ["single_class", "absent_class", "all_unknown"])
def test_degenerate_batches_give_finite_losses(labels_kind):
    student, teacher = _nets(k=4)
    xl, yl, xu = _batch(k=4)
    if labels_kind == "single_class":
        yl = torch.zeros_like(yl)
    elif labels_kind == "absent_class":
        yl = yl.clamp_max(2)  # class 3 absent from the batch
    else:
        yl = torch.full_like(yl, IGNORE_INDEX)
    for per_sample in (False, True):
        terms = cpcl_loss_terms(student, teacher, xl, yl, xu, per_sample_prototypes=per_sample, consistency=True)
        total = sum(terms.values())
        assert torch.isfinite(total), (labels_kind, per_sample, {k: float(v) for k, v in terms.items()})
        total.backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
        student.zero_grad()


def test_no_unlabeled_batch_gives_zero_prototype_terms():
    student, teacher = _nets()
    xl, yl, _ = _batch()
    terms = cpcl_loss_terms(student, teacher, xl, yl, xl[:0])
    assert terms["forward"] == 0 and terms["backward"] == 0 and terms["supervised"] > 0
