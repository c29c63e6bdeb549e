"""API keys on the JSON API: every ``/api/`` route refuses a request without a live key (401) and a
``read`` key on a write (403), changing nothing; ``billing api-key`` makes, lists and revokes keys.

The routes are walked from the app itself, so a route added later is covered without editing this file.
Requests go through FastAPI's TestClient to the real app, on the real database and the Stripe sandbox;
the CLI runs as the operator runs it, in a subprocess, against the same database.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import subprocess
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, text

from billing import apikeys
from billing.db import unit_of_work
from billing.models import ApiKey, Base
from tests.integration.billing_helpers import api_key_headers
from tests.integration.conftest import billing_command

pytestmark = pytest.mark.usefixtures("clean_db")

KEY_SHAPE = re.compile(r"bk_[A-Za-z0-9_-]{43}")
READS = {"GET", "HEAD", "OPTIONS"}


# --- helpers ---------------------------------------------------------------------------------------

def api_routes(app) -> list[tuple[str, str]]:
    """``(method, path template)`` of every route under ``/api/``, from the app's own route table (an
    included router is walked too: FastAPI keeps those as one entry with the routes inside)."""
    found: list[tuple[str, str]] = []

    def walk(routes) -> None:
        for route in routes:
            if hasattr(route, "effective_candidates"):
                walk(route.effective_candidates())
            elif getattr(route, "methods", None) and route.path.startswith("/api/"):
                found.extend((method, route.path) for method in sorted(route.methods - {"HEAD"}))

    walk(app.routes)
    return sorted(set(found))


def billing(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BILLING_")}
    return subprocess.run([*billing_command(), *args], env={**clean, **env}, capture_output=True, text=True,
                          timeout=60)


def fingerprint() -> dict[str, str]:
    """Every table's content (but the keys', whose last use a request may record), as one digest each."""
    digests = {}
    with unit_of_work() as uow:
        for table in Base.metadata.sorted_tables:
            if table.name == ApiKey.__tablename__:
                continue
            digests[table.name] = uow.session.scalar(text(
                f'SELECT count(*) || \':\' || md5(coalesce(string_agg(t::text, \'|\' ORDER BY t::text), \'\')) '
                f'FROM "{table.name}" t'))
    return digests


def assert_unauthorized(resp, what: str) -> None:
    assert resp.status_code == 401, f"{what}: {resp.status_code} {resp.text}"
    assert resp.json() == {"error": {"code": "unauthorized", "message": resp.json()["error"]["message"]}}, what
    assert isinstance(resp.json()["error"]["message"], str) and resp.json()["error"]["message"]
    assert resp.headers.get("www-authenticate") == "Bearer", what


def key_of(headers: dict[str, str]) -> str:
    return headers["Authorization"].removeprefix("Bearer ")


@pytest.fixture
def app(app_env):
    from billing.web.app import create_app

    return create_app()


@pytest.fixture
def anonymous(app):
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def world(anonymous):
    """A customer with a saved card and an active subscription, made with a write key: the ids every
    route's path is filled with, so each request names something that exists."""
    write = api_key_headers("write")
    customer = anonymous.post("/api/customers", json={"email": "ada@example.com", "name": "Ada"}, headers=write)
    assert customer.status_code == 201, customer.text
    cid = customer.json()["id"]
    setup = anonymous.post(f"/api/customers/{cid}/card-setups", json={"payment_method": "pm_card_visa"},
                           headers=write)
    assert setup.status_code == 201 and setup.json()["status"] == "succeeded", setup.text
    sub = anonymous.post("/api/subscriptions", headers=write,
                         json={"customer_id": cid, "amount": 1999, "currency": "eur", "interval": "month"})
    assert sub.status_code == 201, sub.text
    return {"customer_id": cid, "subscription_id": sub.json()["id"],
            "setup_intent_id": setup.json()["setup_intent_id"]}


def fill(path: str, world: dict) -> str:
    return re.sub(r"\{(\w+)(?::\w+)?\}", lambda m: str(world.get(m.group(1), 1)), path)


