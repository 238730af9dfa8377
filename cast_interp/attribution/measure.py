"""`attribute`: stage 4 end to end, from a tuned model and its original to an `AttributionResult`:
data and halves, first order for every unit, exact reverts, the joint and random sets, analysis."""

from __future__ import annotations

import math
import time
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .. import backend, distributed
from ..backend import Model
from ..data import (ChatDataset, DataError, encode_example, make_batches, self_reference,
                    with_refusals)
from ..model import model_id
from ..objectives import NonFiniteLossError
from ..units import Unit, UnitError, UnitKind, all_units, n_units, uses_gqa
from .analysis import _analyze
from .config import AttributionConfig
from .exact import (_Evaluator, _exact_singles, _tokens, changed_outside_units, changed_units,
                    check_pair, per_example_nll)
from .first_order import first_order
from .result import ATTRIBUTION_VERSION, AttributionResult
from .selection import _count, _exact_sets, _joint_sets, _select_on_A, split_halves


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


def _prepare_data(tuned, original, utility_data, safety_data, *, n_examples, utility_reference,
                  max_new_tokens, reference_cache, batch_size, seed) -> dict:
    """Utility examples (self-reference answers of `original` by default), split into halves and
    batched per half with content-only losses; safety examples likewise (no split)."""
    for name, ds in (("utility_data", utility_data), ("safety_data", safety_data)):
        if ds is not None and (not isinstance(ds, ChatDataset) or len(ds) == 0):
            raise DataError(f"{name} must be a non-empty ChatDataset (e.g. load_bundled(...)), got "
                            f"{type(ds).__name__}" + (" of length 0." if ds is not None else "."))
    util = utility_data.take(n_examples)
    if utility_reference == "self":  # under torchrun: rank 0 generates (and caches), all get it
        util = distributed.main_only(lambda: self_reference(
            original, util, max_new_tokens=max_new_tokens, cache_path=reference_cache))
    A, B = split_halves(len(util), seed=seed)
    kw = dict(batch_size=batch_size, end_of_turn_in_loss=False)
    # Each half batched on its own (half A's numbers cannot depend on half B's examples), longest
    # first so that batch-mates have similar lengths (self-reference answers vary: less padding).
    length = [len(encode_example(tuned.tokenizer, ex)[0]) for ex in util]
    order = [sorted(half, key=lambda i: (-length[i], i)) for half in (A, B)]
    batches = [b for half in order for b in make_batches(
        tuned, ChatDataset(util.name, [util[i] for i in half], util.source), **kw)]
    out = {"util": util, "A": A, "B": B, "order": order[0] + order[1], "batches": batches,
           "safe": None, "safe_batches": None}
    if safety_data is not None:
        out["safe"] = with_refusals(safety_data.take(n_examples), seed=seed)
        out["safe_batches"] = make_batches(tuned, out["safe"], **kw)
    return out


def _unit_tensors(fo_pe, ex_pe, sets, changed, total, n_tok, safety) -> dict[str, Tensor]:
    """The per-unit maps of one kind (token means) from the per-example sums."""
    shape = tuple(fo_pe.shape[1:])
    measured = _mask(shape, sets["exact"])
    fo, ex = fo_pe.sum(0) / n_tok, ex_pe.sum(0) / n_tok  # NaN where not measured
    rec = torch.where(measured, ex, fo)
    d = {"first_order": fo, "exact": ex, "recovered": rec,
         "share": rec / total if total > 0 else torch.full(shape, math.nan, dtype=torch.float64),
         "candidate": _mask(shape, sets["candidates"]), "spread": _mask(shape, sets["spread"]),
         "measured": measured, "changed": changed}
    if safety is not None:
        fo_s, ex_s, n_s = safety
        d["safety_first_order"], d["safety_exact"] = fo_s.sum(0) / n_s, ex_s.sum(0) / n_s
    return d


def _mask(shape, us: Sequence[Unit]) -> Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    for l, i in us:
        m[l, i] = True
    return m


