"""What an import did: the counts and the first row errors of a batch, a chunk, a job."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ImportCounts:
    """What a batch did; `inserted + duplicates + invalid` is every row it was given."""

    inserted: int = 0
    duplicates: int = 0
    invalid: int = 0
    sessions_created: int = 0
    sessions_updated: int = 0
    conflicts: int = 0
    # LLM review (SPEC §4d): boundaries that got a verdict, and those merged by it
    boundaries_reviewed: int = 0
    boundaries_merged: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    COUNTERS = ("inserted", "duplicates", "invalid", "sessions_created", "sessions_updated",
                "conflicts", "boundaries_reviewed", "boundaries_merged")

    def add(self, other: ImportCounts) -> None:
        for name in self.COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.extend(other.errors)

    def error(self, line: int, text: str) -> None:
        self.invalid += 1
        self.errors.append({"line": line, "error": text})

    def as_dict(self, max_errors: int = 100) -> dict[str, Any]:
        body: dict[str, Any] = {name: getattr(self, name) for name in self.COUNTERS}
        body["errors"] = sorted(self.errors, key=lambda e: e["line"])[:max_errors]
        return body

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImportCounts:
        counts = cls()
        for name in cls.COUNTERS:
            setattr(counts, name, int(data.get(name, 0)))
        counts.errors = list(data.get("errors") or [])
        return counts



def combined(*parts: ImportCounts) -> ImportCounts:
    total = ImportCounts()
    for part in parts:
        total.add(part)
    return total