def body_for(method: str, path: str, world: dict) -> dict | None:
    """A body the route would accept from a write key (so a refusal is the key's doing, not the body's)."""
    if method in READS:
        return None
    bodies = {
        "/api/customers": {"email": "mallory@example.com", "name": "Mallory"},
        "/api/customers/{customer_id}/card-setups": {"payment_method": "pm_card_mastercard"},
        "/api/customers/{customer_id}/payment-methods/import": {"payment_method": "pm_card_visa",
                                                               "saved_at": "2019-06-01T10:00:00"},
        "/api/subscriptions": {"customer_id": world["customer_id"], "amount": 99_999_999, "currency": "eur",
                               "interval": "day"},
    }
    return bodies.get(path, {})


# --- the matrix --------------------------------------------------------------------------------------

def test_the_route_walk_finds_every_api_route(app):
    routes = api_routes(app)
    for route in [("POST", "/api/customers"), ("POST", "/api/customers/{customer_id}/card-setups"),
                  ("GET", "/api/card-setups/{setup_intent_id}"),
                  ("POST", "/api/customers/{customer_id}/payment-methods/import"),
                  ("POST", "/api/subscriptions"), ("GET", "/api/subscriptions/{subscription_id}"),
                  ("POST", "/api/subscriptions/{subscription_id}/cancel")]:
        assert route in routes


def test_every_api_route_refuses_a_missing_malformed_wrong_or_revoked_key(app, anonymous, world, sandbox):
    real = key_of(api_key_headers("write"))
    revoked = api_key_headers("write")
    revoked_name = next(k.name for k in apikeys.list_keys() if k.prefix == key_of(revoked)[:10])
    apikeys.revoke(revoked_name)
    cases = {
        "no header": {},
        "another scheme": {"Authorization": "Basic " + "YWRhOnNlY3JldA=="},
        "Bearer without a key": {"Authorization": "Bearer"},
        "the key without Bearer": {"Authorization": real},
        "Bearer, key and more": {"Authorization": f"Bearer {real} {real}"},
        "Token scheme": {"Authorization": f"Token {real}"},
        "an unknown key": {"Authorization": f"Bearer bk_{secrets.token_urlsafe(32)}"},
        "one character off": {"Authorization": f"Bearer {real[:-1]}{'A' if real[-1] != 'A' else 'B'}"},
        "not a key at all": {"Authorization": "Bearer x" * 2000},
        "a Stripe key": {"Authorization": "Bearer sk_test_123"},
        "a revoked key": revoked,
    }
    before, stripe_calls = fingerprint(), sandbox.control.requests()["total"]
    checked = 0
    for method, path in api_routes(app):
        url = fill(path, world)
        for what, headers in cases.items():
            resp = anonymous.request(method, url, headers=headers, json=body_for(method, path, world))
            assert_unauthorized(resp, f"{method} {path} with {what}")
            checked += 1
        if method not in READS:
            # Refused before the body is read: malformed JSON from a stranger is still a 401.
            resp = anonymous.request(method, url, content=b"{not json", headers={"Content-Type": "application/json"})
            assert_unauthorized(resp, f"{method} {path} with malformed JSON and no key")
    assert checked >= 7 * len(cases)
    assert fingerprint() == before
    assert sandbox.control.requests()["total"] == stripe_calls  # nothing reached Stripe either


def test_a_read_key_gets_403_on_every_write_and_nothing_changes(app, anonymous, world, sandbox):
    read = api_key_headers("read")
    before, stripe_calls = fingerprint(), sandbox.control.requests()["total"]
    writes = [(m, p) for m, p in api_routes(app) if m not in READS]
    assert len(writes) >= 5
    for method, path in writes:
        resp = anonymous.request(method, fill(path, world), headers=read, json=body_for(method, path, world))
        assert resp.status_code == 403, f"{method} {path}: {resp.status_code} {resp.text}"
        assert resp.json()["error"]["code"] == "forbidden" and resp.json()["error"]["message"]
    assert fingerprint() == before
    assert sandbox.control.requests()["total"] == stripe_calls
    # The same requests with a write key do change things: the 403s above were the key's doing.
    sub = anonymous.post(fill("/api/subscriptions/{subscription_id}/cancel", world), headers=api_key_headers())
    assert sub.status_code == 200 and sub.json()["status"] == "canceled"


