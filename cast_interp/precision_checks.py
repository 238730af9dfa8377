"""Accuracy checks for a cheaper numeric path (bf16, grouped batches) against the float32 one.

A faster path is used for a stage only where it keeps the numbers that stage reports. Each check
compares what the stage delivers, computed both ways, with a margin the experiment itself
supplies (the issue's criteria, ours in their thresholds):

- `check_map` (diagnosis): the top-k units by C of the candidate map overlap the reference map's
  (at least 25 of 27 on SmolLM2: `min_overlap=25/27`), and O and S rank the units alike
  (Spearman >= 0.95 each).
- `check_paired_differences` (evaluation): per prompt, the difference between two arms computed
  on the candidate path agrees with float32's to within 5% of the float32 differences' spread
  (root mean square of the disagreement <= `tol` x their standard deviation).
- `check_curves` (training): at every checkpoint the candidate run stays within the seed-to-seed
  spread of float32 runs: |candidate_s(t) - float32_s(t)| <= max_s' float32_s'(t) - min_s'
  float32_s'(t), run s of each path on the same training seed.

Every check returns a dict with "passed" (bool), the numbers it compared and the thresholds, so a
benchmark or a report can print it beside the timings.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence, Union

import numpy as np
from jaxtyping import Float
from torch import Tensor

from .stats import count_from_fraction, rank_order, spearman

ArrayLike = Union[Tensor, np.ndarray, Sequence]

MIN_TOPK_OVERLAP = 25 / 27  # SmolLM2: 25 of the top 27 (10% of 270) heads
MIN_SPEARMAN = 0.95
PAIRED_TOL = 0.05


def _scores(m: Any, unit: str) -> dict[str, np.ndarray]:
    """{"O", "S", "C"} (those present) of a `ConflictMap`, a mapping, or an object with those
    attributes, as float64 arrays `[n_layers, n_units]`."""
    if hasattr(m, "units"):
        d = m.units(unit)
    elif isinstance(m, Mapping):
        d = m
    else:
        d = {a: getattr(m, a) for a in ("O", "S", "C") if getattr(m, a, None) is not None}
    out = {}
    for a in ("O", "S", "C"):
        v = d.get(a)
        if v is not None:
            out[a] = np.asarray(v.detach().cpu().double() if isinstance(v, Tensor) else v,
                                dtype=np.float64)
    return out


def check_map(
    reference: Any, candidate: Any, *, k: Union[int, float] = 0.1,
    min_overlap: float = MIN_TOPK_OVERLAP, min_spearman: float = MIN_SPEARMAN,
    unit: str = "head", seed: int = 0,
) -> dict:
    """Does the candidate conflict map (e.g. bf16) keep the reference's (float32) ranking?

    Args:
        reference, candidate: `ConflictMap`s, or anything with `O`, `S`, `C` tensors `[n_layers,
            n_units]` (a map of O alone is checked on O alone).
        k: the top-k by C compared: a count, or a fraction of the units (10%: 27 of SmolLM2's 270).
        min_overlap: the share of the top-k that must be in both (25/27 by default; rounded up to
            whole units).
        min_spearman: least Spearman correlation of O, and of S, between the maps.
        seed: ties of C broken by `stats.rank_order` with this seed (the map's own seed).

    Returns {"passed", "k", "overlap", "need", "spearman": {"O", "S"}, "min_spearman",
    "failures": [what failed]}.
    """
    ref, cand = _scores(reference, unit), _scores(candidate, unit)
    common = [a for a in ("O", "S", "C") if a in ref and a in cand]
    if not common:
        raise ValueError("The maps share none of O, S, C: pass two ConflictMaps (or O/S/C tensors "
                         "of the same units).")
    for a in common:
        if ref[a].shape != cand[a].shape:
            raise ValueError(f"{a} has shape {ref[a].shape} in the reference but "
                             f"{cand[a].shape} in the candidate: maps of different models.")
    failures, out = [], {"spearman": {}, "min_spearman": min_spearman}
    if "C" in common:
        n = ref["C"].size
        kk = count_from_fraction(k, n) if isinstance(k, float) else int(k)
        if not 1 <= kk <= n:
            raise ValueError(f"k={k} gives {kk} units; need 1..{n}.")
        top = [set(rank_order(m["C"], seed=seed)[:kk].tolist()) for m in (ref, cand)]
        overlap = len(top[0] & top[1])
        need = math.ceil(min_overlap * kk - 1e-9)
        out.update(k=kk, overlap=overlap, need=need)
        if overlap < need:
            failures.append(f"top-{kk} by C overlap {overlap} < {need}")
    for a in ("O", "S"):
        if a in common:
            rho = spearman(ref[a], cand[a])
            out["spearman"][a] = rho
            if not rho >= min_spearman:  # NaN fails
                failures.append(f"Spearman({a}) {rho:.4f} < {min_spearman}")
    return {"passed": not failures, **out, "failures": failures}


def _grid(x: ArrayLike, name: str) -> np.ndarray:
    a = np.atleast_2d(np.asarray(x.detach().cpu().double() if isinstance(x, Tensor) else x,
                                 dtype=np.float64))
    if a.ndim != 2:
        raise ValueError(f"{name} must be [n_prompts] or [n_seeds, n_prompts], got shape "
                         f"{a.shape}.")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} has NaN/inf values: drop prompts without a value from every arm "
                         "first (the differences are paired).")
    return a


def check_paired_differences(
    ref_a: ArrayLike, ref_b: ArrayLike, cand_a: ArrayLike, cand_b: ArrayLike, *,
    tol: float = PAIRED_TOL,
) -> dict:
    """Do the per-prompt differences between arms a and b agree across the two paths?

    d_ref = ref_a - ref_b and d_cand = cand_a - cand_b per prompt (`[n_prompts]` or `[n_seeds,
    n_prompts]`, the same prompts and seeds in all four). Passes when the root mean square of
    d_cand - d_ref is at most `tol` times the standard deviation of d_ref (the spread the
    comparison of the arms works against).

    Returns {"passed", "rms_disagreement", "spread", "ratio" (rms / spread), "tol",
    "max_disagreement", "mean_shift" (mean d_cand - mean d_ref), "mean_ref", "mean_cand",
    "same_sign" (of the mean differences), "n"}.
    """
    grids = [_grid(x, n) for x, n in ((ref_a, "ref_a"), (ref_b, "ref_b"), (cand_a, "cand_a"),
                                      (cand_b, "cand_b"))]
    if len({g.shape for g in grids}) != 1:
        raise ValueError(f"The four arrays must have one shape (the same prompts and seeds), got "
                         f"{[g.shape for g in grids]}.")
    if grids[0].size < 2:
        raise ValueError("Need at least 2 prompts for a spread of the differences.")
    d_ref, d_cand = grids[0] - grids[1], grids[2] - grids[3]
    gap = d_cand - d_ref
    rms, spread = float(np.sqrt((gap ** 2).mean())), float(d_ref.std(ddof=1))
    ratio = rms / spread if spread > 0 else (0.0 if rms == 0 else math.inf)
    m_ref, m_cand = float(d_ref.mean()), float(d_cand.mean())
    return {"passed": ratio <= tol, "rms_disagreement": rms, "spread": spread, "ratio": ratio,
            "tol": tol, "max_disagreement": float(np.abs(gap).max()),
            "mean_shift": m_cand - m_ref, "mean_ref": m_ref, "mean_cand": m_cand,
            "same_sign": bool(np.sign(m_ref) == np.sign(m_cand)), "n": int(d_ref.size)}


def curve_array(curves: Sequence[Sequence[Mapping]], key: str) -> Float[np.ndarray, "run step"]:
    """`[n_runs, n_checkpoints]` of `key` from `TuningResult.curve`s (one per run), checked to be
    taken at the same steps."""
    if not curves:
        raise ValueError("No curves given.")
    steps = [[int(p["step"]) for p in c] for c in curves]
    if any(s != steps[0] for s in steps):
        raise ValueError(f"The curves are taken at different steps ({steps}): use one eval_every "
                         "and one number of steps for every run.")
    try:
        return np.array([[float(p[key]) for p in c] for c in curves], dtype=np.float64)
    except KeyError:
        raise ValueError(f"A curve has no {key!r}; it has {sorted(curves[0][0])}.") from None


def check_curves(reference: ArrayLike, candidate: ArrayLike, *, atol: float = 1e-6) -> dict:
    """Does each candidate run stay within the float32 runs' seed-to-seed spread?

    Args:
        reference: `[n_seeds, n_checkpoints]` float32 curves of one measure, one row per training
            seed (at least 2: the spread is theirs).
        candidate: `[n_runs, n_checkpoints]` the candidate path's curves; row i is on the training
            seed of reference row i (n_runs <= n_seeds).
        atol: slack where the seeds agree exactly (the untrained model at step 0).

    Passes when at every checkpoint t, max_i |candidate_i(t) - reference_i(t)| <= (max - min over
    the reference seeds at t) + atol. Returns {"passed", "deviation" [n_checkpoints], "spread"
    [n_checkpoints], "worst_checkpoint", "worst_ratio" (deviation / spread there), "n_seeds"}.
    """
    ref, cand = _grid(reference, "reference"), _grid(candidate, "candidate")
    if ref.shape[0] < 2:
        raise ValueError("The reference needs curves of at least 2 training seeds (its spread is "
                         "the seed-to-seed spread).")
    if cand.shape[1] != ref.shape[1] or cand.shape[0] > ref.shape[0]:
        raise ValueError(f"candidate {cand.shape} must have the reference's checkpoints "
                         f"({ref.shape[1]}) and at most one run per reference seed "
                         f"({ref.shape[0]}).")
    spread = ref.max(0) - ref.min(0)
    dev = np.abs(cand - ref[: cand.shape[0]]).max(0)
    excess = dev - (spread + atol)
    worst = int(np.argmax(dev / np.maximum(spread, atol)))
    return {"passed": bool((excess <= 0).all()), "deviation": dev.tolist(),
            "spread": spread.tolist(), "worst_checkpoint": worst,
            "worst_ratio": float(dev[worst] / max(spread[worst], atol)), "n_seeds": ref.shape[0]}
