"""Who may read ``GET /metrics`` on the web app: with ``BILLING_METRICS_TOKEN``, whoever sends it as a
bearer token; without one, only a scraper on the same machine talking to the app directly."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from billing.settings import ConfigError, load
from tests.conftest import environ_applied

TOKEN = "a-metrics-token-0123456789"
LOOPBACK = ("127.0.0.1", 40000)
ELSEWHERE = ("203.0.113.9", 40000)


def _client(peer):
    from billing.web.app import create_app

    return TestClient(create_app(), client=peer)


def test_with_a_token_only_the_token_opens_it(app_env):
    with environ_applied({"BILLING_METRICS_TOKEN": TOKEN}):
        for peer in (LOOPBACK, ELSEWHERE):
            with _client(peer) as c:
                assert c.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
                for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                                {"Authorization": f"Bearer {TOKEN}x"}):
                    resp = c.get("/metrics", headers=headers)
                    assert resp.status_code == 401, headers
                    assert resp.headers["www-authenticate"] == "Bearer"
                    assert resp.json()["error"]["code"] == "unauthorized"
                    assert "billing_" not in resp.text


def test_without_a_token_only_a_local_scraper_reads_it(app_env):
    with _client(LOOPBACK) as c:
        resp = c.get("/metrics")
        assert resp.status_code == 200 and "billing_http_requests_total" in resp.text
        # Through a reverse proxy on the same machine everybody would look local: refused.
        assert c.get("/metrics", headers={"X-Forwarded-For": "127.0.0.1"}).status_code == 404
        assert c.get("/metrics", headers={"Forwarded": "for=127.0.0.1"}).status_code == 404
    with _client(ELSEWHERE) as c:
        resp = c.get("/metrics")
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize("value", ["short", "has spaces in it, sixteen+", "tab\there-0123456789"])
def test_a_weak_token_fails_at_start(value, monkeypatch):
    monkeypatch.setenv("BILLING_METRICS_TOKEN", value)
    with pytest.raises(ConfigError, match="BILLING_METRICS_TOKEN"):
        load()
