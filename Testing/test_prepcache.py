"""The preprocessed cases: named by their inputs' identity (never by file name), cached across runs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from CPCLSegmentLib import preparation

PLAN = {"spacing": None, "normalization": {"scheme": "zscore"}}
SHAPE = (10, 12, 14)  # numpy (z, y, x)


def write_volume(path, array, spacing=(1.0, 1.0, 1.0)):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    sitk.WriteImage(img, str(path))
    return str(path)


def make_labeled(folder, seed, name="img.nii.gz"):
    """An image and a label map (value 1 in a seed-dependent box) named ``name`` / ``seg.nii.gz`` in ``folder``."""
    rng = np.random.RandomState(seed)
    image = rng.randn(*SHAPE).astype(np.float32) * (seed + 1) + 10 * seed
    label = np.zeros(SHAPE, np.uint8)
    label[2 + seed % 3 : 6 + seed % 3, 3:8, 4 + seed % 4 : 9 + seed % 4] = 1
    return (write_volume(os.path.join(folder, name), image), write_volume(os.path.join(folder, "seg.nii.gz"), label),
            image, label)


def expected_image(image):
    return preparation.normalize(image, PLAN["normalization"])


def preprocess(tmp_path, labeled, unlabeled=()):
    items = [preparation.LabeledInput(img, seg) for img, seg in labeled]
    req = preparation.TrainRequest(labeled=items, out=str(tmp_path / "m.pt"), unlabeled=list(unlabeled))
    classes = preparation.resolve_classes(req)
    work = str(tmp_path / "work")
    cases = preparation.preprocess_labeled(items, classes, PLAN, req, work, lambda e: None, "labeled")
    return cases, preparation.preprocess_unlabeled(list(unlabeled), PLAN, work, lambda e: None)


def test_same_named_labeled_cases_keep_their_own_arrays(tmp_path):
    a_img, a_seg, a_arr, a_lab = make_labeled(tmp_path / "a", 0)
    b_img, b_seg, b_arr, b_lab = make_labeled(tmp_path / "b", 1)
    cases, _ = preprocess(tmp_path, [(a_img, a_seg), (b_img, b_seg)])
    assert cases[0].image_source != cases[1].image_source
    np.testing.assert_allclose(cases[0].image, expected_image(a_arr), atol=1e-5)
    np.testing.assert_allclose(cases[1].image, expected_image(b_arr), atol=1e-5)
    np.testing.assert_array_equal(cases[0].label, a_lab)
    np.testing.assert_array_equal(cases[1].label, b_lab)


def test_a_labeled_and_an_unlabeled_case_of_the_same_name_never_mix(tmp_path):
    a_img, a_seg, a_arr, a_lab = make_labeled(tmp_path / "a", 0)
    b_img, _, b_arr, _ = make_labeled(tmp_path / "b", 2)
    labeled, unlabeled = preprocess(tmp_path, [(a_img, a_seg)], [b_img])
    np.testing.assert_allclose(labeled[0].image, expected_image(a_arr), atol=1e-5)  # a's image with a's labels
    np.testing.assert_array_equal(labeled[0].label, a_lab)
    np.testing.assert_allclose(unlabeled[0].image, expected_image(b_arr), atol=1e-5)
    assert len([f for f in os.listdir(tmp_path / "work") if f.endswith("-image.npy")]) == 2


def test_a_file_rewritten_in_place_is_another_input(tmp_path):
    from CPCLSegmentLib.prepcache import file_identity

    img, _, arr, _ = make_labeled(tmp_path / "a", 0)
    before = file_identity(img)
    assert file_identity(os.path.join(str(tmp_path), "a", ".", "img.nii.gz")) == before  # same file, other spelling
    write_volume(img, arr + 1)
    os.utime(img, ns=(before[2] + 1000, before[2] + 1000))
    assert file_identity(img) != before
