"""`auto-session clients …` (built by the HTTP API feature)."""

import click


@click.group()
def clients() -> None:
    """API clients and their tokens."""
