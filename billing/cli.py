"""The ``billing`` command line (Typer). Entry points hand long-running work to workers/ and sandbox/ lazily."""

from __future__ import annotations

import sys

import typer

from billing.settings import ConfigError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Recurring off-session billing on Stripe.")


def fail(message: str, code: int = 2) -> None:
    """One clear error line on stderr, then exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


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


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
