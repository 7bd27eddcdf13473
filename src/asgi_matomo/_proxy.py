"""Who the visitor is behind reverse proxies, and how much of their IP to keep.

Pure functions: they read header values and return addresses. Proxy headers are
believed only when the direct peer is a configured trusted proxy, because any
client can send `X-Forwarded-For: 1.2.3.4` itself.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Matomo's privacy setting masks 1, 2 or 3 bytes of an IPv4 address. For IPv6 the
# same setting here masks 64, 80 or 104 bits: at least the whole interface
# identifier, growing with the setting (our choice; Matomo's own IPv6 masking is
# not documented in the tracking API).
_IPV6_MASK_BITS = {0: 0, 1: 64, 2: 80, 3: 104}


@dataclass(frozen=True, slots=True)
class Forwarded:
    """What trusted proxies told us about the original request."""

    client: str | None = None
    proto: str | None = None
    host: str | None = None


def parse_trusted_proxies(value: Iterable[str] | str | None) -> tuple[IPNetwork, ...]:
    """Turn the `trusted_proxies` option into networks; ValueError names the option."""
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    networks: list[IPNetwork] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"trusted_proxies must contain strings, got {item!r}")
        try:
            networks.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(
                f"trusted_proxies: {item!r} is not an IP address or network (e.g. '10.0.0.0/8')"
            ) from exc
    return tuple(networks)


def parse_ip(value: str) -> IPAddress | None:
    """An address from a header token: strips quotes, brackets and ports; None if not an IP."""
    token = value.strip().strip('"')
    if token.startswith("["):
        # RFC 7239 quotes IPv6 as "[2001:db8::1]:4711".
        token = token[1 : token.find("]")] if "]" in token else token[1:]
    elif token.count(":") == 1:
        token = token.split(":", 1)[0]  # IPv4 with a port
    try:
        return ipaddress.ip_address(token)
    except ValueError:
        return None


def is_trusted(address: IPAddress | None, networks: Sequence[IPNetwork]) -> bool:
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


def _forwarded_elements(header: str) -> list[dict[str, str]]:
    """RFC 7239 `Forwarded`: elements by comma, pairs by semicolon."""
    elements: list[dict[str, str]] = []
    for element in header.split(","):
        pairs: dict[str, str] = {}
        for pair in element.split(";"):
            name, sep, value = pair.partition("=")
            if sep:
                pairs[name.strip().lower()] = value.strip().strip('"')
        elements.append(pairs)
    return elements


def _rightmost_untrusted(chain: Sequence[str], networks: Sequence[IPNetwork]) -> str | None:
    """Walk the chain from the proxy nearest to us; the first hop we don't trust is the client.

    Everything left of it was written by parties we have no reason to believe.
    """
    last_valid: IPAddress | None = None
    for token in reversed(chain):
        address = parse_ip(token)
        if address is None:
            # "unknown" or an obfuscated identifier: the chain is broken here.
            break
        last_valid = address
        if not is_trusted(address, networks):
            return str(address)
    return None if last_valid is None else str(last_valid)


def resolve_forwarded(
    *,
    forwarded: str | None,
    x_forwarded_for: str | None,
    x_forwarded_proto: str | None,
    x_forwarded_host: str | None,
    networks: Sequence[IPNetwork],
) -> Forwarded:
    """The original client, scheme and host, given headers a trusted peer passed on."""
    if forwarded:
        elements = _forwarded_elements(forwarded)
        chain = [element["for"] for element in elements if "for" in element]
        protos = [element["proto"] for element in elements if "proto" in element]
        hosts = [element["host"] for element in elements if "host" in element]
        return Forwarded(
            client=_rightmost_untrusted(chain, networks) if chain else None,
            # The first proxy in the chain is the one the visitor talked to.
            proto=protos[0].lower() if protos else None,
            host=hosts[0] if hosts else None,
        )
    chain = [item for item in (x_forwarded_for or "").split(",") if item.strip()]
    return Forwarded(
        client=_rightmost_untrusted(chain, networks) if chain else None,
        proto=_first_item(x_forwarded_proto, lower=True),
        host=_first_item(x_forwarded_host, lower=False),
    )


def _first_item(value: str | None, *, lower: bool) -> str | None:
    if not value:
        return None
    item = value.split(",", 1)[0].strip()
    if not item:
        return None
    return item.lower() if lower else item


def anonymize_ip(value: str, mask_bytes: int) -> str:
    """Zero the last bytes of an address the way Matomo's IP anonymisation does."""
    if mask_bytes == 0:
        return value
    address = parse_ip(value)
    if address is None:
        return value
    if isinstance(address, ipaddress.IPv4Address):
        bits = 8 * mask_bytes
        packed = int(address) >> bits << bits
        return str(ipaddress.IPv4Address(packed))
    bits = _IPV6_MASK_BITS[mask_bytes]
    return str(ipaddress.IPv6Address(int(address) >> bits << bits))
