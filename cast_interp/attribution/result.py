"""`AttributionResult`: per-unit first-order and exact recoveries with the joint and random revert
sets, saved as safetensors plus JSON (`save` / `load`), and its summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import torch
from torch import Tensor

from .. import stats
from ..units import Unit, UnitError, UnitKind
from ..units import label as unit_label
from .selection import _flat_units

ATTRIBUTION_VERSION = "attribution-2"
FORMAT = "cast_interp.attribution"
FORMAT_VERSION = 2
# Not "attribution.json": the pipeline writes its own summary piece under that name in the same folder.
TENSORS_FILE = "attribution_result.safetensors"
META_FILE = "attribution_result.json"


@dataclass
class AttributionResult:
    """Which units of `tuned` caused its utility drop against `original`.

    head / group: `[n_layers, n_units]` tensors per kind of unit (group only under GQA):
        "first_order" (recovered loss, nats per content token, first-order estimate, all units),
        "exact" (by a real revert; NaN where not measured), "recovered" (exact where measured, else
        first order), "share" (recovered / total drop), "candidate", "spread", "measured",
        "changed" (bool: the unit's slices differ between the models), and with safety data "safety_first_order" / "safety_exact" (safety loss lost, > 0: the
        update bought safety).
    per_example: summed-NLL values per utility example `[n_examples, ...]`, rows in the order of
        `config["split"]["order"]` (half A first): "tokens", "nll_tuned", "nll_original", "drop",
        "{kind}_first_order", "{kind}_exact" `[n_ex, L, n]`, "joint_{name}" `[n_ex]` (a set reverted
        together), "random_draws" `[n_ex, n_draws]`; and "safety_*" on the safety examples.
    analysis: totals, additivity, agreement, joint and random shares with CIs, Spearman with the map.
    config: model, data, seeds, split, k, n_draws, unit sets, versions, timings.
    """

    head: dict[str, Tensor]
    group: dict[str, Tensor] = field(default_factory=dict)
    per_example: dict[str, Tensor] = field(default_factory=dict)
    analysis: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("head", "group") if self.group else ("head",)

    def units(self, kind: UnitKind = "head") -> dict[str, Tensor]:
        if kind not in self.kinds:
            raise UnitError(f"This result has no {kind!r} units (kinds: {self.kinds}).")
        return self.head if kind == "head" else self.group

    @property
    def total_drop(self) -> float:
        return float(self.analysis["drop"]["total"])

    @property
    def utility_recovered(self) -> Tensor:
        """Head units' best estimate of recovered loss (exact where measured), `[L, H]`."""
        return self.head["recovered"]

    def ranking(self, kind: UnitKind = "head", *, by: str = "recovered") -> list[Unit]:
        """Units ordered by `by` ("recovered", "exact", "first_order"), largest first; NaN left out;
        ties in a seeded order."""
        v = self.units(kind)[by]
        order = stats.rank_order(v.flatten(), seed=int(self.config.get("seed", 0)))
        return _flat_units(tuple(v.shape), order[: int(torch.isfinite(v).sum())])

    def rows(self, half: Literal["A", "B"]) -> list[int]:
        """Row indices of `per_example` that belong to half A or B."""
        n_a = len(self.config["split"]["A"])
        n = int(self.per_example["drop"].shape[0])
        return list(range(n_a)) if half == "A" else list(range(n_a, n))

    def summary(self) -> dict:
        """Flat dict of scalars (numbers and short strings) for a report."""
        return _summary(self)

    def to_dict(self) -> dict:
        from ..io import to_jsonable

        return to_jsonable({"analysis": self.analysis, "config": self.config})

    def save(self, directory: Union[str, Path]) -> Path:
        """`attribution_result.safetensors` (every tensor) + `attribution_result.json` (analysis and
        config, written last: its presence marks a complete result). Atomic, no pickle."""
        from ..io import atomic_save_safetensors, atomic_write_json

        d = Path(directory)
        tensors = {f"{part}.{k}": v for part in ("head", "group", "per_example")
                   for k, v in getattr(self, part).items()}
        atomic_save_safetensors(tensors, d / TENSORS_FILE, {"format": FORMAT})
        atomic_write_json({"format": FORMAT, "format_version": FORMAT_VERSION,
                           "analysis": self.analysis, "config": self.config}, d / META_FILE)
        return d

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "AttributionResult":
        from safetensors.torch import load_file

        from ..io import read_json

        d = Path(directory)
        for p in (d / META_FILE, d / TENSORS_FILE):
            if not p.exists():
                raise FileNotFoundError(f"{p} does not exist: {d} holds no saved AttributionResult.")
        meta = read_json(d / META_FILE)
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{d / META_FILE} is not a version-{FORMAT_VERSION} attribution result "
                             f"(format {meta.get('format')!r}, version "
                             f"{meta.get('format_version')!r}); re-run the attribution.")
        parts: dict[str, dict] = {"head": {}, "group": {}, "per_example": {}}
        for key, t in load_file(str(d / TENSORS_FILE)).items():
            part, name = key.split(".", 1)
            parts[part][name] = t
        return cls(analysis=meta["analysis"], config=meta["config"], **parts)


