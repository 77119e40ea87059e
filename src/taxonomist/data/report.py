"""LoadReport: what went wrong while reading a data source, counted and located.

Every loader fills one report. Nothing is dropped without being counted here:
each problem kind keeps the number of affected samples and the first few
offending items (file, CSV line or COCO annotation) with a reason. With
``on_error="raise"`` the report becomes the message of a
:class:`~taxonomist.errors.DataError`; with ``on_error="skip"`` the bad rows are
dropped and the report is returned (``str(report)`` prints it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Literal

from ..errors import DataError

OnError = Literal["raise", "skip"]
ON_ERROR_CHOICES: tuple[str, ...] = ("raise", "skip")

# kind -> (what it means, how to fix it)
PROBLEM_KINDS: dict[str, tuple[str, str]] = {
    "missing_file": ("image file not found",
                     "check the path (relative paths start at the table's folder or at image_root)"),
    "unreadable_image": ("not a readable image (corrupt, truncated or not an image format)",
                         "re-export or delete these files"),
    "missing_label": ("no label given", "fill in the label, or leave such rows out"),
    "unknown_label": ("label is not a taxon of the taxonomy",
                      "rename it to a taxon name or node key of the taxonomy, or add the taxon to the tree"),
    "ambiguous_label": ("label names several taxa (homonyms)",
                        "use the node key instead of the name, or give the rank columns above it"),
    "inconsistent_lineage": ("rank columns disagree with the taxonomy's lineage",
                             "correct the rank columns of these rows, or the taxonomy"),
    "empty_class": ("label folder without any image",
                    "add images to the folder or remove it"),
    "stray_file": ("image outside any label folder",
                   "move it into the folder of its label"),
    "duplicate": ("same image and crop box as an earlier row",
                  "remove the repeated rows"),
    "bad_box": ("crop box is invalid (non-positive size, not numeric, or outside the image)",
                "fix the box (x, y, width, height in pixels from the top-left corner)"),
    "bad_value": ("invalid value", "fix the value in the named column"),
    "bad_reference": ("refers to an image or category id that does not exist",
                      "fix the id, or add the missing image/category entry"),
}


@dataclass(frozen=True)
class Problem:
    """One offending item: a file, a CSV line or an annotation (or a group of them)."""

    kind: str
    where: str
    detail: str = ""


@dataclass
class LoadReport:
    """Counts and first examples of everything that went wrong in one data source.

    ``counts[kind]`` is the number of samples (rows, files, annotations) with that
    problem (for ``empty_class``: the number of folders). A sample with several
    problems is counted under each of them but dropped once; ``n_read - n_kept``
    is the number of samples dropped.
    """

    source: str
    kind: str = ""
    n_read: int = 0
    n_kept: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[Problem]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    max_examples: int = 5

    # ---------------------------------------------------------------- filling
    def add(self, kind: str, where: str, detail: str = "", count: int = 1) -> None:
        """Record ``count`` samples with problem ``kind``; keep the first examples."""
        if kind not in PROBLEM_KINDS:
            raise ValueError(f"unknown problem kind {kind!r}; known: {', '.join(PROBLEM_KINDS)}")
        self.counts[kind] = self.counts.get(kind, 0) + int(count)
        shown = self.examples.setdefault(kind, [])
        if len(shown) < self.max_examples:
            shown.append(Problem(kind, where, detail))

    def note(self, text: str) -> None:
        """An informational line (unused columns, ignored files): never an error."""
        self.notes.append(text)

    # ---------------------------------------------------------------- reading
    @property
    def ok(self) -> bool:
        """True when no problem was found (notes do not count)."""
        return not any(self.counts.values())

    @property
    def n_problems(self) -> int:
        return int(sum(self.counts.values()))

    @property
    def n_dropped(self) -> int:
        return self.n_read - self.n_kept

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source, "kind": self.kind, "n_read": self.n_read, "n_kept": self.n_kept,
            "counts": dict(self.counts),
            "examples": {k: [{"where": p.where, "detail": p.detail} for p in v] for k, v in self.examples.items()},
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        head = f"data source: {self.source}" + (f" ({self.kind})" if self.kind else "")
        lines = [head, f"  {self.n_read} samples read, {self.n_kept} kept, {self.n_dropped} dropped"]
        for kind, n in self.counts.items():
            if not n:
                continue
            meaning, fix = PROBLEM_KINDS[kind]
            unit = "folder(s)" if kind == "empty_class" else "sample(s)"
            lines.append(f"  {kind}: {n} {unit}: {meaning}")
            for p in self.examples.get(kind, []):
                lines.append(f"    - {p.where}" + (f": {p.detail}" if p.detail else ""))
            if n > len(self.examples.get(kind, [])):
                lines.append(f"    ... ({n - len(self.examples.get(kind, []))} more)")
            lines.append(f"    fix: {fix}")
        for text in self.notes:
            lines.append(f"  note: {text}")
        return "\n".join(lines)

    # ----------------------------------------------------------------- policy
    def raise_or_warn(self, on_error: str) -> None:
        """Apply the bad-input policy: raise a DataError, or warn and go on."""
        if self.ok:
            return
        if on_error == "raise":
            raise DataError(
                f"{self}\n"
                f"{self.n_problems} problem(s) in {self.source}. Fix them, or load anyway with "
                "on_error='skip' (config: data.on_error=skip; CLI: --on-error skip): the bad samples are then "
                "dropped and this report is printed.")
        warnings.warn(f"skipped bad samples:\n{self}", DataWarning, stacklevel=3)


class DataWarning(UserWarning):
    """Issued when ``on_error='skip'`` dropped samples; the message is the LoadReport."""


def check_on_error(on_error: str) -> None:
    if on_error not in ON_ERROR_CHOICES:
        from ..errors import ConfigError

        raise ConfigError(f"on_error={on_error!r}; choose one of: {', '.join(ON_ERROR_CHOICES)}")
