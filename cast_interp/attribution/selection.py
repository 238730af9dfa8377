"""What stage 4 measures exactly: the halves A (choose) and B (measure), the first-order candidates
and a spread sample over the first-order range, the top-k chosen on A, and the joint sets."""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .. import stats
from ..data import DataError
from ..units import Unit, all_units, uses_gqa


def split_halves(n: int, *, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of example indices 0..n-1 into halves A (floor(n/2)) and B (the rest),
    disjoint and covering, each sorted."""
    if n < 4:
        raise DataError(f"The out-of-sample split needs at least 4 examples (2 per half), got {n}: "
                        "pass more utility examples (n_examples).")
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return sorted(int(i) for i in perm[: n // 2]), sorted(int(i) for i in perm[n // 2:])


def _flat_units(shape: tuple[int, int], flat: Sequence[int]) -> list[Unit]:
    return [(int(i) // shape[1], int(i) % shape[1]) for i in flat]


def spread_sample(scores: Tensor, n: int, *, seed: int, eligible: Optional[Tensor] = None) -> list[Unit]:
    """`n` units at evenly spaced ranks of `scores` `[L, n_units]` (largest first, both ends kept):
    a sample that covers the whole range, for checking an estimate against exact values.
    Only `eligible` units (bool mask, default all) are sampled; ties in a seeded order."""
    v = scores.double().clone()
    if eligible is not None:
        v[~eligible] = math.nan
    order = stats.rank_order(v.flatten(), seed=seed)[: int(torch.isfinite(v).sum())]
    if len(order) == 0 or n < 1:
        return []
    pos = np.unique(np.round(np.linspace(0, len(order) - 1, min(n, len(order)))).astype(int))
    return sorted(_flat_units(tuple(v.shape), order[pos]))


def _count(k: Union[int, float, None], n: int, what: str) -> int:
    """A count of units from an int or a fraction of n in (0, 1) (round half up, >= 1; ours)."""
    if k is None:
        k = 0.1
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"{what} must be an int count or a float fraction in (0, 1), got {k!r}.")
    if isinstance(k, float):
        if not 0.0 < k < 1.0:
            raise ValueError(f"{what} as a fraction must be in (0, 1), got {k}.")
        return stats.count_from_fraction(k, n)
    if not 1 <= k <= n:
        raise ValueError(f"{what} = {k} is out of range: pick 1..{n} (the model has {n} units of "
                         "this kind).")
    return int(k)


def _every(shape: tuple[int, int]) -> list[Unit]:
    return [(l, i) for l in range(shape[0]) for i in range(shape[1])]


def _exact_sets(fo: dict[str, Tensor], changed: dict[str, Tensor], rows_A, *, exact: str,
                n_candidates: dict[str, int], n_spread: int, seed: int) -> dict[str, dict]:
    """Per kind: candidates (top by first order on half A), the spread sample (evenly spaced ranks
    of first order on all examples, changed units only), and the units to measure exactly."""
    out = {}
    for kind, pe in fo.items():
        fo_a, fo_all = pe[rows_A].sum(0), pe.sum(0)
        shape = tuple(fo_all.shape)
        top = stats.rank_order(fo_a.flatten(), seed=seed)[: n_candidates[kind]]
        cand = sorted(_flat_units(shape, top))
        spread = spread_sample(fo_all, n_spread, seed=seed, eligible=changed[kind])
        todo = _every(shape) if exact == "all" else sorted(set(cand) | set(spread))
        out[kind] = {"candidates": cand, "spread": spread, "exact": todo}
    return out


def _select_on_A(exact_pe: Tensor, candidates: Sequence[Unit], rows_A, k: int, seed: int) -> list[Unit]:
    """Top-k candidates by exact recovery summed over half A only (ties in a seeded order)."""
    on_a = exact_pe[rows_A].sum(0)
    scores = torch.full_like(on_a, math.nan)
    for l, i in candidates:
        scores[l, i] = on_a[l, i]
    return sorted(_flat_units(tuple(on_a.shape), stats.rank_order(scores.flatten(), seed=seed)[:k]))


def _joint_sets(tuned, unit: str, selected, conflict_map, k: int) -> dict[str, tuple[list, list]]:
    """(heads, groups) reverted together: the half-A selection, the map's top-k by C, every unit,
    and under GQA all heads (Q/O) and all groups (K/V) apart."""
    as_kind = lambda us: (us, []) if unit == "head" else ([], us)  # noqa: E731
    out = {"selected": as_kind(selected)}
    if conflict_map is not None:
        out["top_k_C"] = as_kind(sorted(conflict_map.top_units(k, by="C", unit=unit)))
    heads = all_units(tuned, "head")
    groups = all_units(tuned, "group") if uses_gqa(tuned) else []
    out["all_units"] = (heads, groups)
    if groups:
        out.update(all_heads=(heads, []), all_groups=([], groups))
    return out