def _assemble(data, ev, nll_orig, fo, fo_safe, ex_util, ex_safe, joint, rand, sets, changed):
    """(per_example, per-unit maps per kind) of a result from the measured pieces."""
    tokens = _tokens(data["batches"])
    drop = ev.base_util - nll_orig
    n_tok = float(tokens.sum())
    per_example = {"tokens": tokens, "nll_tuned": ev.base_util, "nll_original": nll_orig,
                   "drop": drop, "random_draws": rand,
                   **{f"{kind}_first_order": v for kind, v in fo.items()},
                   **{f"{kind}_exact": v for kind, v in ex_util.items()},
                   **{f"joint_{n}": u for n, (u, _) in joint.items()}}
    safety = {kind: None for kind in fo}
    if fo_safe is not None:
        s_tok = _tokens(data["safe_batches"])
        per_example.update({"safety_tokens": s_tok, "safety_nll_tuned": ev.base_safe,
                            **{f"safety_{kind}_first_order": -v for kind, v in fo_safe.items()},
                            **{f"safety_{kind}_exact": v for kind, v in ex_safe.items()},
                            **{f"safety_joint_{n}": s for n, (_, s) in joint.items()}})
        safety = {kind: (-fo_safe[kind], ex_safe[kind], float(s_tok.sum())) for kind in fo}
    maps = {kind: _unit_tensors(fo[kind], ex_util[kind], sets[kind], changed[kind],
                                float(drop.sum()) / n_tok, n_tok, safety[kind]) for kind in fo}
    return per_example, maps


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _check_options(tuned, cfg: AttributionConfig, *, unit, k
                   ) -> tuple[tuple[str, ...], dict[str, int], dict[str, int]]:
    """Clear errors for options that depend on the model; (kinds, k per kind, candidates per
    kind). The options' own ranges are checked by `AttributionConfig`."""
    kinds = ("head", "group") if uses_gqa(tuned) else ("head",)
    if unit not in kinds:
        raise UnitError(f"unit must be one of {kinds} for this model, got {unit!r}"
                        + (": it has no GQA, so no key/value groups." if unit == "group" else "."))
    n_candidates = cfg.n_candidates
    L = tuned.cfg.n_layers
    sizes = {kind: L * n_units(tuned, kind) for kind in kinds}
    ks = {kind: _count(k if kind == unit else None, sizes[kind], "k") for kind in kinds}
    # Candidates (ours): 2k by default, as the screened sensitivity, so the top-k is chosen by exact
    # values among twice as many first-order candidates; only the selected kind has any (the other
    # kind, groups when heads are selected, gets the spread sample only).
    cand = {kind: 0 for kind in kinds}
    cand[unit] = min(sizes[unit], n_candidates or 2 * ks[unit])
    if cand[unit] < ks[unit]:
        raise ValueError(f"n_candidates = {n_candidates} < k = {ks[unit]}: the top-k is chosen among "
                         "the candidates, so pass n_candidates >= k.")
    return kinds, ks, cand


def _config_with(config: Optional[AttributionConfig], options: dict) -> AttributionConfig:
    """`config` (default `AttributionConfig()`) with `options` (its field names) replaced."""
    cfg = config if config is not None else AttributionConfig()
    if not isinstance(cfg, AttributionConfig):
        raise TypeError(f"config must be an AttributionConfig, got {type(cfg).__name__}.")
    known = {f.name for f in fields(AttributionConfig)}
    bad = sorted(set(options) - known)
    if bad:
        raise TypeError(f"attribute() got unknown option(s) {bad}; its options are the fields of "
                        f"AttributionConfig: {sorted(known)}.")
    return replace(cfg, **options) if options else cfg


