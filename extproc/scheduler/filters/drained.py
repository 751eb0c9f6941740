"""``drop-drained``: a drained endpoint receives no new requests, ever."""

from __future__ import annotations

from extproc.scheduler.candidates import Candidate, FilterContext


class DropDrained:
    """Drops drained endpoints; no fallback keeps them (the spec requires this filter)."""

    name = "drop-drained"

    def __call__(self, ctx: FilterContext, candidates: list[Candidate]) -> list[Candidate]:
        for c in candidates:
            if c.endpoint.drained:
                return [c for c in candidates if not c.endpoint.drained]
        return candidates
