"""The ``billing`` command line (Typer). Entry points hand long-running work to workers/ and sandbox/ lazily.

Every command reads the settings it needs before doing anything, so a missing or invalid variable is
one ``error:`` line naming it and exit status 2 (:class:`~billing.settings.ConfigError`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import typer

from billing.settings import ConfigError, Settings, get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Recurring off-session billing on Stripe.")


def fail(message: str, code: int = 2) -> None:
    """One clear error line on stderr, then exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def settings_for(*required: str) -> Settings:
    return get_settings().require(*required)


@app.callback()
def _root() -> None:
    """Recurring off-session billing on Stripe."""
    # A callback keeps Typer treating the commands as subcommands, however many there are.


@app.command()
def sandbox(
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(12111, help="port to listen on"),
    seed: int = typer.Option(0, help="seed for latency and random faults"),
    latency_median_ms: float = typer.Option(0.0, help="median added latency (log-normal)"),
    latency_p99_ms: float = typer.Option(None, help="99th percentile latency (defaults to the median)"),
    rate_global: float = typer.Option(100.0, help="requests/s across the API; 0 lifts the limit"),
    rate_endpoint: float = typer.Option(25.0, help="requests/s per endpoint; 0 lifts the limit"),
    webhook_url: list[str] = typer.Option(
        None, help="webhook endpoint URL (repeatable)", envvar="SANDBOX_WEBHOOK_URL"
    ),
    webhook_secret: str = typer.Option(None, help="whsec_… signing secret", envvar="SANDBOX_WEBHOOK_SECRET"),
) -> None:
    """Serve the local Stripe sandbox."""
    from sandbox.server import main as serve

    urls = webhook_url or []
    if urls and not webhook_secret:
        fail("--webhook-url needs --webhook-secret (or SANDBOX_WEBHOOK_SECRET)")
    serve(
        host=host,
        port=port,
        seed=seed,
        latency_median_ms=latency_median_ms,
        latency_p99_ms=latency_p99_ms,
        rate_global=rate_global or None,
        rate_endpoint=rate_endpoint or None,
        webhook_endpoints=[(url, webhook_secret) for url in urls],
    )


@app.command()
def migrate() -> None:
    """Apply the database migrations (Alembic) up to head."""
    from billing import migrate as migrations
    from billing.db import resolve_database_url

    migrations.upgrade(resolve_database_url(settings_for()))
    typer.echo("database is at head")


@app.command()
def web(
    host: str = typer.Option("127.0.0.1", help="address to bind"),
    port: int = typer.Option(8000, help="port to listen on"),
    loglevel: str = typer.Option("INFO", help="log level"),
) -> None:
    """Serve the HTTP app: JSON API, webhook endpoint, customer pages, finance console."""
    import uvicorn

    from billing import logs

    settings_for("stripe_api_key", "secret_key")
    logs.configure(level=loglevel, default_format="json")
    # uvicorn's access log would print raw paths, and customer pages carry tokens in theirs; the app
    # logs each request by its route template instead. log_config=None: uvicorn's loggers go through
    # the handler configured above instead of its own. proxy_headers=False: uvicorn would believe
    # X-Forwarded-For from 127.0.0.1; billing.web.client decides by BILLING_TRUSTED_PROXIES instead.
    uvicorn.run("billing.web.app:create_app", factory=True, host=host, port=port, proxy_headers=False,
                log_level=loglevel.lower(), access_log=False, log_config=None)