def attribute(
    tuned: Model,
    original: Model,
    *,
    utility_data: ChatDataset,
    conflict_map: Any = None,
    safety_data: Optional[ChatDataset] = None,
    unit: UnitKind = "head",
    k: Union[int, float, None] = None,
    config: Optional[AttributionConfig] = None,
    reference_cache: Optional[Union[str, Path]] = None,
    label: str = "tuned",
    progress: bool = False,
    **options: Any,
) -> AttributionResult:
    """Which units of `tuned` caused its utility drop relative to `original` (see module doc).

    Args:
        tuned, original: the same model after and before training (any arm: full, CAST, random).
            Neither is changed (tuned's weights are swapped and restored bit-exactly).
        utility_data: benign prompts; the first `config.n_examples` are used.
        conflict_map: the map of `original` (optional): its top-k by C is reverted jointly and placed
            among the random draws; Spearman(recovered, C/O/S) with CIs.
        safety_data: harmful prompts (refusals added by `data.with_refusals`); when given, the
            safety loss lost by each revert is measured too (first order for all units, exact where
            utility is exact and for the joint sets; not for the random draws).
        unit: the kind of unit selected, drawn at random and compared with the map ("head", or
            "group" under GQA). Per-unit numbers are computed for every kind the model has.
        k: units per selected, top-k and random set: a count or a fraction (default 0.1, ours).
        config: how it is measured (`AttributionConfig`: examples, reference answers, exact scope,
            candidates, spread, draws, bootstrap, batch size, seed); default `AttributionConfig()`.
        reference_cache: where the self-reference answers are cached (None: not cached).
        label: names the tuned model in the result (e.g. "full", "cast", "random").
        **options: fields of `AttributionConfig` that replace `config`'s, e.g. `n_examples=8`.
    """
    cfg = _config_with(config, options)
    t_all, timings = time.perf_counter(), {}
    check_pair(tuned, original)
    kinds, ks, n_cand = _check_options(tuned, cfg, unit=unit, k=k)
    seed, n_draws = cfg.seed, cfg.n_draws
    if conflict_map is not None:  # the map describes the model before tuning
        conflict_map.check_model(original)
    t = time.perf_counter()
    data = _prepare_data(tuned, original, utility_data, safety_data, n_examples=cfg.n_examples,
                         utility_reference=cfg.utility_reference,
                         max_new_tokens=cfg.max_new_tokens, reference_cache=reference_cache,
                         batch_size=cfg.batch_size, seed=seed)
    rows_A = list(range(len(data["A"])))
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    fo = first_order(tuned, original, data["batches"], kinds)
    fo_safe = (first_order(tuned, original, data["safe_batches"], kinds)
               if data["safe"] is not None else None)
    timings["first_order"] = time.perf_counter() - t
    changed = {kind: changed_units(tuned, original, kind) for kind in kinds}
    sets = _exact_sets(fo, changed, rows_A, exact=cfg.exact, n_candidates=n_cand,
                       n_spread=cfg.n_spread, seed=seed)
    every = all_units(tuned, unit)
    rng = np.random.default_rng([seed, 2])
    draws = [sorted(every[i] for i in rng.choice(len(every), ks[unit], replace=False))
             for _ in range(n_draws)]
    n_joint = 2 + (conflict_map is not None) + 2 * (len(kinds) - 1)  # see _joint_sets
    n_evals = sum(len(s["exact"]) for s in sets.values()) + n_joint + n_draws
    bar = None
    if progress and distributed.is_main():  # this rank's share of the evaluations
        from tqdm.auto import tqdm

        mine = lambda n: len(distributed.share(range(n)))  # noqa: E731
        bar = tqdm(total=mine(n_evals - n_joint - n_draws) + mine(n_joint) + mine(n_draws),
                   desc=f"attribution ({label})")

    # Many small forwards from here on: no per-call weight copies (same numbers).
    with backend.inference_layout(tuned), backend.inference_layout(original):
        t = time.perf_counter()
        nll_orig = per_example_nll(original, data["batches"])
        ev = _Evaluator(tuned, original, data["batches"], data["safe_batches"], bar)
        if not (torch.isfinite(ev.base_util).all() and torch.isfinite(nll_orig).all()):
            raise NonFiniteLossError("Non-finite utility loss of tuned or original: check both "
                                     "models' weights for NaN/inf (a diverged checkpoint?).")
        shapes = {kind: tuple(changed[kind].shape) for kind in kinds}
        n_safe = len(data["safe"]) if data["safe"] is not None else 0
        ex_util, ex_safe = _exact_singles(ev, sets, shapes, len(data["util"]), n_safe)
        timings["exact_singles"] = time.perf_counter() - t

        t = time.perf_counter()
        selected = _select_on_A(ex_util[unit], sets[unit]["candidates"], rows_A, ks[unit], seed)
        joint_sets = _joint_sets(tuned, unit, selected, conflict_map, ks[unit])
        joint = dict(zip(joint_sets, distributed.map_shared(
            lambda hg: ev(*hg, safety=True), list(joint_sets.values()))))
        timings["joint"] = time.perf_counter() - t
        t = time.perf_counter()
        rand = torch.stack(distributed.map_shared(lambda d: ev(**{f"{unit}s": d})[0], draws), dim=1)
        timings["random_draws"] = time.perf_counter() - t
    if bar is not None:
        bar.close()

    per_example, maps = _assemble(data, ev, nll_orig, fo, fo_safe, ex_util, ex_safe, joint, rand,
                                  sets, changed)
    config = _config(tuned, original, data, label=label, unit=unit, k=ks[unit], n_draws=n_draws,
                     exact=cfg.exact, n_candidates=n_cand, n_spread=cfg.n_spread,
                     n_bootstrap=cfg.n_bootstrap, ci=cfg.ci, seed=seed,
                     utility_reference=cfg.utility_reference, max_new_tokens=cfg.max_new_tokens,
                     batch_size=cfg.batch_size, sets=sets, draws=draws, joint_sets=joint_sets,
                     conflict_map=conflict_map)
    res = AttributionResult(head=maps["head"], group=maps.get("group", {}),
                            per_example=per_example, config=config)
    t = time.perf_counter()
    res.analysis = _analyze(res, conflict_map, k=ks, n_bootstrap=cfg.n_bootstrap, ci=cfg.ci,
                            seed=seed)
    timings["analysis"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    res.config.update(timings_s=timings, n_exact_evaluations=n_evals)
    return res


def _config(tuned, original, data, *, sets, draws, joint_sets, conflict_map, **options) -> dict:
    """Everything needed to redo the attribution (options, data, split, unit sets, versions)."""
    util, seed = data["util"], options["seed"]
    as_lists = lambda us: [list(u) for u in us]  # noqa: E731
    return {
        **options,
        "model": model_id(tuned),
        "n_examples": len(util),
        "data": {"utility": util.describe(),
                 "safety": data["safe"].describe() if data["safe"] is not None else None},
        "loss": "summed NLL per example over response content tokens (end-of-turn and template "
                "excluded, as the diagnosis); per-unit maps and shares are token means",
        "split": {"seed": [seed, 1], "A": data["A"], "B": data["B"], "order": data["order"],
                  "how": "seeded permutation; each half batched apart, longest first; per_example "
                         "rows follow `order` (example indices, half A first)"},
        "seeds": {"split": [seed, 1], "draws": [seed, 2], "bootstrap": seed, "tie_break": seed},
        "candidates": {kind: as_lists(s["candidates"]) for kind, s in sets.items()},
        "spread": {kind: as_lists(s["spread"]) for kind, s in sets.items()},
        "random_draws": [as_lists(d) for d in draws],
        "selected": as_lists(joint_sets["selected"][0 if options["unit"] == "head" else 1]),
        "selected_on": "half A: top-k by exact recovery among half A's first-order candidates",
        "joint_sets": {n: {"heads": as_lists(h), "groups": as_lists(g)}
                       for n, (h, g) in joint_sets.items()},
        "changed_outside_units": changed_outside_units(tuned, original),
        "conflict_map": None if conflict_map is None else {
            "combine": conflict_map.config.get("combine"), "model": conflict_map.config.get("model")},
        "device": str(tuned.cfg.device), "dtype": str(tuned.cfg.dtype),
        "versions": {"attribution": ATTRIBUTION_VERSION, "torch": torch.__version__,
                     "transformer_lens": backend.TL_VERSION},
    }
