"""`auto-session import FILE` (built by the history import feature)."""

import click


@click.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
def import_file(path: str) -> None:
    """Import a chat export (not built yet)."""
    raise click.ClickException("history import is not built yet")
