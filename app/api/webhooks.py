"""`/api/v1/webhook`: a client registers, reads or removes its webhook URL and gets the
secret its deliveries are signed with (SPEC §6)."""

from __future__ import annotations

from flask import Blueprint, Response
from pydantic import AnyHttpUrl, BaseModel, Field, field_validator

from app.api.auth import current_client, require_roles
from app.api.http import parse_body, respond, runtime
from app.api.openapi import documented
from app.delivery.service import register_webhook, webhook_info
from app.validation import BoundaryModel

bp = Blueprint("delivery", __name__, url_prefix="/api/v1/webhook")


class WebhookRegistration(BoundaryModel):
    url: AnyHttpUrl | None = Field(
        description="where events are POSTed (http or https, no user:password@); null "
        "stops delivery. A host that is or resolves to a loopback, private, link-local, "
        "multicast, unspecified or otherwise reserved address is refused unless "
        "WEBHOOK_ALLOW_PRIVATE is set"
    )
    rotate_secret: bool = Field(default=False, description="issue a new signing secret")

    @field_validator("url")
    @classmethod
    def _short_enough(cls, value: AnyHttpUrl | None) -> AnyHttpUrl | None:
        if value is not None and len(str(value)) > 1024:
            raise ValueError("at most 1024 characters")
        return value


class WebhookView(BaseModel):
    client_id: str
    url: str | None
    secret: str | None = Field(
        default=None, description="HMAC-SHA256 key: signature = hex(HMAC(secret, "
        "'<timestamp>.' + body)) sent as 'sha256=<hex>'"
    )
    signature_header: str
    timestamp_header: str
    delivery_header: str


def _view(client_id: str) -> WebhookView:
    with runtime().database.read() as db:
        info = webhook_info(db, client_id, reveal_secret=True)
    return WebhookView.model_validate(info.as_dict())


@bp.put("")
@documented(
    summary="Register (or change) this client's webhook URL",
    description="Events this client may read in the events feed are POSTed to the URL, "
    "signed with the returned secret, retried with backoff, in order per session.",
    tags=("webhooks",), body=WebhookRegistration, responses={200: WebhookView},
    errors=(401, 403, 422),
)
@require_roles("bot", "desk", "admin")
def put_webhook() -> Response:
    body = parse_body(WebhookRegistration)
    client = current_client()
    settings = runtime().settings
    with runtime().database.unit_of_work() as uow:
        register_webhook(uow.session, client.client_id, str(body.url) if body.url else None,
                         rotate_secret=body.rotate_secret,
                         allow_private=settings.webhook_allow_private,
                         resolve_timeout=settings.webhook_timeout)
        uow.commit()
    return respond(_view(client.client_id))


@bp.get("")
@documented(summary="This client's webhook URL and signing secret", tags=("webhooks",),
            responses={200: WebhookView}, errors=(401, 403))
@require_roles("bot", "desk", "admin")
def get_webhook() -> Response:
    return respond(_view(current_client().client_id))


@bp.delete("")
@documented(summary="Stop webhook delivery for this client", tags=("webhooks",),
            responses={200: WebhookView}, errors=(401, 403))
@require_roles("bot", "desk", "admin")
def delete_webhook() -> Response:
    client = current_client()
    with runtime().database.unit_of_work() as uow:
        register_webhook(uow.session, client.client_id, None)
        uow.commit()
    return respond(_view(client.client_id))
