"""The one form of a request's time budget: :class:`Deadline`, an absolute :func:`time.monotonic` time.

A ``/predict`` makes one (``Deadline.after(MASKCLIP_PREDICT_TIME_BUDGET)``) and hands it down to whatever
waits or downloads for it: the model and text embeddings being ready, each image's download and decoding
room. Each asks it what is left (:meth:`Deadline.remaining`, None for no limit) or whether it has passed
(:meth:`Deadline.expired`); :data:`NO_DEADLINE` waits as long as it takes. Imports nothing of the package.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

__all__ = ["Deadline", "NO_DEADLINE"]


@dataclass(frozen=True)
class Deadline:
    """Work must end by ``at`` (:func:`time.monotonic` seconds; ``math.inf``: no limit)."""

    at: float = math.inf

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        """The deadline ``seconds`` from now."""
        return cls(time.monotonic() + seconds)

    @property
    def limited(self) -> bool:
        """Whether there is a limit at all."""
        return not math.isinf(self.at)

    def remaining(self) -> float | None:
        """Seconds left, at least 0; None for no limit (what ``Event.wait`` and ``Future.result`` take)."""
        return None if math.isinf(self.at) else max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        """Whether the time is up."""
        return time.monotonic() >= self.at

    def within(self, seconds: float) -> Deadline:
        """This deadline or ``seconds`` from now, whichever comes first (a step's own time-out inside it)."""
        return Deadline(min(self.at, time.monotonic() + seconds))


#: no limit: wait as long as it takes
NO_DEADLINE = Deadline()
