"""The package's errors: one root, two branches, and the HTTP answer each gets.

- :class:`BadInput` (also a ``ValueError``): what was sent cannot be used: a task, a labeling config, an RLE,
  a webhook, a file or an option given on the command line. The server answers 400 with the message and
  keeps serving.
- :class:`Unavailable` (also a ``RuntimeError``): something a request needs is not there now: the model's
  weights, the annotation store, Label Studio, a checkpoint, a free worker. The server answers 503; trying
  again later may work.

Every error class of the package derives from one branch; the server has one handler for all of them
(:func:`~labelstudio_maskclip.serving.server.create_app`), and so has the command line
(:func:`~labelstudio_maskclip.cli.main`: one line, exit status 2). Imports nothing: every layer may use it.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = ["MaskCLIPError", "BadInput", "Unavailable"]


class MaskCLIPError(Exception):
    """The root: an error this package raises on purpose, with the HTTP status that answers it."""

    http_status: ClassVar[int] = 500
    #: what the message is about, put before it in an HTTP answer ("labeling config: ..."); "" for nothing
    subject: ClassVar[str] = ""
    #: seconds after which a client may try again (the ``Retry-After`` header), None for no header
    retry_after: ClassVar[int | None] = None

    def describe(self) -> str:
        """The message of the HTTP answer: the subject, then the error's own text."""
        return f"{self.subject}: {self}" if self.subject else str(self)


class BadInput(MaskCLIPError, ValueError):
    """The input cannot be used (400): the message says what to change."""

    http_status = 400


class Unavailable(MaskCLIPError, RuntimeError):
    """Something needed is not there now (503): the message says what."""

    http_status = 503
