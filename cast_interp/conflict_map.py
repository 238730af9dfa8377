"""The conflict map: which units carry the utility risk of a safety update.

CAST combines two numbers per unit (a query head, or under GQA a key/value group; `units.py`),
measured before any training:

- O(u), the Optimization Conflict (`conflict.py`): do safety and utility pull unit u apart?
- S(u), the Functional Sensitivity (`sensitivity.py`): how much does utility lose without u?

into a conflict score C(u), "the utility risk of updating u". The paper names the ingredients but not
the combination; ours (METHOD.md v2), by default, is the product of percentile ranks

    C(u) = rank(O)(u) * rank(max(S, 0))(u),     rank = rank / n over all units of the kind,

so that neither factor wins by its scale (the v1 min-max product made C mostly S). Options
(`how=`): "product" (v1: minmax(O) * minmax(max(S, 0))), "weighted_sum" and "first_order_harm"
(-g_safe . g_util). Ties are broken by a seeded random order, never by layer order. The map reports
Spearman(C, O) and Spearman(C, S), so a map that is one factor in disguise is named as such.

Concentration (the "not global" claim) is the share of the total in the top 10% and the Gini
coefficient, for O, S and C, each beside a null that shows what noise gives (ours): for C, C
recomputed with O and S permuted independently across units; for O and S, every unit set to the
mean plus its own bootstrap deviation (equal units, measured with this noise). The map calls a
score concentrated only when both numbers are above the null's 95% range.

A `ConflictMap` holds, per kind of unit, a dict of `[n_layers, n_units]` tensors (`head`, and
`group` under GQA), the summary (`summary`: Spearman, concentration with nulls, counts of O > 1) and
its configuration. Undefined values are NaN: a NaN unit stays NaN in C, ranks last, is never selected.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .heads import Head
from .units import UnitError, UnitKind

CombineKind = Literal["product", "rank_product", "weighted_sum", "first_order_harm"]
COMBINE_KINDS: tuple[str, ...] = ("rank_product", "product", "weighted_sum", "first_order_harm")
RankBy = Literal["C", "O", "S"]
MAP_FORMAT = "cast_interp.conflict_map"
MAP_FORMAT_VERSION = 2
MAP_METHOD_VERSION = "conflict-map-2"
TENSORS_FILE = "conflict_map.safetensors"
META_FILE = "conflict_map.json"
NULL_DRAWS = 1000


class MapMismatchError(UnitError):
    """A conflict map used with a model it was not made for (shape or model identity differ)."""


# --------------------------------------------------------------------------------------------------
# Combination
# --------------------------------------------------------------------------------------------------


def minmax(x: Tensor) -> Tensor:
    """Min-max scaling over all finite entries (NaN stays NaN); a constant input maps to 1 (ours)."""
    x = x.double()
    finite = torch.isfinite(x)
    out = torch.full_like(x, float("nan"))
    if not finite.any():
        return out
    lo, hi = x[finite].min(), x[finite].max()
    out[finite] = 1.0 if hi == lo else (x[finite] - lo) / (hi - lo)
    return out


def percentile_rank(x: Tensor) -> Tensor:
    """Rank / n over finite entries, in (0, 1], ties averaged (NaN stays NaN)."""
    from scipy.stats import rankdata

    x = x.double()
    finite = torch.isfinite(x)
    out = torch.full_like(x, float("nan"))
    n = int(finite.sum())
    if n:
        r = rankdata(x[finite].cpu().numpy(), method="average") / n
        out[finite] = torch.as_tensor(r, dtype=torch.float64, device=x.device)
    return out


def combine(
    O: Float[Tensor, "layer unit"],
    S: Float[Tensor, "layer unit"],
    *,
    how: CombineKind = "rank_product",
    alpha: float = 0.5,
    dot: Optional[Float[Tensor, "layer unit"]] = None,
) -> Float[Tensor, "layer unit"]:
    """Conflict score C from O and S (float32; NaN where an input is NaN).

    how:
        "rank_product" (default, ours, v2): percentile_rank(O) * percentile_rank(max(S, 0)).
            Neither factor wins by its scale.
        "product" (v1 default): minmax(O) * minmax(max(S, 0)). The factor with the more skewed
            distribution dominates (in SmolLM2's v1 map, S: Spearman(C, S) = 0.93).
        "weighted_sum": alpha * minmax(O) + (1 - alpha) * minmax(max(S, 0)); a unit scores with
            either conflict or sensitivity.
        "first_order_harm": -dot, with dot = g_safe . g_util (O and S unused).
    S is clipped at 0 first: a unit whose ablation *helps* utility is not a utility risk.
    """
    if how not in COMBINE_KINDS:
        raise ValueError(f"Unknown combination {how!r}: use one of {COMBINE_KINDS}.")
    if how == "first_order_harm":
        if dot is None:
            raise ValueError("how='first_order_harm' needs the gradient dot products "
                             "(ConflictMap.dot); pass dot=...")
        return (-dot.double()).float()
    if O.shape != S.shape:
        raise UnitError(f"O {tuple(O.shape)} and S {tuple(S.shape)} must have the same "
                             "[n_layers, n_units] shape (were they computed on the same model?).")
    if how == "weighted_sum" and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    S_pos = S.double().clamp_min(0.0)  # clamp keeps NaN
    if how == "product":
        C = minmax(O) * minmax(S_pos)
    elif how == "rank_product":
        C = percentile_rank(O) * percentile_rank(S_pos)
    else:
        C = alpha * minmax(O) + (1 - alpha) * minmax(S_pos)
    nan = ~(torch.isfinite(O) & torch.isfinite(S))
    return C.masked_fill(nan.to(C.device), float("nan")).float()


# --------------------------------------------------------------------------------------------------
# Concentration against a null
# --------------------------------------------------------------------------------------------------


def gini(x) -> float:
    """Gini coefficient of non-negative values: 0 all equal, (n-1)/n all in one. NaN if all zero."""
    from .stats import gini as _gini

    return _gini(x)


def _conc(x: np.ndarray) -> tuple[float, float]:
    from .stats import concentration

    c = concentration(x)
    return c["top_share"], c["gini"]


def concentration_with_null(observed: Tensor, null_draws: Optional[np.ndarray]) -> dict:
    """`top10_share` and `gini` of `observed` (non-negative part, finite units) beside the same
    numbers over `null_draws` `[n_null, n_units]`; `concentrated` only if both beat the null."""
    from .stats import compare_to_null

    v = observed.double().flatten().cpu().numpy()
    top, g = _conc(v[np.isfinite(v)])
    out: dict[str, Any] = {"top10_share": top, "gini": g, "n_units": int(np.isfinite(v).sum())}
    if null_draws is None or len(null_draws) == 0:
        out.update(null=None, concentrated=None)
        return out
    stats = np.array([_conc(d[np.isfinite(d)]) for d in null_draws])
    out["null"] = {name: compare_to_null(obs, stats[:, i])
                   for i, (name, obs) in enumerate((("top10_share", top), ("gini", g)))}
    out["concentrated"] = bool(all(r["beats_null"] for r in out["null"].values()))
    return out


def noise_null(values: Tensor, boot: Optional[Tensor]) -> Optional[np.ndarray]:
    """Equal units measured with this noise: mean(values) + (boot_b(u) - values(u)), `[n_boot, n]`."""
    if boot is None or boot.numel() == 0:
        return None
    v = values.double().flatten().numpy()
    b = boot.double().reshape(boot.shape[0], -1).numpy()
    return np.nanmean(v) + (b - v[None])


def permutation_null(O: Tensor, S: Tensor, *, how: str, alpha: float, seed: int,
                     n_draws: int = NULL_DRAWS) -> np.ndarray:
    """C recomputed with O and S permuted independently across units, `[n_draws, n_units]`."""
    from .stats import permute_within

    o, s = O.double().flatten().numpy(), S.double().flatten().numpy()
    out = np.empty((n_draws, o.size))
    for d in range(n_draws):
        po = torch.as_tensor(permute_within(o, seed=seed * 100_003 + 2 * d))
        ps = torch.as_tensor(permute_within(s, seed=seed * 100_003 + 2 * d + 1))
        out[d] = combine(po, ps, how=how if how != "first_order_harm" else "rank_product",
                         alpha=alpha).double().numpy()
    return out


def summarize(scores: dict[str, Tensor], *, how: str, alpha: float, seed: int) -> dict:
    """Spearman(C, O), Spearman(C, S), and concentration of O, S, C each beside its null."""
    from .stats import spearman

    O, S, C = scores["O"], scores["S"], scores["C"]
    return {
        "spearman_C_O": spearman(C.flatten(), O.flatten()),
        "spearman_C_S": spearman(C.flatten(), S.flatten()),
        "spearman_O_S": spearman(O.flatten(), S.flatten()),
        "concentration": {
            "C": concentration_with_null(C, permutation_null(O, S, how=how, alpha=alpha, seed=seed)),
            "O": concentration_with_null(O, noise_null(O, scores.get("O_boot"))),
            "S": concentration_with_null(S, noise_null(S, scores.get("S_boot"))),
        },
        "n_O_above_1": int((O > 1).sum()),
        "n_units": int(O.numel()),
        "null": {"C": "O and S permuted independently across units (ours)",
                 "O, S": "mean + each unit's bootstrap deviation: equal units with this noise (ours)",
                 "n_draws_C": NULL_DRAWS, "range": "95% percentile range"},
    }


# --------------------------------------------------------------------------------------------------
# The map
# --------------------------------------------------------------------------------------------------


def model_difference(recorded: dict, model) -> dict:
    """{field: (recorded, model's)} where a recorded model identity (`model_id` plus the
    `weights` fingerprint, as a map stores it) disagrees with `model`; fields not recorded (older
    maps have no fingerprint) or unknown are not compared."""
    from .model import model_id, weight_fingerprint

    theirs = model_id(model)
    if recorded.get("weights") is not None:
        theirs["weights"] = weight_fingerprint(model)
    return {k: (recorded[k], theirs[k]) for k in theirs
            if recorded.get(k) is not None and theirs[k] is not None and recorded[k] != theirs[k]}


class UnitList(list):
    """A list of (layer, index) units that remembers the model identity of the map it came from
    (`model`, as `ConflictMap.config["model"]`), so `safety_finetune` can refuse another model's
    selection. It compares, prints and serialises as a plain list."""

    def __init__(self, units=(), model: Optional[dict] = None):
        super().__init__(units)
        self.model = model or {}


@dataclass
class ConflictMap:
    """Per-unit conflict map, indexed [layer, unit].

    head: `[n_layers, n_heads]` tensors: "O", "O_low", "O_high", "O_balanced" (+ interval), "O_{c}"
        per owned component, "dot", norms, "S", "S_low", "S_high", "S_exact" (1 where S is an exact
        ablation, 0 where a first-order screen), "C"; and the bootstrap draws "O_boot", "S_boot"
        `[n_boot, n_layers, n_heads]`.
    group: the same per key/value group under GQA (`[n_layers, n_kv_heads]`), else empty.
    summary: per kind, Spearman(C, O), Spearman(C, S), concentration of O, S, C with nulls, counts.
    config: everything needed to reproduce it (model_id, data, seeds, options, versions, timings).
    """

    head: dict[str, Tensor]
    group: dict[str, Tensor] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for kind, d in (("head", self.head), ("group", self.group)):
            if not d:
                continue
            for need in ("O", "S", "C"):
                if need not in d:
                    raise ValueError(f"A conflict map needs {kind} {need!r}; got {sorted(d)}.")
            shape = tuple(d["O"].shape)
            if len(shape) != 2:
                raise UnitError(f"{kind} O must be [n_layers, n_units], got shape {shape}.")
            for name, t in d.items():
                want = shape if not name.endswith("_boot") else (t.shape[0],) + shape
                if tuple(t.shape) != tuple(want):
                    raise UnitError(f"{kind} {name} has shape {tuple(t.shape)} but O has {shape}:"
                                         " all per-unit arrays of a map must be [n_layers, n_units].")

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_results(
        cls, conflict: Any, sensitivity: Any, group_sensitivity: Any = None, *,
        how: CombineKind = "rank_product", alpha: float = 0.5, seed: int = 0,
        config: Optional[dict] = None,
    ) -> "ConflictMap":
        """A map from a `ConflictResult` and head (and, under GQA, group) `SensitivityResult`s."""
        parts = {"head": (conflict.head, sensitivity)}
        if conflict.group:
            if group_sensitivity is None:
                raise ValueError("Under GQA the map needs the groups' sensitivity too "
                                 "(functional_sensitivity(..., unit='group')).")
            parts["group"] = (conflict.group, group_sensitivity)
        kinds = {}
        for kind, (o, sens) in parts.items():
            d = {k: v.detach().float().cpu() for k, v in o.items()}
            if hasattr(sens, "S"):
                d["S"] = sens.S.detach().float().cpu()
                for name in ("S_low", "S_high", "S_boot"):
                    if getattr(sens, name, None) is not None:
                        d[name] = getattr(sens, name).detach().float().cpu()
                if getattr(sens, "exact", None) is not None:
                    d["S_exact"] = sens.exact.float().cpu()
            else:
                d["S"] = torch.as_tensor(sens).detach().float().cpu()
            d["C"] = combine(d["O"], d["S"], how=how, alpha=alpha, dot=d.get("dot"))
            kinds[kind] = d
        cfg = {"combine": {"how": how, "alpha": alpha, "tie_break_seed": seed},
               "method_version": MAP_METHOD_VERSION, "conflict": copy.deepcopy(conflict.config),
               "sensitivity": copy.deepcopy(getattr(sensitivity, "config", {}))}
        if group_sensitivity is not None:
            cfg["group_sensitivity"] = copy.deepcopy(getattr(group_sensitivity, "config", {}))
        cfg.update(config or {})
        summary = {k: summarize(d, how=how, alpha=alpha, seed=seed) for k, d in kinds.items()}
        return cls(head=kinds["head"], group=kinds.get("group", {}), summary=summary, config=cfg)

    def recombine(self, *, how: CombineKind = "rank_product", alpha: float = 0.5) -> "ConflictMap":
        """A new map with C (and the summary) recomputed by another combination."""
        new = copy.deepcopy(self)
        seed = self.seed
        for kind in self.kinds:
            d = new.units(kind)
            d["C"] = combine(d["O"], d["S"], how=how, alpha=alpha, dot=d.get("dot"))
            new.summary[kind] = summarize(d, how=how, alpha=alpha, seed=seed)
        new.config["combine"] = {"how": how, "alpha": alpha, "tie_break_seed": seed}
        return new

    # -- views -------------------------------------------------------------------------------------

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("head", "group") if self.group else ("head",)

    def units(self, kind: UnitKind = "head") -> dict[str, Tensor]:
        if kind not in ("head", "group"):
            raise ValueError(f"unit must be 'head' or 'group', got {kind!r}.")
        if kind == "group" and not self.group:
            raise UnitError("This map has no key/value groups (the model has no GQA): "
                                 "use unit='head'.")
        return self.head if kind == "head" else self.group

    O = property(lambda self: self.head["O"])
    S = property(lambda self: self.head["S"])
    C = property(lambda self: self.head["C"])
    dot = property(lambda self: self.head.get("dot"))
    ci_low = property(lambda self: self.head.get("O_low"))
    ci_high = property(lambda self: self.head.get("O_high"))

    @property
    def components(self) -> dict[str, Tensor]:
        """Per-component O of the head units (Q, O under GQA; groups hold K, V)."""
        return {k[2:]: v for k, v in self.head.items() if k in ("O_q", "O_k", "O_v", "O_o")}

    @property
    def kv_group_O(self) -> Optional[Tensor]:
        return self.group.get("O") if self.group else None

    @property
    def seed(self) -> int:
        return int(self.config.get("combine", {}).get("tie_break_seed", 0))

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.O.shape)  # type: ignore[return-value]

    @property
    def n_heads_total(self) -> int:
        return int(self.O.numel())

    def check_model(self, model) -> None:
        """Raise `MapMismatchError` unless this map was made for a model like `model`."""
        L, H = model.cfg.n_layers, model.cfg.n_heads
        if self.shape != (L, H):
            raise MapMismatchError(
                f"This conflict map is {self.shape[0]} layers x {self.shape[1]} heads but the model "
                f"has {L} x {H}: it was made for another model. Re-run diagnose on this model.")
        mine = self.config.get("model") or {}
        diff = model_difference(mine, model)
        n_kv = model.cfg.n_key_value_heads or H
        if bool(self.group) != (n_kv != H) or (self.group and self.group["O"].shape[1] != n_kv):
            diff["key/value groups"] = (self.group["O"].shape[1] if self.group else H, n_kv)
        if diff:
            desc = ", ".join(f"{k}: map {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise MapMismatchError(f"This conflict map was made for another model ({desc}). "
                                   "Re-run diagnose on this model.")

    # -- selection ---------------------------------------------------------------------------------

    def _values(self, by: RankBy, kind: UnitKind = "head") -> Tensor:
        if by not in ("C", "O", "S"):
            raise ValueError(f"by must be 'C', 'O' or 'S', got {by!r}.")
        return self.units(kind)[by]

    def ranking(self, *, by: RankBy = "C", largest: bool = True,
                unit: UnitKind = "head") -> list[Head]:
        """All units ordered by `by` (descending if `largest`), NaN last; ties broken by the map's
        seeded random order (never by layer order)."""
        from .stats import rank_order

        v = self._values(by, unit)
        n = v.shape[1]
        return [(int(i // n), int(i % n)) for i in rank_order(v.flatten(), seed=self.seed,
                                                              largest=largest)]

    def top_units(self, k: Union[int, float], *, by: RankBy = "C", largest: bool = True,
                  unit: UnitKind = "head") -> list[Head]:
        """The k units with the largest (or smallest) `by` value, best first.

        k: a count (int) or a fraction of all units of the kind in (0, 1) (rounded half up, at
        least one). NaN units are never selected; asking for more than have a defined value is a
        `UnitError`.
        """
        v = self._values(by, unit)
        n = int(v.numel())
        if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)):
            raise TypeError(f"k must be an int count or a float fraction in (0, 1), got {k!r}.")
        if isinstance(k, (float, np.floating)):
            if not 0.0 < float(k) < 1.0:
                raise UnitError(f"A fraction k must be in (0, 1), got {k}; pass an int for a "
                                     "count of units.")
            from .stats import count_from_fraction

            count = count_from_fraction(float(k), n)
        else:
            count = int(k)
        if count < 0 or count > n:
            raise UnitError(f"k = {k} is out of range: the map has {n} {unit}s.")
        n_finite = int(torch.isfinite(v).sum())
        if count > n_finite:
            raise UnitError(f"k = {count} {unit}s requested but only {n_finite} of {n} have a "
                                 f"defined {by} ({n - n_finite} are NaN and never selected).")
        return UnitList(self.ranking(by=by, largest=largest, unit=unit)[:count],
                        model=self.config.get("model"))

    def top_heads(self, k: Union[int, float], *, by: RankBy = "C",
                  largest: bool = True) -> list[Head]:
        """`top_units(k, by=by, largest=largest, unit="head")`."""
        return self.top_units(k, by=by, largest=largest, unit="head")

    # -- summaries ---------------------------------------------------------------------------------

    def concentration(self, *, by: RankBy = "C", unit: UnitKind = "head") -> dict:
        """Share of the total held by the top 10% of units and Gini, beside the null's 95% range;
        `concentrated` is True only where both beat the null (see module docstring)."""
        self._values(by, unit)
        return copy.deepcopy(self.summary[unit]["concentration"][by])

    def to_dataframe(self, unit: UnitKind = "head"):
        """One row per unit: layer, index (and kv_group for heads), every per-unit value, rank_C."""
        import pandas as pd

        d = self.units(unit)
        L, n = d["O"].shape
        rows: dict[str, Any] = {"layer": np.repeat(np.arange(L), n),
                                unit: np.tile(np.arange(n), L)}
        if unit == "head":
            n_kv = self.group["O"].shape[1] if self.group else n
            rows["kv_group"] = np.tile(np.arange(n) // (n // n_kv), L)
        for name, t in d.items():
            if not name.endswith("_boot"):
                rows[name] = t.flatten().numpy()
        rank = np.empty(L * n, dtype=np.int64)
        for r, (l, i) in enumerate(self.ranking(by="C", unit=unit)):
            rank[l * n + i] = r + 1
        rows["rank_C"] = rank
        return pd.DataFrame(rows)

    # -- persistence -------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, Tensor]:
        out = {f"{kind}.{k}": v for kind in self.kinds for k, v in self.units(kind).items()}
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def save(self, directory: Union[str, Path]) -> Path:
        """Write `conflict_map.safetensors` + `conflict_map.json` into `directory` (atomically each;
        the JSON, written last, marks a complete map). No pickle."""
        from .io import atomic_save_safetensors, atomic_write_json, to_jsonable

        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise NotADirectoryError(f"{d} is a file: a conflict map is saved into a directory.")
        d.mkdir(parents=True, exist_ok=True)
        tensors = self._tensors()
        atomic_save_safetensors(tensors, d / TENSORS_FILE,
                                metadata={"format": MAP_FORMAT, "format_version": MAP_FORMAT_VERSION})
        atomic_write_json({"format": MAP_FORMAT, "format_version": MAP_FORMAT_VERSION,
                           "shape": list(self.shape), "tensors": sorted(tensors),
                           "summary": to_jsonable(self.summary), "config": self.config},
                          d / META_FILE)
        return d

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "ConflictMap":
        """Read a map written by `save` (format 2; a format-1 map is converted, without nulls)."""
        from safetensors.torch import load_file

        from .io import read_json

        d = Path(directory)
        meta_path, tens_path = d / META_FILE, d / TENSORS_FILE
        for p in (meta_path, tens_path):
            if not p.exists():
                raise FileNotFoundError(f"{p} does not exist: {d} is not a saved ConflictMap "
                                        "(expected conflict_map.json and conflict_map.safetensors).")
        meta = read_json(meta_path)
        if not isinstance(meta, dict) or meta.get("format") != MAP_FORMAT:
            raise ValueError(f"{meta_path} is not a conflict map.")
        version = meta.get("format_version", 0)
        if version > MAP_FORMAT_VERSION:
            raise ValueError(f"{meta_path} was written by a newer cast_interp (format version "
                             f"{version}); upgrade the package.")
        try:
            t = load_file(str(tens_path))
        except Exception as exc:  # truncated or not safetensors
            raise ValueError(f"{tens_path} cannot be read ({exc}); re-run diagnose.") from exc
        missing = [k for k in meta.get("tensors", []) if k not in t]
        if missing:
            raise ValueError(f"{tens_path} lacks tensors {missing}: the files do not belong "
                             "together; re-run diagnose.")
        config = meta.get("config") or {}
        if version < 2:
            head = {{"ci_low": "O_low", "ci_high": "O_high"}.get(k, k).replace("component_O.", "O_"): v
                    for k, v in t.items() if "." not in k or k.startswith("component_O.")}
            head.pop("kv_group_O", None)
            return cls(head=head, config=config)
        kinds = {k: {n[len(k) + 1:]: v for n, v in t.items() if n.startswith(k + ".")}
                 for k in ("head", "group")}
        return cls(head=kinds["head"], group=kinds["group"], summary=meta.get("summary") or {},
                   config=config)

    def __repr__(self) -> str:
        L, H = self.shape
        top = ", ".join(f"L{l}H{h}" for l, h in self.ranking()[:5])
        how = self.config.get("combine", {}).get("how", "?")
        return f"ConflictMap({L} layers x {H} heads, C by {how!r}, top: {top})"


CONC_HEADER = ["| score | top-10% share | null 95% | share − null mean | Gini | null 95% | "
               "Gini − null mean | verdict |", "|---|---|---|---|---|---|---|---|"]


def _effect(obs: float, null: dict) -> str:
    """The effect size beside a null: observed - null mean, and in null sds where recorded."""
    z = null.get("effect_z")
    zs = f" (z = {z:.1f})" if isinstance(z, (int, float)) and math.isfinite(z) else ""
    return f"{obs - null['null_mean']:+.3f}{zs}"


def _fmt_conc(name: str, c: dict) -> str:
    """One markdown row (`CONC_HEADER`): observed top-10% share and Gini beside the null's 95%
    range, and each one's effect size (observed - null mean)."""
    if not c.get("null"):
        return (f"| {name} | {c['top10_share']:.3f} | — | — | {c['gini']:.3f} | — | — | "
                "no null (no bootstrap) |")
    t, g = c["null"]["top10_share"], c["null"]["gini"]
    verdict = "concentrated (beats the null)" if c["concentrated"] else "not beyond the null"
    return (f"| {name} | {c['top10_share']:.3f} | {t['null_low']:.3f}–{t['null_high']:.3f} | "
            f"{_effect(c['top10_share'], t)} | {c['gini']:.3f} | "
            f"{g['null_low']:.3f}–{g['null_high']:.3f} | {_effect(c['gini'], g)} | {verdict} |")


def map_report(cmap: ConflictMap, *, k: Union[int, float] = 0.1) -> str:
    """The map's numbers as markdown: Spearman(C, O), Spearman(C, S), concentration of O, S, C
    each beside its null, counts of O > 1, and the top-k units with their intervals."""
    lines = [f"# Conflict map ({cmap.config.get('model', {}).get('model_name', '?')})", ""]
    for kind in cmap.kinds:
        sm = cmap.summary.get(kind)
        if not sm:
            continue
        d = cmap.units(kind)
        lines += [f"## {kind} units ({sm['n_units']})", "",
                  f"- C = {cmap.config.get('combine', {}).get('how', '?')}; "
                  f"Spearman(C, O) = {sm['spearman_C_O']:.2f}, Spearman(C, S) = "
                  f"{sm['spearman_C_S']:.2f}, Spearman(O, S) = {sm['spearman_O_S']:.2f}.",
                  f"- Units with O > 1 (safety and utility gradients opposed): {sm['n_O_above_1']} "
                  f"of {sm['n_units']}.", "", *CONC_HEADER]
        lines += [_fmt_conc(n, sm["concentration"][n]) for n in ("O", "S", "C")]
        top = cmap.top_units(k, unit=kind)
        lines += ["", f"Top {len(top)} {kind}s by C (95% CIs over examples):", "",
                  "| unit | C | O | O 95% CI | S | S 95% CI | S exact |", "|---|---|---|---|---|---|---|"]
        g = lambda n, u: float(d[n][u]) if n in d else float("nan")  # noqa: E731
        for u in top:
            tag = f"L{u[0]}{'H' if kind == 'head' else 'G'}{u[1]}"
            lines.append(f"| {tag} | {g('C', u):.3f} | {g('O', u):.3f} | [{g('O_low', u):.3f}, "
                         f"{g('O_high', u):.3f}] | {g('S', u):.4f} | [{g('S_low', u):.4f}, "
                         f"{g('S_high', u):.4f}] | {'yes' if g('S_exact', u) == 1 else 'no'} |")
        lines.append("")
    lines += ["Nulls (ours): for C, O and S permuted independently across units; for O and S, every "
              "unit at the mean plus its own bootstrap deviation. \"Concentrated\" only where both "
              "numbers are above the null's 95% range.", ""]
    return "\n".join(lines)
