"""Sparse labels (issue 7) on real data: every 5th axial slice of the chest CT's lung labels kept."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from CPCLSegmentLib import io as cio
from CPCLSegmentLib.labels import build_label_array
from CPCLSegmentLib import pipeline, preparation
from CPCLSegmentLib.prediction import Predictor
from CPCLSegmentLib.preparation import foreground_intensity_sample, normalize, plan_normalization
from CPCLSegmentLib.settings import RunOptions
from CPCLSegmentLib.losses import backward_prototype_loss, supervised_loss
from CPCLSegmentLib.metrics import dice_per_class
from CPCLSegmentLib.network import VNet
from CPCLSegmentLib.prototypes import IGNORE_INDEX, class_masks, downsample_masks, masked_average_pooling

from conftest import COARSE_SPACING, LUNGS, small_config


@pytest.fixture(scope="module")
def ct_patch(ct_path, seg_path):
    """A 20x64x64 patch of the real CT (normalised) with full and every-5th-slice labels."""
    image = cio.read_image(ct_path)
    labels, _ = build_label_array(cio.read_segmentation(seg_path), LUNGS, image, ct_path)
    arr = sitk.GetArrayFromImage(image)
    x = normalize(arr, plan_normalization("ct", [foreground_intensity_sample(arr, labels, np.random.RandomState(0))]))
    x, full = x[8:24, 32:96, 16:80], labels[8:24, 32:96, 16:80].astype(np.int64)
    sparse = full.copy()
    kept = np.arange(full.shape[0]) % 5 == 0
    sparse[~kept] = IGNORE_INDEX
    return torch.from_numpy(x)[None, None], torch.from_numpy(full)[None], torch.from_numpy(sparse)[None], kept


def test_supervised_loss_equals_the_loss_over_kept_slices_and_unknown_voxels_get_no_gradient(ct_patch):
    x, full, sparse, kept = ct_patch
    torch.manual_seed(0)
    net = VNet(num_classes=3, width=4, depth=3)
    logits, _ = net(x)
    logits.retain_grad()
    loss = supervised_loss(logits, sparse)
    by_hand = supervised_loss(logits[:, :, kept], full[:, kept])  # only the kept slices, no ignore index
    assert torch.allclose(loss, by_hand, atol=1e-6)
    loss.backward()
    assert logits.grad[:, :, ~kept].abs().max() == 0
    assert logits.grad[:, :, kept].abs().max() > 0


def test_labeled_prototypes_use_the_kept_slices_only(ct_patch):
    x, full, sparse, kept = ct_patch
    torch.manual_seed(0)
    _, feats = VNet(num_classes=3, width=4, depth=3)(x)
    ours, valid = masked_average_pooling(feats, downsample_masks(class_masks(sparse, 3), feats.shape[2:]))
    up = F.interpolate(feats, size=full.shape[1:], mode="nearest")[0]  # (C, D, H, W) at label resolution
    for k in range(3):
        sel = (full[0] == k) & torch.from_numpy(kept)[:, None, None]
        by_hand = up[:, sel].mean(dim=1)
        assert torch.allclose(ours[k], by_hand, atol=1e-5), k
    assert valid.all()


def test_backward_loss_gets_no_gradient_from_unknown_voxels(ct_patch):
    _, _, sparse, kept = ct_patch
    u2l = torch.randn(1, 3, *sparse.shape[1:], requires_grad=True)
    backward_prototype_loss(u2l, sparse, torch.tensor([True, True, True])).backward()
    assert u2l.grad[:, :, ~kept].abs().max() == 0 and u2l.grad[:, :, kept].abs().max() > 0


def _every_fifth_slice_labelmap(tmp_path, ct_path, seg_path):
    image = cio.read_image(ct_path)
    labels, _ = build_label_array(cio.read_segmentation(seg_path), LUNGS, image, ct_path)
    painted = np.zeros_like(labels)
    painted[::5] = labels[::5]
    lm = sitk.GetImageFromArray(painted.astype(np.uint8))
    lm.CopyInformation(image)
    path = tmp_path / "every 5th slice.nii.gz"
    sitk.WriteImage(lm, str(path))
    return str(path), labels, painted


def test_auto_detects_painted_axial_slices_and_the_image_joins_the_unlabeled_stream(tmp_path, ct_path, seg_path):
    path, labels, painted = _every_fifth_slice_labelmap(tmp_path, ct_path, seg_path)
    events = []
    req = preparation.TrainRequest(labeled=[preparation.LabeledInput(ct_path, path, "auto")], out=str(tmp_path / "m.pt"),
                                   config=small_config(iterations=2, width=4, depth=3, patch_size=(16, 32, 32)), options=RunOptions(spacing=list(COARSE_SPACING)))
    image, lab, known = preparation.read_labeled(req.labeled[0], ["Label 1", "Label 2"], None, False, events.append)
    assert any("every few axial slices" in e["message"] for e in events)
    has_labels = painted.reshape(painted.shape[0], -1).max(axis=1) > 0
    assert (lab[has_labels] >= 0).all() and (lab[~has_labels] == IGNORE_INDEX).all()
    assert np.array_equal(lab[has_labels], painted[has_labels])
    summary = []
    pipeline.train(req, summary.append)
    assert [e for e in summary if e["event"] == "summary"][0]["unlabeled"] == 1  # its own image, as unlabeled


def test_partial_segments_mark_missing_segments_unknown_for_that_case(tmp_path, ct_path, seg_path):
    image = cio.read_image(ct_path)
    labels, _ = build_label_array(cio.read_segmentation(seg_path), LUNGS, image, ct_path)
    only_right = sitk.GetImageFromArray((labels == 1).astype(np.uint8) * 5)
    only_right.CopyInformation(image)
    path = tmp_path / "right only.nii.gz"
    sitk.WriteImage(only_right, str(path))
    item = preparation.LabeledInput(ct_path, str(path))
    _, _, known = preparation.read_labeled(item, ["Label 5", "Label 6"], None, True, lambda e: None)
    assert known.tolist() == [True, True, False]
    _, _, known = preparation.read_labeled(item, ["Label 5", "Label 6"], None, False, lambda e: None)
    assert known.all()  # default: a missing segment is absent anatomy


# Stated margin: with labels on every 5th slice the lungs' Dice (on the full labels) stays within 0.15 of
# training on full labels for the same iterations. Measured with this test's settings, seeds 0, 1, 2: gaps 0.100,
# 0.116, 0.099 at 150 iterations (0.096 at 250, seed 0): 0.10 was the gap itself, not a margin (BENCHMARKS.md has
# the hippocampus' N = 1, 3, 5 table).
SPARSE_MARGIN = 0.15


@pytest.mark.slow
def test_every_fifth_slice_training_is_close_to_full_labels(tmp_path, ct_path, seg_path):
    path, labels, _ = _every_fifth_slice_labelmap(tmp_path, ct_path, seg_path)
    full_lm = sitk.GetImageFromArray(labels.astype(np.uint8))
    full_lm.CopyInformation(cio.read_image(ct_path))
    full_path = tmp_path / "full.nii.gz"
    sitk.WriteImage(full_lm, str(full_path))
    dice = {}
    for name, seg, mode in (("full", str(full_path), "all"), ("sparse", path, "axial")):
        req = preparation.TrainRequest(labeled=[preparation.LabeledInput(ct_path, seg, mode)], unlabeled=[ct_path],
                                       out=str(tmp_path / f"{name}.pt"),
                                       config=small_config(iterations=150), options=RunOptions(spacing=list(COARSE_SPACING)))
        pipeline.train(req)
        pred = Predictor(req.out).segment(cio.read_image(ct_path))
        dice[name] = np.mean(dice_per_class(pred, labels, 3))
    assert dice["sparse"] >= dice["full"] - SPARSE_MARGIN, dice
