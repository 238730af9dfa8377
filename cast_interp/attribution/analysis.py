"""Stage 4's statistics from per-example sums (no model needed): recovered shares with bootstrap CIs
over examples, first order against exact, the random revert sets, Spearman with the map."""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import stats
from .result import AttributionResult


def _ratio(num: np.ndarray, den: np.ndarray) -> Any:
    """sum(num) / sum(den) over rows (num may have more columns); NaN when sum(den) <= 0."""
    d = den.sum()
    return num.sum(0) / d if d > 0 else np.full(num.shape[1:], np.nan)


def _ratio_ci(num: Tensor, den: Tensor, rows: Sequence[int], boot: dict) -> dict:
    """sum(num) / sum(den) over `rows` with a percentile bootstrap over those rows."""
    x, y = num.double().numpy()[rows], den.double().numpy()[rows]
    r = stats.bootstrap_statistic(lambda i: _ratio(x[i], y[i]), len(rows), **boot)
    return {"estimate": r["estimate"], "low": r["low"], "high": r["high"]}


def _spearman_ci(x: Tensor, refs: dict[str, Tensor], rows: Sequence[int], boot: dict) -> dict:
    """Spearman of summed per-example values `x` `[n_ex, n_units]` with each reference: fixed
    `[n_units]`, or per example `[n_ex, n_units]` (resampled with x). Bootstrap over examples."""
    xs = x.double().numpy()[rows]
    ys = {k: v.double().numpy()[rows] if v.dim() == 2 else v.double().numpy()
          for k, v in refs.items()}

    def fn(i):
        return [stats.spearman(xs[i].sum(0), y[i].sum(0) if y.ndim == 2 else y) for y in ys.values()]

    r = stats.bootstrap_statistic(fn, len(rows), **boot)
    est, low, high = (np.atleast_1d(r[k]) for k in ("estimate", "low", "high"))
    out = {k: {"spearman": float(est[j]), "low": float(low[j]), "high": float(high[j]),
               "n_units": int(x.shape[1])} for j, k in enumerate(ys)}
    for k, y in ys.items():
        if y.ndim == 1:
            out[k]["p_permutation"] = _permutation_p(xs.sum(0), y, out[k]["spearman"],
                                                     boot["n_boot"], boot["seed"])
    return out


def _permutation_p(x: np.ndarray, y: np.ndarray, rho: float, n_perm: int, seed: int) -> float:
    """Two-sided p of Spearman(x, y) against y permuted across units (what an unrelated map
    gives). The bootstrap CI holds the units fixed, so it can exclude 0 for a random map; this
    p-value is the test of association (ours)."""
    if not math.isfinite(rho):
        return math.nan
    null = np.array([stats.spearman(x, stats.permute_within(y, seed=seed + j))
                     for j in range(n_perm)])
    null = null[np.isfinite(null)]
    return float((1 + (np.abs(null) >= abs(rho) - 1e-12).sum()) / (null.size + 1))


def _agreement(fo: Tensor, ex: Tensor, mask: Tensor, n_tok: float, rows, boot) -> dict:
    """First order vs exact on the `mask` units (per example `[n_ex, L, n]`): Spearman with CI,
    max abs diff and relative L2 error of the token-mean values."""
    if int(mask.sum()) < 3:
        return {"n_units": int(mask.sum()), "spearman": math.nan}
    a, e = fo[:, mask], ex[:, mask]
    out = _spearman_ci(a, {"exact": e}, rows, boot)["exact"]
    a, e = a.sum(0) / n_tok, e.sum(0) / n_tok
    rel = float((a - e).norm() / e.norm()) if float(e.norm()) > 0 else math.nan
    return {**out, "max_abs_diff": float((a - e).abs().max()), "relative_error": rel}


