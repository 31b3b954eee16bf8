"""The background job runner (CPCLSegmentLib/jobs.py) against the real CLI: progress, Stop, Cancel, errors.

This is what the Slicer panel polls from its QTimer; here the same calls run without Qt.
"""

import os
import shutil
import time

import psutil
import pytest

from CPCLSegmentLib import jobs
from CPCLSegmentLib.errors import Cancelled

from conftest import COARSE_SPACING, child_env

def one_thread_env():
    """The child's environment with one torch thread: stable timings on a shared 2-core machine (and no
    oversubscription when pytest runs beside other work)."""
    return dict(child_env(), OMP_NUM_THREADS="1")


TINY = ["--segments", "right lung", "left lung", "--width", "4", "--patch-size", "64", "64", "16",
        "--spacing", *[str(s) for s in COARSE_SPACING], "--device", "cpu", "--seed", "0"]


@pytest.fixture
def case_in_odd_folder(tmp_path, ct_path, seg_path):
    """The chest CT and its segmentation in a folder whose name has a space and non-ASCII letters."""
    folder = tmp_path / "Lékař data" / "případ 1"
    folder.mkdir(parents=True)
    image, seg = folder / "hrudník CT.nrrd", folder / "segmentace plic.seg.nrrd"
    shutil.copyfile(ct_path, image)
    shutil.copyfile(seg_path, seg)
    return folder, str(image), str(seg)


def _train_args(image, seg, out, iterations, unlabeled=True):
    return ["train", "--labeled", image, seg, *(["--unlabeled", image] if unlabeled else []), "--out", str(out),
            "--iterations", str(iterations), *TINY]


def _wait_for(job, kind, timeout=120):
    """Polls like the widget's timer until an event of ``kind`` arrives; returns the events seen."""
    seen = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        for e in job.poll():
            seen.append(e)
            if e["event"] == kind:
                return seen
        if job.finished:
            break
        time.sleep(0.05)
    raise AssertionError(f"no {kind!r} event; got {[e['event'] for e in seen]}; log: {list(job.log)[-5:]}")


def test_training_job_reports_progress_and_finishes_in_an_odd_folder(case_in_odd_folder):
    folder, image, seg = case_in_odd_folder
    out = folder / "model ů.pt"
    job = jobs.Job(_train_args(image, seg, out, 8, unlabeled=False), env=one_thread_env(), name="training")
    assert "--progress" in job.command() and "--exit-with-parent" in job.command() and job.stop_file in job.command()
    events = []
    result = job.wait(on_event=events.append, timeout=300)
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "finished" and events[-1]["status"] == "done" and events[-1]["exit_code"] == 0
    progress = [e for e in events if e["event"] == "progress"]
    assert [e["iteration"] for e in progress] == list(range(1, 9))
    assert all({"supervised", "total"} <= set(e["loss"]) and "eta_s" in e for e in progress)
    assert kinds.index("summary") < kinds.index("progress")
    assert result["status"] == "completed" and os.path.samefile(result["model"], out)
    assert out.is_file() and not os.path.exists(str(out) + ".checkpoint.pt")
    assert any(e["event"] == "log" and e["stream"] == "stderr" for e in events)  # human text went to stderr
    assert job.status == "done" and job.error is None and not os.path.exists(job.temp_dir)


def test_cancel_ends_the_process_tree_within_5_s_and_writes_no_model(case_in_odd_folder):
    folder, image, seg = case_in_odd_folder
    out = folder / "cancelled.pt"
    job = jobs.Job(_train_args(image, seg, out, 5000), env=one_thread_env(), name="training").start()
    _wait_for(job, "progress")
    pid = job.proc.pid
    tree = [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    t0 = time.time()
    job.cancel()
    with pytest.raises(Cancelled):
        job.wait(timeout=10)
    assert time.time() - t0 < 5.0
    assert job.status == "cancelled" and job.error is None
    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in tree)
    assert not out.exists()
    assert [p.name for p in folder.iterdir() if p.name.startswith(".tmp")] == []
    assert not os.path.exists(job.temp_dir)


def test_cancel_reaches_a_child_that_cannot_be_signalled(tmp_path, monkeypatch):
    """On Windows the child has no console, so CTRL_BREAK never arrives: Cancel creates the cancel file the CLI
    is started with, and the CLI's StopControl cancels when it appears (its own cleanup runs: exit 130)."""
    import subprocess
    import sys

    from CPCLSegmentLib.console import StopControl

    job = jobs.Job(["train", "--labeled", "a.nrrd", "b.seg.nrrd", "--out", str(tmp_path / "m.pt")], name="training")
    assert job.command()[-2:] == ["--cancel-file", job.cancel_file]
    job.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        monkeypatch.setattr(jobs, "_WINDOWS", True)  # as on Windows: no signal is sent
        assert job._signal_root() and os.path.exists(job.cancel_file)
        assert job.proc.poll() is None  # not signalled, not killed: the child cancels itself
    finally:
        job.proc.kill()
        job.proc.wait()
        job._remove_temp()
    control = StopControl(cancel_file=str(tmp_path / "cancel"), grace_s=600.0)  # no hard exit of pytest itself
    try:
        assert control.should_stop() is False
        (tmp_path / "cancel").write_text("cancel")
        deadline = time.time() + 5
        while not control.cancelled.is_set() and time.time() < deadline:
            time.sleep(0.05)
        assert control.cancelled.is_set()  # noticed by its watcher, even between the run's own checks
        with pytest.raises(Cancelled):
            control.should_stop()
    finally:
        control.close()
        from CPCLSegmentLib import cleanup

        cleanup.reset()


