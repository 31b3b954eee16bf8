"""Background jobs: run the ``cpcl-segment`` CLI in a child process and follow its JSON-lines progress.

Qt-free (no slicer / qt imports), so the Slicer widget polls it from a ``qt.QTimer`` (the MONAIAuto3DSeg
pattern) and the console, scripts and tests call ``wait()``::

    job = Job(["train", "--labeled", img, seg, "--out", model])
    job.start()
    while not job.finished:          # the widget does this from a QTimer instead
        for event in job.poll():     # dicts: the CLI's JSON events, plus "log" and a final "finished"
            ...
    # or: result = job.wait(on_event=print)   -> the CLI's "done" event; raises on failure

The child is ``[python, "-m", "CPCLSegmentLib.cli", *args, "--progress", "json", "--exit-with-parent",
"--stop-file", <tmp>]``. Inside Slicer ``python`` is ``PythonSlicer`` (``PythonSlicer.exe`` on Windows),
which sets up Slicer's Python environment; the child's ``PYTHONPATH`` and working folder reach this
package's parent folder, so the engine is importable wherever the extension is installed.

- ``stop()``: creates the stop file; training ends at the next iteration and **keeps** the model so far.
- ``cancel()``: creates the child's cancel file (``--cancel-file``, polled by the CLI: a child without a console
  on Windows never gets CTRL_BREAK) and on POSIX SIGTERMs the tree; the CLI exits within seconds, writing
  nothing; what lives after ``grace_s`` is killed (psutil: children first, then the parent).
- An ``error`` event or a non-zero exit code becomes ``job.error`` (a one-line message).
- The job's temporary folder (stop file) is removed when the job has finished.
- ``result()`` (after the job finished; ``wait()`` returns it): what ``collect(job)`` makes of the CLI's
  ``done`` event (the Slicer module imports result files into new nodes there, on the calling thread), or
  the ``done`` event itself; raises like ``outcome()``. A ``work_dir`` handed to the job (exported inputs,
  results) is removed then, unless ``keep_work_dir(job)`` says to keep it.

``probe_job`` and ``model_info_job`` run ``python -m CPCLSegmentLib.childinfo probe | model-info MODEL``: they answer,
in a child process, what the Slicer GUI process must not find out itself because it would import torch there:
the PyTorch build, GPUs (``torch.cuda``; ``nvidia-smi``) and package versions, and what a model file holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence

from .errors import EXIT_MESSAGES, Cancelled, CPCLError

Event = Dict[str, Any]

# What the CLI's exit codes mean (``errors.EXIT_MESSAGES``) is shown when a child dies without an "error" line.
CANCELLED_EXIT_CODE = Cancelled.exit_code

_WINDOWS = os.name == "nt"
_CREATE_NEW_PROCESS_GROUP = 0x00000200
_CREATE_NO_WINDOW = 0x08000000


class JobError(CPCLError):
    """A background job failed; ``exit_code`` is the child's exit code and the message its error line."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def package_parent() -> str:
    """The folder that holds the ``CPCLSegmentLib`` package (the Slicer module's folder)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_python(inside_slicer: bool = False) -> str:
    """The interpreter for the child: ``PythonSlicer`` inside Slicer (it sets up Slicer's environment;
    ``PythonSlicer.exe`` on Windows), otherwise the current interpreter."""
    if inside_slicer:
        exe = shutil.which("PythonSlicer")
        if exe:
            return exe
        candidate = os.path.join(os.path.dirname(sys.executable), "PythonSlicer" + (".exe" if _WINDOWS else ""))
        if os.path.isfile(candidate):
            return candidate
    return sys.executable


def child_environment(base: Optional[Dict[str, str]] = None, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """``base`` (default: this process's environment) with PYTHONPATH reaching this package and UTF-8 I/O."""
    env = dict(os.environ if base is None else base)
    parent = package_parent()
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if parent not in paths:
        paths.insert(0, parent)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONUNBUFFERED"] = "1"
    # The child's direct parent may be a launcher (PythonSlicer), not Slicer itself: name the process
    # whose death must cancel the child (``--exit-with-parent`` watches it).
    env["CPCL_PARENT_PID"] = str(os.getpid())
    env.update(extra or {})
    return {str(k): str(v) for k, v in env.items()}


class Job:
    """One ``cpcl-segment`` command running in a child process.

    Args:
        args: the subcommand and its arguments, e.g. ``["predict", "--model", m, "--image", f, "--out", o]``
            (``--progress json --exit-with-parent --stop-file`` are appended).
        python: interpreter (default ``default_python()``).
        env: full environment for the child (default: this process's, see ``child_environment``).
        extra_env: variables added to it (e.g. ``{"CUDA_VISIBLE_DEVICES": "-1"}``).
        name: shown in messages ("training", "segmentation", ...).
        log_lines: how many log lines ``job.log`` keeps.
        module: the module the child runs (``python -m``); the CLI's progress / stop / parent flags are
            appended only for ``CPCLSegmentLib.cli``.
        work_dir: a folder that belongs to this job (exported inputs, results); removed by ``result()``
            unless ``keep_work_dir(job)`` returns True.
        collect: ``collect(job)`` turns a finished job into its result (called once, by ``result()``).
    """

    def __init__(self, args: Sequence[Any], python: Optional[str] = None, env: Optional[Dict[str, str]] = None,
                 extra_env: Optional[Dict[str, str]] = None, name: str = "cpcl-segment", log_lines: int = 2000,
                 module: str = "CPCLSegmentLib.cli", work_dir: Optional[str] = None,
                 collect: Optional[Callable[["Job"], Any]] = None,
                 keep_work_dir: Optional[Callable[["Job"], bool]] = None) -> None:
        self.args = [str(a) for a in args]
        if not self.args:
            raise ValueError("Job needs a cpcl-segment subcommand")
        self.python = python or default_python()
        self.env = child_environment(env, extra_env)
        self.name = name
        self.module = module
        self.work_dir = work_dir
        self._collect = collect
        self._keep_work_dir = keep_work_dir
        self._collected = False
        self._collected_value: Any = None
        self.temp_dir = tempfile.mkdtemp(prefix="cpcl-job-")
        self.stop_file = os.path.join(self.temp_dir, "stop")
        self.cancel_file = os.path.join(self.temp_dir, "cancel")
        self.proc: Optional[subprocess.Popen] = None
        self.status = "created"  # created | running | done | stopped | cancelled | failed
        self.exit_code: Optional[int] = None
        self.error: Optional[str] = None
        self.done: Optional[Event] = None  # the CLI's "done" event
        self.warnings: List[str] = []
        self.log: Deque[str] = deque(maxlen=log_lines)
        self.started_at: Optional[float] = None
        self.ended_at: Optional[float] = None
        self._queue: "queue.Queue[Event]" = queue.Queue()
        self._threads: List[threading.Thread] = []
        self._cancel_requested = False
        self._stop_requested = False
        self._finished_event_seen = False
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------- running

    def command(self) -> List[str]:
        if self.module != "CPCLSegmentLib.cli":
            return [self.python, "-m", self.module, *self.args]
        return [self.python, "-m", self.module, *self.args,
                "--progress", "json", "--exit-with-parent", "--stop-file", self.stop_file, "--cancel-file", self.cancel_file]

    def start(self) -> "Job":
        if self.proc is not None:
            raise RuntimeError("job already started")
        kwargs: Dict[str, Any] = {}
        if _WINDOWS:
            # own process group (Slicer's console events do not reach it); no console window pops up
            kwargs["creationflags"] = _CREATE_NEW_PROCESS_GROUP | _CREATE_NO_WINDOW
        else:
            kwargs["start_new_session"] = True  # Slicer's Ctrl-C / terminal signals do not reach the child
        self.started_at = time.time()
        try:
            self.proc = subprocess.Popen(
                self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                cwd=package_parent(), env=self.env, **kwargs,
            )
        except OSError as e:
            self._remove_temp()
            self.status, self.exit_code = "failed", 1
            self.error = f"cannot start the {self.name} process ({self.python}): {e}"
            self._queue.put({"event": "finished", "status": self.status, "exit_code": 1, "error": self.error})
            return self
        self.status = "running"
        out = threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True, name="cpcl-job-stdout")
        err = threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True, name="cpcl-job-stderr")
        self._threads = [out, err]
        for t in self._threads:
            t.start()
        threading.Thread(target=self._wait_exit, daemon=True, name="cpcl-job-wait").start()
        return self

    def _read(self, stream, is_stdout: bool) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not line.strip():
                continue
            event = _parse_event(line) if is_stdout else None
            self._queue.put(event if event is not None else {"event": "log", "message": line, "stream": "stdout" if is_stdout else "stderr"})
        stream.close()

    def _wait_exit(self) -> None:
        assert self.proc is not None
        code = self.proc.wait()
        for t in self._threads:
            t.join()
        self._queue.put({"event": "_exit", "exit_code": code})

    # ------------------------------------------------------------------------------------- polling

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def finished(self) -> bool:
        return self.status in ("done", "stopped", "cancelled", "failed") and self._finished_event_seen

    def poll(self) -> List[Event]:
        """New events since the last call (never blocks). The last one of a job is ``finished``."""
        events = []
        while True:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                break
            events.extend(self._handle(event))
        return events

    def _handle(self, event: Event) -> List[Event]:
        kind = event.get("event")
        if kind == "_exit":
            return [self._finish(int(event["exit_code"]))]
        if kind == "finished":  # start() failed
            self._finished_event_seen = True
            return [event]
        if kind == "warning":
            self.warnings.append(str(event.get("message", "")))
        elif kind == "done":
            self.done = event
        elif kind == "error":
            self.error = str(event.get("message", "unknown error"))
        if kind == "log":
            self.log.append(event["message"])
        elif kind in ("warning", "info", "error"):
            self.log.append(f"{kind}: {event.get('message')}")
        return [event]

    def _finish(self, code: int) -> Event:
        self.exit_code = code
        self.ended_at = time.time()
        if self._cancel_requested:
            self.status = "cancelled"
            self.error = None
        elif code == 0:
            self.status = "stopped" if (self.done or {}).get("status") == "stopped" else "done"
        elif code == CANCELLED_EXIT_CODE or (not _WINDOWS and code < 0):
            self.status = "cancelled"
            self.error = self.error or "cancelled"
        else:
            self.status = "failed"
            if not self.error:
                tail = [line for line in list(self.log)[-5:] if line.strip()]
                detail = tail[-1] if tail else EXIT_MESSAGES.get(code, "no message")
                self.error = f"the {self.name} process ended with exit code {code}: {detail}"
        self._remove_temp()
        self._finished_event_seen = True
        return {"event": "finished", "status": self.status, "exit_code": code, "error": self.error,
                "seconds": round(self.ended_at - (self.started_at or self.ended_at), 2)}

    def wait(self, on_event: Optional[Callable[[Event], None]] = None, timeout: Optional[float] = None,
             tick: Optional[Callable[[], None]] = None) -> Any:
        """Blocks until the job ends, passing every event to ``on_event``; returns ``result()`` (the CLI's
        ``done`` event when no ``collect`` was given). ``tick()`` is called at least twice a second (Slicer's
        console keeps its window painted with it).

        Raises ``errors.Cancelled`` when cancelled, ``JobError`` (with the child's message) when it failed,
        and ``TimeoutError`` after ``timeout`` seconds (the job keeps running).
        """
        if self.proc is None and self.status == "created":
            self.start()
        deadline = None if timeout is None else time.time() + timeout
        while not self.finished:
            remaining = None if deadline is None else max(0.0, deadline - time.time())
            if remaining == 0.0:
                raise TimeoutError(f"the {self.name} job is still running after {timeout} s")
            if tick is not None:
                tick()
            try:
                event = self._queue.get(timeout=(0.5 if tick is None else 0.1) if remaining is None else min(0.5, remaining))
            except queue.Empty:
                continue
            for e in self._handle(event):
                if on_event is not None:
                    on_event(e)
        return self.result()

    def outcome(self) -> Event:
        """The ``done`` event of a finished job; raises like ``wait``."""
        if self.status == "cancelled":
            raise Cancelled(f"{self.name} was cancelled")
        if self.status == "failed":
            raise JobError(self.error or f"{self.name} failed", self.exit_code or 1)
        return self.done or {}

    def result(self) -> Any:
        """After the job has finished: ``collect(job)`` (once; its value is kept) or the ``done`` event.

        Raises like ``outcome()`` when the job failed or was cancelled. The job's ``work_dir`` is removed
        the first time, unless ``keep_work_dir(job)`` keeps it.
        """
        if not self.finished:
            raise RuntimeError(f"the {self.name} job has not finished")
        if not self._collected:
            self._collected = True
            try:
                done = self.outcome()
                self._collected_value = self._collect(self) if self._collect is not None else done
            finally:
                if self.work_dir and not (self._keep_work_dir is not None and self._keep_work_dir(self)):
                    shutil.rmtree(self.work_dir, ignore_errors=True)
        else:
            self.outcome()
        return self._collected_value

    # ------------------------------------------------------------------------------- stop / cancel

    def stop(self) -> None:
        """Graceful stop: training ends after the current iteration and the model so far is written."""
        self._stop_requested = True
        if self.running:
            with open(self.stop_file, "w", encoding="utf-8") as f:
                f.write("stop\n")

    def cancel(self, grace_s: float = 3.0, block: bool = True) -> None:
        """Ends the whole process tree: terminate, then kill what is left after ``grace_s`` seconds.

        ``block=False`` (the widget) does the waiting on a background thread; ``poll()`` then delivers
        the ``finished`` event with status ``cancelled``.
        """
        self._cancel_requested = True
        if self.proc is None or self.proc.poll() is not None:
            return
        if block:
            self._terminate_tree(grace_s)
        else:
            threading.Thread(target=self._terminate_tree, args=(grace_s,), daemon=True, name="cpcl-job-cancel").start()

    def _terminate_tree(self, grace_s: float) -> None:
        assert self.proc is not None
        with self._lock:
            pid = self.proc.pid
            try:
                import psutil
            except ImportError:  # psutil is an engine dependency; this is only a fallback
                psutil = None
            if psutil is None:
                delivered = self._signal_root()
                try:
                    self.proc.wait(timeout=grace_s if delivered else 0.2)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                return
            try:
                root = psutil.Process(pid)
                tree = root.children(recursive=True) + [root]  # list the children before anyone exits
            except psutil.NoSuchProcess:
                return
            delivered = self._signal_root()
            if not _WINDOWS:
                for p in tree[:-1]:
                    try:
                        p.terminate()
                    except psutil.NoSuchProcess:
                        pass
            # if the cancel could not be delivered at all, kill at once
            _, alive = psutil.wait_procs(tree, timeout=grace_s if delivered else 0.2)
            for p in [p for p in alive if p.pid != pid] + [p for p in alive if p.pid == pid]:
                try:
                    p.kill()  # children first, then the launcher / parent
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=2.0)

    def _signal_root(self) -> bool:
        """Asks the child to cancel itself (it removes partial outputs, says what it kept): the cancel file it polls
        (a console-less child on Windows never gets CTRL_BREAK), and on POSIX SIGTERM too. True if delivered."""
        assert self.proc is not None
        delivered = False
        with contextlib.suppress(OSError):
            if self.module == "CPCLSegmentLib.cli":
                with open(self.cancel_file, "w", encoding="utf-8") as f:
                    f.write("cancel\n")
                delivered = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            if not _WINDOWS:
                self.proc.send_signal(signal.SIGTERM)
                delivered = True
        return delivered

    # ------------------------------------------------------------------------------------ cleanup

    def _remove_temp(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __del__(self) -> None:  # a forgotten job never outlives its owner
        try:
            if self.proc is not None and self.proc.poll() is None:
                self.cancel(grace_s=1.0)
            self._remove_temp()
        except Exception:
            pass


def _parse_event(line: str) -> Optional[Event]:
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or "event" not in event:
        return None
    return event


def run(args: Sequence[Any], on_event: Optional[Callable[[Event], None]] = None, **kwargs: Any) -> Event:
    """Runs one CLI command to the end (blocking) and returns its ``done`` event."""
    return Job(args, **kwargs).start().wait(on_event)


# ------------------------------------------------------------------------------- child-side queries


def probe_job(python: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> Job:
    """A job whose ``done`` event is ``childinfo.probe_environment()`` as seen by the child's Python."""
    return Job(["probe"], python=python, env=env, name="environment check", module="CPCLSegmentLib.childinfo")


def model_info_job(model: str, python: Optional[str] = None, env: Optional[Dict[str, str]] = None) -> Job:
    """A job whose ``done`` event is ``childinfo.model_info(model)`` (reads the model file in the child)."""
    return Job(["model-info", model], python=python, env=env, name="model check", module="CPCLSegmentLib.childinfo")