def _summary(res: AttributionResult) -> dict:
    a, c = res.analysis, res.config
    unit = a["unit"]
    s: dict[str, Any] = {"label": c.get("label"), "unit": unit, "k": c.get("k"),
                         "n_examples": c.get("n_examples"), "n_draws": c.get("n_draws"),
                         "total_drop": a["drop"]["total"],
                         "total_drop_low": a["drop"]["total_ci"]["low"],
                         "total_drop_high": a["drop"]["total_ci"]["high"],
                         "L_util_tuned": a["drop"]["L_util_tuned"],
                         "L_util_original": a["drop"]["L_util_original"]}
    s.update({f"additivity_{k}": v for k, v in a["additivity"].items()})
    for kind, g in a["agreement"].items():
        s.update({f"agreement_{kind}_{k}": v for k, v in g.items()})
    for t in ("_A", "_B"):  # a half's drop and recovered amounts (nats/token), if recorded
        if f"ci{t}" in a["drop"]:
            h = a["drop"][f"ci{t}"]
            s.update({f"total_drop{t}": h["estimate"], f"total_drop{t}_low": h["low"],
                      f"total_drop{t}_high": h["high"]})
    for name, j in a["joint"].items():
        s[f"{name}_recovered"] = j["recovered"]
        for t in ("", "_A", "_B"):
            if f"recovered_ci{t}" in j:
                r = j[f"recovered_ci{t}"]
                s.update({f"{name}_recovered{t}": r["estimate"],
                          f"{name}_recovered{t}_low": r["low"],
                          f"{name}_recovered{t}_high": r["high"]})
        for part in ("share", "share_A", "share_B"):
            s.update({f"{name}_{part}": j[part]["estimate"], f"{name}_{part}_low": j[part]["low"],
                      f"{name}_{part}_high": j[part]["high"]})
    s.update({f"random_{k}": v for k, v in a["random"].items()})
    for key, v in a["random"].items():
        if key.endswith("_vs_random"):
            s[f"{key}_percentile"], s[f"{key}_p"] = v["percentile"], v["p"]
    for kind, m in a.get("map", {}).items():
        for est in ("first_order", "exact"):
            for by, v in m[est].items():
                s.update({f"spearman_{by}_{kind}_{est}": v["spearman"],
                          f"spearman_{by}_{kind}_{est}_low": v["low"],
                          f"spearman_{by}_{kind}_{est}_high": v["high"],
                          f"spearman_{by}_{kind}_{est}_p": v.get("p_permutation")})
        s[f"top_k_overlap_C_{kind}"] = m["top_k_overlap"]
    s.update({f"safety_lost_{k}": v for k, v in a.get("safety_lost", {}).items()})
    for kind in res.kinds:
        s[f"top_{kind}s_recovered"] = ", ".join(unit_label(u, kind) for u in res.ranking(kind)[:5])
    s["selected"] = ", ".join(unit_label(u, unit) for u in c.get("selected", []))
    s["time_s"] = c.get("timings_s", {}).get("total")
    return {k: v for k, v in s.items() if isinstance(v, (int, float, str)) or v is None}
