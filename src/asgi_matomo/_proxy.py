"""Who the visitor is behind reverse proxies, and how much of their IP to keep.

Pure functions: they read header values and return addresses. Proxy headers are
believed only when the direct peer is a configured trusted proxy, because any
client can send `X-Forwarded-For: 1.2.3.4` itself.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

logger = logging.getLogger("asgi_matomo")

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
            network = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError as exc:
            raise ValueError(
                f"trusted_proxies: {item!r} is not an IP address or network (e.g. '10.0.0.0/8')"
            ) from exc
        networks.append(_unmapped_network(network))
    return tuple(networks)


def _unmapped_network(network: IPNetwork) -> IPNetwork:
    """`::ffff:10.0.0.0/104` as `10.0.0.0/8`: addresses are matched unmapped."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.IPv4Network((mapped, network.prefixlen - 96))
    return network


def parse_ip(value: str) -> IPAddress | None:
    """An address from a header token: strips quotes, brackets and ports; None if not an IP.

    An IPv4-mapped IPv6 address (`::ffff:192.0.2.1`) is the IPv4 address it maps:
    the same visitor, whether a dual-stack socket or a proxy wrote it that way.
    """
    token = value.strip().strip('"')
    if token.startswith("["):
        # RFC 7239 quotes IPv6 as "[2001:db8::1]:4711".
        token = token[1 : token.find("]")] if "]" in token else token[1:]
    elif token.count(":") == 1:
        token = token.split(":", 1)[0]  # IPv4 with a port
    try:
        address = ipaddress.ip_address(token)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@lru_cache(maxsize=1024)
def plain_peer(peer: str) -> str:
    """The server's client address with an IPv4-mapped IPv6 one (`::ffff:192.0.2.1`) unmapped.

    A server listening on `::` sees its IPv4 clients so. Only called for text
    with a colon; anything that is no address is returned as it is.
    """
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return str(mapped) if mapped is not None else peer


def is_trusted(address: IPAddress | None, networks: Sequence[IPNetwork]) -> bool:
    if address is None:
        return False
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
    `a, for=6.6.6.6`. A line that does not parse (a quote left open, text
    after a closing quote, a parameter twice in one element) gives no element
    at all: the visitor writes the left of the header, and a malformed left
    part must not shift how the trusted proxies' elements after it are read
    (`_forwarded_chain` then reads what can be read safely from the right).
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


# In place of what could not be read: no address, so the walk from the right stops there.
_BROKEN_HOP = {"for": ""}


def _forwarded_chain(header: str) -> list[dict[str, str]]:
    """The elements of every `Forwarded` field line, in order, for the walk from the right.

    Field lines come separated by a newline (`_headers` joins them so; no server
    lets one into a header value). A quote cannot span two lines, so a proxy
    that adds its own line is read whatever the visitor's line holds. A line
    that does not parse stands for a broken hop, after the elements of its end
    that can be read safely (`_tail_elements`): the walk stops there, and uses
    the good elements the trusted proxies appended to its right.
    """
    if "\n" not in header:
        elements = _forwarded_elements(header)
        return elements if elements else [_BROKEN_HOP, *_tail_elements(header)]
    chain: list[dict[str, str]] = []
    for line in header.split("\n"):
        elements = _forwarded_elements(line)
        chain += elements if elements else [_BROKEN_HOP, *_tail_elements(line)]
    return chain


def _tail_elements(line: str) -> list[dict[str, str]]:
    """The elements at the end of a line that does not parse, read from the right.

    Only after the line's last double quote: a comma there cannot be inside a
    quoted value the proxies wrote, so it separates elements whatever the
    visitor wrote further left (an open quote, say). Before it, a comma may be
    inside a `host="..."` holding a `Host` the visitor chose, and reading from
    the right would let that host choose the address. The text between the
    last quote and the next comma ends some element: never one of its own.
    Elements are taken from the right until one does not parse.
    """
    quote = line.rfind('"')
    parts = line[quote + 1 :].split(",")
    if quote != -1:
        del parts[0]
    elements: list[dict[str, str]] = []
    for part in reversed(parts):
        parsed = _forwarded_elements(part)
        if not parsed:
            break
        elements += parsed
    elements.reverse()
    return elements


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
        elements = [element for element in _forwarded_chain(forwarded) if "for" in element]
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


def hint_untrusted_peer(
    peer: str | None,
    x_forwarded_for: str | None,
    forwarded: str | None,
    forwarded_header: str,
) -> bool:
    """Warn that a peer outside `trusted_proxies` sent forwarding headers; True when warned.

    Its headers are rightly ignored, but if the peer is the app's own proxy,
    every visitor is recorded with the proxy's address, and nothing else would
    say so. The caller asks once per process. Nothing is said when the server
    already put an address of the chain in the scope's `client` (uvicorn's
    `--proxy-headers`): tracking is right then. The address shown is the peer's,
    never one from the headers, and a public one is not shown at all: a peer
    sending such headers itself may be a visitor.
    """
    if x_forwarded_for is not None:
        header = "X-Forwarded-For"
        chain = [parse_ip(item) for item in _items(x_forwarded_for)]
    else:
        header = "Forwarded"
        chain = [parse_ip(e["for"]) for e in _forwarded_chain(forwarded or "") if "for" in e]
    address = parse_ip(peer) if peer is not None else None
    if address is not None and address in chain:
        return False
    if peer is None:
        where, setting = "a unix socket", '"unix"'
    elif address is None or address.is_global:
        where = "a public address (not shown: it may be a visitor's own)"
        setting = '"<your proxy\'s address or network>"'
    else:
        where = setting = f'"{address}"'
    family = "forwarded" if header == "Forwarded" else "x-forwarded-for"
    also = f' and forwarded_header="{family}"' if family != forwarded_header else ""
    logger.warning(
        "asgi_matomo: requests come with an %s header from %s, which is not in "
        "trusted_proxies: the header is ignored, so Matomo records that peer as the "
        "visitor of every request it passes on. If it is your reverse proxy, set "
        "trusted_proxies=[%s]%s (said once)",
        header,
        where,
        setting,
        also,
    )
    return True


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
