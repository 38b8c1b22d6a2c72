"""Label Studio's address block, modelled: which ranges it refuses, and the settings that allow one address."""

from __future__ import annotations

import ipaddress
import random

import pytest

from labelstudio_maskclip.commands.network import (
    BLOCK_MESSAGE,
    COMPOSE_BACKEND_ADDRESS,
    COMPOSE_SUBNET,
    DEFAULT_BANNED_SUBNETS,
    LABEL_STUDIO_SETTINGS,
    LOOPBACK,
    banned_subnets_except,
    blocking_subnet,
    label_studio_environment,
    resolve,
)


def _blocked(ip: str, env: dict[str, str]) -> str | None:
    """What Label Studio 1.23's validate_ip does with these settings: the first banned range holding ip."""
    use_default = env.get("USE_DEFAULT_BANNED_SUBNETS", "true").lower() not in ("false", "0", "no", "off")
    extra = [s for s in env.get("USER_ADDITIONAL_BANNED_SUBNETS", "").split(",") if s]
    return blocking_subnet(ip, [*(DEFAULT_BANNED_SUBNETS if use_default else ()), *extra])


@pytest.mark.parametrize(
    ("ip", "subnet"),
    [("127.0.0.1", "127.0.0.0/8"), ("172.18.0.3", "172.16.0.0/12"), ("192.168.1.20", "192.168.0.0/16"),
     ("10.2.3.4", "10.0.0.0/8"), ("169.254.169.254", "169.254.0.0/16"), ("::1", "::1/128"), ("fd00::5", "fc00::/7"),
     ("93.184.216.34", None), ("2606:4700::1111", None)],
)  # fmt: skip
def test_default_block_names_the_range_like_label_studio(ip, subnet):
    assert blocking_subnet(ip) == subnet
    if subnet:
        assert BLOCK_MESSAGE.format(subnet=subnet) == f"URL resolves to a reserved network address (block: {subnet})"


def test_allowing_one_address_unblocks_it_and_nothing_else():
    env = label_studio_environment(["10.20.30.40"])
    assert env["USE_DEFAULT_BANNED_SUBNETS"] == "false"
    assert _blocked("10.20.30.40", env) is None
    for neighbour in ("10.20.30.39", "10.20.30.41", "10.0.0.1", "10.255.255.255"):
        assert _blocked(neighbour, env), neighbour
    for other in ("127.0.0.1", "192.168.0.1", "169.254.169.254", "::1"):
        assert _blocked(other, env), other
    assert _blocked("93.184.216.34", env) is None


def test_the_cut_list_blocks_exactly_the_default_minus_the_allowed_on_random_addresses():
    rng = random.Random(0)
    allowed = ["127.0.0.0/8", "::1/128", "192.168.239.10", "100.64.7.0/24"]
    env = label_studio_environment(allowed)
    holes = [ipaddress.ip_network(a) for a in allowed]
    samples = [str(ipaddress.ip_address(rng.getrandbits(32))) for _ in range(3000)]
    # plus addresses near every range edge, where cutting mistakes show
    for subnet in [*DEFAULT_BANNED_SUBNETS, *allowed]:
        net = ipaddress.ip_network(subnet)
        for ip in (net.network_address, net.broadcast_address):
            for delta in (-1, 0, 1):
                try:
                    samples.append(str(ip + delta))
                except ipaddress.AddressValueError:
                    pass
    for ip in samples:
        address = ipaddress.ip_address(ip)
        expected = blocking_subnet(ip) is not None and not any(
            h.version == address.version and address in h for h in holes
        )
        assert (_blocked(ip, env) is not None) == expected, ip


def test_a_range_inside_an_allowed_one_is_dropped_and_unrelated_ranges_keep_their_order():
    cut = banned_subnets_except(["127.0.0.0/8"])
    assert "127.0.0.0/8" not in cut and cut == tuple(s for s in banned_subnets_except([]) if s != "127.0.0.0/8")
    assert banned_subnets_except(["::/0"]) == tuple(s for s in DEFAULT_BANNED_SUBNETS if ":" not in s)


def test_nothing_to_allow_changes_nothing():
    assert label_studio_environment([]) == {}
    assert LABEL_STUDIO_SETTINGS["public address"] == {}


def test_documented_setups():
    same = LABEL_STUDIO_SETTINGS["same machine"]
    for ip in ("127.0.0.1", "::1"):
        assert _blocked(ip, same) is None
    assert _blocked("10.0.0.1", same) and _blocked("172.17.0.2", same)
    compose = LABEL_STUDIO_SETTINGS["docker compose"]
    assert ipaddress.ip_address(COMPOSE_BACKEND_ADDRESS) in ipaddress.ip_network(COMPOSE_SUBNET)
    assert _blocked(COMPOSE_BACKEND_ADDRESS, compose) is None
    assert _blocked("192.168.239.1", compose) and _blocked("127.0.0.1", compose)  # the docker host, loopback
    assert set(LOOPBACK) == {"127.0.0.0/8", "::1/128"}
    # both keep Label Studio's two checks on: only the list of ranges changes
    for env in (same, compose):
        assert set(env) == {"USE_DEFAULT_BANNED_SUBNETS", "USER_ADDITIONAL_BANNED_SUBNETS"}
        assert " " not in env["USER_ADDITIONAL_BANNED_SUBNETS"]  # Label Studio splits on "," and does not strip


def test_resolve():
    assert resolve("http://127.0.0.1:9090/x") == ("127.0.0.1", ["127.0.0.1"])
    with pytest.raises(ValueError):
        resolve("ftp://example.com")
