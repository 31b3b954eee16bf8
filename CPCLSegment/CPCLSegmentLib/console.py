"""What the CLI shows and how it stops: engine events as JSON lines, a progress bar or text (``Reporter``,
``print_summary``; a ``heartbeat`` event when a phase runs long without any other event), and cancel / stop
handling (``StopControl``: signals, a stop file, the parent process; a cancel that the run does not notice
within ``grace_s`` exits hard, after ``cleanup.cancel_report``)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, Optional

import psutil

from . import __version__, cleanup
from .durations import format_seconds
from .jsonout import strict_json
from .errors import Cancelled


def print_summary(s: Dict[str, Any], out=None) -> None:
    """The ``summary`` event (before training) as a few lines of text, on stderr unless ``out`` is given."""
    lines = [
        f"CPCLSegment {__version__}: {s['method']} training on {len(s['labeled'])} labeled + {s['unlabeled']} unlabeled case(s)"
        + (f", {s['validation']} validation" if s["validation"] else ""),
        "  voxels per segment: " + ", ".join(f"{k}: {v}" for k, v in s["voxels_per_segment"].items()),
        f"  spacing {[round(v, 3) for v in s['spacing']]} mm, patch {' '.join(str(v) for v in reversed(s['patch_size']))} (X Y Z), "
        f"normalisation {s['normalization']}",
        f"  {s['iterations']} iterations on {s['device']}: about {format_seconds(s['estimated_time_s'])}, peak memory about {s['estimated_memory']}",
    ]
    if s.get("starting_model"):
        lines.insert(1, f"  starting from {s['starting_model']}")
    print("\n".join(lines), file=out or sys.stderr, flush=True)


class Reporter:
    """Turns engine events into JSON lines (stdout), a progress bar, or quiet text (stderr).

    ``start_heartbeat(every_s)``: when no event came for ``every_s`` seconds (a long read, resampling, a large
    sliding window), a ``{"event": "heartbeat", "phase", "seconds"}`` line (text: "still <phase>… (N s)") says the
    run is alive and what it is doing; the phase is the last ``phase`` event's (else the last event's kind)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.bar = None
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._phase_since = time.monotonic()
        self.phase = "starting"
        self._beat: Optional[threading.Event] = None

    def start_heartbeat(self, every_s: float = 15.0) -> None:
        if self._beat is not None:
            return
        stop = self._beat = threading.Event()

        def loop() -> None:
            while not stop.wait(min(every_s, 1.0)):
                if time.monotonic() - self._last >= every_s:
                    seconds = int(time.monotonic() - self._phase_since)
                    self._last = time.monotonic()
                    with contextlib.suppress(Exception):
                        if self.mode == "json":
                            self.json_line({"event": "heartbeat", "phase": self.phase, "seconds": seconds})
                        elif self.mode == "bar":
                            self.text(f"still {self.phase}... ({seconds} s)")

        threading.Thread(target=loop, daemon=True, name="heartbeat").start()

    def stop_heartbeat(self) -> None:
        if self._beat is not None:
            self._beat.set()
            self._beat = None

    def _note(self, event: Dict[str, Any]) -> None:
        self._last = time.monotonic()
        kind = event.get("event")
        if kind == "phase":
            phase = str(event.get("phase", "working"))
            if event.get("of"):
                phase += f" ({event.get('index')}/{event.get('of')})"
            if event.get("detail"):
                phase += f": {event['detail']}"
            self.phase = phase
            self._phase_since = time.monotonic()
        elif kind in ("progress", "start"):
            self.phase, self._phase_since = "training", time.monotonic()

    def json_line(self, event: Dict[str, Any]) -> None:
        with self._lock:
            sys.stdout.write(strict_json(event) + "\n")
            sys.stdout.flush()

    def text(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def __call__(self, event: Dict[str, Any]) -> None:
        kind = event.get("event")
        self._note(event)
        if self.mode == "json":
            if kind == "summary":
                print_summary(event)
            self.json_line(event)
            return
        if kind == "summary":
            print_summary(event)
        elif kind in ("warning", "info"):
            self.text(("warning: " if kind == "warning" else "") + event["message"])
        elif kind == "progress" and self.mode == "bar":
            self._bar(event)
        elif kind == "validation":
            dice = ", ".join(f"{k} {v:.3f}" for k, v in event["dice"].items() if v is not None) or "undefined (no validation case holds the segments)"
            label = event.get("label") or f"iteration {event['iteration']}"
            self.text(f"validation Dice ({label}): {dice}" + (" (best so far)" if event.get("best") else ""))
        elif kind == "predict":
            self.text(f"[{event['index']}/{event['of']}] {event['image']} -> {event['output']} ({event['seconds']} s)")
        elif kind == "start" and self.mode != "json":
            self.text(f"training {event['method']} on {event['device']}")

    def _bar(self, event: Dict[str, Any]) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=event["of"], initial=event["iteration"] - 1, file=sys.stderr, dynamic_ncols=True, unit="it")
        self.bar.update(event["iteration"] - self.bar.n)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in event["loss"].items()}, refresh=False)
        if event["iteration"] >= event["of"]:
            self.close()  # training is over: what follows (Dice, paths) prints below a finished bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class StopControl:
    """Cancel (SIGTERM / Ctrl-C / parent gone: nothing more is written; what was finished is named) and Stop
    (a stop file: keep the model so far).

    A cancel sets ``cleanup``'s cancel flag at once (no output is committed after it) and raises ``Cancelled``
    at the run's next check; if the run does not get there within ``grace_s`` (a long read or save), the
    process exits with 130 after ``cleanup.cancel_report`` (printed through ``on_hard_exit``)."""

    def __init__(self, stop_file: Optional[str] = None, exit_with_parent: bool = False, grace_s: float = 3.0,
                 on_hard_exit: Optional[Callable[[str], None]] = None, cancel_file: Optional[str] = None) -> None:
        self.cancelled = threading.Event()
        self.stop_file = stop_file
        self.grace_s = grace_s
        self.on_hard_exit = on_hard_exit
        self._installed = False
        self._previous: Dict[int, Any] = {}
        self._timer: Optional[threading.Timer] = None
        self._closed = threading.Event()
        self.cancel_file = cancel_file
        if exit_with_parent:
            self._watch_parent()
        if cancel_file:
            self._watch_cancel_file(cancel_file)

    def install(self) -> None:
        if self._installed:
            return
        self._installed = True
        for sig in (signal.SIGTERM, signal.SIGINT) + ((signal.SIGBREAK,) if hasattr(signal, "SIGBREAK") else ()):
            try:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            except (ValueError, OSError):  # not the main thread
                pass

    def close(self) -> None:
        """The command has ended: no hard exit any more; the previous signal handlers are back."""
        self._closed.set()
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.cancel(f"signal {signum}")

    def cancel(self, why: str) -> None:
        if self.cancelled.is_set() or self._closed.is_set():
            return
        self.cancelled.set()
        cleanup.request_cancel()
        # The loop notices at its next check; if an iteration runs long, leave anyway within grace_s.
        self._timer = threading.Timer(self.grace_s, self._hard_exit)
        self._timer.daemon = True
        self._timer.start()

    def _hard_exit(self) -> None:
        if self._closed.is_set():
            return
        try:
            message = cleanup.cancel_report()
            if self.on_hard_exit is not None:
                self.on_hard_exit(message)
            else:
                sys.stderr.write(message + "\n")
                sys.stderr.flush()
        except Exception:
            pass
        finally:
            os._exit(Cancelled.exit_code)

    def _watch_parent(self) -> None:
        """Cancels when the parent dies: the direct parent, and the process named by CPCL_PARENT_PID
        (Slicer itself when a launcher such as PythonSlicer sits in between)."""
        ppid = os.getppid()
        watched = {ppid}
        with contextlib.suppress(ValueError):
            watched.add(int(os.environ.get("CPCL_PARENT_PID", "")))

        def alive() -> bool:
            if os.name != "nt" and os.getppid() != ppid:
                return False
            return all(psutil.pid_exists(pid) for pid in watched)

        def loop() -> None:
            while not self.cancelled.is_set() and not self._closed.is_set():
                if not alive():
                    self.cancel("parent process gone")
                    self._hard_exit()
                time.sleep(0.5)

        threading.Thread(target=loop, daemon=True, name="parent-watchdog").start()

    def _watch_cancel_file(self, path: str) -> None:
        """Cancels when ``path`` appears: how a parent cancels a child it cannot signal (on Windows a child
        started without a console never receives CTRL_BREAK)."""

        def loop() -> None:
            while not self.cancelled.is_set() and not self._closed.is_set():
                if os.path.exists(path):
                    self.cancel("cancel file")
                    return
                time.sleep(0.2)

        threading.Thread(target=loop, daemon=True, name="cancel-file-watch").start()

    def should_stop(self) -> bool:
        if self.cancel_file and not self.cancelled.is_set() and os.path.exists(self.cancel_file):
            self.cancel("cancel file")
        if self.cancelled.is_set():
            raise Cancelled("cancelled")
        return bool(self.stop_file) and os.path.exists(self.stop_file)
