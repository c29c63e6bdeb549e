"""Who is on the other end of a request: the one place the client's address is read.

``X-Forwarded-For`` is a claim anyone can send. It is believed only from the reverse proxies named in
``BILLING_TRUSTED_PROXIES`` (addresses or CIDR blocks; default none), and then only as far as the
chain is trusted: each trusted proxy appends the address it received the request from, so the list
is read from the right, skipping trusted hops, and the first untrusted one is the client (the
"rightmost untrusted hop"; entries to its left were written by the client itself and mean nothing).
See MDN "X-Forwarded-For", section "Selecting an IP address".

``billing web`` runs uvicorn without its own proxy-header handling, so ``request.client`` is the TCP
peer and this module alone decides.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from starlette.requests import Request

from billing.settings import get_settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

UNKNOWN = "unknown"


@functools.lru_cache(maxsize=8)
def parse_networks(value: str) -> tuple[Network, ...]:
    """``"10.0.0.0/8, 192.0.2.7"`` → networks (a bare address is a /32 or /128)."""
    return tuple(ipaddress.ip_network(e.strip(), strict=False) for e in value.split(",") if e.strip())


def _address(value: str) -> IPAddress | None:
    """One hop as written by a proxy: ``192.0.2.1``, ``192.0.2.1:5678``, ``[2001:db8::1]:443``, ``2001:db8::1``."""
    value = value.strip().strip('"')
    if value.startswith("["):
        value = value[1:].split("]", 1)[0]
    elif value.count(":") == 1:
        value = value.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def _trusted(address: IPAddress, networks: Iterable[Network]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


def resolve(peer: str | None, forwarded_for: Iterable[str], trusted: tuple[Network, ...]) -> str:
    """The client's address from the TCP peer and the ``X-Forwarded-For`` header values, in order.

    An unparsable hop inside the trusted part of the chain stops the walk at the last trusted proxy:
    nothing written before it can be attributed to anyone.
    """
    current = _address(peer or "")
    if current is None:
        return peer or UNKNOWN
    if not trusted or not _trusted(current, trusted):
        return str(current)
    hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break
        current = address
        if not _trusted(current, trusted):
            break
    return str(current)


def client_address(request: Request) -> str:
    """The address a request came from, as far as ``BILLING_TRUSTED_PROXIES`` lets us know it."""
    peer = request.client.host if request.client else None
    trusted = parse_networks(get_settings().trusted_proxies)
    return resolve(peer, request.headers.getlist("x-forwarded-for"), trusted)
