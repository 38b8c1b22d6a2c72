"""Task image URLs: the address policy against server-side request forgery, and their display form.

Pure apart from DNS resolution (:func:`resolve`).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

from .errors import ImageFetchError

__all__ = ["CLOUD_SCHEMES", "is_public_address", "resolve", "origin", "display"]

#: URI schemes of Label Studio's cloud storages, resolved by Label Studio's presign endpoint.
CLOUD_SCHEMES = ("s3", "gs", "gcs", "azure-blob")

_SECRET_QUERY_KEY = re.compile(r"sig|token|key|credential|auth|secret|password", re.IGNORECASE)


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


def resolve(host: str, port: int, url: str) -> list[str]:
    """Every address ``host`` resolves to (sorted, unique)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageFetchError(f"{display(url)}: cannot resolve host {host!r} ({exc})", url=display(url)) from None
    return sorted({str(info[4][0]) for info in infos})


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``url``, the port defaulted from the scheme."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    return scheme, (parts.hostname or "").lower(), port or (443 if scheme == "https" else 80)


def display(url: str) -> str:
    """The URL for messages: data: URIs shortened, secret-looking query values (signatures) redacted."""
    if url[:5].lower() == "data:":
        return f"{url[:32]}... ({len(url)} characters)"
    base, question, query = url.partition("?")
    if not question:
        return url
    pairs = []
    for pair in query.split("&"):
        key, equals, value = pair.partition("=")
        pairs.append(f"{key}=REDACTED" if equals and _SECRET_QUERY_KEY.search(key) else pair)
    return base + "?" + "&".join(pairs)
