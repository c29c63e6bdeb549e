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
) -> None:
    """Serve the local Stripe sandbox."""
    from sandbox.server import main as serve

    serve(host=host, port=port)


def main() -> None:
    try:
        app()
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
