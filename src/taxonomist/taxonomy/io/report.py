"""The load report: what an importer read, skipped, repaired or added.

Every reader returns ``(taxonomy, report)`` when called with ``return_report=True``.
The report is plain data, so the CLI prints it and tests assert on it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LoadReport:
    """Counts and notes from one import.

    ``skipped`` and ``repaired`` map a reason (e.g. ``"synonym rows"``,
    ``"orphans attached to the root"``) to a count; nothing is dropped or fixed
    without being counted here.
    """

    path: str
    format: str
    rows_read: int = 0
    n_nodes: int = 0
    n_labels: int = 0
    synthetic_root: bool = False
    skipped: dict[str, int] = field(default_factory=dict)
    repaired: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rank_violations: int | None = None  # None: not measured (no ranks)

    def skip(self, reason: str, count: int) -> None:
        if count:
            self.skipped[reason] = self.skipped.get(reason, 0) + int(count)

    def repair(self, reason: str, count: int) -> None:
        if count:
            self.repaired[reason] = self.repaired.get(reason, 0) + int(count)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def lines(self) -> list[str]:
        """Human-readable summary, one fact per line."""
        out = [f"read {self.path} as {self.format}: {self.rows_read:,} rows/entries -> "
               f"{self.n_nodes:,} nodes, {self.n_labels:,} label nodes"]
        if self.synthetic_root:
            out.append("added a synthetic root named 'root' above the several top-level nodes")
        out += [f"skipped {n:,} {why}" for why, n in self.skipped.items()]
        out += [f"repaired {n:,} {why}" for why, n in self.repaired.items()]
        if self.rank_violations:
            out.append(f"{self.rank_violations:,} node(s) sit at or above the rank of a ranked ancestor "
                       "(rank order not enforced; `taxonomist taxonomy validate` lists them)")
        out += self.notes
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def to_dict(self) -> dict[str, object]:
        return asdict(self)
