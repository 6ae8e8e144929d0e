"""`auto-session serve` (built by the HTTP API feature)."""

import click


@click.command()
def serve() -> None:
    """Start the HTTP API (not built yet)."""
    raise click.ClickException("the HTTP API is not built yet")
