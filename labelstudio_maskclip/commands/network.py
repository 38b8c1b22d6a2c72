"""Which addresses Label Studio 1.23 refuses to call, and the Label Studio settings that let it call a backend.

Label Studio checks the address of every URL it calls for a user (server-side request forgery protection):

- ML backend URLs, on *Connect Model* and on every call after it, when ``ML_BLOCK_LOCAL_IP`` is on;
- webhooks (when saved and when sent, the one it creates for an ML backend included), task imports from a
  URL, S3 endpoints and media fetched for exports, when ``SSRF_PROTECTION_ENABLED`` is on.

An address is refused when it lies in one of the blocked ranges: Label Studio's built-in list of reserved
ranges (loopback, the private networks, link-local, ...) when ``USE_DEFAULT_BANNED_SUBNETS`` is on, plus the
comma-separated ``USER_ADDITIONAL_BANNED_SUBNETS``. All three switches default to on, so a stock Label
Studio answers *Connect Model* with ``http://127.0.0.1:9090`` by ``403 URL resolves to a reserved network
address (block: 127.0.0.0/8)``, and the same for a backend on a private network (docker compose included).

The narrowest change that lets it call a backend on such an address keeps both checks on and replaces the
built-in list by the same list less the backend's address (:func:`label_studio_environment`): Label Studio
may then call that address, from every feature above, and nothing else that it blocked before.

Pure: no I/O except :func:`resolve` (DNS). :data:`LABEL_STUDIO_SETTINGS` is the one place the documented
setups' settings are written down: ``docker/docker-compose.yml`` and the end-to-end tests use it (a test
checks the compose file against it).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_BANNED_SUBNETS",
    "BLOCK_MESSAGE",
    "SWITCHES",
    "blocking_subnet",
    "banned_subnets_except",
    "label_studio_environment",
    "resolve",
    "LOOPBACK",
    "COMPOSE_SUBNET",
    "COMPOSE_BACKEND_ADDRESS",
    "LABEL_STUDIO_SETTINGS",
]

#: The ranges Label Studio 1.23 blocks by default (``core/utils/io.py``, ``validate_ip``), in its order.
DEFAULT_BANNED_SUBNETS: tuple[str, ...] = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "233.252.0.0/24", "240.0.0.0/4", "255.255.255.255/32",
    "::/128", "::1/128", "::ffff:0:0/96", "::ffff:0:0:0/96", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64",
    "2001:0000::/32", "2001:20::/28", "2001:db8::/32", "2002::/16", "fc00::/7", "fe80::/10", "ff00::/8",
)  # fmt: skip

#: What Label Studio answers (403) for a refused URL; ``{subnet}`` is the first blocked range that matched.
BLOCK_MESSAGE = "URL resolves to a reserved network address (block: {subnet})"

#: Label Studio's switches, all on by default, and what each one guards.
SWITCHES: dict[str, str] = {
    "ML_BLOCK_LOCAL_IP": "ML backend URLs (Connect Model, /health, /setup, /predict, training)",
    "SSRF_PROTECTION_ENABLED": "webhooks (the ML backend's included), task imports from URLs, S3 endpoints, "
    "media downloads during exports",
    "USE_DEFAULT_BANNED_SUBNETS": "whether the built-in list of reserved ranges is blocked (both checks above)",
}

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network(value: str) -> _Network:
    """``"10.0.0.5"`` -> ``10.0.0.5/32``; ``"10.0.0.0/8"`` -> itself (host bits must be zero)."""
    return ipaddress.ip_network(value.strip(), strict=True)


def blocking_subnet(ip: str, banned: Iterable[str] = DEFAULT_BANNED_SUBNETS) -> str | None:
    """The first range of ``banned`` that contains ``ip`` (as Label Studio names it), or None."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    for subnet in banned:
        network = ipaddress.ip_network(subnet)
        if network.version == address.version and address in network:
            return subnet
    return None


def banned_subnets_except(allowed: Iterable[str], banned: Iterable[str] = DEFAULT_BANNED_SUBNETS) -> tuple[str, ...]:
    """``banned`` with the ``allowed`` addresses or networks cut out: a range that contains an allowed one is
    replaced by the pieces around it, a range inside an allowed one is dropped, the rest kept in order.

    Every address blocked by ``banned`` stays blocked by the result unless it is in ``allowed``.
    """
    keep = [_network(a) for a in allowed]
    out: list[_Network] = []
    for subnet in banned:
        pieces = [ipaddress.ip_network(subnet)]
        for hole in keep:
            next_pieces: list[_Network] = []
            for piece in pieces:
                if piece.version != hole.version or not piece.overlaps(hole):
                    next_pieces.append(piece)
                elif hole.supernet_of(piece):  # type: ignore[arg-type]  # same version: checked above
                    continue
                else:
                    next_pieces.extend(sorted(piece.address_exclude(hole)))  # type: ignore[arg-type]
            pieces = next_pieces
        out.extend(pieces)
    return tuple(str(n) for n in out)


def label_studio_environment(allowed: Iterable[str]) -> dict[str, str]:
    """The Label Studio environment that lets it call ``allowed`` (addresses or networks) and keeps every
    other default block: ``ML_BLOCK_LOCAL_IP`` and ``SSRF_PROTECTION_ENABLED`` stay on, the built-in list
    is replaced by the same list less ``allowed``. Empty ``allowed``: no change, an empty mapping."""
    allowed = list(allowed)
    if not allowed:
        return {}
    return {
        "USE_DEFAULT_BANNED_SUBNETS": "false",
        "USER_ADDITIONAL_BANNED_SUBNETS": ",".join(banned_subnets_except(allowed)),
    }


def resolve(url: str) -> tuple[str, list[str]]:
    """(host, its IP addresses) of a URL, as this machine resolves it (Label Studio checks every address
    its own resolver returns; from another machine or container the answer may differ).

    Raises ValueError for a URL without a host, OSError when the host does not resolve.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL with a host")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    infos = socket.getaddrinfo(parts.hostname, port, 0, socket.SOCK_STREAM)
    return parts.hostname, list(dict.fromkeys(str(info[4][0]) for info in infos))


# --- the documented setups -----------------------------------------------------------------------------

#: Same machine: the backend on loopback (``http://127.0.0.1:9090``; ``localhost`` may also resolve to ::1).
LOOPBACK = ("127.0.0.0/8", "::1/128")
#: docker compose: the compose network and the backend's fixed address on it (docker/docker-compose.yml).
COMPOSE_SUBNET = "192.168.239.0/24"
COMPOSE_BACKEND_ADDRESS = "192.168.239.10"

#: Label Studio's environment per documented setup (README "Connect it to Label Studio"). A backend on a
#: public address needs nothing; separate hosts on a private network: ``label_studio_environment([ip])``.
LABEL_STUDIO_SETTINGS: Mapping[str, Mapping[str, str]] = {
    "same machine": label_studio_environment(LOOPBACK),
    "docker compose": label_studio_environment([COMPOSE_BACKEND_ADDRESS]),
    "public address": {},
}
