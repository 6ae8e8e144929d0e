"""The composition root: the one place that wires the services to the task layer.

`bootstrap(runtime)` gives the runtime its `Dispatcher` (`tasks.dispatch`: Celery tasks,
or threads of this process on the embedded default) and connects the services'
after-commit hooks (`ServiceHooks`, called through the unit of work's `after_commit`)
to it:

- events written → a webhook delivery run (`DeliveryKick`: only if some client has a
  webhook and no run is queued already);
- counterpart messages on sessions → transfer detection on those sessions.

`get_runtime()` and `set_runtime()` call it; no module of `app/` or `admin/` other than
this one, the CLI and the WSGI entry imports `tasks` (`tests/core/test_wiring.py`).
"""

from __future__ import annotations

from app.delivery.kick import DeliveryKick
from app.delivery.service import claim_kick, kick_started
from app.dispatch import Dispatcher
from app.runtime import Runtime
from tasks.dispatch import dispatcher_for


def bootstrap(runtime: Runtime, *, dispatcher: Dispatcher | None = None) -> Runtime:
    """Wire `runtime` to `dispatcher` (by default, this process's: `dispatcher_for`)."""
    chosen = dispatcher if dispatcher is not None else dispatcher_for(runtime)
    runtime.dispatcher = chosen

    def counterpart_messages(session_ids: list[str]) -> None:
        unique = list(dict.fromkeys(session_ids))
        if unique:
            chosen.detect_transfers(unique)

    runtime.hooks.events_written = DeliveryKick(
        database=runtime.database, claim=lambda: claim_kick(runtime),
        release=lambda: kick_started(runtime), start=chosen.deliver_webhooks)
    runtime.hooks.counterpart_messages = counterpart_messages
    return runtime
