"""The one form of a request's time budget: an absolute monotonic time, asked what is left."""

from __future__ import annotations

import math
import time

from labelstudio_maskclip.deadline import NO_DEADLINE, Deadline


def test_a_deadline_counts_down_and_expires():
    soon = Deadline.after(0.2)
    left = soon.remaining()
    assert left is not None and 0.0 < left <= 0.2 and not soon.expired() and soon.limited
    time.sleep(0.25)
    assert soon.expired() and soon.remaining() == 0.0  # never negative: what Event.wait and Future.result take


def test_no_deadline_waits_as_long_as_it_takes():
    assert NO_DEADLINE.remaining() is None and not NO_DEADLINE.expired() and not NO_DEADLINE.limited
    assert NO_DEADLINE == Deadline() and math.isinf(NO_DEADLINE.at)


def test_within_takes_the_earlier_of_the_two():
    late = Deadline.after(60)
    step = late.within(1.0)
    assert step.at < late.at and step.remaining() is not None and step.remaining() <= 1.0
    early = Deadline.after(0.5)
    assert early.within(60) == early  # the request's deadline comes first
    assert NO_DEADLINE.within(2.0).limited  # a step's own time-out still bounds it
