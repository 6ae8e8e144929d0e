"""`auto-session import FILE [--format …] [--encoding …] [--session-gap S] [--grouping …]
[--review/--no-review] [--wait]`.

The file is staged in the database like an HTTP upload and handed to the workers;
`--wait` follows the job with a progress bar and prints the final counts. On the
embedded default (no Redis) the import runs in this process, so it always waits.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

FORMATS = ["auto", "json", "ndjson", "csv"]
ENCODINGS = ["auto", "utf-8", "utf-8-sig", "gbk"]
GROUPINGS = ["auto", "threads", "gap"]


@click.command("import")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(FORMATS, case_sensitive=False),
              default="auto", show_default=True, help="Export format (auto: by name/content).")
@click.option("--encoding", type=click.Choice(ENCODINGS, case_sensitive=False),
              default="auto", show_default=True, help="Text encoding (auto: BOM, UTF-8, GBK).")
@click.option("--session-gap", type=click.IntRange(1, 30 * 86400), default=None,
              help="Seconds of silence that start a new conversation (default SESSION_GAP).")
@click.option("--grouping", type=click.Choice(GROUPINGS, case_sensitive=False), default=None,
              help="auto: threading fields where rows have them, else the gap rule (default); "
                   "threads: threading fields alone; gap: the gap rule alone.")
@click.option("--review/--no-review", default=None,
              help="Ask the LLM to review ambiguous gap-rule boundaries "
                   "(default GROUPING_REVIEW).")
@click.option("--wait/--no-wait", default=False,
              help="Follow the job until it finishes (always on the embedded default).")
@click.option("--json", "as_json", is_flag=True, help="Print the final job as JSON.")
def import_file(path: Path, fmt: str, encoding: str, session_gap: int | None,
                grouping: str | None, review: bool | None, wait: bool, as_json: bool) -> None:
    """Import a chat export (JSON array, NDJSON or CSV; UTF-8/GBK; optionally gzip)."""
    from app.errors import AutoSessionError
    from app.imports.service import ImportService
    from app.runtime import get_runtime

    runtime = get_runtime()
    runtime.ensure_schema()
    service = ImportService(runtime)
    try:
        with path.open("rb") as stream:
            job = service.create_job(stream, filename=path.name, format=fmt, encoding=encoding,
                                     actor="cli", session_gap=session_gap,
                                     grouping=grouping.lower() if grouping else None,
                                     review=review)
    except AutoSessionError as exc:
        raise click.ClickException(exc.detail) from None
    runtime.dispatcher.start_import(job.job_id)
    if not (wait or runtime.dispatcher.in_process):
        click.echo(f"import job {job.job_id} queued ({job.size_bytes} bytes); follow it with "
                   f"`auto-session import --wait` or GET /api/v1/imports/{job.job_id}")
        return
    view = _follow(service, job.job_id, quiet=as_json)
    if as_json:
        click.echo(json.dumps(view.model_dump(mode="json"), ensure_ascii=False, indent=2))
    else:
        _print_summary(view)
    if view.status == "failed":
        raise SystemExit(1)


def _follow(service, job_id: str, *, quiet: bool):  # type: ignore[no-untyped-def]
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("inserted {task.fields[inserted]}  dup {task.fields[duplicates]}  "
                          "invalid {task.fields[invalid]}"), TimeElapsedColumn())
    with Progress(*columns, disable=quiet, transient=False) as progress:
        task = progress.add_task("queued", total=None, inserted=0, duplicates=0, invalid=0)
        while True:
            view = service.get(job_id)
            total = view.total_rows
            splitting = view.phase in ("splitting", "split_parts")
            progress.update(task, description="splitting" if splitting else view.status,
                            total=total, completed=view.processed,
                            inserted=view.inserted, duplicates=view.duplicates,
                            invalid=view.invalid)
            if view.finished:
                return view
            time.sleep(0.5)


def _print_summary(view) -> None:  # type: ignore[no-untyped-def]
    click.echo(f"job {view.job_id}: {view.status}")
    for name in ("total_rows", "processed", "inserted", "duplicates", "invalid",
                 "sessions_created", "sessions_updated", "conflicts"):
        click.echo(f"  {name:17} {getattr(view, name)}")
    click.echo(f"  grouping          {view.grouping}, session_gap {view.session_gap} s, "
               f"review {'on' if view.review else 'off'}")
    if view.review:
        click.echo(f"  review            {view.boundaries_reviewed} boundaries reviewed, "
                   f"{view.boundaries_merged} merged")
    if view.detail:
        click.echo(f"  detail            {view.detail}")
    for error in view.errors[:20]:
        click.echo(f"  line {error.line}: {error.error}")
    if len(view.errors) > 20:
        click.echo(f"  … {len(view.errors) - 20} more row errors (GET /api/v1/imports/"
                   f"{view.job_id})")