@app.command()
def worker(
    concurrency: int = typer.Option(16, min=1, help="charges processed at once (threads)"),
    loglevel: str = typer.Option("INFO", help="log level"),
    metrics_port: int = typer.Option(0, "--metrics-port", min=0, envvar="BILLING_WORKER_METRICS_PORT",
                                     help="serve Prometheus metrics on this port (0: off)"),
    metrics_host: str = typer.Option("127.0.0.1", "--metrics-host", envvar="BILLING_WORKER_METRICS_HOST",
                                     help="address for --metrics-port (0.0.0.0 to be scraped from elsewhere)"),
    health: bool = typer.Option(False, "--health", help="check the running worker(s) instead: exit 0 when "
                                "connected to Redis and PostgreSQL and working, 1 otherwise"),
    health_file: Path | None = typer.Option(None, "--health-file", envvar="BILLING_WORKER_HEALTH_FILE",
                                            help="heartbeat file to write (or, with --health, to read); default "
                                                 "BILLING_DATA_DIR/health/worker-<pid>.json"),
) -> None:
    """Run a Celery worker (threads pool: charging waits on Stripe and the database, not the CPU).

    Exits 0 after a requested stop (SIGTERM: running tasks finish), non-zero after an error it cannot
    recover from. Redis and PostgreSQL restarts are waited out, not exits."""
    if health:
        _probe("worker", health_file)
    settings = settings_for("stripe_api_key")
    from billing import metrics
    from billing.ratelimit import resolve_broker_url
    from workers import health as heartbeats
    from workers import observability
    from workers.celery_app import TASK_QUEUE
    from workers.celery_app import app as celery_app

    fmt = observability.setup_logging(loglevel)
    from billing import db

    db.configure_pool(concurrency)  # a connection per task running at once, none held across Stripe
    if metrics_port:
        # One process (threads pool), so the default registry holds every thread's counts.
        metrics.serve(metrics_port, metrics_host, TASK_QUEUE)
    heartbeat = heartbeats.WorkerHeartbeat(health_file or heartbeats.default_path("worker", settings.data_dir),
                                           broker_url=resolve_broker_url(settings)).start()
    quiet = ["--quiet"] if fmt == "json" else []  # the banner is printed, not logged: one log line instead
    try:
        # Celery.start, not worker_main: worker_main drops the exit status, so a worker that died of an
        # unrecoverable error would look to its supervisor like one that was asked to stop.
        code = celery_app.start([*quiet, "worker", "--pool=threads", f"--concurrency={concurrency}",
                                 f"--loglevel={loglevel}", f"--hostname=billing-{os.getpid()}@%h",
                                 "--without-mingle", "--without-gossip"])
    finally:
        heartbeat.stop()
    raise typer.Exit(code or 0)


@app.command()
def beat(
    loglevel: str = typer.Option("INFO", help="log level"),
    health: bool = typer.Option(False, "--health", help="check the running beat(s) instead: exit 0 when Redis "
                                "answers them (active or standby), 1 otherwise"),
    health_file: Path | None = typer.Option(None, "--health-file", envvar="BILLING_BEAT_HEALTH_FILE",
                                            help="heartbeat file to write (or, with --health, to read); default "
                                                 "BILLING_DATA_DIR/health/beat-<pid>.json"),
) -> None:
    """Run the scheduler. Start one per machine if you like: a Redis lock lets exactly one send tasks.

    Redis restarts (with or without its data) are waited out; exits non-zero only on an error it cannot
    recover from."""
    if health:
        _probe("beat", health_file)
    settings = settings_for()
    from workers import beat as beat_scheduler
    from workers import health as heartbeats
    from workers import observability
    from workers.celery_app import BEAT_SCHEDULER
    from workers.celery_app import app as celery_app

    fmt = observability.setup_logging(loglevel)
    beat_scheduler.heartbeat_path = health_file or heartbeats.default_path("beat", settings.data_dir)
    quiet = ["--quiet"] if fmt == "json" else []
    try:
        code = celery_app.start([*quiet, "beat", f"--scheduler={BEAT_SCHEDULER}", f"--loglevel={loglevel}"])
    finally:
        heartbeats.remove(beat_scheduler.heartbeat_path)
    raise typer.Exit(code or 0)


def _probe(kind: str, path: Path | None) -> None:
    """``--health``: one line per running process of ``kind``, exit 0 when all are healthy, else 1."""
    from workers import health as heartbeats

    code, lines = heartbeats.probe(kind, data_dir=get_settings().data_dir, path=path)
    for line in lines:
        typer.echo(line, err=code != 0)
    raise typer.Exit(code)


