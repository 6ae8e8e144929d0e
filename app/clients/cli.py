"""`auto-session clients …`: create, list, rotate and revoke API clients."""

from __future__ import annotations

import json

import click

from app.errors import AutoSessionError


def _service():  # type: ignore[no-untyped-def]
    from app.clients.service import ClientService
    from app.runtime import get_runtime

    runtime = get_runtime()
    runtime.ensure_schema()
    return ClientService(runtime.database)


@click.group()
def clients() -> None:
    """API clients and their tokens."""


@clients.command("create")
@click.option("--name", required=True, help="A name to recognise the client by.")
@click.option("--role", required=True, type=click.Choice(["bot", "desk", "admin"],
                                                         case_sensitive=False))
@click.option("--webhook-url", default=None, help="Where events are POSTed (optional).")
@click.option("--json", "as_json", is_flag=True, help='Print {"client_id": …, "token": …}.')
def create(name: str, role: str, webhook_url: str | None, as_json: bool) -> None:
    """Create a client and print its token (shown only this once)."""
    try:
        from app.runtime import get_runtime

        settings = get_runtime().settings
        issued = _service().create(name=name, role=role, webhook_url=webhook_url,
                                   allow_private_webhook=settings.webhook_allow_private,
                                   resolve_timeout=settings.webhook_timeout)
    except AutoSessionError as exc:
        raise click.ClickException(exc.detail) from None
    if as_json:
        click.echo(json.dumps({"client_id": issued.client_id, "token": issued.token}))
        return
    click.echo(f"client {issued.client_id} ({issued.name}, role {issued.role}) created.")
    click.echo(f"token: {issued.token}")
    click.echo("Keep the token now: only its hash is stored. Send it as "
               "'Authorization: Bearer <token>'.")


@clients.command("list")
@click.option("--json", "as_json", is_flag=True)
def list_clients(as_json: bool) -> None:
    """List clients (tokens are never shown, only their first characters)."""
    rows = [
        {"client_id": c.client_id, "name": c.name, "role": c.role,
         "token_prefix": c.token_prefix, "created_at": c.created_at.isoformat(),
         "revoked_at": c.revoked_at.isoformat() if c.revoked_at else None}
        for c in _service().list()
    ]
    if as_json:
        click.echo(json.dumps(rows))
        return
    for row in rows:
        state = "revoked" if row["revoked_at"] else "active"
        click.echo(f"{row['client_id']}  {row['role']:<5}  {state:<7}  {row['token_prefix']}…  "
                   f"{row['name']}")


@clients.command("rotate")
@click.argument("client_id")
@click.option("--json", "as_json", is_flag=True)
def rotate(client_id: str, as_json: bool) -> None:
    """Give CLIENT_ID a new token; the old one stops working."""
    try:
        issued = _service().rotate(client_id)
    except AutoSessionError as exc:
        raise click.ClickException(exc.detail) from None
    if as_json:
        click.echo(json.dumps({"client_id": issued.client_id, "token": issued.token}))
    else:
        click.echo(f"token: {issued.token}")


@clients.command("revoke")
@click.argument("client_id")
def revoke(client_id: str) -> None:
    """Revoke CLIENT_ID: its token is refused from now on."""
    try:
        _service().revoke(client_id)
    except AutoSessionError as exc:
        raise click.ClickException(exc.detail) from None
    click.echo(f"client {client_id} revoked")
