"""The committed Grafana dashboard charts metrics the app really exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from app.observability.metrics import exposition
from app.runtime import Runtime

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "auto-session.json"
SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def queries(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [q for value in node.values() for q in queries(value)]
    if isinstance(node, list):
        return [q for value in node for q in queries(value)]
    return []


def test_every_dashboard_query_names_an_exposed_metric(runtime: Runtime):
    exposed = {family.name for family in text_string_to_metric_families(
        exposition(runtime.database).decode())}
    exprs = queries(json.loads(DASHBOARD.read_text()))
    assert len(exprs) >= 25
    charted = set()
    for expr in exprs:
        for name in re.findall(r"autosession_[a-z_]+", expr):
            for suffix in SUFFIXES:
                if name.endswith(suffix) and name.removesuffix(suffix) in exposed:
                    name = name.removesuffix(suffix)
            charted.add(name)
    assert charted - exposed == set()
    # every metric of SPEC §13 is on a chart
    assert {"autosession_http_requests", "autosession_http_request_duration_seconds",
            "autosession_sessions", "autosession_transfers_waiting",
            "autosession_transfer_oldest_wait_seconds", "autosession_slot_lock_wait_seconds",
            "autosession_fence_rejections", "autosession_import_rows",
            "autosession_webhook_deliveries", "autosession_sweep_duration_seconds"} <= charted
