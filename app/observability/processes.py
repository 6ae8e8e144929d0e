"""Where the Procfile's processes keep their metrics, so `/metrics` adds up all of them.

prometheus_client's multiprocess mode: every process writes its samples into memory-
mapped files `<kind>_<pid>.db` of `PROMETHEUS_MULTIPROC_DIR`, and a scrape merges the
files. Each process type of the Procfile has its own folder under METRICS_DIR (default
`DATA_DIR/metrics`): `web/` (gunicorn's workers) and `worker/` (the Celery worker's pool
processes). A type cleans its own folder when it starts (`gunicorn.conf.py` `on_starting`,
the worker's `celeryd_init`), so a restart never adds the counts of the previous run
twice, and one type's start never wipes the other's live files; the web's `/metrics`
merges both folders (`app.observability.metrics`).

prometheus_client chooses the mode when it is imported; `use_metrics_dir` switches it
later if need be (before the process forks its children). Nothing here imports it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.config import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
ROLES = ("web", "worker")


def metrics_root(settings: Settings) -> Path:
    """METRICS_DIR, else `DATA_DIR/metrics`."""
    return Path(settings.metrics_dir or Path(settings.data_dir) / "metrics")


def use_metrics_dir(root: Path, role: str, *, clean: bool) -> Path:
    """Make this process (and the children it forks) write its metrics under
    `root/role`; `clean` deletes what an earlier run of this role left there."""
    if role not in ROLES:
        raise ValueError(f"unknown process role {role!r}")
    folder = (root / role).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if clean:
        own = f"_{os.getpid()}.db"
        for path in glob.glob(str(folder / "*.db")):
            if not path.endswith(own):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
    os.environ[MULTIPROC_ENV] = str(folder)
    values: Any = sys.modules.get("prometheus_client.values")
    if values is not None and not getattr(values.ValueClass, "_multiprocess", False):
        # prometheus_client came first (a Celery worker imports its task modules before
        # its first signal): samples from now on go to files, and the metrics created
        # already start over on them.
        values.ValueClass = values.MultiProcessValue()
        metrics: Any = sys.modules.get("app.observability.metrics")
        if metrics is not None:
            metrics.start_over()
    return folder


def multiprocess_folders() -> list[Path]:
    """The role folders a scrape merges: the siblings of this process's own folder."""
    own = os.environ.get(MULTIPROC_ENV)
    if not own:
        return []
    root = Path(own).parent
    return [root / role for role in ROLES if (root / role).is_dir()]


def forget_process(pid: int) -> None:
    """A child process ended: drop its live gauges (its counters stay: they are totals)."""
    folder = os.environ.get(MULTIPROC_ENV)
    if not folder:
        return
    for path in glob.glob(os.path.join(folder, f"gauge_live*_{pid}.db")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
