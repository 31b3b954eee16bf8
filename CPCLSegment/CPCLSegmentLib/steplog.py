"""A training step's logged values, left on the device until the loop reads them one step later.

Reading a device tensor's value (``.item()``, ``.tolist()``, ``float(t)``) makes the host wait until the device
has finished everything queued before it. Done after every step, the host queues step N+1 only once step N is
over, and the device idles while the host samples, copies and launches the next step's kernels. So the loop
(``Trainer._loop``) reads step N's values after it has dispatched step N+1, as nanoGPT does: the device always has
a step queued. On the CPU nothing changes (every operator runs when it is called); the values are the same
numbers either way.

``StepValues`` holds every loss term and the total stacked in one device tensor; ``read()`` copies them to the
host once (one synchronisation), checks that they are finite, and adds the host-side values (learning rate,
ramp). It is also a read-on-first-use ``Mapping`` (``values["total"]``), so a caller that wants the values at once
(the time estimate, benchmarks, tests) just uses them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch

# (iteration, values, whether the step's input images were finite) -> the exception to raise
NonFinite = Callable[[int, Dict[str, float], bool], Exception]


class StepValues(Mapping):
    """Step ``iteration``'s logged values (module docstring): terms and total on the device until ``read()``."""

    def __init__(self, iteration: int, terms: Dict[str, torch.Tensor], loss: torch.Tensor, host: Dict[str, float],
                 images: Sequence[Optional[torch.Tensor]], nonfinite: NonFinite) -> None:
        self.iteration = iteration
        self._names: List[str] = list(terms) + ["total"]
        self._stacked: Optional[torch.Tensor] = torch.stack([t.detach().float() for t in terms.values()] + [loss.detach().float()])
        self._host = dict(host)
        self._images = [t for t in images if t is not None]  # kept until read: a non-finite loss from bad input or weights?
        self._nonfinite = nonfinite
        self._values: Optional[Dict[str, float]] = None
        self._error: Optional[Exception] = None

    def read(self) -> Dict[str, float]:
        """The values as floats (one device-to-host copy, the first time); raises ``nonfinite(...)``'s exception when
        a term is NaN or infinite."""
        if self._error is not None:
            raise self._error
        if self._values is None:
            assert self._stacked is not None
            numbers = self._stacked.tolist()  # the step's one synchronisation with the device
            values = dict(zip(self._names, numbers))
            self._stacked = None
            if not all(v == v and abs(v) != float("inf") for v in numbers):
                self._error = self._nonfinite(self.iteration, values, all(bool(torch.isfinite(t).all()) for t in self._images))
                self._images = []
                raise self._error
            values.update(self._host)
            self._values, self._images = values, []
        return self._values

    @property
    def is_read(self) -> bool:
        return self._values is not None

    def __getitem__(self, key: str) -> float:
        return self.read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.read())

    def __len__(self) -> int:
        return len(self.read())

    def __repr__(self) -> str:
        return f"StepValues(iteration={self.iteration}, {'read' if self.is_read else 'on the device'})"


def progress_event(values: Dict[str, float], done: int, of: int, lambda_max: float, seconds_per_it: float,
                   eta_s: float) -> Dict[str, Any]:
    """The ``progress`` event of iteration ``done`` (1-based) from its step's values."""
    return {
        "event": "progress", "iteration": done, "of": of,
        "loss": {k: round(v, 5) for k, v in values.items() if k not in ("lr", "ramp")},
        "lr": values["lr"], "lambda": lambda_max * values["ramp"],
        "seconds_per_iteration": round(seconds_per_it, 4), "eta_s": round(eta_s, 1),
    }
