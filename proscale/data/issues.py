"""Counting data problems that are handled (not fatal): each kind is logged once, then only counted."""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("proscale.data")


class IssueLog:
    """Per-dataset counter of handled data problems.

    ``report(kind, detail)`` counts one occurrence and logs a warning the first time a kind is seen (with
    the file and the problem), so a dataset with thousands of the same defect logs one line. The counts
    are in ``counts`` (per process: DataLoader workers keep their own).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.counts: Counter[str] = Counter()

    def report(self, kind: str, detail: str) -> None:
        self.counts[kind] += 1
        if self.counts[kind] == 1:
            log.warning("%s: %s: %s (further cases are counted, not logged)", self.name, kind, detail)

    def __repr__(self) -> str:
        return f"IssueLog({self.name!r}, {dict(self.counts)})"
