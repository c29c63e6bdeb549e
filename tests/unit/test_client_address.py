"""The client's address: X-Forwarded-For believed only from BILLING_TRUSTED_PROXIES, read from the
right, stopping at the first hop that is not a trusted proxy."""

from __future__ import annotations

import pytest

from billing.settings import ConfigError, load
from billing.web.client import parse_networks, resolve

PROXIES = parse_networks("10.0.0.0/8, 192.0.2.7, 2001:db8::/32")


@pytest.mark.parametrize(("peer", "xff", "trusted", "client"), [
    # Nothing trusted (the default): the header is ignored, even from loopback.
    ("127.0.0.1", ["198.51.100.1"], (), "127.0.0.1"),
    ("203.0.113.5", ["198.51.100.1"], PROXIES, "203.0.113.5"),  # an untrusted peer's header means nothing
    ("10.1.2.3", [], PROXIES, "10.1.2.3"),  # a trusted proxy that sent no header is the client itself
    ("10.1.2.3", ["198.51.100.1"], PROXIES, "198.51.100.1"),
    # The client wrote whatever it liked on the left; the rightmost untrusted hop is the truth.
    ("10.1.2.3", ["1.1.1.1, 198.51.100.1"], PROXIES, "198.51.100.1"),
    ("10.1.2.3", ["1.1.1.1, 198.51.100.1, 192.0.2.7"], PROXIES, "198.51.100.1"),
    ("10.1.2.3", ["1.1.1.1", "198.51.100.1, 10.9.9.9"], PROXIES, "198.51.100.1"),  # several header lines
    ("10.1.2.3", ["10.0.0.2, 10.0.0.1"], PROXIES, "10.0.0.2"),  # all trusted: the farthest one
    ("10.1.2.3", ["198.51.100.1:4711"], PROXIES, "198.51.100.1"),
    ("2001:db8::1", ["[2001:db8:ffff::9]:443, 2a00:1450::1"], PROXIES, "2a00:1450::1"),
    ("::ffff:10.1.2.3", ["198.51.100.1"], PROXIES, "198.51.100.1"),  # IPv4-mapped peer
    ("10.1.2.3", ["1.1.1.1, garbage"], PROXIES, "10.1.2.3"),  # an unreadable hop: stop at the last proxy
    ("10.1.2.3", ["198.51.100.1, unknown, 10.0.0.1"], PROXIES, "10.0.0.1"),
    ("testclient", ["198.51.100.1"], PROXIES, "testclient"),
    (None, ["198.51.100.1"], PROXIES, "unknown"),
])
def test_rightmost_untrusted_hop(peer, xff, trusted, client):
    assert resolve(peer, xff, trusted) == client


def test_the_setting_is_checked_at_start(monkeypatch):
    monkeypatch.setenv("BILLING_TRUSTED_PROXIES", "10.0.0.0/8, proxy.internal")
    with pytest.raises(ConfigError, match=r"BILLING_TRUSTED_PROXIES is invalid: 'proxy\.internal'"):
        load()
    monkeypatch.setenv("BILLING_TRUSTED_PROXIES", " 10.0.0.0/8 ,192.0.2.7 ")
    assert load().trusted_proxies == "10.0.0.0/8,192.0.2.7"
    monkeypatch.delenv("BILLING_TRUSTED_PROXIES")
    assert load().trusted_proxies == ""
