"""The container's health check: ``python -m labelstudio_maskclip.serving.healthcheck [--url URL]``.

Asks the backend's ``/health`` (default ``http://127.0.0.1:9090/health``) the way Label Studio does: with
the basic-auth credentials when ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS`` are set (read from the
environment through :class:`~labelstudio_maskclip.settings.Settings`, never from the command line, so they
do not show in the process list). Exit status 0 when it answers 200 with ``"status": "UP"``, else 1, with
one line saying why (never the credentials). Every route needs the credentials when they are configured,
``/health`` included: Label Studio 1.23 sends them on its health probe too.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence

from ..settings import Settings
from .server import basic_auth_header

__all__ = ["check", "main"]

DEFAULT_URL = "http://127.0.0.1:9090/health"


def check(url: str, settings: Settings, timeout: float = 5.0) -> tuple[bool, str]:
    """(healthy, one line saying why) for the backend's health route at ``url``."""
    headers = {}
    if settings.basic_auth_user:
        headers["Authorization"] = basic_auth_header(settings.basic_auth_user, settings.basic_auth_pass)
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310 (a loopback URL we chose)
            body = json.loads(reply.read(65536) or b"{}")
    except urllib.error.HTTPError as e:
        return False, f"{url} -> {e.code}" + (" (check BASIC_AUTH_USER / BASIC_AUTH_PASS)" if e.code == 401 else "")
    except (OSError, ValueError) as e:
        return False, f"{url}: {type(e).__name__}: {e}"
    status = body.get("status") if isinstance(body, dict) else None
    return status == "UP", f"{url} -> 200 status={status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the health route (default {DEFAULT_URL})")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    healthy, why = check(args.url, Settings.from_env(), args.timeout)
    print(why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
