"""A small deterministic all-pairs (pairwise) generator with constraints.

Given named dimensions and a predicate that says which full combinations are valid, return
rows (dicts) such that every pair of values of two dimensions that occurs in some valid
combination occurs in at least one row. Greedy, AETG-style: each new row is the best of a
few candidates built value by value in a seeded random order; ties prefer values listed in
``prefer`` (used to keep the number of worker configurations down). Deterministic for a
given seed; no dependency.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Row = dict[str, Any]

__all__ = ["all_pairs", "full_product"]


def full_product(dims: Mapping[str, Sequence[Any]], valid: Callable[[Row], bool]) -> list[Row]:
    """Every valid combination, in a stable order."""
    names = list(dims)
    rows = []
    for values in itertools.product(*(dims[n] for n in names)):
        row = dict(zip(names, values, strict=True))
        if valid(row):
            rows.append(row)
    return rows


def _pairs(row: Row, names: list[str]) -> set[tuple[str, Any, str, Any]]:
    return {(a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2)}


def all_pairs(
    dims: Mapping[str, Sequence[Any]],
    valid: Callable[[Row], bool],
    *,
    seed: int = 0,
    candidates: int = 24,
    prefer: Callable[[Row], int] | None = None,
    seeds: Sequence[Mapping[str, Any]] = (),
) -> list[Row]:
    """Rows covering every valid pair of values (see the module docs).

    ``seeds``: partial rows that must appear (each completed with the values that cover the
    most pairs): interactions of more than two values worth a case of their own.
    """
    names = list(dims)
    pool = full_product(dims, valid)
    uncovered: set[tuple[str, Any, str, Any]] = set()
    for row in pool:
        uncovered |= _pairs(row, names)
    rng = random.Random(seed)
    rows: list[Row] = []
    for partial in seeds:
        matching = [r for r in pool if all(r[k] == v for k, v in partial.items())]
        if not matching:
            raise ValueError(f"no valid row matches the seed {dict(partial)!r}")
        seeded = max(matching, key=lambda r: len(_pairs(r, names) & uncovered))
        rows.append(seeded)
        uncovered -= _pairs(seeded, names)
    # Each round adds one row covering at least one uncovered pair: bounded by len(uncovered).
    for _ in range(len(uncovered) + 1):
        if not uncovered:
            break
        best: Row | None = None
        best_score = (-1, -1)
        seed_pair = sorted(uncovered, key=repr)[rng.randrange(len(uncovered))]
        a, va, b, vb = seed_pair
        matching = [r for r in pool if r[a] == va and r[b] == vb]
        for row in rng.sample(matching, min(candidates, len(matching))):
            gain = len(_pairs(row, names) & uncovered)
            score = (gain, prefer(row) if prefer else 0)
            if score > best_score:
                best, best_score = row, score
        assert best is not None  # the seed pair came from a valid row
        rows.append(best)
        uncovered -= _pairs(best, names)
    return rows
