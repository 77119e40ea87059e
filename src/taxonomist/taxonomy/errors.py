"""Errors raised by the taxonomy engine. Every message says what is wrong and how to fix it."""

from __future__ import annotations


class TaxonomyError(ValueError):
    """A taxonomy file or operation is invalid."""


class UnknownNameError(TaxonomyError, KeyError):
    def __init__(self, name: str, suggestions: list[str] | None = None) -> None:
        self.name = name
        self.suggestions = suggestions or []
        hint = f" Did you mean: {', '.join(map(repr, self.suggestions))}?" if self.suggestions else ""
        super().__init__(f"no taxon named {name!r} in this taxonomy.{hint}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class AmbiguousNameError(TaxonomyError, KeyError):
    """A name matches several nodes (homonyms); the message lists their lineages."""

    def __init__(self, name: str, candidates: list[tuple[int, str, str, str]]) -> None:
        self.name = name
        self.candidates = candidates
        lines = "\n".join(f"  id {key!r} (node {nid}, rank {rank or '-'}): {lineage}"
                          for nid, lineage, rank, key in candidates[:10])
        more = f"\n  ... and {len(candidates) - 10} more" if len(candidates) > 10 else ""
        super().__init__(
            f"the name {name!r} is ambiguous: {len(candidates)} taxa carry it:\n{lines}{more}\n"
            "Use the node id/key instead, or narrow it with a rank or an ancestor (find(name, rank=..., under=...)).")

    def __str__(self) -> str:
        return self.args[0]