def test_a_read_key_reads_every_read_route(app, anonymous, world):
    read = api_key_headers("read")
    reads = [(m, p) for m, p in api_routes(app) if m in READS]
    assert len(reads) >= 2
    for method, path in reads:
        resp = anonymous.request(method, fill(path, world), headers=read)
        assert resp.status_code == 200, f"{method} {path}: {resp.status_code} {resp.text}"
        if "{" in path:  # and something that does not exist is a plain 404, not a refusal
            missing = anonymous.request(method, fill(path, {}).replace("/1", "/987654"), headers=read)
            assert missing.status_code == 404, f"{method} {path}: {missing.status_code} {missing.text}"
    got = anonymous.get(fill("/api/subscriptions/{subscription_id}", world), headers=read).json()
    assert got["id"] == world["subscription_id"] and got["status"] == "active"


def test_customer_pages_webhook_and_health_stay_public(anonymous):
    """Their token or signature is their lock: no key is asked for (whatever else they answer here)."""
    assert anonymous.get("/healthz").status_code == 200
    answers = [anonymous.get("/setup/not-a-real-token"), anonymous.get("/recover/not-a-real-token"),
               anonymous.post("/webhooks/stripe", content=b"{}", headers={"Stripe-Signature": "t=1,v1=00"})]
    for resp in answers:
        assert resp.status_code not in (401, 403) and "www-authenticate" not in resp.headers, resp.url


def test_openapi_declares_the_bearer_scheme_on_api_operations_only(app):
    spec = app.openapi()
    schemes = spec["components"]["securitySchemes"]
    [name] = [n for n, s in schemes.items() if s.get("type") == "http" and s.get("scheme") == "bearer"]
    api_ops = [(p, m, op) for p, ops in spec["paths"].items() for m, op in ops.items() if p.startswith("/api/")]
    assert len(api_ops) >= 7
    for path, method, op in api_ops:
        assert {name: []} in op.get("security", []), f"{method} {path}"
        assert {"401", "403"} <= set(op["responses"]), f"{method} {path}"
    public = [(p, m, op) for p, ops in spec["paths"].items() for m, op in ops.items()
              if p.startswith(("/setup/", "/recover/", "/webhooks/")) or p == "/healthz"]
    assert public
    for path, method, op in public:
        assert not op.get("security"), f"{method} {path} should be public"


# --- keys: verification, last use, revocation ----------------------------------------------------------

