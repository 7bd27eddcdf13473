"""Who the visitor is behind reverse proxies, and how much of their IP to keep.

Pure functions: they read header values and return addresses. Proxy headers are
believed only when the direct peer is a configured trusted proxy, because any
client can send `X-Forwarded-For: 1.2.3.4` itself.
"""

from __future__ import annotations

import ipaddress
import re
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


UNIX_SOCKET = "unix"


def parse_trusted_proxies(value: Iterable[str] | str | None) -> tuple[IPNetwork, ...]:
    """Turn the `trusted_proxies` option into networks; ValueError names the option.

    The marker "unix" (a proxy talking to the app over a unix socket, so without
    a peer address) is left to the caller.
    """
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    networks: list[IPNetwork] = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"trusted_proxies must contain strings, got {item!r}")
        if item.strip().lower() == UNIX_SOCKET:
            continue
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


# One `name=value` pair of RFC 7239 and the delimiter after it: `;` (next pair),
# `,` (next element) or the end. A value is a token or a quoted-string, in which
# commas and semicolons are text and a backslash quotes the next character.
_PAIR = re.compile(
    r"""[ \t]*([^=,;"\s]*)[ \t]*"""
    r"""(?:=[ \t]*(?:"((?:[^"\\]|\\.)*)"|([^,;"\s]*)))?"""
    r"""[ \t]*([,;]|\Z)""",
    re.DOTALL,
)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def _forwarded_elements(header: str) -> list[dict[str, str]]:
    """RFC 7239 `Forwarded`: elements by comma, pairs by semicolon, outside quoted-strings.

    `for=2.2.2.2;host="a, for=6.6.6.6"` is one element whose host is
    `a, for=6.6.6.6`. A header that does not parse (a quote left open, text
    after a closing quote, a parameter twice in one element) gives no element
    at all: the visitor writes the left of the header, and a malformed left
    part must not shift how the trusted proxies' elements after it are read.
    """
    elements: list[dict[str, str]] = []
    pairs: dict[str, str] = {}
    index = 0
    while True:
        match = _PAIR.match(header, index)
        if match is None:
            return []
        name, quoted, token, delimiter = match.groups()
        value = _QUOTED_PAIR.sub(r"\1", quoted) if quoted is not None else token
        if name and value is not None:
            key = name.lower()
            if key in pairs:
                return []
            pairs[key] = value
        if delimiter != ";":
            elements.append(pairs)
            if not delimiter:
                return elements
            pairs = {}
        index = match.end()


def _client_hop(chain: Sequence[str], networks: Sequence[IPNetwork]) -> tuple[int, str] | None:
    """Walk the chain from the proxy nearest to us; the first hop we don't trust is the client.

    Returns its position in the chain and its address. Everything left of it was
    written by parties we have no reason to believe.
    """
    found: tuple[int, str] | None = None
    for index in range(len(chain) - 1, -1, -1):
        address = parse_ip(chain[index])
        if address is None:
            # "unknown" or an obfuscated identifier: the chain is broken here.
            break
        found = (index, str(address))
        if not is_trusted(address, networks):
            break
    return found


def _items(value: str | None) -> list[str]:
    return [item.strip() for item in (value or "").split(",")]


def _entry(items: Sequence[str], index: int, chain_length: int) -> str | None:
    """The entry written by the same proxy as the client's hop.

    Appending proxies keep the lists aligned with the address chain; a proxy that
    overwrites leaves one value, set by the trusted proxy nearest to us.
    """
    value = items[index] if len(items) == chain_length else items[-1]
    return value or None


def resolve_forwarded(
    *,
    forwarded: str | None,
    x_forwarded_for: str | None,
    x_forwarded_proto: str | None,
    x_forwarded_host: str | None,
    networks: Sequence[IPNetwork],
) -> Forwarded:
    """The original client, scheme and host, given headers a trusted peer passed on.

    Scheme and host come from the same hop as the client address: what the
    visitor wrote further left is as untrustworthy as an address it wrote.
    """
    if forwarded is not None:
        elements = [element for element in _forwarded_elements(forwarded) if "for" in element]
        hop = _client_hop([element["for"] for element in elements], networks)
        if hop is None:
            return Forwarded()
        element = elements[hop[0]]
        proto = element.get("proto")
        return Forwarded(
            client=hop[1], proto=proto.lower() if proto else None, host=element.get("host")
        )
    chain = [item for item in _items(x_forwarded_for) if item]
    hop = _client_hop(chain, networks)
    # Without an address chain, the scheme and host are the trusted peer's own word.
    index, client = hop if hop is not None else (len(chain) - 1, None)
    proto = _entry(_items(x_forwarded_proto), index, len(chain)) if x_forwarded_proto else None
    host = _entry(_items(x_forwarded_host), index, len(chain)) if x_forwarded_host else None
    return Forwarded(client=client, proto=proto.lower() if proto else None, host=host)


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
