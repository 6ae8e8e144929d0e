"""The port to the task layer: work sent on past a committed change.

Services never import `tasks`. The composition root (`app.bootstrap`) gives the runtime a
`Dispatcher` — Celery tasks for real workers, or threads of this process on the embedded
default (`tasks.dispatch`) — and wires the services' after-commit hooks to it.
"""

from __future__ import annotations

from typing import Protocol


class Dispatcher(Protocol):
    """Starts work that must not run inside the request that caused it."""

    @property
    def in_process(self) -> bool:
        """The work runs in this process (the embedded default), not on workers."""
        ...

    def deliver_webhooks(self) -> None:
        """Start a webhook delivery run (SPEC §6)."""
        ...

    def detect_transfers(self, session_ids: list[str]) -> None:
        """Judge the new counterpart messages of these sessions (SPEC §5)."""
        ...

    def start_import(self, job_id: str) -> None:
        """Run the pipeline of a staged import job (SPEC §4); after its commit."""
        ...


class NotWired:
    """The dispatcher of a runtime the composition root has not wired: sends nothing."""

    in_process = False

    def _refuse(self) -> None:
        raise RuntimeError("this runtime is not wired to the task layer: "
                           "app.bootstrap.bootstrap(runtime)")

    def deliver_webhooks(self) -> None:
        self._refuse()

    def detect_transfers(self, session_ids: list[str]) -> None:
        self._refuse()

    def start_import(self, job_id: str) -> None:
        self._refuse()
