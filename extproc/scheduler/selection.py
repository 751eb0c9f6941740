"""``max-score``: the picker point's plugin, the best few by score with ties taking turns.

It runs per request, so it is written for speed: for each entry one dict lookup for its in-flight
count ``n`` and ``a1/(d1+n) + a2/(d2+n)`` (``idle`` when nothing is in flight), keeping the best
few in a short sorted list. Only a strictly better score displaces a kept one, so among equal
scores the first in the (rotated) order wins and the rotation makes them take turns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from extproc.scheduler.interfaces import Entry

INF = math.inf


class MaxScore:
    name = "max-score"

    def select(
        self, entries: Sequence[Entry], inflight: Mapping[str, float], k: int, bonus: Mapping[str, float] | None
    ) -> list[str]:
        get = inflight.get
        if bonus or len(entries[0]) > 6:
            return _top_general(entries, inflight, k, bonus)
        if k == 1 or len(entries) == 1:
            best_s = -INF
            best_a = ""
            for addr, idle, a1, d1, a2, d2 in entries:
                x = get(addr)
                s = idle if x is None else a1 / (d1 + x) + a2 / (d2 + x)
                if s > best_s:
                    best_s = s
                    best_a = addr
            return [best_a]
        # Top k by insertion into a short descending list; most entries fail the first test.
        scores: list[float] = []
        top: list[str] = []
        worst = -INF
        for addr, idle, a1, d1, a2, d2 in entries:
            x = get(addr)
            s = idle if x is None else a1 / (d1 + x) + a2 / (d2 + x)
            if s > worst:
                i = len(scores)
                while i and s > scores[i - 1]:
                    i -= 1
                scores.insert(i, s)
                top.insert(i, addr)
                if len(top) > k:
                    scores.pop()
                    top.pop()
                if len(top) == k:
                    worst = scores[-1]
        return top


def _top_general(
    entries: Sequence[Entry], inflight: Mapping[str, float], k: int, bonus: Mapping[str, float] | None
) -> list[str]:
    """More than two in-flight terms, or a request scorer's bonus: slower, no built-in profile
    without a request scorer needs it."""
    get = inflight.get
    scored = []
    for e in entries:
        address = e[0]
        x = get(address, 0)
        s = e[2] / (e[3] + x) + e[4] / (e[5] + x)
        if len(e) > 6:
            for a, d in e[6]:
                s += a / (d + x)
        if bonus:
            s += bonus.get(address, 0.0)
        scored.append((s, address))
    # A stable sort keeps the rotation order among equal scores.
    scored.sort(key=lambda t: t[0], reverse=True)
    return [a for _, a in scored[:k]]
