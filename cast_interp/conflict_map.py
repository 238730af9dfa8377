"""The conflict map: which heads carry the utility risk of a safety update.

CAST combines two per-head numbers measured before any training:

- O(h), the Optimization Conflict (`conflict.py`): do safety and utility pull head h apart?
- S(h), the Functional Sensitivity (`sensitivity.py`): how much does utility lose without head h?

into a conflict score C(h), "the utility risk of updating head h". The paper names the ingredients
but not the combination; ours, by default, is the product of min-max scaled scores

    C(h) = norm(O)(h) * norm(max(S, 0))(h),   norm(x) = (x - min x) / (max x - min x) over all heads,

so a head needs both conflict *and* utility dependence to score high. Options (`how=`):
"rank_product" (product of percentile ranks: robust to outliers), "weighted_sum"
(alpha * norm(O) + (1 - alpha) * norm(S): a head scores with either), and "first_order_harm"
(-g_safe(h) . g_util(h): the first-order increase of L_util from a small safety step on h alone).

The map is a `ConflictMap`: C with everything it was made from (O, S, per-component O, gradient norms,
bootstrap CIs, dot products) and its configuration. `concentration()` turns the paper's "not global"
claim into numbers (the share of C held by the top 10% of heads, a Gini coefficient). Undefined values
are NaN: a NaN head stays NaN in C, ranks last and is never selected.
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
from transformer_lens import HookedTransformer

from .heads import Head, HeadIndexError, rank_heads

CombineKind = Literal["product", "rank_product", "weighted_sum", "first_order_harm"]
COMBINE_KINDS: tuple[str, ...] = ("product", "rank_product", "weighted_sum", "first_order_harm")
RankBy = Literal["C", "O", "S"]
MAP_FORMAT = "cast_interp.conflict_map"
MAP_FORMAT_VERSION = 1
MAP_METHOD_VERSION = "conflict-map-1"
TENSORS_FILE = "conflict_map.safetensors"
META_FILE = "conflict_map.json"


class MapMismatchError(HeadIndexError):
    """A conflict map used with a model it was not made for (shape or model identity differ)."""


# --------------------------------------------------------------------------------------------------
# Combination
# --------------------------------------------------------------------------------------------------


def minmax(x: Tensor) -> Tensor:
    """Min-max scaling over all finite entries (NaN stays NaN).

    A constant input carries no ranking information: it maps to 1 (ours), so in a product C ranks by
    the other factor alone.
    """
    x = x.double()
    finite = torch.isfinite(x)
    out = torch.full_like(x, float("nan"))
    if not finite.any():
        return out
    lo, hi = x[finite].min(), x[finite].max()
    if hi == lo:
        out[finite] = 1.0
    else:
        out[finite] = (x[finite] - lo) / (hi - lo)
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
    O: Float[Tensor, "layer head"],
    S: Float[Tensor, "layer head"],
    *,
    how: CombineKind = "product",
    alpha: float = 0.5,
    dot: Optional[Float[Tensor, "layer head"]] = None,
) -> Float[Tensor, "layer head"]:
    """Conflict score C from O and S (float32; NaN where an input is NaN).

    how:
        "product" (default, ours): minmax(O) * minmax(max(S, 0)). High only where both are high.
        "rank_product": percentile_rank(O) * percentile_rank(max(S, 0)). Use when a few extreme
            heads would squash the min-max scale of the rest.
        "weighted_sum": alpha * minmax(O) + (1 - alpha) * minmax(max(S, 0)). A head scores with
            either conflict or sensitivity; alpha in [0, 1] weighs O.
        "first_order_harm": -dot, with dot = g_safe . g_util (needs `dot`, O and S are not used):
            the first-order L_util increase per unit safety gradient step on that head alone.
    S is clipped at 0 first: a head whose ablation *helps* utility is not a utility risk.
    """
    if how not in COMBINE_KINDS:
        raise ValueError(f"Unknown combination {how!r}: use one of {COMBINE_KINDS}.")
    if how == "first_order_harm":
        if dot is None:
            raise ValueError("how='first_order_harm' needs the gradient dot products "
                             "(ConflictResult.dot / ConflictMap.dot); pass dot=...")
        return (-dot.double()).float()
    if O.shape != S.shape:
        raise HeadIndexError(f"O {tuple(O.shape)} and S {tuple(S.shape)} must have the same "
                             "[n_layers, n_heads] shape (were they computed on the same model?).")
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
# Concentration
# --------------------------------------------------------------------------------------------------


def gini(x: Union[Tensor, np.ndarray]) -> float:
    """Gini coefficient of non-negative values: 0 all equal, (n-1)/n all in one. NaN if all zero."""
    v = np.sort(np.asarray(x, dtype=np.float64).ravel())
    n = v.size
    total = v.sum()
    if n == 0 or total <= 0:
        return float("nan")
    i = np.arange(1, n + 1)
    return float(2.0 * np.sum(i * v) / (n * total) - (n + 1) / n)


def _count_from_fraction(frac: float, n: int) -> int:
    """round(frac * n) half up, at least 1 (a positive fraction always names a head)."""
    return max(1, int(math.floor(frac * n + 0.5)))


# --------------------------------------------------------------------------------------------------
# The map
# --------------------------------------------------------------------------------------------------


@dataclass
class ConflictMap:
    """Per-head conflict map `[n_layers, n_heads]`, indexed [layer, head].

    O, S, C: Optimization Conflict, Functional Sensitivity, combined score (see module docstring).
    components: per-component O `{"q", "k", "v", "o": [L, H]}`.
    norms: gradient norms `{"safe", "util", "safe_q", ...}`.
    ci_low, ci_high: bootstrap interval of O; component_ci_low/high per component.
    dot: g_safe . g_util per head (for "first_order_harm").
    kv_group_O: `[L, n_kv_heads]` conflict of each K/V group's own parameters.
    config: everything needed to reproduce it (model_id, data, seeds, options, versions, timings).
    """

    O: Float[Tensor, "layer head"]
    S: Float[Tensor, "layer head"]
    C: Float[Tensor, "layer head"]
    components: dict[str, Tensor] = field(default_factory=dict)
    norms: dict[str, Tensor] = field(default_factory=dict)
    ci_low: Optional[Tensor] = None
    ci_high: Optional[Tensor] = None
    dot: Optional[Tensor] = None
    kv_group_O: Optional[Tensor] = None
    component_ci_low: dict[str, Tensor] = field(default_factory=dict)
    component_ci_high: dict[str, Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = tuple(self.O.shape)
        if len(shape) != 2:
            raise HeadIndexError(f"O must be [n_layers, n_heads], got shape {shape}.")
        for name, t in self._per_head_tensors().items():
            if tuple(t.shape) != shape:
                raise HeadIndexError(f"{name} has shape {tuple(t.shape)} but O has {shape}: all "
                                     "per-head arrays of a map must be [n_layers, n_heads].")

    # -- construction ------------------------------------------------------------------------------

    @classmethod
    def from_results(
        cls, conflict: Any, sensitivity: Any, *, how: CombineKind = "product", alpha: float = 0.5,
        config: Optional[dict] = None,
    ) -> "ConflictMap":
        """A map from a `ConflictResult` and a `SensitivityResult` (or an `[L, H]` tensor of S)."""
        S = sensitivity.S if hasattr(sensitivity, "S") else torch.as_tensor(sensitivity)
        S = S.detach().float().cpu()
        O = conflict.O.detach().float().cpu()
        cpu = lambda d: {k: v.detach().float().cpu() for k, v in d.items()}  # noqa: E731
        C = combine(O, S, how=how, alpha=alpha, dot=conflict.dot.cpu())
        cfg = {"combine": {"how": how, "alpha": alpha}, "method_version": MAP_METHOD_VERSION,
               "conflict": copy.deepcopy(conflict.config),
               "sensitivity": copy.deepcopy(getattr(sensitivity, "config", {}))}
        if hasattr(sensitivity, "base_loss"):
            cfg["sensitivity"].setdefault("base_loss", float(sensitivity.base_loss))
        cfg.update(config or {})
        return cls(O=O, S=S, C=C, components=cpu(conflict.component_O), norms=cpu(conflict.norms),
                   ci_low=conflict.ci_low.float().cpu(), ci_high=conflict.ci_high.float().cpu(),
                   dot=conflict.dot.float().cpu(), kv_group_O=conflict.kv_group_O.float().cpu(),
                   component_ci_low=cpu(conflict.component_ci_low),
                   component_ci_high=cpu(conflict.component_ci_high), config=cfg)

    def recombine(self, *, how: CombineKind = "product", alpha: float = 0.5) -> "ConflictMap":
        """A new map with C recomputed by another combination (O, S and the rest unchanged)."""
        new = copy.deepcopy(self)
        new.C = combine(self.O, self.S, how=how, alpha=alpha, dot=self.dot)
        new.config["combine"] = {"how": how, "alpha": alpha}
        return new

    # -- shape -------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.O.shape)  # type: ignore[return-value]

    @property
    def n_heads_total(self) -> int:
        return int(self.O.numel())

    def _per_head_tensors(self) -> dict[str, Tensor]:
        out = {"S": self.S, "C": self.C}
        for prefix, d in (("component_O", self.components), ("norms", self.norms),
                          ("component_ci_low", self.component_ci_low),
                          ("component_ci_high", self.component_ci_high)):
            out.update({f"{prefix}.{k}": v for k, v in d.items()})
        for name in ("ci_low", "ci_high", "dot"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def check_model(self, model: HookedTransformer) -> None:
        """Raise `MapMismatchError` unless this map was made for a model like `model`."""
        L, H = model.cfg.n_layers, model.cfg.n_heads
        if self.shape != (L, H):
            raise MapMismatchError(
                f"This conflict map is {self.shape[0]} layers x {self.shape[1]} heads but the model "
                f"has {L} x {H}: it was made for another model. Re-run diagnose on this model.")
        from .model import model_id

        mine, theirs = self.config.get("model") or {}, model_id(model)
        diff = {k: (mine[k], theirs[k]) for k in theirs
                if mine.get(k) is not None and theirs[k] is not None and mine[k] != theirs[k]}
        if diff:
            desc = ", ".join(f"{k}: map {a!r} vs model {b!r}" for k, (a, b) in diff.items())
            raise MapMismatchError(f"This conflict map was made for another model ({desc}). "
                                   "Re-run diagnose on this model.")

    # -- selection ---------------------------------------------------------------------------------

    def _values(self, by: RankBy) -> Tensor:
        if by not in ("C", "O", "S"):
            raise ValueError(f"by must be 'C', 'O' or 'S', got {by!r}.")
        return getattr(self, by)

    def ranking(self, *, by: RankBy = "C", largest: bool = True) -> list[Head]:
        """All heads ordered by `by` (descending if `largest`), NaN heads last; ties keep
        (layer, head) order, so the ranking is deterministic."""
        return rank_heads(self._values(by), largest=largest, nan_last=True)

    def top_heads(self, k: Union[int, float], *, by: RankBy = "C",
                  largest: bool = True) -> list[Head]:
        """The k heads with the largest (or smallest) `by` value, best first.

        k: a count (int) or a fraction of all heads in (0, 1) (rounded, at least one). NaN heads are
        never selected; asking for more heads than have a defined value is a `HeadIndexError`.
        """
        n = self.n_heads_total
        if isinstance(k, bool) or not isinstance(k, (int, float, np.integer, np.floating)):
            raise TypeError(f"k must be an int count or a float fraction in (0, 1), got {k!r}.")
        if isinstance(k, (float, np.floating)):
            if not 0.0 < float(k) < 1.0:
                raise HeadIndexError(f"A fraction k must be in (0, 1), got {k}; pass an int for a "
                                     "count of heads.")
            count = _count_from_fraction(float(k), n)
        else:
            count = int(k)
        if count < 0 or count > n:
            raise HeadIndexError(f"k = {k} is out of range: the map has {n} heads.")
        v = self._values(by)
        n_finite = int(torch.isfinite(v).sum())
        if count > n_finite:
            raise HeadIndexError(f"k = {count} heads requested but only {n_finite} of {n} have a "
                                 f"defined {by} ({n - n_finite} are NaN and never selected).")
        return self.ranking(by=by, largest=largest)[:count]

    # -- summaries ---------------------------------------------------------------------------------

    def concentration(self, *, by: RankBy = "C") -> dict:
        """How concentrated the score is: the "not global" claim as numbers.

        Over heads with a finite score, negative values counted as 0 (first-order harm can be
        negative: a benefit, not a risk): `top{5,10,20}_share` = share of the total held by the top
        5/10/20% of heads (rounded count, at least one), `gini`, `n_heads` (finite), `n_nan`.
        Shares are NaN when the total is zero.
        """
        v = self._values(by).double().flatten()
        finite = torch.isfinite(v)
        x = np.sort(v[finite].clamp_min(0).cpu().numpy())[::-1]
        n, total = x.size, float(x.sum())
        out: dict[str, Any] = {"by": by, "n_heads": int(n), "n_nan": int((~finite).sum())}
        for pct in (5, 10, 20):
            k = _count_from_fraction(pct / 100, n) if n else 0
            out[f"top{pct}_k"] = k
            out[f"top{pct}_share"] = float(x[:k].sum() / total) if total > 0 else float("nan")
        out["gini"] = gini(x)
        return out

    def to_dataframe(self):
        """One row per head: layer, head, kv_group, O, S, C, rank_C, component O's, norms, CIs, dot."""
        import pandas as pd

        L, H = self.shape
        n_kv = self.kv_group_O.shape[1] if self.kv_group_O is not None else H
        rows: dict[str, Any] = {
            "layer": np.repeat(np.arange(L), H), "head": np.tile(np.arange(H), L),
            "kv_group": np.tile(np.arange(H) // (H // n_kv), L),
            "O": self.O.flatten().numpy(), "S": self.S.flatten().numpy(),
            "C": self.C.flatten().numpy(),
        }
        rank = np.empty(L * H, dtype=np.int64)
        for r, (l, h) in enumerate(self.ranking(by="C")):
            rank[l * H + h] = r + 1
        rows["rank_C"] = rank
        for c, t in self.components.items():
            rows[f"O_{c}"] = t.flatten().numpy()
        for name, t in self.norms.items():
            rows[f"norm_{name}"] = t.flatten().numpy()
        for name in ("ci_low", "ci_high", "dot"):
            if getattr(self, name) is not None:
                rows[f"O_{name}" if name.startswith("ci") else name] = \
                    getattr(self, name).flatten().numpy()
        if self.kv_group_O is not None:
            idx = np.arange(H) // (H // n_kv)
            rows["kv_group_O"] = self.kv_group_O[:, idx].flatten().numpy()
        return pd.DataFrame(rows)

    # -- persistence -------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, Tensor]:
        out = {"O": self.O, **self._per_head_tensors()}
        if self.kv_group_O is not None:
            out["kv_group_O"] = self.kv_group_O
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def save(self, directory: Union[str, Path]) -> Path:
        """Write `conflict_map.safetensors` + `conflict_map.json` into `directory` (atomically each;
        the JSON, written last, marks a complete map). No pickle."""
        from .io import atomic_save_safetensors, atomic_write_json

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = self._tensors()
        atomic_save_safetensors(tensors, d / TENSORS_FILE,
                                metadata={"format": MAP_FORMAT, "format_version": MAP_FORMAT_VERSION})
        atomic_write_json({"format": MAP_FORMAT, "format_version": MAP_FORMAT_VERSION,
                           "shape": list(self.shape), "tensors": sorted(tensors),
                           "config": self.config}, d / META_FILE)
        return d

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "ConflictMap":
        """Read a map written by `save`."""
        from safetensors.torch import load_file

        from .io import read_json

        d = Path(directory)
        meta_path, tens_path = d / META_FILE, d / TENSORS_FILE
        for p in (meta_path, tens_path):
            if not p.exists():
                raise FileNotFoundError(f"{p} does not exist: {d} is not a saved ConflictMap "
                                        "(expected conflict_map.json and conflict_map.safetensors).")
        meta = read_json(meta_path)
        if meta.get("format") != MAP_FORMAT:
            raise ValueError(f"{meta_path} is not a conflict map (format {meta.get('format')!r}).")
        if meta.get("format_version", 0) > MAP_FORMAT_VERSION:
            raise ValueError(f"{meta_path} was written by a newer cast_interp (format version "
                             f"{meta['format_version']}); upgrade the package.")
        t = load_file(str(tens_path))
        missing = [k for k in meta.get("tensors", []) if k not in t]
        if missing:
            raise ValueError(f"{tens_path} lacks tensors {missing}: the files do not belong "
                             "together; re-save the map.")

        def group(prefix: str) -> dict[str, Tensor]:
            return {k[len(prefix) + 1:]: v for k, v in t.items() if k.startswith(prefix + ".")}

        return cls(O=t["O"], S=t["S"], C=t["C"], components=group("component_O"),
                   norms=group("norms"), ci_low=t.get("ci_low"), ci_high=t.get("ci_high"),
                   dot=t.get("dot"), kv_group_O=t.get("kv_group_O"),
                   component_ci_low=group("component_ci_low"),
                   component_ci_high=group("component_ci_high"), config=meta.get("config", {}))

    def __repr__(self) -> str:
        L, H = self.shape
        top = ", ".join(f"L{l}H{h}" for l, h in self.ranking()[:5])
        how = self.config.get("combine", {}).get("how", "?")
        return f"ConflictMap({L} layers x {H} heads, C by {how!r}, top: {top})"