def _analyze(res: AttributionResult, cmap: Any, *, k: dict[str, int], n_bootstrap: int,
             ci: float, seed: int) -> dict:
    """Everything the report needs, from the per-example sums (and the map, if any)."""
    pe, boot = res.per_example, {"n_boot": n_bootstrap, "ci": ci, "seed": seed}
    every, B = list(range(len(pe["drop"]))), res.rows("B")
    tok, drop = pe["tokens"], pe["drop"]
    n_tok = float(tok.sum())
    halves = (("", every), ("_A", res.rows("A")), ("_B", B))
    # each half's drop with its CI: a share over a drop whose CI reaches 0 is not reported as a
    # share (`inference.share_or_difference`), so the report needs the denominators' CIs
    out: dict[str, Any] = {"unit": res.config["unit"], "drop": {
        "total": float(drop.sum()) / n_tok, "total_ci": _ratio_ci(drop, tok, every, boot),
        **{f"ci{t}": _ratio_ci(drop, tok, rows, boot) for t, rows in halves[1:]},
        "L_util_tuned": float(pe["nll_tuned"].sum()) / n_tok,
        "L_util_original": float(pe["nll_original"].sum()) / n_tok, "n_tokens": n_tok}}
    joint = {name[len("joint_"):]: v for name, v in pe.items() if name.startswith("joint_")}
    out["joint"] = {name: {"recovered": float(v.sum()) / n_tok,
                           **{f"share{t}": _ratio_ci(v, drop, rows, boot) for t, rows in halves},
                           **{f"recovered_ci{t}": _ratio_ci(v, tok, rows, boot)
                              for t, rows in halves}}
                    for name, v in joint.items()}
    out["additivity"] = _additivity(res, joint.get("all_units"), n_tok)
    out["agreement"] = {}
    for kind in res.kinds:
        d = res.units(kind)
        fo, ex = pe[f"{kind}_first_order"], pe[f"{kind}_exact"]
        out["agreement"][kind] = _agreement(fo, ex, d["measured"] & d["changed"], n_tok, every,
                                            boot)
        out["agreement"][f"{kind}_spread"] = _agreement(fo, ex, d["spread"], n_tok, every, boot)
    out["random"] = _random(pe["random_draws"], drop, every, B, out["joint"], k[res.config["unit"]])
    if cmap is not None:
        out["map"] = {kind: _map_agreement(res, cmap, kind, every, boot, k[kind])
                      for kind in res.kinds}
    if "safety_tokens" in pe:
        n_s = float(pe["safety_tokens"].sum())
        out["safety_lost"] = {name[len("safety_joint_"):]: float(v.sum()) / n_s
                              for name, v in pe.items() if name.startswith("safety_joint_")}
    return out


def _additivity(res: AttributionResult, all_units_pe: Optional[Tensor], n_tok: float) -> dict:
    """The per-unit recoveries summed, beside the joint revert of every unit: what the exact
    singles miss (interaction) and what no unit owns (drop left)."""
    out: dict[str, Any] = {"sum_first_order": 0.0, "sum_exact_singles": 0.0, "n_exact": 0,
                           "n_units": 0}
    for kind in res.kinds:
        d = res.units(kind)
        out["sum_first_order"] += float(d["first_order"].sum())
        out["sum_exact_singles"] += float(d["exact"].nan_to_num(0.0).sum())
        out["n_exact"] += int(d["measured"].sum())
        out["n_units"] += d["first_order"].numel()
    out["all_exact"] = out["n_exact"] == out["n_units"]
    if all_units_pe is not None:
        rec = float(all_units_pe.sum()) / n_tok
        total = float(res.per_example["drop"].sum()) / n_tok
        out.update(recovered_all_units=rec, drop_left_after_all_units=total - rec,
                   interaction=out["sum_exact_singles"] - rec if out["all_exact"] else math.nan)
    return out


def _random(draws: Tensor, drop: Tensor, every, B, joint: dict, k: int) -> dict:
    """Shares recovered by the random k-sets (on all examples and on half B) and where the map's
    top-k by C and the half-A selection fall among them (`stats.empirical_p`, larger is extreme)."""
    d, dr = draws.double().numpy(), drop.double().numpy()
    out: dict[str, Any] = {"k": k, "n_draws": int(d.shape[1])}
    for tag, rows in (("", every), ("_B", B)):
        shares = _ratio(d[rows], dr[rows])
        fin = shares[np.isfinite(shares)]
        out[f"shares{tag}"] = shares.tolist()
        out[f"mean{tag}"] = float(fin.mean()) if fin.size else math.nan
        out[f"sd{tag}"] = float(fin.std(ddof=1)) if fin.size > 1 else math.nan
        lo, hi = np.quantile(fin, [0.025, 0.975]) if fin.size else (math.nan, math.nan)
        out[f"low{tag}"], out[f"high{tag}"] = float(lo), float(hi)
    for name, tag in (("top_k_C", ""), ("top_k_C", "_B"), ("selected", "_B")):
        v = joint.get(name, {}).get(f"share{tag}", {}).get("estimate", math.nan)
        if math.isfinite(v) and np.isfinite(out[f"shares{tag}"]).any():
            out[f"{name}{tag}_vs_random"] = stats.empirical_p(v, out[f"shares{tag}"],
                                                              alternative="greater")
    return out


def _map_agreement(res: AttributionResult, cmap: Any, kind: str, rows, boot, k: int) -> dict:
    """Spearman of recovered with C, O and S (first order over all units; exact over the
    measured units, a sample biased to the top), and the top-k overlap with C."""
    m = cmap.units(kind)
    d, pe = res.units(kind), res.per_example
    meas = d["measured"]
    out = {"first_order": _spearman_ci(pe[f"{kind}_first_order"].flatten(1),
                                       {by: m[by].flatten() for by in "COS"}, rows, boot),
           "exact": _spearman_ci(pe[f"{kind}_exact"][:, meas],
                                 {by: m[by][meas] for by in "COS"}, rows, boot)}
    kk = min(k, int(torch.isfinite(m["C"]).sum()))
    top_r = set(res.ranking(kind, by="recovered")[:kk])
    out["top_k_overlap"] = len(set(cmap.top_units(kk, by="C", unit=kind)) & top_r) / kk
    out["k"] = kk
    return out
