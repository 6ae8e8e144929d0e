"""The wiring (issue 15): one composition root (`app.bootstrap`) wires the services to the
task layer through a dispatcher; every after-commit kick goes through the unit of work."""

from __future__ import annotations

import ast
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from app.bootstrap import bootstrap
from app.delivery.service import kick_started
from app.messages.service import LiveMessage
from app.runtime import Runtime
from app.sessions.enums import SenderRole
from tests.delivery.test_webhooks import make_client, subscribe
from tests.sessions.helpers import ask

ROOT = Path(__file__).resolve().parents[2]
# Who may import the task layer: the composition root, the CLI and the WSGI entries.
MAY_IMPORT_TASKS = {"app/bootstrap.py", "app/cli.py", "app/wsgi.py", "app/stream_wsgi.py"}


def imports_of_tasks(source: str) -> list[int]:
    """Lines importing `tasks` or a module under it, at any depth (a lazy import in a
    function counts), `importlib.import_module("tasks…")` included."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in ("importlib.import_module", "import_module",
                                             "__import__")):
            names = [node.args[0].value]
        if any(name == "tasks" or name.startswith("tasks.") for name in names):
            lines.append(node.lineno)
    return lines


def test_the_import_walker_finds_every_way_of_importing_tasks():
    source = (
        "import tasks\n"
        "from tasks.imports import x\n"
        "def f():\n"
        "    from tasks import celery_app\n"
        "    import importlib\n"
        "    importlib.import_module('tasks.hooks')\n"
        "from app.tasks_like import y\n"
        "import taskset\n"
        "from . import tasks\n"
    )
    assert imports_of_tasks(source) == [1, 2, 4, 6]


def test_only_the_composition_root_the_cli_and_the_wsgi_entry_import_tasks():
    importers = {}
    for folder in ("app", "admin"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            lines = imports_of_tasks(path.read_text(encoding="utf-8"))
            if lines:
                importers[path.relative_to(ROOT).as_posix()] = lines
    assert "app/bootstrap.py" in importers  # the root does wire the task layer
    strays = {path: lines for path, lines in importers.items() if path not in MAY_IMPORT_TASKS}
    assert strays == {}, "only app/bootstrap.py, the CLI and the WSGI entry import tasks"


def test_eager_or_real_workers_is_answered_in_one_place():
    asking = sorted(
        path.relative_to(ROOT).as_posix()
        for folder in ("app", "admin", "tasks")
        for path in (ROOT / folder).rglob("*.py")
        if "task_always_eager" in path.read_text(encoding="utf-8"))
    assert asking == ["tasks/celery_app.py"]  # set there, asked by `runs_in_process()`


# ---- the unit of work's after-commit callbacks -----------------------------------------
@contextmanager
def recorded(steps: list[str]) -> Iterator[None]:
    steps.append("lock")
    try:
        yield
    finally:
        steps.append("unlock")


def test_after_commit_callbacks_run_once_the_unit_of_work_has_ended(runtime: Runtime):
    steps: list[str] = []
    with runtime.database.unit_of_work(under=recorded(steps)) as uow:
        uow.after_commit(lambda: steps.append("kick"))
        steps.append("work")
        uow.commit()
        steps.append("committed")
    assert steps == ["lock", "work", "committed", "unlock", "kick"]


def test_after_commit_callbacks_never_run_for_a_rolled_back_unit_of_work(runtime: Runtime):
    steps: list[str] = []
    with runtime.database.unit_of_work() as uow:
        uow.after_commit(lambda: steps.append("never committed"))
    with pytest.raises(ZeroDivisionError), runtime.database.unit_of_work(
            under=recorded(steps)) as uow:
        uow.after_commit(lambda: steps.append("never committed"))
        _ = 1 / 0
    with runtime.database.unit_of_work() as uow:
        uow.after_commit(lambda: steps.append("committed"))
        uow.commit()
        uow.after_commit(lambda: steps.append("after the last commit: rolled back"))
    assert steps == ["lock", "unlock", "committed"]


def test_a_failing_after_commit_callback_is_logged_not_raised(runtime: Runtime, caplog):
    steps: list[str] = []

    def fail() -> None:
        raise ConnectionError("broker down")

    with caplog.at_level(logging.ERROR, logger="app.db"), \
            runtime.database.unit_of_work() as uow:
        uow.after_commit(fail)
        uow.after_commit(lambda: steps.append("the next one still runs"))
        uow.commit()
    assert steps == ["the next one still runs"]
    assert "after-commit callback failed" in caplog.text and "broker down" in caplog.text


# ---- the composition root ----------------------------------------------------------------
class RecordingDispatcher:
    in_process = True

    def __init__(self) -> None:
        self.delivery_runs = 0
        self.detected: list[list[str]] = []
        self.imports: list[str] = []
        self.broker_down = False

    def deliver_webhooks(self) -> None:
        if self.broker_down:
            raise ConnectionError("broker down")
        self.delivery_runs += 1

    def detect_transfers(self, session_ids: list[str]) -> None:
        self.detected.append(session_ids)

    def start_import(self, job_id: str) -> None:
        self.imports.append(job_id)


def test_the_composition_root_wires_the_after_commit_kicks_to_the_dispatcher(
        runtime: Runtime):
    dispatcher = RecordingDispatcher()
    bootstrap(runtime, dispatcher=dispatcher)
    assert runtime.dispatcher is dispatcher
    robot = ask(runtime.sessions, "AUTO_BARGAIN").session
    assert dispatcher.delivery_runs == 0  # nobody listens: no delivery run

    message = LiveMessage(message_id="m-1", sender_role=SenderRole.COUNTERPART,
                          content="I want a human", sent_at=datetime.now(UTC))
    runtime.sessions.record_messages(robot.session_id, [message, message], actor="bot")
    assert dispatcher.detected == [[robot.session_id]]
    runtime.sessions.record_messages(robot.session_id, [message], actor="bot")
    assert dispatcher.detected == [[robot.session_id]]  # a duplicate is nothing new


def test_a_burst_of_commits_starts_one_delivery_run_and_a_lost_kick_is_tried_again(
        runtime: Runtime):
    make_client(runtime, "bot-a", "bot")
    subscribe(runtime, "bot-a", "http://127.0.0.1:9/hooks", allow_private=True)
    dispatcher = RecordingDispatcher()
    bootstrap(runtime, dispatcher=dispatcher)

    try:
        dispatcher.broker_down = True
        ask(runtime.sessions, "AUTO_BARGAIN", shop="s-0")  # committed; the kick is logged
        dispatcher.broker_down = False
        for shop in ("s-1", "s-2", "s-3"):
            ask(runtime.sessions, "AUTO_BARGAIN", shop=shop)
        assert dispatcher.delivery_runs == 1  # the queued run reads the later events too
    finally:
        kick_started(runtime)  # the run "starts": later tests' commits kick their own
