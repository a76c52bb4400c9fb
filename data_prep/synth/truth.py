"""What parsing a generated split must give: the records, the counted skips and fixes of the
format's parser, and the keys the shard builder must skip (shared by the detection generators)."""
from __future__ import annotations


class SplitTruth:
    """Ground truth of one split, filled while its files are written."""

    def __init__(self) -> None:
        self.records: dict = {}
        self.skipped: dict[str, int] = {}
        self.fixed: dict[str, int] = {}
        self.builder_skipped: dict[str, list[str]] = {}

    def count(self, table: dict, reason: str, n: int = 1) -> None:
        table[reason] = table.get(reason, 0) + n

    def as_dict(self) -> dict:
        return {"records": self.records, "skipped": self.skipped, "fixed": self.fixed,
                "builder_skipped": {r: len(k) for r, k in self.builder_skipped.items()},
                "builder_skipped_keys": self.builder_skipped}
