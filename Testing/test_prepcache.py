"""The preprocessed cases: named by their inputs' identity (never by file name), cached across runs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import SimpleITK as sitk

from CPCLSegmentLib import preparation, preprocessing
from CPCLSegmentLib.prepcache import PreprocessCache

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


def preprocess(tmp_path, labeled, unlabeled=(), validation=(), cache=None, emit=None):
    """(labeled, validation, unlabeled) cases of a run through the preprocessing cache in ``tmp_path/cache``."""
    items = [preparation.LabeledInput(img, seg) for img, seg in labeled]
    req = preparation.TrainRequest(labeled=items, out=str(tmp_path / "m.pt"), unlabeled=list(unlabeled),
                                   validation=[preparation.LabeledInput(img, seg) for img, seg in validation])
    classes = preparation.resolve_classes(req)
    cache = cache or PreprocessCache(str(tmp_path / "cache")).prepare()
    try:
        return preprocessing.preprocess_cases(req, classes, PLAN, list(unlabeled), cache, emit or (lambda e: None))
    finally:
        cache.release()


def test_same_named_labeled_cases_keep_their_own_arrays(tmp_path):
    a_img, a_seg, a_arr, a_lab = make_labeled(tmp_path / "a", 0)
    b_img, b_seg, b_arr, b_lab = make_labeled(tmp_path / "b", 1)
    cases, _, _ = preprocess(tmp_path, [(a_img, a_seg), (b_img, b_seg)])
    assert cases[0].image_source != cases[1].image_source
    np.testing.assert_allclose(cases[0].image, expected_image(a_arr), atol=1e-5)
    np.testing.assert_allclose(cases[1].image, expected_image(b_arr), atol=1e-5)
    np.testing.assert_array_equal(cases[0].label, a_lab)
    np.testing.assert_array_equal(cases[1].label, b_lab)


def test_a_labeled_and_an_unlabeled_case_of_the_same_name_never_mix(tmp_path):
    a_img, a_seg, a_arr, a_lab = make_labeled(tmp_path / "a", 0)
    b_img, _, b_arr, _ = make_labeled(tmp_path / "b", 2)
    labeled, _, unlabeled = preprocess(tmp_path, [(a_img, a_seg)], [b_img])
    np.testing.assert_allclose(labeled[0].image, expected_image(a_arr), atol=1e-5)  # a's image with a's labels
    np.testing.assert_array_equal(labeled[0].label, a_lab)
    np.testing.assert_allclose(unlabeled[0].image, expected_image(b_arr), atol=1e-5)
    assert labeled[0].image_source != unlabeled[0].image_source


def test_a_file_rewritten_in_place_is_another_input(tmp_path):
    from CPCLSegmentLib.prepcache import file_identity

    img, _, arr, _ = make_labeled(tmp_path / "a", 0)
    before = file_identity(img)
    assert file_identity(os.path.join(str(tmp_path), "a", ".", "img.nii.gz")) == before  # same file, other spelling
    write_volume(img, arr + 1)
    os.utime(img, ns=(before[2] + 1000, before[2] + 1000))
    assert file_identity(img) != before


# ------------------------------------------------------------------------------------------------ reuse


def count_builds(monkeypatch):
    """Counts the cases preprocessed (read and put on the model grid) from now on."""
    built = []
    real = preprocessing.build_entry

    def counting(task, root):
        built.append(task.name)
        return real(task, root)

    monkeypatch.setattr(preprocessing, "build_entry", counting)
    return built


def entry_files(root):
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, fs in os.walk(root) for f in fs
            if f.endswith(".npy")}


def test_a_second_run_reads_nothing_and_gets_the_same_cases(tmp_path, monkeypatch):
    a_img, a_seg, a_arr, a_lab = make_labeled(tmp_path / "a", 0)
    b_img, _, b_arr, _ = make_labeled(tmp_path / "b", 1)
    built = count_builds(monkeypatch)
    first = preprocess(tmp_path, [(a_img, a_seg)], [b_img])
    assert sorted(built) == ["img", "img"]
    before = entry_files(tmp_path / "cache")
    built.clear()
    events = []
    second = preprocess(tmp_path, [(a_img, a_seg)], [b_img], emit=events.append)
    assert built == [] and entry_files(tmp_path / "cache") == before  # nothing re-read, nothing rewritten
    assert any("2 of 2 preprocessed cases are reused" in e.get("message", "") for e in events)
    for x, y in zip(first[0] + first[2], second[0] + second[2]):
        assert x.image_source == y.image_source and x.pad_value == y.pad_value
    np.testing.assert_array_equal(second[0][0].label, a_lab)
    np.testing.assert_allclose(second[2][0].image, expected_image(b_arr), atol=1e-5)


def test_a_changed_file_or_plan_is_preprocessed_again(tmp_path, monkeypatch):
    a_img, a_seg, a_arr, _ = make_labeled(tmp_path / "a", 0)
    preprocess(tmp_path, [(a_img, a_seg)])
    built = count_builds(monkeypatch)
    write_volume(a_img, a_arr * 2 + 5)
    os.utime(a_img, ns=(os.stat(a_img).st_mtime_ns + 10**9,) * 2)
    cases, _, _ = preprocess(tmp_path, [(a_img, a_seg)])
    assert built == ["img"]
    np.testing.assert_allclose(cases[0].image, expected_image(a_arr * 2 + 5), atol=1e-5)
    monkeypatch.setattr(__import__(__name__), "PLAN", {"spacing": [2.0, 2.0, 2.0], "normalization": {"scheme": "zscore"}})
    cases, _, _ = preprocess(tmp_path, [(a_img, a_seg)])
    assert built == ["img", "img"] and cases[0].shape == (5, 6, 7)


def test_a_sparsely_labeled_image_is_read_once_for_both_streams(tmp_path, monkeypatch):
    a_img, a_seg, _, _ = make_labeled(tmp_path / "a", 0)
    built = count_builds(monkeypatch)
    labeled, _, unlabeled = preprocess(tmp_path, [(a_img, a_seg)], [a_img])
    assert built == ["img"] and unlabeled[0].image_source == labeled[0].image_source and not unlabeled[0].is_labeled


# --------------------------------------------------------------------------------- damage and crashes


def test_a_truncated_entry_is_detected_and_rebuilt(tmp_path, monkeypatch):
    a_img, a_seg, a_arr, a_lab = make_labeled(tmp_path / "a", 0)
    cases, _, _ = preprocess(tmp_path, [(a_img, a_seg)])
    with open(cases[0].image_source, "r+b") as f:
        f.truncate(os.path.getsize(cases[0].image_source) - 100)
    from CPCLSegmentLib import data

    data._open_npy.cache_clear()
    built = count_builds(monkeypatch)
    events = []
    cases, _, _ = preprocess(tmp_path, [(a_img, a_seg)], emit=events.append)
    assert built == ["img"]
    assert any("damaged preprocessing cache entry" in e.get("message", "") and "bytes" in e["message"] for e in events)
    np.testing.assert_allclose(cases[0].image, expected_image(a_arr), atol=1e-5)
    np.testing.assert_array_equal(cases[0].label, a_lab)


def test_a_write_that_fails_midway_leaves_no_entry(tmp_path, monkeypatch):
    cache = PreprocessCache(str(tmp_path / "cache")).prepare()
    real_save = np.save

    def crash_on_label(f, arr, *a, **k):
        if arr.dtype == np.int16:
            raise OSError(28, "No space left on device")
        return real_save(f, arr, *a, **k)

    monkeypatch.setattr(np, "save", crash_on_label)
    with pytest.raises(OSError):
        cache.store("0" * 32, {"image": np.zeros((2, 2, 2), np.float32), "label": np.zeros((2, 2, 2), np.int16)}, {})
    assert cache.load("0" * 32) is None
    assert [n for n in os.listdir(cache.root) if not n.startswith("CACHEDIR")] == []


def test_a_dead_runs_half_written_entry_is_never_trusted_and_is_swept(tmp_path):
    cache = PreprocessCache(str(tmp_path / "cache")).prepare()
    cache.store("1" * 32, {"image": np.ones((2, 3, 4), np.float32)}, {"name": "x"})
    half = os.path.join(cache.root, ".tmp-p999999999-abc")  # a crashed writer's folder: never under a key
    os.rename(os.path.join(cache.root, "1" * 32), half)
    os.utime(half, (1, 1))
    assert cache.load("1" * 32) is None and [e.key for e in cache.entries()] == []
    PreprocessCache(cache.root).prepare()
    assert not os.path.exists(half)


def test_a_manifest_that_is_not_strict_json_is_damaged(tmp_path):
    cache = PreprocessCache(str(tmp_path / "cache")).prepare()
    entry = cache.store("2" * 32, {"image": np.ones((2, 3, 4), np.float32)}, {"name": "x"})
    path = os.path.join(entry.folder, "manifest.json")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    with open(path, "w", encoding="utf-8") as f:
        f.write(text.replace('"meta": {', '"meta": {"pad": NaN, '))
    assert cache.load("2" * 32) is None and "NaN" in cache.damaged[0]


# ----------------------------------------------------------------------------------------- the limit


def test_the_limit_evicts_the_least_recently_used_entries_but_never_held_ones(tmp_path):
    root = str(tmp_path / "cache")
    cache = PreprocessCache(root).prepare()
    keys = [str(i) * 32 for i in range(4)]
    for n, key in enumerate(keys):
        entry = cache.store(key, {"image": np.zeros((25, 20, 20), np.float32)}, {"name": key[:1]})  # 40 kB each
        os.utime(os.path.join(entry.folder, "manifest.json"), (1000 + n, 1000 + n))
    cache.load(keys[0])  # used now: the most recent
    size = max(e.size for e in cache.entries())  # manifests differ by a byte or two (their creation time)
    other_run = PreprocessCache(root)
    other_run.hold([keys[1]])  # a live run reads keys[1]
    try:
        removed = PreprocessCache(root, limit=3 * size).trim(keep=[keys[3]])  # this run's cases: keys[3]
        assert [e.key for e in removed] == [keys[2]]  # the oldest, keys[1], is another live run's
        removed = PreprocessCache(root, limit=size).trim(keep=[keys[3]])
        assert [e.key for e in removed] == [keys[0]]  # over the limit now, but the rest is in use
    finally:
        other_run.release()
    assert [e.key for e in PreprocessCache(root, limit=size).trim()] == [keys[1]]  # released: it goes
    assert [e.key for e in cache.entries()] == [keys[3]]


def test_a_run_over_the_limit_warns_and_keeps_its_cases(tmp_path):
    a_img, a_seg, _, _ = make_labeled(tmp_path / "a", 0)
    events = []
    cache = PreprocessCache(str(tmp_path / "cache"), limit=1000).prepare()
    cases, _, _ = preprocess(tmp_path, [(a_img, a_seg)], cache=cache, emit=events.append)
    assert os.path.exists(cases[0].image_source)
    assert any("exceed the preprocessing cache's limit" in e.get("message", "") for e in events)


def test_parse_size():
    from CPCLSegmentLib.errors import InputError
    from CPCLSegmentLib.prepcache import parse_size

    assert parse_size("20GB") == 20 * 10**9 and parse_size("1.5 GiB") == int(1.5 * 1024**3) and parse_size("512") == 512
    with pytest.raises(InputError, match="--cache-limit 'lots'"):
        parse_size("lots")


# -------------------------------------------------------------------------------------------- parallel


def test_parallel_preprocessing_gives_the_same_arrays_as_sequential(tmp_path, monkeypatch):
    pairs = [make_labeled(tmp_path / f"c{i}", i)[:2] for i in range(3)]
    unl = [make_labeled(tmp_path / f"u{i}", 5 + i)[0] for i in range(3)]
    monkeypatch.setattr(__import__(__name__), "PLAN", {"spacing": [1.5, 1.3, 0.7], "normalization": {"scheme": "zscore"}})
    results = {}
    for workers in ("1", "2"):
        monkeypatch.setenv(preprocessing.WORKERS_ENV, workers)
        run = tmp_path / f"run{workers}"
        run.mkdir()
        results[workers] = preprocess(run, pairs, unl[:2], validation=[make_labeled(tmp_path / "v", 9)[:2]])
    for seq, par in zip(results["1"], results["2"]):
        assert len(seq) == len(par)
        for x, y in zip(seq, par):
            assert x.image_source != y.image_source  # two caches
            np.testing.assert_array_equal(x.image, y.image)
            assert (x.label is None) == (y.label is None)
            if x.label is not None:
                np.testing.assert_array_equal(x.label, y.label)
                assert sorted(x.locations) == sorted(y.locations)


def test_the_same_data_exported_again_under_another_name_is_reused_and_unchanged_files_are_not_rehashed(tmp_path, monkeypatch):
    import shutil

    from CPCLSegmentLib import prepcache

    a_img, a_seg, _, _ = make_labeled(tmp_path / "run1", 0)
    preprocess(tmp_path, [(a_img, a_seg)])
    hashed = []
    real = prepcache.content_digest
    monkeypatch.setattr(prepcache, "content_digest", lambda p: hashed.append(p) or real(p))
    built = count_builds(monkeypatch)
    preprocess(tmp_path, [(a_img, a_seg)])
    assert hashed == [] and built == []  # unchanged files: identified by path, size and mtime alone
    shutil.copytree(tmp_path / "run1", tmp_path / "run2")  # what the Slicer module does for every run
    cases, _, _ = preprocess(tmp_path, [(str(tmp_path / "run2" / "img.nii.gz"), str(tmp_path / "run2" / "seg.nii.gz"))])
    assert len(hashed) == 2 and built == []


# --------------------------------------------------------------------------------- cpcl-segment cache


def test_a_nrrd_written_again_at_another_time_has_the_same_identity_and_other_voxels_another(tmp_path):
    """NRRD writers stamp the header's comment lines with the time (pynrrd, hence every ``.seg.nrrd`` slicerio
    writes): the same voxels and fields written a second later are the same input; a changed voxel or field is not."""
    import nrrd

    from CPCLSegmentLib.prepcache import content_digest

    data = np.arange(60, dtype=np.uint8).reshape(3, 4, 5)
    paths = [str(tmp_path / f"{n}.nrrd") for n in "abcd"]
    for p in paths[:2]:
        nrrd.write(p, data, {"space": "left-posterior-superior"})
    with open(paths[1], "rb") as f:
        text = f.read()
    stamped = text.replace(b"\n# on ", b"\n# on 1999-01-01 00:00:00 and not ", 1)
    assert stamped != text  # pynrrd's time stamp is a comment line
    with open(paths[1], "wb") as f:
        f.write(stamped)
    nrrd.write(paths[2], data + 1, {"space": "left-posterior-superior"})
    nrrd.write(paths[3], data, {"space": "right-anterior-superior"})
    digests = [content_digest(p) for p in paths]
    assert digests[0] == digests[1] and len(set(digests)) == 3
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"# not a nrrd\n\nbytes")
    import hashlib

    assert content_digest(str(plain)) == hashlib.sha256(plain.read_bytes()).hexdigest()


def test_the_cache_command_lists_and_clears(tmp_path, capsys):
    from CPCLSegmentLib.cli import main

    a_img, a_seg, _, _ = make_labeled(tmp_path / "a", 0)
    b_img, _, _, _ = make_labeled(tmp_path / "b", 1)
    preprocess(tmp_path, [(a_img, a_seg)], [b_img])
    root = str(tmp_path / "cache")
    cache = PreprocessCache(root)
    old, new = sorted(cache.entries(), key=lambda e: e.meta["kind"])  # labeled, unlabeled
    os.utime(os.path.join(old.folder, "manifest.json"), (1, 1))  # last used in 1970
    assert main(["cache", "--cache-dir", root]) == 0
    out = capsys.readouterr().out
    assert root in out and "2 entries" in out and "labeled " + preprocessing.canonical_path(a_img) in out
    assert "unlabeled " + preprocessing.canonical_path(b_img) in out and "1970-01-01" in out
    assert main(["cache", "clear", "--older-than", "30", "--cache-dir", root]) == 0
    assert "removed 1 preprocessed case(s) not used for 30 days" in capsys.readouterr().out
    assert [e.key for e in cache.entries()] == [new.key]
    assert main(["cache", "list", "--older-than", "3", "--cache-dir", root]) == 2  # --older-than is for clear
    assert "--older-than DAYS goes with clear" in capsys.readouterr().err
    assert main(["cache", "clear", "--cache-dir", root]) == 0
    assert "removed 1 preprocessed case(s)" in capsys.readouterr().out and cache.entries() == []
    assert not os.path.exists(os.path.join(root, "identities"))


def test_the_cache_folder_and_limit_come_from_flags_then_environment(tmp_path, monkeypatch):
    from CPCLSegmentLib import prepcache
    from CPCLSegmentLib.cli_args import build_parser, cache_settings
    from CPCLSegmentLib.errors import InputError

    monkeypatch.setenv(prepcache.CACHE_DIR_ENV, str(tmp_path / "env-cache"))
    monkeypatch.setenv(prepcache.CACHE_LIMIT_ENV, "3GB")
    assert PreprocessCache().root == str(tmp_path / "env-cache") and PreprocessCache().limit == 3 * 10**9
    base = ["train", "--labeled", "i", "s", "--out", "m.pt"]
    args = build_parser().parse_args(base + ["--cache-dir", "c", "--cache-limit", "500MB"])
    assert cache_settings(args) == ("c", 500 * 10**6)
    assert cache_settings(build_parser().parse_args(base + ["--work-dir", "w"])) == ("w", None)  # the older name
    with pytest.raises(InputError, match="--work-dir is the older name of --cache-dir"):
        cache_settings(build_parser().parse_args(base + ["--work-dir", "w", "--cache-dir", "c"]))
    monkeypatch.delenv(prepcache.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if os.name == "posix" and os.uname().sysname == "Linux":
        assert prepcache.default_cache_dir() == str(tmp_path / "xdg" / "cpcl-segment")


# ------------------------------------------------------------------------------------ across trainings


def test_retraining_another_seed_and_compare_supervised_reuse_the_cache(tmp_path, monkeypatch, capsys):
    """The label -> train loop: a second training on the same files (another seed, --compare-supervised) preprocesses
    nothing; --work-dir (the older name of --cache-dir) names the cache folder."""
    from CPCLSegmentLib.cli import main

    monkeypatch.setenv("CPCL_SEGMENT_CACHE_DIR", str(tmp_path / "cache"))
    a_img, a_seg, _, _ = make_labeled(tmp_path / "a", 0)
    v_img, v_seg, _, _ = make_labeled(tmp_path / "v", 1)
    u_img = make_labeled(tmp_path / "u", 2)[0]
    tiny = ["--iterations", "1", "--patch-size", "32", "32", "16", "--width", "4", "--device", "cpu", "--progress", "none"]
    train = ["train", "--labeled", a_img, a_seg, "--unlabeled", u_img, "--validation", v_img, v_seg, *tiny]
    built = count_builds(monkeypatch)
    assert main([*train, "--out", str(tmp_path / "m1.pt")]) == 0
    assert sorted(built) == ["img", "img", "img"]
    built.clear()
    assert main([*train, "--out", str(tmp_path / "m2.pt"), "--seed", "1", "--compare-supervised"]) == 0
    assert built == []
    assert main([*train, "--out", str(tmp_path / "m3.pt"), "--work-dir", str(tmp_path / "other")]) == 0
    assert len(built) == 3 and len(PreprocessCache(str(tmp_path / "other")).entries()) == 3
    built.clear()
    assert main([*train, "--out", str(tmp_path / "m4.pt"), "--cache-dir", str(tmp_path / "other")]) == 0
    assert built == []
    assert "are reused from the preprocessing cache" in capsys.readouterr().err


def test_a_cancel_during_preprocessing_leaves_complete_entries_only_and_nothing_elsewhere(tmp_path, monkeypatch):
    import tempfile

    from CPCLSegmentLib import cleanup
    from CPCLSegmentLib.errors import Cancelled

    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    unl = [make_labeled(tmp_path / f"u{i}", i)[0] for i in range(4)]
    a_img, a_seg, _, _ = make_labeled(tmp_path / "a", 9)

    def cancel_after_first(event):
        if event.get("event") == "preprocess":
            cleanup.request_cancel()  # what SIGTERM / Ctrl-C / the Slicer Cancel button do

    try:
        with pytest.raises(Cancelled):
            preprocess(tmp_path, [(a_img, a_seg)], unl, emit=cancel_after_first)
        message = cleanup.cancel_report()
    finally:
        cleanup.reset()
    assert message.startswith("cancelled: no output was written")
    cache = PreprocessCache(str(tmp_path / "cache"))
    names = sorted(os.listdir(cache.root))
    assert [n for n in names if n.startswith(".tmp-p")] == []  # no half entry, no in-use marker
    assert len(cache.entries()) == 1 and all("damaged" not in e.meta for e in cache.entries())  # the one finished
    assert os.listdir(tmp_path / "tmp") == []
    built = count_builds(monkeypatch)
    preprocess(tmp_path, [(a_img, a_seg)], unl)
    assert len(built) == 4  # the next run preprocesses only what the cancelled one had not finished
