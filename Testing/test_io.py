"""Reading / writing images and segmentations: round trips, geometry, bad and corrupted inputs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from CPCLSegmentLib import io as cio
from CPCLSegmentLib.labels import build_label_array
from CPCLSegmentLib import writers
from CPCLSegmentLib.errors import InputError, OutputError

from conftest import ROOT, child_env


def test_seg_nrrd_round_trip_keeps_names_colours_terminology_and_voxels(seg_path, ct_path, tmp_path):
    image = cio.read_image(ct_path)
    seg = cio.read_segmentation(seg_path)
    names = seg.names()
    labels, missing = build_label_array(seg, names, image, ct_path)
    assert missing == []
    classes = [{"name": "background", "color": [0, 0, 0], "label_value": 0}] + [
        {"name": s.name, "color": s.color, "label_value": s.label_value, "terminology": s.terminology, "segment_id": s.segment_id}
        for s in seg.segments
    ]
    out = tmp_path / "copy.seg.nrrd"
    writers.write_seg_nrrd(str(out), labels, image, classes)
    a, b = slicerio.read_segmentation(seg_path), slicerio.read_segmentation(str(out))
    assert [s["name"] for s in a["segments"]] == [s["name"] for s in b["segments"]]
    for sa, sb in zip(a["segments"], b["segments"]):
        assert np.allclose(sa["color"], sb["color"], atol=1e-6)
        assert sa["terminology"] == sb["terminology"]
        assert sa["id"] == sb["id"] and sa["labelValue"] == sb["labelValue"]
    assert np.array_equal(a["voxels"], b["voxels"])
    assert np.allclose(a["ijkToLPS"], b["ijkToLPS"])


def test_a_seg_nrrd_cropped_to_its_segments_holds_the_box_and_lies_where_the_whole_grid_does(seg_path, ct_path, tmp_path):
    image = cio.read_image(ct_path)
    names = ["right lung", "left lung"]
    labels, _ = build_label_array(cio.read_segmentation(seg_path), names, image, ct_path)
    classes = [{"name": "background", "label_value": 0}] + [{"name": n, "color": [0.5, 0.5, 0.5], "label_value": i}
                                                            for i, n in enumerate(names, start=1)]
    out = tmp_path / "cropped.seg.nrrd"
    writers.write_seg_nrrd(str(out), labels, image, classes, crop=True)
    seg = slicerio.read_segmentation(str(out))
    first, last = writers.segments_box(labels)
    box = tuple(b - a + 1 for a, b in zip(first, last))
    assert seg["voxels"].shape == box[::-1] and box != labels.shape  # (i, j, k) in the file
    assert seg["referenceImageExtentOffset"] == first[::-1]
    again, missing = build_label_array(cio.read_segmentation(str(out)), names, image, ct_path)  # placed by its origin
    assert missing == [] and np.array_equal(again, labels)


def test_label_map_values_and_names(tmp_path, ct_path):
    image = cio.read_image(ct_path)
    arr = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    arr[5:10, 20:40, 20:40] = 3
    arr[12:15, 60:70, 60:70] = 7
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(image)
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(lab, str(path))
    seg = cio.read_segmentation(str(path), {7: "lesion"})
    assert [(s.name, s.label_value) for s in seg.segments] == [("Label 3", 3), ("lesion", 7)]
    labels, _ = build_label_array(seg, ["Label 3", "lesion"], image, ct_path)
    assert (labels == 1).sum() == 5 * 20 * 20 and (labels == 2).sum() == 3 * 10 * 10
    out = tmp_path / "out.nrrd"
    writers.write_label_image(str(out), labels, image, [0, 3, 7])
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert np.array_equal(back, arr)  # the same label values it was given


def test_segmentation_on_a_shifted_cropped_grid_lands_on_the_right_voxels(ct_path, tmp_path):
    """A segmentation stored on a cropped grid with a known offset (as Slicer writes them) is placed at
    exactly the right voxels of its image."""
    image = cio.read_image(ct_path)
    full = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    full[10:20, 30:60, 40:90] = 1
    k0, j0, i0 = 8, 25, 33
    crop = full[k0:24, j0:70, i0:100]
    m = cio.ijk_to_lps_matrix(image)
    origin = m[:3, :3] @ np.array([i0, j0, k0]) + m[:3, 3]
    seg = {"voxels": np.ascontiguousarray(crop.transpose(2, 1, 0)), "ijkToLPS": np.vstack([np.hstack([m[:3, :3], origin[:, None]]), [0, 0, 0, 1]]),
           "segments": [{"id": "s1", "name": "box", "color": [1, 0, 0], "labelValue": 1, "layer": 0}]}
    path = tmp_path / "cropped.seg.nrrd"
    slicerio.write_segmentation(str(path), seg)
    labels, _ = build_label_array(cio.read_segmentation(str(path)), ["box"], image, ct_path)
    assert np.array_equal(labels > 0, full > 0)


def test_segmentation_that_does_not_overlap_its_image_is_an_error_naming_both(ct_path, seg_path, tmp_path):
    image = cio.read_image(ct_path)
    moved = sitk.Image(image)
    moved.SetOrigin([o + 5000 for o in image.GetOrigin()])
    far = tmp_path / "far-away.nrrd"
    sitk.WriteImage(moved, str(far))
    with pytest.raises(InputError) as e:
        build_label_array(cio.read_segmentation(seg_path), ["ribs"], cio.read_image(str(far)), str(far))
    assert "far-away.nrrd" in str(e.value) and "Segmentation.seg.nrrd" in str(e.value) and "do not overlap" in str(e.value)


def test_overlapping_selected_segments_are_an_error_naming_them(overlapping_seg_path, ct_path):
    seg = cio.read_segmentation(overlapping_seg_path)
    image = cio.read_image(ct_path)
    layer1 = [s.name for s in seg.segments if s.layer == 1]
    assert layer1, "fixture should have an overlapping layer"
    overlapping = None
    for other in [s.name for s in seg.segments if s.layer == 0]:
        try:
            build_label_array(seg, [other, layer1[0]], image, ct_path)
        except InputError as e:
            overlapping = (other, str(e))
            break
    assert overlapping is not None
    assert overlapping[0] in overlapping[1] and layer1[0] in overlapping[1] and "overlap" in overlapping[1]
    # segments of the same layer never overlap: fine
    labels, _ = build_label_array(seg, [s.name for s in seg.segments if s.layer == 0][:3], image, ct_path)
    assert labels.max() == 3


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), "RGB / vector"),
        (lambda: sitk.Image([8, 8, 8, 3], sitk.sitkFloat32), "4-D"),
        (lambda: sitk.Image([8, 8], sitk.sitkFloat32), "2-D"),
    ],
)
def test_unusable_volumes_get_clear_errors(make, match, tmp_path):
    path = tmp_path / "odd volume.nrrd"
    sitk.WriteImage(make(), str(path))
    with pytest.raises(InputError, match=match) as e:
        cio.read_image(str(path))
    assert "odd volume.nrrd" in str(e.value)


def test_wide_integer_types_are_converted_to_float32(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.int64).reshape(4, 5, 6) * 10**6 - 5 * 10**7
    path = tmp_path / "int64.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    img = cio.read_image(str(path))
    assert img.GetPixelID() == sitk.sitkFloat32
    assert np.allclose(sitk.GetArrayFromImage(img), arr, rtol=1e-6)


def test_missing_and_unreadable_files_name_the_file(tmp_path):
    with pytest.raises(InputError, match="not found: .*nope.nrrd"):
        cio.read_image(str(tmp_path / "nope.nrrd"))
    bad = tmp_path / "broken.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: float\nsizes: 3\n\n" + b"\x00" * 5)
    with pytest.raises(InputError, match="broken.nrrd"):
        cio.read_image(str(bad))
    bad_seg = tmp_path / "broken.seg.nrrd"
    bad_seg.write_bytes(b"not a nrrd at all")
    with pytest.raises(InputError, match="broken.seg.nrrd"):
        cio.read_segmentation(str(bad_seg))


def test_non_integer_label_map_is_refused(tmp_path):
    img = sitk.GetImageFromArray(np.full((4, 4, 4), 0.5, np.float32))
    path = tmp_path / "soft.nii.gz"
    sitk.WriteImage(img, str(path))
    with pytest.raises(InputError, match="non-integer"):
        cio.read_segmentation(str(path))


def test_full_disk_leaves_the_previous_file_intact(tmp_path, monkeypatch, ct_path):
    image = cio.read_image(ct_path)
    labels = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
    target = tmp_path / "out.nii.gz"
    writers.write_label_image(str(target), labels, image, [0, 1])
    before = target.read_bytes()

    def full_disk(img, path, *a, **k):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", full_disk)
    with pytest.raises(OutputError, match="No space left"):
        writers.write_label_image(str(target), labels + 1, image, [0, 1])
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]  # no temporary file left behind


FUZZ_WORKER = r"""
import json, os, sys, random
import numpy as np
sys.path.insert(0, sys.argv[2])
from CPCLSegmentLib import io as cio
from CPCLSegmentLib.labels import build_label_array
from CPCLSegmentLib.errors import CPCLError
random.seed(int(sys.argv[3]))
src = open(sys.argv[1], "rb").read()
head_end = src.index(b"\n\n") + 2
head, body = src[:head_end], src[head_end:]
out = []
for n in range(int(sys.argv[4])):
    lines = head.split(b"\n")
    i = random.randrange(1, max(2, len(lines) - 2))
    mode = random.choice(["flip", "drop", "dup", "garble", "truncate", "sizes", "type"])
    if mode == "flip" and lines[i]:
        b = bytearray(lines[i]); b[random.randrange(len(b))] = random.randrange(32, 127); lines[i] = bytes(b)
    elif mode == "drop":
        del lines[i]
    elif mode == "dup":
        lines.insert(i, lines[i])
    elif mode == "garble":
        lines[i] = bytes(random.randrange(32, 127) for _ in range(random.randrange(1, 40)))
    elif mode == "sizes":
        lines = [(b"sizes: " + b" ".join(str(random.choice([0, 1, 7, 128, 999999, -3])).encode() for _ in range(random.choice([2, 3, 4])))) if l.startswith(b"sizes:") else l for l in lines]
    elif mode == "type":
        lines = [(b"type: " + random.choice([b"double", b"int64", b"block", b"float", b"nonsense"])) if l.startswith(b"type:") else l for l in lines]
    data = b"\n".join(lines) + (body[: random.randrange(len(body))] if mode == "truncate" else body)
    path = os.path.join(sys.argv[5], f"f{n}" + sys.argv[6])
    open(path, "wb").write(data)
    try:
        if sys.argv[6] == ".seg.nrrd":
            seg = cio.read_segmentation(path)
            for layer in seg.layers:
                assert layer.GetDimension() == 3
        else:
            img = cio.read_image(path)
            assert img.GetDimension() == 3
        out.append("ok")
    except CPCLError as e:
        assert os.path.basename(path) in str(e), str(e)
        out.append("error")
    os.remove(path)
