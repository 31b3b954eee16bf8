"""Prototypes and similarity maps on tiny hand-computed tensors, and the resolution choice."""

import math

import pytest
import torch
import torch.nn.functional as F

from CPCLSegmentLib.prototypes import (
    IGNORE_INDEX,
    NEG,
    class_masks,
    downsample_masks,
    masked_average_pooling,
    prototype_logits,
    prototype_probabilities,
    to_label_resolution,
)


def test_masked_average_pooling_by_hand():
    # one sample, 2 channels, 1x1x4 voxels; classes 0, 0, 1, 1
    f = torch.tensor([[1.0, 3.0, 5.0, 7.0], [0.0, 2.0, 4.0, 8.0]]).view(1, 2, 1, 1, 4)
    labels = torch.tensor([0, 0, 1, 1]).view(1, 1, 1, 4)
    protos, valid = masked_average_pooling(f, class_masks(labels, 3))
    assert protos.shape == (3, 2)
    assert torch.allclose(protos[0], torch.tensor([2.0, 1.0]))
    assert torch.allclose(protos[1], torch.tensor([6.0, 6.0]))
    assert valid.tolist() == [True, True, False]
    assert torch.equal(protos[2], torch.zeros(2))  # absent class: no prototype, no NaN


def test_batch_pooling_pools_over_samples_and_per_sample_keeps_them_apart():
    f = torch.tensor([[2.0, 4.0], [10.0, 20.0]]).view(2, 1, 1, 1, 2)
    labels = torch.tensor([[1, 0], [1, 1]]).view(2, 1, 1, 2)
    m = class_masks(labels, 2)
    p, v = masked_average_pooling(f, m)
    assert torch.allclose(p[1], torch.tensor([(2 + 10 + 20) / 3]))
    ps, vs = masked_average_pooling(f, m, per_sample=True)
    assert ps.shape == (2, 2, 1)
    assert torch.allclose(ps[0, 1], torch.tensor([2.0])) and torch.allclose(ps[1, 1], torch.tensor([15.0]))
    assert vs.tolist() == [[True, True], [False, True]]


def test_ignore_voxels_and_weights():
    f = torch.tensor([1.0, 2.0, 3.0, 100.0]).view(1, 1, 1, 1, 4)
    labels = torch.tensor([1, 1, 1, IGNORE_INDEX]).view(1, 1, 1, 4)
    w = torch.tensor([1.0, 1.0, 2.0, 1.0]).view(1, 1, 1, 4)
    p, v = masked_average_pooling(f, class_masks(labels, 2, weights=w))
    assert torch.allclose(p[1], torch.tensor([(1 + 2 + 2 * 3) / 4.0]))
    assert not v[0]


def test_class_known_removes_class_and_background_of_that_case():
    labels = torch.tensor([[0, 1], [0, 2]]).view(2, 1, 1, 2)
    known = torch.tensor([[True, True, False], [True, True, True]])
    m = class_masks(labels, 3, class_known=known)
    assert m[0, 0].sum() == 0  # case 0's background may hide the unannotated class 2
    assert m[0, 1].sum() == 1 and m[1, 0].sum() == 1 and m[1, 2].sum() == 1


def test_cosine_probabilities_by_hand():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 1, 1, 2)  # voxel 0 = e1, voxel 1 = e2
    protos = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    valid = torch.tensor([True, True])
    logits = prototype_logits(f, protos, valid, scale=20.0)
    c = 1 / math.sqrt(2)
    assert torch.allclose(logits[0, :, 0, 0, 0], torch.tensor([20.0, 20 * c]))
    assert torch.allclose(logits[0, :, 0, 0, 1], torch.tensor([0.0, 20 * c]))
    p = prototype_probabilities(f, protos, valid, scale=20.0)
    expected = torch.softmax(torch.tensor([20.0, 20 * c]), 0)
    assert torch.allclose(p[0, :, 0, 0, 0], expected)
    assert torch.allclose(p.sum(1), torch.ones(1, 1, 1, 2))


def test_invalid_class_gets_zero_probability_and_no_nan():
    f = torch.randn(2, 4, 2, 2, 2)
    protos = torch.randn(3, 4)
    valid = torch.tensor([True, False, True])
    p = prototype_probabilities(f, protos, valid)
    assert torch.isfinite(p).all()
    assert p[:, 1].max() == 0
    assert prototype_logits(f, protos, valid)[:, 1].max() == NEG


def test_feature_resolution_equals_full_resolution_formula():
    """Pooling soft masks at feature resolution == the full-resolution formula with nearest upsampling
    (exact), and is close to it with the reference's trilinear upsampling."""
    torch.manual_seed(0)
    # decoder features are spatially smooth and classes are regions: build both that way
    feats = F.interpolate(torch.randn(2, 8, 2, 2, 2), size=(4, 4, 4), mode="trilinear", align_corners=True)
    labels = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    labels[:, :4, :4] = 1
    labels[:, 5:, 2:7, 3:] = 2
    labels[1, :, :, :2] = 2
    ours, v = masked_average_pooling(feats, downsample_masks(class_masks(labels, 3), feats.shape[2:]))
    spread = feats.std().item()
    for mode, tol in (("nearest", 1e-5), ("trilinear", 0.1 * spread)):
        up = F.interpolate(feats, size=(8, 8, 8), mode=mode, **({"align_corners": False} if mode == "trilinear" else {}))
        full, v_full = masked_average_pooling(up, class_masks(labels, 3))
        assert v.tolist() == v_full.tolist()
        err = (ours - full).abs().max().item()
        assert err <= tol, (mode, err, tol)
    # and the similarity maps agree after bringing the K-channel logits up
    protos = ours
    low = to_label_resolution(prototype_logits(feats, protos, v), (8, 8, 8))
    up = F.interpolate(feats, size=(8, 8, 8), mode="nearest")
    high = prototype_logits(up, protos, v)
    # trilinear interpolation of logits vs exact logits of replicated features: same argmax almost everywhere
    agree = (low.argmax(1) == high.argmax(1)).float().mean().item()
    assert agree > 0.8


def test_downsample_rejects_non_integer_factors():
    with pytest.raises(ValueError):
        downsample_masks(torch.zeros(1, 2, 7, 8, 8), (4, 4, 4))
