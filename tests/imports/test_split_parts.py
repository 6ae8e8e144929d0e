"""A big NDJSON upload is split in line-aligned parts, one task each, so that every
worker splits: every part routes its rows by the same slot hash, so the rows of a slot
meet in one chunk whichever parts they came from; lines keep their numbers; the chunks
are made once, when the last part is done; a part run again after dying midway, or
taken over from a run gone quiet, stages each row once; a part of a failed job stages
nothing more."""

from __future__ import annotations

import gzip
import io
import os
import re
import subprocess
from collections import Counter
from datetime import datetime, timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from app.db import utcnow
from app.imports import chunking, decoding, formats
from app.imports.chunking import bucket_of, slot_of
from app.imports.models import ImportChunk, ImportChunkPart, ImportJob, ImportSplitPart
from app.imports.service import ImportService
from app.imports.splitting import PART_MIN_BYTES, PART_SEQ_SHIFT
from app.imports.staging import PartFence, SplitTakenOver
from tests.imports.helpers import (
    BIN,
    ROOT,
    message_count,
    row,
    sessions_of,
    staged_left,
    start_worker,
    stop,
    wait_until,
)

START = datetime(2026, 3, 2, 9, 0)
SLOTS = 40
PER_SLOT = 30


def export() -> tuple[bytes, dict[str, int], list[tuple[int, str]]]:
    """Slots interleaved over the whole file (each one's rows fall into every part), two
    conversations a slot two hours apart, duplicates and bad lines throughout: the bytes,
    the line of each message id, the bad lines with their errors."""
    lines: list[str] = []
    line_of: dict[str, int] = {}
    bad: list[tuple[int, str]] = []
    for turn in range(PER_SLOT):
        for slot in range(SLOTS):
            at = START + timedelta(minutes=turn + (120 if turn >= PER_SLOT // 2 else 0))
            body = row(f"shop-{slot}", "counterpart" if turn % 2 else "robot", at,
                       f"turn {turn} " + "x" * 60, message_id=f"m-{slot}-{turn}")
            lines.append(formats.json.dumps(body))
            line_of.setdefault(body["message_id"], len(lines))
            if turn % 7 == 3 and slot % 5 == 0:
                lines.append(lines[-1])  # a duplicate, further down
            if turn % 9 == 4 and slot % 8 == 1:
                lines.append('{"account_id": "acc-1", "shop_id": "shop-x", "content": ')
                bad.append((len(lines), "not valid JSON"))
            if turn == 11 and slot == 2:
                lines.append('{"account_id": "acc-1", "content": "no shop"}')
                bad.append((len(lines), "shop_id: is missing"))
                lines.append("")  # a blank line is no record
    return ("\n".join(lines) + "\n").encode(), line_of, bad


def parts_of(runtime, job_id: str) -> list[ImportSplitPart]:  # type: ignore[no-untyped-def]
    with runtime.database.read() as db:
        job_pk = db.execute(select(ImportJob.id).where(ImportJob.job_id == job_id)
                            ).scalar_one()
        parts = list(db.execute(select(ImportSplitPart).where(
            ImportSplitPart.job_pk == job_pk).order_by(ImportSplitPart.part)).scalars())
        db.expunge_all()
        return parts


def refused_rows() -> float:
    """This process's `autosession_import_rows_total{outcome="invalid"}`."""
    value = REGISTRY.get_sample_value("autosession_import_rows_total", {"outcome": "invalid"})
    return value or 0.0


def staged_rows(runtime, job_id: str) -> list[tuple[int, int, dict]]:  # type: ignore[no-untyped-def]
    """(bucket, line, fields) of every row staged for the job's chunks."""
    with runtime.database.read() as db:
        job_pk = db.execute(select(ImportJob.id).where(ImportJob.job_id == job_id)
                            ).scalar_one()
        pieces = db.execute(select(ImportChunkPart.bucket, ImportChunkPart.payload)
                            .where(ImportChunkPart.job_pk == job_pk)).all()
    return [(bucket, line, fields) for bucket, payload in pieces
            for line, fields in chunking.unpack_rows(payload)]


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_every_part_routes_a_slot_to_one_chunk_and_lines_keep_their_numbers(
        runtime, compressed):
    data, line_of, bad = export()
    refused_before = refused_rows()
    service = ImportService(runtime, split_parts=3, part_min_bytes=len(data) // 4)
    job = service.create_job(io.BytesIO(gzip.compress(data) if compressed else data),
                             filename="history.ndjson")
    outcome = service.prepare(job.job_id)
    assert outcome.chunk_pks == [] and len(outcome.part_pks) == 3
    parts = parts_of(runtime, job.job_id)
    assert [p.first_line for p in parts][0] == 1 and parts[-1].end_byte == len(data)
    for before, after in zip(parts, parts[1:], strict=False):  # cut at line starts
        assert before.end_byte == after.start_byte and data[after.start_byte - 1] == 10
        assert after.first_line == data[:after.start_byte].count(b"\n") + 1
    assert service.get(job.job_id).phase == "split_parts"

    for part_pk in outcome.part_pks[:-1]:
        service.split_part(job.job_id, part_pk)
        assert service.parts_left(job.job_id) > 0
        assert service.merge_parts(job.job_id).chunk_pks == []  # not before the last part
    service.split_part(job.job_id, outcome.part_pks[-1])
    assert service.parts_left(job.job_id) == 0
    merged = service.merge_parts(job.job_id)
    assert merged.chunk_pks
    assert service.merge_parts(job.job_id).chunk_pks == []  # the chunks are made once
    assert service.prepare(job.job_id).chunk_pks == merged.chunk_pks  # recovery: re-sent
    # the rows the parts refused are in the rows metric once, counted at the merge
    assert refused_rows() - refused_before == len(bad)

    staged = staged_rows(runtime, job.job_id)
    buckets = parts[0].buckets
    text_lines = data.decode().split("\n")
    for bucket, line, fields in staged:
        assert bucket == bucket_of(slot_of(fields), buckets)  # the same hash in every part
        assert formats.json.loads(text_lines[line - 1]) == fields  # its own line's number
    assert {f["message_id"]: line for _, line, f in sorted(staged, key=lambda r: -r[1])
            if "message_id" in f} == line_of  # first seen where the file first has it
    lines = [line for _, line, _ in staged]
    assert len(lines) == len(set(lines))  # each row staged once
    shops_by_bucket: dict[str, set[int]] = {}
    for bucket, _, fields in staged:
        shops_by_bucket.setdefault(fields["shop_id"], set()).add(bucket)
    assert all(len(b) == 1 for b in shops_by_bucket.values())

    for chunk_pk in merged.chunk_pks:
        service.process_chunk(chunk_pk)
    view = service.finish(job.job_id)
    duplicates = sum(1 for turn in range(PER_SLOT) for slot in range(SLOTS)
                     if turn % 7 == 3 and slot % 5 == 0)
    assert (view.status, view.inserted, view.duplicates) == (
        "partially_succeeded", SLOTS * PER_SLOT, duplicates)
    assert view.total_rows == SLOTS * PER_SLOT + duplicates + len(bad)
    assert view.invalid == len(bad) and view.processed == view.total_rows
    assert [(e.line, e.error.split(":")[0]) for e in view.errors] == [
        (line, text.split(":")[0]) for line, text in bad]
    assert message_count(runtime) == SLOTS * PER_SLOT
    by_shop = Counter(s.shop_id for s in sessions_of(runtime))
    assert by_shop == {f"shop-{n}": 2 for n in range(SLOTS)}  # two conversations a slot
    assert parts_of(runtime, job.job_id) == []  # the parts went with the staged upload


def test_a_small_upload_or_one_in_another_format_is_split_in_one_run(runtime):
    data, _, _ = export()
    service = ImportService(runtime, split_parts=3, part_min_bytes=len(data))
    outcome = service.prepare(service.create_job(io.BytesIO(data),
                                                 filename="h.ndjson").job_id)
    assert outcome.part_pks == [] and outcome.chunk_pks  # under two parts' worth
    lines = data.decode().splitlines()
    as_array = ("[" + ",\n".join(line for line in lines if line.endswith("}")) + "]").encode()
    service = ImportService(runtime, split_parts=3, part_min_bytes=1024)
    outcome = service.prepare(service.create_job(io.BytesIO(as_array),
                                                 filename="h.json").job_id)
    assert outcome.part_pks == [] and outcome.chunk_pks  # a JSON array is not cut


def test_a_part_run_again_after_dying_midway_stages_each_row_once(runtime):
    data, _, bad = export()
    service = ImportService(runtime, split_parts=2, part_min_bytes=len(data) // 3,
                            split_lease=0.0)
    job = service.create_job(io.BytesIO(data), filename="history.ndjson")
    first, second = service.prepare(job.job_id).part_pks
    # A run of the first part died after staging some of its pieces: its leftovers stay
    # behind, its token and heartbeat are still on the part.
    with runtime.database.unit_of_work() as uow:
        part = uow.session.get(ImportSplitPart, first)
        part.token, part.heartbeat_at, part.attempts = "spl_dead", utcnow() - timedelta(hours=1), 1
        leftovers = [(line, fields) for line, fields in chunking.unpack_rows(
            chunking.pack_rows([(1, {"account_id": "acc-1", "shop_id": "shop-0"})]))]
        uow.session.add(ImportChunkPart(job_pk=part.job_pk, bucket=0,
                                        seq=(part.part << PART_SEQ_SHIFT) + 3, row_count=1,
                                        payload=chunking.pack_rows(leftovers)))
        uow.commit()
    service.split_part(job.job_id, first)  # quiet past the lease: taken over, leftovers gone
    service.split_part(job.job_id, second)
    chunks = service.merge_parts(job.job_id).chunk_pks
    with runtime.database.read() as db:
        staged = db.execute(select(func.sum(ImportChunk.row_count))).scalar_one()
        in_pieces = db.execute(select(func.sum(ImportChunkPart.row_count))).scalar_one()
        attempts = db.get(ImportSplitPart, first).attempts
    assert attempts == 2
    total = len([line for line in data.decode().splitlines() if line])
    assert staged == in_pieces == total - len(bad)  # every row once, no leftover
    for chunk_pk in chunks:
        service.process_chunk(chunk_pk)
    view = service.finish(job.job_id)
    assert view.inserted == message_count(runtime) == SLOTS * PER_SLOT
    assert view.invalid == len(bad)


def test_a_live_part_is_left_alone_and_a_run_taken_over_stages_nothing_more(runtime):
    data, _, _ = export()
    service = ImportService(runtime, split_parts=2, part_min_bytes=len(data) // 3)
    job = service.create_job(io.BytesIO(data), filename="history.ndjson")
    part_pk = service.prepare(job.job_id).part_pks[0]
    with runtime.database.unit_of_work() as uow:  # another run is splitting it right now
        part = uow.session.get(ImportSplitPart, part_pk)
        part.token, part.heartbeat_at = "spl_live", utcnow()
        uow.commit()
    outcome = service.split_part(job.job_id, part_pk)
    assert outcome.retry_in is not None and outcome.retry_in > 0
    assert parts_of(runtime, job.job_id)[0].token == "spl_live"  # untouched
    ImportService(runtime, split_lease=0.0).split_part(job.job_id, part_pk)  # taken over
    assert parts_of(runtime, job.job_id)[0].status == "done"
    with runtime.database.unit_of_work() as uow, pytest.raises(SplitTakenOver):
        PartFence(runtime.database, part_pk, "spl_live").write(uow.session, 10)


def test_a_part_of_a_job_that_failed_stages_nothing_more(runtime):
    data, _, _ = export()
    service = ImportService(runtime, split_parts=2, part_min_bytes=len(data) // 3)
    job = service.create_job(io.BytesIO(data), filename="history.ndjson")
    first, second = service.prepare(job.job_id).part_pks
    with runtime.database.unit_of_work() as uow:
        part = uow.session.get(ImportSplitPart, first)
        part.token = "spl_running"
        uow.commit()
    service.fail_job(job.job_id, "stopped by a test")
    with runtime.database.unit_of_work() as uow, pytest.raises(SplitTakenOver):
        PartFence(runtime.database, first, "spl_running").write(uow.session, 10)
    assert service.split_part(job.job_id, second).part_pks == []  # the job ended: nothing to do
    view = service.get(job.job_id)
    assert (view.status, view.detail) == ("failed", "stopped by a test")
    assert message_count(runtime) == 0


@pytest.mark.services
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_real_workers_split_a_big_upload_in_parts_with_exact_counts(
        runtime, backend, tmp_path):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("the workers split in as many parts as the machine has cores")
    slots, per_slot, pad = 200, 45, "p" * 2_000  # 18 MB: more than two parts' worth
    lines = []
    for turn in range(per_slot):
        for slot in range(slots):
            at = START + timedelta(minutes=turn + (120 if turn >= 30 else 0))
            lines.append(formats.json.dumps({
                **row(f"shop-{slot}", "robot" if turn % 3 == 0 else "counterpart", at,
                      f"turn {turn}", message_id=f"m-{slot}-{turn}"),
                "note": pad}))  # a column the import does not read: dropped by the split
    lines.insert(5_000, "not json")
    upload = tmp_path / "history.ndjson"
    upload.write_text("\n".join(lines) + "\n" + lines[10] + "\n")
    assert upload.stat().st_size > 2 * PART_MIN_BYTES
    env = {**backend.env(), "PYTHONPATH": str(ROOT)}
    queued = subprocess.run([str(BIN / "auto-session"), "import", str(upload)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)
    assert queued.returncode == 0, queued.stderr
    job_id = re.search(r"import job (\S+) queued", queued.stdout).group(1)  # type: ignore[union-attr]

    log = tmp_path / "worker.log"
    workers = [start_worker(env, log, f"parts-{n}") for n in range(2)]
    service = ImportService(runtime)
    try:
        wait_until(lambda: service.get(job_id).finished, 240, "the job to finish", log)
    finally:
        for worker in workers:
            stop(worker)
    job = service.get(job_id)
    rows = slots * per_slot
    assert (job.status, job.total_rows, job.inserted, job.duplicates, job.invalid) == (
        "partially_succeeded", rows + 2, rows, 1, 1)
    assert [(e.line, e.error.split(":")[0]) for e in job.errors] == [(5_001, "not valid JSON")]
    assert message_count(runtime) == rows
    assert Counter(s.shop_id for s in sessions_of(runtime)) == {
        f"shop-{n}": 2 for n in range(slots)}
    text = log.read_text()
    assert re.search(r"split in (\d+) parts", text), text[-3000:]
    assert text.count("Task imports.split_part[") >= 4  # received and succeeded, each part
    assert staged_left(runtime, job_id) == (0, 0)


@pytest.mark.parametrize("cut_every", [1, 7, 64, 1 << 16])
def test_the_scan_cuts_only_at_line_starts_and_numbers_their_lines(cut_every):
    text = b"".join(b"x" * (n * 37 % 211) + b"\n" * (1 + n % 3) for n in range(2_000)) + b"tail"
    scan = decoding.scan_upload(lambda: io.BytesIO(gzip.compress(text)), cut_every=cut_every)
    assert scan.size == len(text) and scan.lines == text.count(b"\n") + 1
    assert scan.cuts and all(0 < a < b for (a, _), (b, _) in zip(scan.cuts, scan.cuts[1:],
                                                                  strict=False))
    for offset, line in scan.cuts:
        assert text[offset - 1:offset] == b"\n" and line == text[:offset].count(b"\n") + 1
    previous = 0
    for offset, _ in scan.cuts:  # the first line start at or past every cut_every bytes
        assert offset - previous >= cut_every or offset == text.find(b"\n", previous) + 1
        previous = offset
    start, stop = scan.cuts[len(scan.cuts) // 2][0], scan.cuts[-1][0]
    with decoding.open_text_range(lambda: io.BytesIO(gzip.compress(text)), "utf-8", start,
                                 stop) as part:
        assert part.read().encode() == text[start:stop]