def parse_now(value: str | None) -> datetime | None:
    """An ISO 8601 instant; without an offset it is taken as UTC."""
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--now is not an ISO 8601 date-time: {value!r} (e.g. 2025-01-31T09:00:00Z)")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@app.command("run-due")
def run_due(
    wait: bool = typer.Option(False, "--wait", help="block until every charge started has been decided"),
    now: str | None = typer.Option(None, "--now", help="pretend it is this ISO 8601 instant when finding due periods"),
    timeout: float = typer.Option(900.0, help="with --wait: give up after this many seconds (exit 1)"),
) -> None:
    """Run the billing once now (what beat triggers every billing run interval)."""
    at = parse_now(now)
    settings_for("stripe_api_key")
    from billing import charging
    from billing.charging import IN_FLIGHT
    from workers.tasks import enqueue_charge

    report = charging.run_due(now=at, enqueue=enqueue_charge)
    started = list(report.created)
    typer.echo(f"started {len(started)} charge(s)"
               + (f"; {len(report.failed_subscriptions)} subscription(s) failed, see the log"
                  if report.failed_subscriptions else ""))
    if not wait or not started:
        return
    statuses = _wait_for(started, timeout)
    summary = Counter(statuses.values())
    typer.echo("summary: " + ", ".join(f"{status} {n}" for status, n in sorted(summary.items())))
    if any(s in IN_FLIGHT for s in statuses.values()):
        fail(f"{sum(summary[s] for s in IN_FLIGHT)} charge(s) still in flight after {timeout:.0f}s", code=1)


def _wait_for(charge_ids: list[int], timeout: float) -> dict[int, str]:
    """Wait for the charges to be decided, with a progress line on stderr."""
    from billing.charging import wait_until_decided

    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        typer.echo(("\r" if tty else "") + f"{done}/{total} decided", err=True, nl=not tty)

    statuses = wait_until_decided(charge_ids, timeout=timeout, progress=progress)
    if tty:
        typer.echo("", err=True)
    return statuses


QUEUE_COLUMNS = ("charge", "customer", "amount", "currency", "status", "attempts", "last error", "next retry",
                 "notified", "page opened", "card", "prev. auth")


@app.command()
def queue(
    as_json: bool = typer.Option(False, "--json", help="one JSON array instead of a table"),
    status: str | None = typer.Option(None, help="only this status (void included only when asked for)"),
    decline_code: str | None = typer.Option(None, "--decline-code", help="e.g. insufficient_funds"),
    country: str | None = typer.Option(None, help="card country, two letters"),
    since: str | None = typer.Option(None, "--from", help="opened on or after this day (YYYY-MM-DD)"),
    until: str | None = typer.Option(None, "--to", help="opened on or before this day (YYYY-MM-DD)"),
    sort: str = typer.Option("next_retry", help="next_retry, created, amount or attempts"),
    desc: bool = typer.Option(False, "--desc", help="largest / latest first"),
    limit: int = typer.Option(1000, min=1, help="at most this many rows"),
) -> None:
    """Show the retry queue (every charge not paid), soonest retry first; the console's filters as flags."""
    settings_for()
    from billing.db import unit_of_work
    from billing.queue import QueueFilter, QueueFilterError, count, unpaid_charges

    try:
        flt = QueueFilter.parse(status=status, decline_code=decline_code, country=country, date_from=since,
                                date_to=until, sort=sort, direction="desc" if desc else "asc")
    except QueueFilterError as exc:
        fail(str(exc))
    with unit_of_work() as uow:
        rows = unpaid_charges(uow.session, limit=limit, flt=flt)
        total = count(uow.session, flt) if len(rows) == limit else len(rows)
    if as_json:
        typer.echo(json.dumps([row.as_json() for row in rows], indent=2))
        return
    if not rows:
        typer.echo("the retry queue is empty" if flt == QueueFilter(sort=flt.sort, descending=flt.descending)
                   else "no charge matches these filters")
        return
    _print_queue(rows, total)


def _print_queue(rows, total: int) -> None:
    import shutil

    from rich import box
    from rich.console import Console
    from rich.table import Table

    # Piped into a file or another program, a row stays on one line instead of wrapping at 80 columns.
    console = Console(width=None if sys.stdout.isatty() else max(shutil.get_terminal_size().columns, 220),
                      highlight=False)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for name in QUEUE_COLUMNS:
        table.add_column(name, justify="right" if name in ("charge", "amount", "attempts") else "left",
                         no_wrap=True)
    for row in rows:
        table.add_row(*row.as_cells())
    console.print(table)
    if total > len(rows):
        console.print(f"{len(rows)} of {total} shown; narrow the filters or raise --limit")


