"""Error types. Every failure the user can cause is raised as a CPCLError subclass with a message that
names the file, node or setting and says what is wrong; the CLI prints it without a traceback."""

from __future__ import annotations


class CPCLError(Exception):
    """Base class of every error CPCLSegment raises on purpose."""

    exit_code = 2


class InputError(CPCLError):
    """An input image, segmentation, case list or setting is unusable."""


class ModelFileError(CPCLError):
    """A model file is missing, corrupt, truncated, of another version, or incompatible."""


class OutputError(CPCLError):
    """An output could not be written (disk full, no permission); any previous file is left intact."""


class TrainingDiverged(CPCLError):
    """The loss became NaN or infinite."""

    exit_code = 3


class OutOfMemory(CPCLError):
    """The device ran out of memory; the message says what to reduce (``smaller_patch``: the patch (D, H, W) it
    suggests, when there is one)."""

    exit_code = 4
    smaller_patch = None


class Cancelled(CPCLError):
    """The run was cancelled (SIGTERM, Ctrl-C, Cancel in Slicer, parent process gone)."""

    exit_code = 130


# Exit codes of ``cpcl-segment`` (0 done, 1 internal error, the rest from the classes above) and what each means;
# the Slicer module reads them from the child process.
EXIT_INTERNAL = 1
EXIT_MESSAGES = {
    EXIT_INTERNAL: "internal error",
    CPCLError.exit_code: "bad input or model file",
    TrainingDiverged.exit_code: "training diverged (the loss became NaN or infinite, or grew a thousandfold)",
    OutOfMemory.exit_code: "out of memory",
    Cancelled.exit_code: "cancelled",
}
