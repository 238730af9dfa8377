"""Arms of stage 2: which units an arm skips at budget k, and how figures draw it.

One table, `ARM_REGISTRY`, of `ArmSpec`s. Training (`sparse_tuning.select_arm_units`), the run's
baselines (`pipeline.RunConfig.baselines`, the `smoke` and `gpu` presets' "every baseline"), the
figures' colours (`style.ARMS`, `style.Z_ORDER`) and the report read it, so a new arm is one call:

    import torch
    from cast_interp.registry import register_arm

    def top_c_last_layer(scores, k, *, shape, seed, tie_seed, **options):
        # scores: {"O", "S", "C"} -> [n_layers, n_units] (None without a map); k: a count
        order = torch.argsort(scores["C"][-1], descending=True)[:k]
        return [(shape[0] - 1, int(u)) for u in order]

    register_arm("last_layer", top_c_last_layer, label="top-k by C, last layer",
                 colour="#999933", marker="X")

A selector returns the `(layer, unit)` pairs the arm skips (heads, or key/value groups with
`unit="group"`). Budget matching (the same number of frozen parameters per arm at one k) is the
selector's contract; `select_arm_units` checks that the units exist and are distinct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .. import stats
from .. import units as U
from ..units import UnitError

Unit = tuple[int, int]
#: select(scores, k, *, shape, seed, tie_seed, **options) -> units. scores: {"O", "S", "C"} ->
#: `[n_layers, n_units]` tensors of the conflict map (None when the run has none); k: a count;
#: shape: (n_layers, n_units); seed: the arm's draw seed (random arms); tie_seed: the map's seed
#: for ties; options: `start_layer` (the layer band).
Selector = Callable[..., list]


@dataclass(frozen=True)
class ArmSpec:
    """One arm kind. `baseline`: added to a run beside full tuning, CAST and random (which the
    pipeline plans itself); `needs_map`: ranks units by the conflict map; `budget(k, per_layer)`:
    the most units it skips at k (the layer band rounds up to whole layers; default k)."""

    name: str
    select: Selector
    label: str
    colour: str = "#777777"
    marker: str = "o"
    z_order: int = 2
    baseline: bool = True
    needs_map: bool = True
    budget: Optional[Callable[[int, int], int]] = None

    def max_units(self, k: int, per_layer: int) -> int:
        return k if self.budget is None else int(self.budget(k, per_layer))


ARM_REGISTRY: dict[str, ArmSpec] = {}
#: method -> (label, colour, marker); `style.ARMS` is this dict (figures read it live).
ARM_STYLES: dict[str, tuple[str, str, str]] = {}
#: method -> drawing order (higher on top); `style.Z_ORDER` is this dict.
Z_ORDER: dict[str, int] = {}


def register_arm(name: str, select: Selector, *, label: Optional[str] = None,
                 colour: str = "#777777", marker: str = "o", z_order: int = 2,
                 baseline: bool = True, needs_map: bool = True,
                 budget: Optional[Callable[[int, int], int]] = None,
                 replace: bool = False) -> ArmSpec:
    """Add an arm: trainable (`select_arm_units`, `RunConfig.baselines`), drawn in its colour and
    reported. A name already registered is a ValueError unless `replace`."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"An arm name must be an identifier (it names files: <arm>_k<k>), got "
                         f"{name!r}.")
    if name in ARM_REGISTRY and not replace:
        raise ValueError(f"Arm {name!r} is already registered; pass replace=True to redefine it.")
    if not callable(select):
        raise TypeError(f"select must be a function (scores, k, *, shape, seed, tie_seed, "
                        f"**options) -> units, got {select!r}.")
    spec = ArmSpec(name, select, label or name, colour, marker, z_order, baseline, needs_map,
                   budget)
    ARM_REGISTRY[name] = spec
    ARM_STYLES[name] = (spec.label, spec.colour, spec.marker)
    Z_ORDER[name] = z_order
    return spec


def unregister_arm(name: str) -> None:
    """Remove an arm (tests that register one clean up with this)."""
    for table in (ARM_REGISTRY, ARM_STYLES, Z_ORDER):
        table.pop(name, None)


def get_arm(name: str) -> ArmSpec:
    if name not in ARM_REGISTRY:
        raise ValueError(f"arm={name!r} is not one of {arm_names()} (register a new arm with "
                         "cast_interp.registry.register_arm).")
    return ARM_REGISTRY[name]


def arm_names() -> list[str]:
    """Every registered arm, in registration order."""
    return list(ARM_REGISTRY)


def baseline_names() -> list[str]:
    """The arms a run adds beside full tuning, CAST and random."""
    return [n for n, s in ARM_REGISTRY.items() if s.baseline]


# --------------------------------------------------------------------------------------------------
# Budgets and the built-in selectors
# --------------------------------------------------------------------------------------------------