def test_stop_keeps_the_model_trained_so_far(case_in_odd_folder):
    folder, image, seg = case_in_odd_folder
    out = folder / "stopped.pt"
    job = jobs.Job(_train_args(image, seg, out, 5000), env=one_thread_env(), name="training").start()
    _wait_for(job, "progress")
    job.stop()
    result = job.wait(timeout=60)
    assert job.status == "stopped" and result["status"] == "stopped"
    assert 1 <= result["iterations"] < 5000
    assert out.is_file()
    assert os.path.exists(str(out) + ".checkpoint.pt")  # kept so the run can be resumed


def test_an_error_line_becomes_the_job_error(tmp_path):
    missing = tmp_path / "no such model.pt"
    job = jobs.Job(["predict", "--model", missing, "--image", tmp_path / "x.nrrd", "--out", tmp_path / "o.seg.nrrd"],
                   env=one_thread_env(), name="segmentation")
    events = []
    with pytest.raises(jobs.JobError) as err:
        job.wait(on_event=events.append, timeout=120)
    assert err.value.exit_code == 2 and job.status == "failed"
    assert "not found" in str(err.value) and ("x.nrrd" in str(err.value) or "no such model" in str(err.value))
    assert any(e["event"] == "error" for e in events) and events[-1]["event"] == "finished"


def test_a_crash_without_an_error_line_still_gives_a_message(tmp_path):
    job = jobs.Job(["no-such-command"], env=one_thread_env(), name="training")
    with pytest.raises(jobs.JobError) as err:
        job.wait(timeout=60)
    assert err.value.exit_code == 2  # argparse's usage error
    assert "exit code 2" in str(err.value) and "invalid choice" in str(err.value)


def test_json_lines_and_log_lines_are_told_apart():
    assert jobs._parse_event('{"event": "progress", "iteration": 3}') == {"event": "progress", "iteration": 3}
    assert jobs._parse_event("100%|#####| 3/3") is None
    assert jobs._parse_event('{"no_event": 1}') is None
    assert jobs._parse_event("{broken json}") is None


def test_child_environment_reaches_the_engine_package():
    env = jobs.child_environment({"PYTHONPATH": "/somewhere"}, {"CUDA_VISIBLE_DEVICES": "-1"})
    parts = env["PYTHONPATH"].split(os.pathsep)
    assert parts[0] == jobs.package_parent() and "/somewhere" in parts
    assert os.path.isfile(os.path.join(parts[0], "CPCLSegmentLib", "cli.py"))
    assert env["CUDA_VISIBLE_DEVICES"] == "-1" and env["PYTHONIOENCODING"] == "utf-8"


def test_a_missing_interpreter_is_a_clear_error(tmp_path):
    job = jobs.Job(["info", "model.pt"], python=str(tmp_path / "no" / "PythonSlicer"), name="training")
    with pytest.raises(jobs.JobError, match="cannot start the training process"):
        job.wait(timeout=10)
    assert job.status == "failed" and job.finished and not os.path.exists(job.temp_dir)


def test_a_job_collects_its_result_once_and_removes_its_work_folder(tmp_path):
    """What the Slicer core's Run did, now Job's: result() turns the done event into the caller's result once
    (importing nodes there, on the calling thread) and removes the job's work folder unless told to keep it."""
    work = tmp_path / "run"
    work.mkdir()
    calls = []
    job = jobs.probe_job(env=one_thread_env())
    job.work_dir, job._collect = str(work), lambda j: calls.append(j.done["python"]) or "collected"
    assert job.start().wait(timeout=120) == "collected" and job.result() == "collected" and len(calls) == 1
    assert not work.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    job = jobs.Job(["probe"], env=one_thread_env(), module="CPCLSegmentLib.childinfo", work_dir=str(kept), keep_work_dir=lambda j: True)
    assert "--progress" not in job.command()  # only the CLI gets the CLI's flags
    assert job.wait(timeout=120)["event"] == "done" and kept.exists()
    running = jobs.Job(["probe"], env=one_thread_env(), module="CPCLSegmentLib.childinfo")
    with pytest.raises(RuntimeError, match="has not finished"):
        running.result()


def test_the_child_reports_torch_and_reads_model_files(tmp_path):
    import torch

    done = jobs.probe_job(env=one_thread_env()).start().wait(timeout=120)
    assert done["torch"]["version"] == torch.__version__ and done["torch"]["threads"] >= 1
    assert done["torch"]["cuda"] == [] or torch.cuda.is_available()
    bad = tmp_path / "not a model.pt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(jobs.JobError) as err:
        jobs.model_info_job(str(bad), env=one_thread_env()).start().wait(timeout=120)
    assert err.value.exit_code == 2 and "not a model.pt" in str(err.value)


def test_installed_versions_come_from_metadata_without_importing():
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from CPCLSegmentLib import childinfo; "
            "v = childinfo.installed_versions(['torch', 'PyYAML', 'pyyaml', 'no-such-package']); "
            "print(v['torch'] is not None, v['pyyaml'] is not None, v['no-such-package'], 'torch' in sys.modules)")
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, "-c", code, str(ROOT / "CPCLSegment")], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True", "None", "False"]
