"""Where the real public chat exports live: `shared/data` beside the checkout (as on
the development machines and in CI), or `AUTO_SESSION_SHARED_DATA`."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _find() -> Path:
    configured = os.environ.get("AUTO_SESSION_SHARED_DATA")
    if configured:
        return Path(configured)
    for candidate in (ROOT.parent / "shared" / "data", Path("/work/shared/data")):
        if candidate.is_dir():
            return candidate
    return ROOT.parent / "shared" / "data"


SHARED_DATA = _find()
TWCS_CSV = SHARED_DATA / "twcs_customer_support_twitter_first5000.csv"
UBUNTU_CSV = SHARED_DATA / "ubuntu_dialogue_corpus_3turn_sample_9999.csv"
