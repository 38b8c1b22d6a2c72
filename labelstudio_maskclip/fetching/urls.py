"""Task image URLs: one parse for the address guard, the credentials decision and the request.

A URL is parsed once, by the HTTP client's own parser (``requests`` prepares it, ``urllib3`` splits it:
that split is what the connection goes to), into a :class:`Target`. The address policy, the decision to
send Label Studio's credentials and the request itself all use that one :class:`Target`, so they cannot
disagree about the host. URLs that parsers read differently are refused rather than guessed at:
backslashes, whitespace and control characters, credentials before ``@`` in the authority,
percent-encoded hosts and IPv6 zone ids, numeric hosts that are not a plain dotted-quad (``2130706433``,
``0177.0.0.1``, ``0x7f.1``), and any URL whose host, port or scheme ``urllib.parse`` reads otherwise.

Pure apart from DNS resolution (:func:`resolve`).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from requests.models import PreparedRequest
from urllib3.util import parse_url

from .errors import ImageFetchError
from .uris import CLOUD_SCHEMES

__all__ = [
    "CLOUD_SCHEMES",
    "MEDIA_ROUTES",
    "Target",
    "parse_target",
    "is_media_route",
    "is_public_address",
    "resolve",
    "display",
]


#: Label Studio's routes that serve task media, the only paths fetched from Label Studio (with its
#: credentials): uploads, Local Storage files, and the per-task presign endpoint of cloud storages.
MEDIA_ROUTES = ("/data/upload/<file>", "/data/local-files/?d=<path>", "/tasks/<id>/presign/?fileuri=<uri>")

_MEDIA_PATH = re.compile(r"/data/upload/[^?#]+|/data/local-files/?|/tasks/[0-9]+/presign/?")
# Encoded dots, slashes and backslashes in a media path could be decoded by the server into another route.
_ENCODED_SEPARATOR = re.compile(r"%2e|%2f|%5c", re.IGNORECASE)
_SCHEME = re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*):")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)", re.IGNORECASE)
_SECRET_QUERY_KEY = re.compile(r"sig|token|key|credential|auth|secret|password", re.IGNORECASE)
_USERINFO = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*:)?//[^/?#]*@")
_DEFAULT_PORT = {"http": 80, "https": 443}


@dataclass(frozen=True)
class Target:
    """An http(s) URL as the HTTP client requests it.

    ``url`` is the prepared form sent on the wire (``requests`` keeps it unchanged); ``host`` is lowercase,
    IPv6 without brackets; ``port`` is explicit or the scheme's default; ``path`` has dot segments removed.
    """

    url: str
    scheme: str
    host: str
    port: int
    path: str

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port

    @property
    def display(self) -> str:
        return display(self.url)


def parse_target(url: str) -> Target:
    """Parse an absolute http(s) URL the way the HTTP client will, or raise :class:`ImageFetchError`."""
    shown = display(url)

    def refuse(reason: str) -> ImageFetchError:
        return ImageFetchError(f"{shown}: refused, {reason}", url=shown)

    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else ""
    if scheme not in _DEFAULT_PORT:
        raise refuse(f"only http(s) URLs are fetched (scheme {scheme!r})")
    if "\\" in url:
        raise refuse("the URL contains a backslash, which HTTP clients and URL parsers read differently")
    if _CONTROL.search(url):
        raise refuse("the URL contains a control character (tab, newline, ...)")
    rest = url[match.end() :] if match else url
    if not rest.startswith("//"):
        raise refuse("the URL has no host")
    authority = re.split(r"[/?#]", rest[2:], maxsplit=1)[0]
    if "@" in authority:
        raise refuse("credentials in the URL (user:password@host) are not accepted")
    if "%" in authority:
        raise refuse("a percent-encoded host or an IPv6 zone id is not accepted")
    if " " in authority:
        raise refuse("the host contains a space")

    prepared = _prepare(url, refuse)
    if _prepare(prepared, refuse) != prepared:
        raise refuse("the URL does not have one stable form")

    try:
        wire = parse_url(prepared)
        split, original = urlsplit(prepared), urlsplit(url)
        readings = {
            (str(wire.scheme).lower(), (wire.host or "").strip("[]").lower(), wire.port),
            (split.scheme.lower(), (split.hostname or "").lower(), split.port),
        }
        if original.hostname is None or original.hostname.isascii():
            readings.add((original.scheme.lower(), (original.hostname or "").lower(), original.port))
    except ValueError as exc:
        raise refuse(f"the URL cannot be parsed ({_safe_reason(exc)})") from None
    if len(readings) != 1:
        raise refuse("URL parsers disagree about its host, port or scheme")
    scheme, host, port = readings.pop()
    if not host:
        raise refuse("the URL has no host")
    last = host.rstrip(".").rsplit(".", 1)[-1]
    if _NUMERIC_LABEL.fullmatch(last) and not _is_dotted_quad(host):
        raise refuse(f"the numeric host {host!r} is not a plain dotted-quad IPv4 address")
    return Target(prepared, scheme, host, port or _DEFAULT_PORT[scheme], wire.path or "/")


def is_media_route(target: Target, base_path: str = "") -> bool:
    """``target`` is one of Label Studio's :data:`MEDIA_ROUTES` (under ``base_path``, where Label Studio
    is served below a path prefix)."""
    path = target.path
    if base_path:
        if not path.startswith(base_path + "/"):
            return False
        path = path[len(base_path) :]
    return bool(_MEDIA_PATH.fullmatch(path)) and not _ENCODED_SEPARATOR.search(path)


def is_public_address(ip: str) -> bool:
    """True for a globally routable unicast address (IPv4 or IPv6).

    False for private, loopback, link-local, multicast, reserved, unspecified, shared (100.64/10) and
    documentation ranges, and for IPv6 forms that embed one (IPv4-mapped, 6to4, Teredo).
    """
    address = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and not is_public_address(str(embedded)):
            return False
    if (
        address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
    ):
        return False
    return address.is_global


def resolve(target: Target) -> list[str]:
    """Every address ``target``'s host resolves to (sorted, unique)."""
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageFetchError(
            f"{target.display}: cannot resolve host {target.host!r} ({getattr(exc, 'strerror', None) or _safe_reason(exc)})",
            url=target.display,
        ) from None
    return sorted({str(info[4][0]) for info in infos})


def display(url: str) -> str:
    """The URL for messages and logs: data: URIs shortened, credentials before ``@`` and secret-looking
    query values (signatures, tokens) redacted."""
    if url[:5].lower() == "data:":
        return f"{url[:32]}... ({len(url)} characters)"
    url = _USERINFO.sub(lambda m: (m.group(1) or "") + "//REDACTED@", url)
    base, question, query = url.partition("?")
    if not question:
        return url
    pairs = []
    for pair in query.split("&"):
        key, equals, value = pair.partition("=")
        pairs.append(f"{key}=REDACTED" if equals and _SECRET_QUERY_KEY.search(key) else pair)
    return base + "?" + "&".join(pairs)


def _prepare(url: str, refuse) -> str:
    request = PreparedRequest()
    try:
        request.prepare_url(url, None)
    except (requests.RequestException, ValueError, UnicodeError) as exc:
        raise refuse(f"not a valid URL ({type(exc).__name__})") from None
    return str(request.url)


def _is_dotted_quad(host: str) -> bool:
    try:
        return str(ipaddress.IPv4Address(host)) == host
    except ValueError:
        return False


def _safe_reason(exc: Exception) -> str:
    """An exception's type and message without the URL text it may quote."""
    return type(exc).__name__