def k_from_fraction(k: Union[int, float], n_total: int) -> int:
    """A budget as a count of units: an int is a count in 0..n_total; a float a fraction in [0, 1),
    rounded half up, at least 1 when positive (the conflict map's rule, so both agree at x.5)."""
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"k must be a count (int) or a fraction (float in [0, 1)), got {k!r}.")
    if isinstance(k, float):
        if not 0.0 <= k < 1.0:
            raise UnitError(f"k = {k} is out of range: a fraction must be in [0, 1) "
                            f"(or pass a count 0..{n_total}).")
        return 0 if k == 0 else stats.count_from_fraction(k, n_total)
    if not 0 <= k <= n_total:
        raise UnitError(f"k = {k} is out of range: there are {n_total} units "
                        f"(use a count 0..{n_total} or a fraction in [0, 1)).")
    return int(k)


def layer_band_heads(model: Any, k: Union[int, float], *,
                     start_layer: Optional[int] = None) -> list[Unit]:
    """All units of a band of consecutive whole layers, the layer baseline at budget k.

    `model` is a model (query heads) or a `(n_layers, n_units_per_layer)` grid (e.g. key/value
    groups). The band has ceil(k / n_units_per_layer) layers: it freezes exactly the parameters of
    k units when k is a multiple of the units per layer, and otherwise rounds *up* to the next
    whole layer (it then freezes more than k units). `start_layer` defaults (ours) to the band
    centred on the middle of the network.
    """
    L, H = ((model.cfg.n_layers, model.cfg.n_heads) if hasattr(model, "cfg")
            else (int(model[0]), int(model[1])))
    k = k_from_fraction(k, L * H)
    n_band = -(-k // H)
    if n_band == 0:
        return []
    if start_layer is None:
        start_layer = (L - n_band) // 2
    if not 0 <= start_layer <= L - n_band:
        raise UnitError(f"A band of {n_band} layers starting at layer {start_layer} does not "
                        f"fit in {L} layers (start in 0..{L - n_band}).")
    return [(l, h) for l in range(start_layer, start_layer + n_band) for h in range(H)]


def ranked(scores: Float[Tensor, "n_layers n_units"], k: int, *, largest: bool,
           tie_seed: int) -> list[Unit]:
    """Top-k (or bottom-k) units by score; NaN never selected; ties in a seeded random order
    (`stats.rank_order`), never by layer order."""
    n_finite = int(torch.isfinite(scores).sum())
    if n_finite < k:
        raise ValueError(f"Only {n_finite} units have a finite score, fewer than k={k}; "
                         "the conflict map is incomplete (NaN scores mean undefined values).")
    n = scores.shape[1]
    order = stats.rank_order(scores.flatten(), seed=tie_seed, largest=largest)[:k]
    return sorted((int(i) // n, int(i) % n) for i in order)


def _by_score(score: str, *, largest: bool = True) -> Selector:
    def select(scores, k, *, tie_seed, **_):
        return ranked(scores[score], k, largest=largest, tie_seed=tie_seed)
    return select


def _random(scores, k, *, shape, seed, **_):
    n_total = shape[0] * shape[1]
    pick = torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:k]
    return sorted((int(i) // shape[1], int(i) % shape[1]) for i in pick)


def _layer_band(scores, k, *, shape, start_layer=None, **_):
    return layer_band_heads(shape, k, start_layer=start_layer)


def _full(scores, k, **_):
    return []


def _layer_matched(scores, k, *, shape, seed, tie_seed, **_):
    """Random units with CAST's count in every layer (the top-k by C's layer profile): a chance
    set that cannot differ from CAST by which layers it touches."""
    cast = ranked(scores["C"], k, largest=True, tie_seed=tie_seed)
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in sorted({l for l, _ in cast}):
        n = sum(1 for l, _ in cast if l == layer)
        out += [(layer, int(u)) for u in torch.randperm(shape[1], generator=g)[:n]]
    return sorted(out)


def c_quantile_bins(C: Float[Tensor, "n_layers n_units"], n_bins: int, *,
                    tie_seed: int) -> list[list[Unit]]:
    """Units split by C into `n_bins` bins of (nearly) equal size, lowest C first; ties in the
    map's seeded order (NaN never binned)."""
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    n = C.shape[1]
    order = stats.rank_order(C.flatten(), seed=tie_seed, largest=False)
    order = [int(i) for i in order if bool(torch.isfinite(C.flatten()[int(i)]))]
    edges = np.linspace(0, len(order), int(n_bins) + 1).round().astype(int)
    return [[(i // n, i % n) for i in order[a:b]] for a, b in zip(edges[:-1], edges[1:])]


def _graded(scores, k, *, seed, tie_seed, bin=None, n_bins=None, **_):
    """k random units from C-quantile bin `bin` of `n_bins` (0 = lowest C): the graded design,
    whose sets span the map's range so utility cost can be regressed on C."""
    if bin is None or n_bins is None:
        raise ValueError("The 'graded' arm needs bin= and n_bins= (select_arm_units(..., bin=b, "
                         "n_bins=n)).")
    bins = c_quantile_bins(scores["C"], n_bins, tie_seed=tie_seed)
    if not 0 <= int(bin) < len(bins):
        raise UnitError(f"bin={bin} is out of range: there are {len(bins)} bins (0..{len(bins) - 1}).")
    pool = bins[int(bin)]
    if len(pool) < k:
        raise UnitError(f"C bin {bin} of {n_bins} holds {len(pool)} units, fewer than k={k}: use "
                        "fewer bins or a smaller k.")
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:k]
    return sorted(pool[int(i)] for i in pick)


# The built-in arms (ours: "bottom", "top_o", "top_s", "layer_band" are the controls of METHOD v2).
register_arm("full", _full, label="full tuning", colour="#000000", marker="s", z_order=3,
             baseline=False, needs_map=False, budget=lambda k, per_layer: 0)
register_arm("cast", _by_score("C"), label="CAST (skip top-k by C)", colour="#D55E00",
             marker="*", z_order=5, baseline=False)
register_arm("random", _random, label="random k heads", colour="#0072B2", marker="o",
             baseline=False, needs_map=False)
register_arm("bottom", _by_score("C", largest=False), label="bottom-k by C", colour="#009E73",
             marker="v")
register_arm("top_o", _by_score("O"), label="top-k by O only", colour="#CC79A7", marker="^")
register_arm("top_s", _by_score("S"), label="top-k by S only", colour="#E69F00", marker="D")
register_arm("layer_matched", _layer_matched, label="random, CAST's heads per layer",
             colour="#56B4E9", marker="h", baseline=False)
register_arm("graded", _graded, label="random within a C-quantile bin", colour="#999999",
             marker=".", baseline=False)
register_arm("layer_band", _layer_band, label="layer band", colour="#56B4E9", marker="P",
             needs_map=False, budget=lambda k, per_layer: -(-k // per_layer) * per_layer)


# Peer arms (issue 25; not run as baselines of the v2 pipeline). Whole layers from the bottom or
# the top at CAST's budget (k rounded up to whole layers, as the layer band), and the activation
# arms, which rank heads by `peers.head_activation_shift` (passed as `act_scores=`).
def _edge_layers(top: bool) -> Selector:
    def select(scores, k, *, shape, **_):
        n_band = -(-k // shape[1])
        return layer_band_heads(shape, k, start_layer=shape[0] - n_band if top else 0)
    return select


def _activation_scores(shape, act_scores) -> Tensor:
    if act_scores is None:
        raise ValueError("The act_tune / act_skip arms rank heads by their activation shift: pass "
                         "act_scores= (peers.head_activation_shift(model, harmful, harmless)).")
    t = torch.as_tensor(act_scores, dtype=torch.float32)
    if tuple(t.shape) != tuple(shape):
        raise UnitError(f"act_scores has shape {tuple(t.shape)} but the unit grid is "
                        f"{tuple(shape)}: score query heads of this model (unit='head').")
    return t


def _act_skip(scores, k, *, shape, tie_seed, act_scores=None, **_):
    """Freeze the k heads whose output shifts most between harmful and harmless prompts."""
    return ranked(_activation_scores(shape, act_scores), k, largest=True, tie_seed=tie_seed)


def _act_tune(scores, k, *, shape, tie_seed, act_scores=None, **_):
    """Tune only those k heads: freeze every other one (N - k units)."""
    top = set(ranked(_activation_scores(shape, act_scores), k, largest=True, tie_seed=tie_seed))
    return [(l, u) for l in range(shape[0]) for u in range(shape[1]) if (l, u) not in top]


_WHOLE_LAYERS = lambda k, per_layer: -(-k // per_layer) * per_layer  # noqa: E731
register_arm("bottom_layers", _edge_layers(top=False), label="bottom layers frozen",
             colour="#882255", marker="<", baseline=False, needs_map=False, budget=_WHOLE_LAYERS)
register_arm("top_layers", _edge_layers(top=True), label="top layers frozen", colour="#44AA99",
             marker=">", baseline=False, needs_map=False, budget=_WHOLE_LAYERS)
register_arm("act_skip", _act_skip, label="skip top-k by activation shift", colour="#AA4499",
             marker="H", baseline=False, needs_map=False)
# Its budget is N - k frozen units (N, the grid, is not known to `budget`): not a baseline.
register_arm("act_tune", _act_tune, label="tune only top-k by activation shift",
             colour="#332288", marker="p", baseline=False, needs_map=False)


# --------------------------------------------------------------------------------------------------
# Selection (`sparse_tuning.select_arm_units` is this function)
# --------------------------------------------------------------------------------------------------


def _scores(conflict_map: Any, unit: str) -> dict[str, Tensor]:
    """{"O", "S", "C"} `[n_layers, n_units]` of the map for this kind of unit, shapes checked."""
    if unit == "group":
        if not hasattr(conflict_map, "units"):
            raise TypeError("unit='group' needs a ConflictMap (with group scores).")
        d = conflict_map.units("group")
    else:
        d = conflict_map.units("head") if hasattr(conflict_map, "units") else {
            a: getattr(conflict_map, a, None) for a in ("O", "S", "C")}
    missing = [a for a in ("O", "S", "C") if not isinstance(d.get(a), Tensor)]
    if missing:
        raise TypeError(f"conflict_map must have O, S, C tensors (a ConflictMap); missing "
                        f"{missing}.")
    shape = tuple(d["C"].shape)
    if len(shape) != 2:
        raise ValueError(f"Conflict scores must be [n_layers, n_units], got shape {shape}.")
    for a in ("O", "S"):
        if tuple(d[a].shape) != shape:
            raise ValueError(f"conflict_map.{a} has shape {tuple(d[a].shape)} but C has {shape}.")
    return d


def select_arm_units(arm: str, conflict_map: Any, k: Union[int, float], *, unit: str = "head",
                     seed: int = 0, model: Any = None,
                     start_layer: Optional[int] = None, **options: Any) -> list[Unit]:
    """The units an arm skips at budget k (a count, or a fraction of all units of the kind).

    Arms (`ARM_REGISTRY`): "cast" top-k by C; "full" none (k ignored); "random" a sample of k
    units drawn with the draw seed `seed` (independent of the training seed); "bottom" bottom-k by
    C; "top_o" / "top_s" top-k by O / S alone; "layer_band" whole consecutive layers
    (`layer_band_heads`, rounded up); "layer_matched" random units with CAST's count per layer;
    "graded" random units of one C-quantile bin (`bin=`, `n_bins=` in `options`); the peer arms
    "bottom_layers" / "top_layers" (whole layers from the bottom / top, k rounded up) and
    "act_skip" / "act_tune" (top-k by `act_scores=` frozen / everything else frozen, see
    `peers.activation`); and any arm added with `register_arm` (`options` go to its selector).
    NaN scores are never selected; ties are broken by the map's seeded order (`ConflictMap.seed`).
    `unit`: "head" (query heads) or "group" (key/value groups, GQA; scores from the map's groups).
    `conflict_map` is a `ConflictMap`, or for heads anything with `O`, `S`, `C` tensors
    `[n_layers, n_heads]`; with `model`, its shape and identity are checked against the model.
    """
    spec = get_arm(arm)
    if unit not in ("head", "group"):
        raise ValueError(f"unit={unit!r} is not one of ['head', 'group'].")
    if spec.budget is not None and spec.max_units(1, 1) == 0:  # skips nothing (full tuning)
        return []
    scores = _scores(conflict_map, unit) if conflict_map is not None else None
    shape = tuple(scores["C"].shape) if scores is not None else None
    if model is not None:
        mshape = (model.cfg.n_layers, U.n_units(model, unit))
        if shape is not None and shape != mshape:
            raise UnitError(
                f"The conflict map is [{shape[0]} layers x {shape[1]} {unit}s] but the model has "
                f"{mshape[0]} x {mshape[1]}: it was computed on a different model. Recompute the "
                "map on this model.")
        if shape is not None and hasattr(conflict_map, "check_model"):
            conflict_map.check_model(model)
        shape = mshape
    if shape is None:
        raise ValueError(f"Arm {arm!r} needs a conflict map or a model (for the unit grid).")
    k = k_from_fraction(k, shape[0] * shape[1])
    if k == 0:
        return []
    if spec.needs_map and scores is None:
        raise ValueError(f"Arm {arm!r} with k={k} ranks units by the conflict map: pass one "
                         "(a ConflictMap from the diagnosis stage).")
    out = [(int(l), int(u)) for l, u in spec.select(
        scores, k, shape=shape, seed=seed, tie_seed=int(getattr(conflict_map, "seed", 0)),
        start_layer=start_layer, **options)]
    bad = [x for x in out if not (0 <= x[0] < shape[0] and 0 <= x[1] < shape[1])]
    if bad or len(set(out)) != len(out):
        raise UnitError(f"Arm {arm!r} selected {'units outside the ' if bad else 'repeated units '}"
                        f"[{shape[0]} x {shape[1]}] grid ({(bad or out)[:3]}...): its selector "
                        "must return distinct (layer, unit) pairs.")
    return out
