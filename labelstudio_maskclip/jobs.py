"""Starting detached jobs (the trainer, the re-scoring): a child process in its own session, its output in
``MODEL_DIR/runs/<name>-<timestamp>-<pid>.log``, its settings passed through the environment. Never waits for
the child; takes milliseconds, so a request thread may call it.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .settings import ENV, Settings

__all__ = ["Started", "settings_env", "start_detached"]


@dataclasses.dataclass(frozen=True)
class Started:
    """A started job: its process and the log its output goes to."""

    process: subprocess.Popen
    log_path: Path


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes ``Settings.from_env()`` in the child equal ``settings``."""
    env = dict(os.environ)
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        env[ENV[f.name]] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return env


def start_detached(
    settings: Settings, name: str, module: str, args: Sequence[str], *, pass_fds: Sequence[int] = ()
) -> Started:
    """Start ``python -m <module> <args>`` detached (own session, stdin closed), with ``settings`` in its
    environment and its output appended to ``MODEL_DIR/runs/<name>-<timestamp>-<pid>.log``."""
    runs = Path(settings.model_dir) / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    log_path = runs / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, pass_fds=tuple(pass_fds), env=settings_env(settings), cwd=os.getcwd(),
        )  # fmt: skip
    return Started(proc, log_path)