def test_revoking_with_the_cli_refuses_the_next_request_of_a_running_app(app, base_env, world):
    headers = api_key_headers("read")
    name = next(k.name for k in apikeys.list_keys() if k.prefix == key_of(headers)[:10])
    url = fill("/api/subscriptions/{subscription_id}", world)
    with TestClient(app, raise_server_exceptions=False, headers=headers) as running:
        assert running.get(url).status_code == 200
        result = billing("api-key", "revoke", name, env=base_env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"revoked API key {name!r}"
        assert_unauthorized(running.get(url), "a key revoked a moment ago")
    again = billing("api-key", "revoke", name, env=base_env)  # revoking twice is no error
    assert again.returncode == 0 and "already revoked" in again.stdout


def test_last_use_is_recorded_at_most_once_a_minute(app_env):
    created = apikeys.create("last-use", "read")
    assert created.info.last_used_at is None
    t0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    def last_used() -> datetime | None:
        with unit_of_work() as uow:
            return uow.session.scalar(select(ApiKey.last_used_at).where(ApiKey.name == "last-use"))

    assert apikeys.verify(created.key, now=t0).name == "last-use"
    assert last_used() == t0
    apikeys.verify(created.key, now=t0 + timedelta(seconds=59))
    assert last_used() == t0
    apikeys.verify(created.key, now=t0 + timedelta(seconds=61))
    assert last_used() == t0 + timedelta(seconds=61)
    apikeys.revoke("last-use")
    assert apikeys.verify(created.key, now=t0 + timedelta(minutes=5)) is None
    assert last_used() == t0 + timedelta(seconds=61)


# --- the command line ------------------------------------------------------------------------------

def test_cli_create_prints_the_key_once_on_the_last_line_and_stores_only_its_hash(app, base_env, world):
    result = billing("api-key", "create", "crm-sync", "--scope", "read", env=base_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    key = lines[-1]
    assert KEY_SHAPE.fullmatch(key), lines
    assert result.stdout.count(key[3:]) == 1 and key[3:] not in result.stderr
    with unit_of_work() as uow:
        row = uow.session.scalars(select(ApiKey).where(ApiKey.name == "crm-sync")).one()
        assert (row.scope, row.key_hash, row.prefix) == ("read", hashlib.sha256(key.encode()).hexdigest(), key[:10])
        for table in Base.metadata.sorted_tables:  # the plaintext is nowhere in the database
            dump = uow.session.scalar(text(f'SELECT coalesce(string_agg(t::text, \'|\'), \'\') FROM "{table.name}" t'))
            assert key[10:] not in dump, table.name
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {key}"}) as c:
        assert c.get(fill("/api/subscriptions/{subscription_id}", world)).status_code == 200
        assert c.post("/api/customers", json={"email": "x@example.com", "name": "X"}).status_code == 403


def test_cli_create_defaults_to_write_and_list_shows_scope_and_use(app, base_env, world):
    created = billing("api-key", "create", "ops", env=base_env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.splitlines()[-1]

    def row_of_ops() -> str:
        listed = billing("api-key", "list", env=base_env)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.split()[:6] == ["name", "scope", "key", "created", "last", "used"]
        [row] = [line for line in listed.stdout.splitlines() if line.split()[:1] == ["ops"]]
        assert key[3:] not in listed.stdout  # only the start of a key is ever shown
        return row

    row = row_of_ops()
    assert row.split()[1:3] == ["write", key[:10] + "…"] and "never" in row
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {key}"}) as c:
        resp = c.post("/api/customers", json={"email": "grace@example.com", "name": "Grace"})
        assert resp.status_code == 201, resp.text
    row = row_of_ops()
    assert "never" not in row and row.count("UTC") == 2 and row.rstrip().endswith("-")
    billing("api-key", "revoke", "ops", env=base_env)
    assert row_of_ops().count("UTC") == 3


def test_cli_refuses_a_duplicate_name_and_keeps_the_first_key(base_env):
    first = billing("api-key", "create", "dup", env=base_env)
    assert first.returncode == 0, first.stderr
    second = billing("api-key", "create", "dup", "--scope", "read", env=base_env)
    assert second.returncode != 0 and second.stdout == ""
    assert second.stderr.strip() == "error: an API key named 'dup' already exists"
    assert apikeys.verify(first.stdout.splitlines()[-1]).scope == "write"


@pytest.mark.parametrize("args", [
    ["revoke", "ghost"],
    ["create", ""],
    ["create", "   "],
    ["create", "line\nfeed"],
    ["create", "carriage\rreturn"],
    ["create", "tab\tname"],
    ["create", "esc\x1b[31mred"],
    ["create", "bidi\u202eoverride"],
    ["create", "x" * 101],
    ["create", "fine-name", "--scope", "admin"],
])
def test_cli_refuses_bad_input_with_one_error_line_and_changes_nothing(base_env, args):
    with unit_of_work() as uow:
        before = uow.session.scalar(select(func.count()).select_from(ApiKey))
    result = billing("api-key", *args, env=base_env)
    assert result.returncode != 0
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    with unit_of_work() as uow:
        assert uow.session.scalar(select(func.count()).select_from(ApiKey)) == before


def test_names_with_nul_or_too_long_are_refused_in_process(app_env):
    for name in ("nul\x00name", "x" * 101, "\u2028"):
        with pytest.raises(apikeys.ApiKeyError):
            apikeys.create(name)
    assert apikeys.create("  padded  ").info.name == "padded"  # surrounding blanks are not part of a name
    assert apikeys.create("x" * 100).info.name == "x" * 100
