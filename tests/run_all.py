"""Run the whole suite twice — on SQLite, then on MariaDB + Redis — and sum up.

`make test` calls this. Extra arguments go to both pytest runs. Each pass runs in
its own process so that no module state leaks from one backend to the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path


def run_pass(backend: str, extra: list[str], report: Path) -> tuple[int, dict[str, int]]:
    print(f"\n===== pass: {backend} =====", flush=True)
    cmd = [sys.executable, "-m", "pytest", "--backend", backend, f"--junitxml={report}", *extra]
    code = subprocess.call(cmd, env={**os.environ, "TEST_BACKEND": backend})
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if report.exists():
        root = ET.parse(report).getroot()
        suites = [root] if root.tag == "testsuite" else list(root)
        for suite in suites:
            for key in counts:
                counts[key] += int(suite.get(key, 0))
    return code, counts


def main() -> int:
    extra = sys.argv[1:]
    total = {"passed": 0, "failed": 0, "skipped": 0}
    worst = 0
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("sqlite", "mysql"):
            code, c = run_pass(backend, extra, Path(tmp) / f"{backend}.xml")
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