print(json.dumps(out))
"""


@pytest.mark.parametrize("which", ["seg", "volume"])
def test_fuzzed_headers_give_a_result_or_our_error_never_a_crash(which, seg_path, ct_path, tmp_path):
    """Randomly corrupted NRRD / .seg.nrrd headers: every outcome is a correct result or our own error
    type. Runs in a child process so a segfault or a hang would be caught."""
    script = tmp_path / "fuzz.py"
    script.write_text(FUZZ_WORKER)
    src = seg_path if which == "seg" else ct_path
    ext = ".seg.nrrd" if which == "seg" else ".nrrd"
    proc = subprocess.run([sys.executable, str(script), src, str(ROOT / "CPCLSegment"), "7", "40", str(tmp_path), ext],
                          capture_output=True, text=True, timeout=240, env=child_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(outcomes) == 40 and "error" in outcomes


def test_random_array_shapes_through_the_label_builder(ct_path):
    image = cio.read_image(ct_path)
    rng = np.random.RandomState(0)
    for _ in range(10):
        shape = tuple(int(s) for s in rng.randint(1, 40, size=3))
        lab = sitk.GetImageFromArray(rng.randint(0, 3, size=shape).astype(np.int16))
        lab.SetOrigin(image.GetOrigin())
        lab.SetSpacing(image.GetSpacing())
        lab.SetDirection(image.GetDirection())
        seg = cio.Segmentation("random.nrrd", [cio.SegmentInfo("a", 1, [1, 0, 0]), cio.SegmentInfo("b", 2, [0, 1, 0])], [lab], True)
        labels, _ = build_label_array(seg, ["a", "b"], image, ct_path)
        assert labels.shape == tuple(reversed(image.GetSize()))
        k, j, i = [min(a, b) for a, b in zip(shape, labels.shape)]
        assert np.array_equal(labels[:k, :j, :i], sitk.GetArrayFromImage(lab)[:k, :j, :i])


def test_class_argmax_is_argmax_with_ties_to_the_lower_class():
    """``inference.class_argmax`` (the predict path's and validation's fast argmax) equals ``argmax`` over classes, ties included."""
    import numpy as np
    import torch

    from CPCLSegmentLib.inference import class_argmax

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(4, 6, 7, 8, generator=g), dim=0)
    probs[:, 0, 0, 0] = torch.tensor([0.25, 0.25, 0.25, 0.25])  # a four-way tie: class 0
    probs[:, 0, 0, 1] = torch.tensor([0.1, 0.4, 0.4, 0.1])  # a tie between 1 and 2: class 1
    out = class_argmax(probs)
    assert out.dtype == np.uint8 and out.shape == (6, 7, 8)
    assert (out == probs.numpy().argmax(0)).all() and out[0, 0, 0] == 0 and out[0, 0, 1] == 1
    assert (class_argmax(probs[:1]) == 0).all()  # one class
