"""The `auto-session` console command (click, as Flask ships it)."""

from __future__ import annotations

import sys

import click

from app.config import ConfigError, get_settings


@click.group()
def main() -> None:
    """Auto Session: the session broker for robot and human customer service."""
    try:
        get_settings()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations up to REVISION."""
    from app import migrate

    migrate.upgrade(revision=revision)
    click.echo(f"database at {_safe_url()} upgraded to {revision}")


@db.command("downgrade")
@click.option("--revision", default="-1", show_default=True)
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION."""
    from app import migrate

    migrate.downgrade(revision=revision)
    click.echo(f"database downgraded to {revision}")


@db.command("current")
def db_current() -> None:
    """Show the applied revision."""
    from app import migrate

    migrate.current()


def _safe_url() -> str:
    from sqlalchemy.engine import make_url

    return make_url(get_settings().sqlalchemy_url).render_as_string(hide_password=True)


def _register_feature_commands() -> None:
    """Feature folders contribute their own commands."""
    from app.api.cli import serve
    from app.clients.cli import clients
    from app.imports.cli import import_file

    main.add_command(serve)
    main.add_command(clients)
    main.add_command(import_file)


_register_feature_commands()

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
