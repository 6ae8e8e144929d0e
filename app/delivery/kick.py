"""The after-commit kick of webhook delivery (SPEC §6): a commit that wrote events starts
a delivery run, only if some client has a webhook and no run is queued already (a
queued one will read these events too). `app.bootstrap` wires it to the dispatcher.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from app.db import Database
from app.delivery.service import any_webhook

WEBHOOK_PRESENCE_TTL = 2.0  # seconds


class DeliveryKick:
    """`events_written` of the services: called after every commit that wrote events."""

    def __init__(self, *, database: Database, claim: Callable[[], bool],
                 release: Callable[[], None], start: Callable[[], None],
                 presence_ttl: float = WEBHOOK_PRESENCE_TTL) -> None:
        self.database = database
        self.claim = claim  # `claim_kick`: False when a queued run will read the events
        self.release = release  # `kick_started`: nothing queued any more
        self.start = start  # the dispatcher's `deliver_webhooks`
        self.presence_ttl = presence_ttl
        self._seen_at = -1e9
        self._any = False

    def __call__(self) -> None:
        if not self.some_client_has_a_webhook():
            return
        if not self.claim():  # a queued run will read these events too
            return
        try:
            self.start()
        except Exception:  # nothing started (no thread, broker down): the next commit tries
            self.release()
            raise

    def some_client_has_a_webhook(self) -> bool:
        # Asked after every committed change: remember the answer for a moment. A webhook
        # registered meanwhile is served by the next kick or the beat's safety-net run.
        now = time.monotonic()
        if now - self._seen_at > self.presence_ttl:
            with self.database.read() as db:
                self._any = any_webhook(db)
            self._seen_at = now
        return self._any
