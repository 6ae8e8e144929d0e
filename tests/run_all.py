"""Run the whole suite twice — on SQLite and on MariaDB + Redis — and sum up.

`make test` calls this. Extra arguments go to both pytest runs. Each pass runs in
its own process so that no module state leaks from one backend to the other.

The two passes run at the same time (they share nothing: the SQLite pass uses temporary
files and no Redis, the MariaDB pass its own database and Redis db), which takes the
whole suite from the sum of the two to about the longer one. Each pass's output is
kept in a file and printed whole when it ends, so the two never interleave.
`TEST_SERIAL=1` runs them one after the other, streaming, as before.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

BACKENDS = ("sqlite", "mysql")


def command(backend: str, extra: list[str], report: Path) -> list[str]:
    return [sys.executable, "-m", "pytest", "--backend", backend, f"--junitxml={report}",
            *extra]


def counts_of(report: Path) -> dict[str, int]:
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if report.exists():
        root = ET.parse(report).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        for suite in suites:
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    return counts


def run_serial(extra: list[str], tmp: Path) -> dict[str, int]:
    codes = {}
    for backend in BACKENDS:
        print(f"\n===== pass: {backend} =====", flush=True)
        codes[backend] = subprocess.call(
            command(backend, extra, tmp / f"{backend}.xml"),
            env={**os.environ, "TEST_BACKEND": backend})
    return codes


def run_together(extra: list[str], tmp: Path) -> dict[str, int]:
    running = {}
    for backend in BACKENDS:
        log = (tmp / f"{backend}.log").open("wb")
        running[backend] = (subprocess.Popen(
            command(backend, extra, tmp / f"{backend}.xml"), stdout=log,
            stderr=subprocess.STDOUT, env={**os.environ, "TEST_BACKEND": backend}), log)
    print(f"running the passes together: {', '.join(BACKENDS)} (TEST_SERIAL=1: one by one)",
          flush=True)
    codes: dict[str, int] = {}
    started = time.monotonic()
    while len(codes) < len(running):
        for backend, (process, log) in running.items():
            if backend in codes or process.poll() is None:
                continue
            codes[backend] = process.returncode
            log.close()
            print(f"\n===== pass: {backend} ({time.monotonic() - started:.0f} s) =====",
                  flush=True)
            sys.stdout.write((tmp / f"{backend}.log").read_text(errors="replace"))
            sys.stdout.flush()
        time.sleep(0.5)
    return codes


def main() -> int:
    extra = sys.argv[1:]
    total = {"passed": 0, "failed": 0, "skipped": 0}
    worst = 0
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        serial = os.environ.get("TEST_SERIAL", "").lower() in ("1", "true", "yes")
        codes = (run_serial if serial else run_together)(extra, tmp)
        for backend in BACKENDS:
            code, c = codes[backend], counts_of(tmp / f"{backend}.xml")
            failed = c["failures"] + c["errors"]
            total["failed"] += failed
            total["skipped"] += c["skipped"]
            total["passed"] += c["tests"] - failed - c["skipped"]
            if code not in (0, 5):
                worst = worst or code
            print(f"pass {backend}: exit {code}, {c}", flush=True)
    print(f"\nboth backends: {total['passed']} passed, {total['failed']} failed, "
          f"{total['skipped']} skipped")
    return worst or (1 if total["failed"] else 0)


if __name__ == "__main__":
    sys.exit(main())