@app.command()
def demo(
    serve: bool = typer.Option(True, "--serve/--no-serve", help="keep the web app up at the end until Ctrl-C"),
    port: int = typer.Option(8000, help="port for the web app (another free one if taken)"),
) -> None:
    """The whole system on embedded defaults, end to end: no servers, no keys, no configuration."""
    from billing import demo as demo_run

    raise typer.Exit(demo_run.run(serve=serve, web_port=port))


api_key_app = typer.Typer(no_args_is_help=True, help="Keys for the JSON API (Authorization: Bearer <key>).")
app.add_typer(api_key_app, name="api-key")


@api_key_app.command("create")
def api_key_create(
    name: str = typer.Argument(..., help="what the key is for, e.g. crm-sync (unique, at most 100 characters)"),
    scope: str = typer.Option("write", help="write (every API route) or read (GET only)"),
) -> None:
    """Make a key. It is printed once, alone on the last line; only its hash is stored."""
    settings_for()
    from billing import apikeys

    try:
        created = apikeys.create(name, scope)
    except apikeys.ApiKeyError as exc:
        fail(str(exc))
    typer.echo(f"created API key {created.info.name!r} with scope {created.info.scope}. "
               "Store it now: it is shown only this once.")
    typer.echo(created.key)


@api_key_app.command("list")
def api_key_list() -> None:
    """Every key: name, scope, the start of the key, when it was created, last used and revoked."""
    settings_for()
    from billing import apikeys

    keys = apikeys.list_keys()
    if not keys:
        typer.echo("no API keys yet; make one with: billing api-key create NAME")
        return
    _print_api_keys(keys)


def _when(at: datetime | None, none: str) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if at else none


def _print_api_keys(keys) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(width=None if sys.stdout.isatty() else 200, highlight=False)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for column in ("name", "scope", "key", "created", "last used", "revoked"):
        table.add_column(column, no_wrap=True)
    for key in keys:
        # Text, not markup: a name like "[bold]" is shown as typed.
        table.add_row(Text(key.name), key.scope, f"{key.prefix}…", _when(key.created_at, ""),
                      _when(key.last_used_at, "never"), _when(key.revoked_at, "-"))
    console.print(table)


@api_key_app.command("revoke")
def api_key_revoke(name: str = typer.Argument(..., help="the key's name, as in billing api-key list")) -> None:
    """Revoke a key: every process refuses it from its next request on."""
    settings_for()
    from billing import apikeys

    try:
        key, revoked_now = apikeys.revoke(name)
    except apikeys.ApiKeyError as exc:
        fail(str(exc))
    typer.echo(f"revoked API key {key.name!r}" if revoked_now
               else f"API key {key.name!r} was already revoked on {_when(key.revoked_at, '')}")


staff_app = typer.Typer(no_args_is_help=True, help="Finance console accounts.")
app.add_typer(staff_app, name="staff")


@staff_app.command("add")
def staff_add(
    email: str = typer.Argument(..., help="the person's email address (their login)"),
    role: str = typer.Option(..., help="viewer (reads) or operator (also acts on charges)"),
) -> None:
    """Create a finance console account. The password is asked for twice, or read from stdin when piped."""
    settings_for()
    from billing import staff

    if sys.stdin.isatty():
        password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    try:
        created = staff.add_staff(email, password, role)
    except staff.StaffError as exc:
        fail(str(exc))
    typer.echo(f"added {created.email} ({created.role})")


@staff_app.command("revoke")
def staff_revoke(email: str = typer.Argument(..., help="the account to sign out everywhere")) -> None:
    """End every session of an account at once (a lost laptop, someone leaving)."""
    settings_for()
    from billing import staff

    try:
        n = staff.revoke_sessions(email)
    except staff.StaffError as exc:
        fail(str(exc))
    typer.echo(f"ended {n} session(s) of {staff.normalize_email(email)}")


def main() -> None:
    from billing import logs

    try:
        # Interactive commands print for people; web, worker and beat configure JSON lines themselves.
        logs.configure(level=logging.WARNING, default_format="text", text_format="%(levelname)s %(name)s: %(message)s")
        app()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
