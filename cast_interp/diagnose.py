"""Stage 1 of CAST, diagnosis: the pre-alignment conflict map of every attention head.

Before any safety training, CAST measures for each head h
  1. the Optimization Conflict O(h) between the safety and utility gradients (`conflict.py`),
  2. the Functional Sensitivity S(h) of utility to ablating the head (`sensitivity.py`),
and combines them into the conflict score C(h) (`conflict_map.py`). Stage 2 then skips the top heads
by C during safety fine-tuning.

`diagnose` is that stage in one call: it takes the two calibration sets (D_safe: harmful prompt ->
refusal; D_util: benign prompt -> reference answer), tokenizes them with the chat template, runs
both measurements and returns a `ConflictMap` whose `config` records everything needed to redo it
(options, model identity, data fingerprints, seeds, versions) and how long each part took.

Example:
    >>> from cast_interp.data import load_bundled
    >>> model = load_model("smollm2-135m-instruct")                              # doctest: +SKIP
    >>> cmap = diagnose(model, load_bundled("harmful", "calibration"),
    ...                 load_bundled("benign", "calibration"))                   # doctest: +SKIP
    >>> cmap.top_heads(0.1), cmap.concentration()["top10_share"]                 # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Literal, Optional

from .backend import Model

from .conflict import optimization_conflict
from .conflict_map import COMBINE_KINDS, CombineKind, ConflictMap
from .data import ChatDataset, DataError, make_batches, self_reference
from .model import model_id, weight_fingerprint
from .checks import check_types
from .io import check_fields
from .stats import count_from_fraction
from .units import uses_gqa

DIAGNOSIS_VERSION = "diagnose-2"
UtilityReference = Literal["dataset", "self"]


@dataclass
class DiagnosisConfig:
    """Settings of one diagnosis (saved in the map's `config["diagnosis"]`). Defaults are v2.

    n_calibration: examples taken from each calibration set (the first n) for O.
    n_sensitivity: utility examples used for S (the first n of D_util; None = all n_calibration).
        Default 16 (ours): on SmolLM2 the exact ablations of the candidates cost ~15 s per layer
        and 8 examples of natural-length answers on 2 CPU cores, so 32 would double a diagnosis
        that already exceeds 5 minutes; the report gives each top unit's CI so a reader sees
        whether 16 sufficed.
    batch_size: examples per batch (O is computed one example at a time whatever this is).
    include_end_of_turn: put the end-of-turn token in the diagnosis losses (default False, v2: both
        objectives teach "stop here", which made their gradients look aligned for a reason
        unrelated to content).
    ablation: how a unit is knocked out for S ("mean"/"zero"/"resample").
    sensitivity_method: "screened" (default, v2: attribution patching over all units, exact
        ablation of the top candidates), "exact" (every unit; slow) or "attribution" (first order).
    n_exact: exact candidates per kind of unit for "screened" (None: twice 10% of the units, ours,
        so a top-10% selection is exact).
    combine, alpha: how O and S make C; see `conflict_map.combine` (default "rank_product", v2).
    n_bootstrap, ci: bootstrap resamples over examples and coverage of the O and S intervals.
    seed: seeds the bootstraps, the resample ablation and the tie-breaks of the ranking.
    utility_reference: "self" (default, v2: the model's own greedy answers before training,
        generated to their natural end; L_util then measures preservation of what the model does) or
        "dataset" (D_util's own answers).
    max_new_tokens: cap on self-reference answers (default 128, ours); a cut answer is marked
        truncated and gets no end-of-turn token. Generation cost grows faster than linearly with
        the cap (TransformerLens's key/value cache), so the default trades natural ends for time.
    max_length: longest tokenized example (None: the model's context); longer ones are an error.
    heads_per_pass: units ablated together per stacked pass in exact sensitivity (None: automatic).
    """

    n_calibration: int = 32
    n_sensitivity: Optional[int] = 16
    batch_size: int = 8
    include_end_of_turn: bool = False
    ablation: Literal["mean", "zero", "resample"] = "mean"
    sensitivity_method: Literal["screened", "exact", "attribution"] = "screened"
    n_exact: Optional[int] = None
    combine: CombineKind = "rank_product"
    alpha: float = 0.5
    n_bootstrap: int = 200
    ci: float = 0.95
    seed: int = 0
    utility_reference: UtilityReference = "self"
    max_new_tokens: int = 128
    max_length: Optional[int] = None
    heads_per_pass: Optional[int] = None

    def __post_init__(self) -> None:
        check_types(self)
        for name, lo in (("n_calibration", 1), ("batch_size", 1), ("max_new_tokens", 1),
                         ("n_bootstrap", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}.")
        for name in ("n_sensitivity", "n_exact", "max_length", "heads_per_pass"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {v!r}.")
        choices = {"ablation": ("mean", "zero", "resample"),
                   "sensitivity_method": ("screened", "exact", "attribution"),
                   "combine": COMBINE_KINDS, "utility_reference": ("dataset", "self")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")
        if not 0.0 < self.ci < 1.0:
            raise ValueError(f"ci must be in (0, 1), got {self.ci}.")
        if self.n_bootstrap == 1:
            raise ValueError("n_bootstrap = 1 gives no interval: use 0 (none) or >= 2 (200 default).")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiagnosisConfig":
        check_fields(cls, d)
        return cls(**d)


def _sensitivity(model, batches, cfg: DiagnosisConfig, unit: str, O, progress: bool,
                 screen=None):
    """S for one kind of unit, by the configured method (`screen`: the heads' attribution result,
    reused to screen groups)."""
    from .sensitivity import functional_sensitivity, screened_sensitivity

    kw = dict(unit=unit, ablation=cfg.ablation, n_bootstrap=cfg.n_bootstrap, ci=cfg.ci,
              seed=cfg.seed, progress=progress)
    if cfg.sensitivity_method != "screened":
        return functional_sensitivity(model, batches, method=cfg.sensitivity_method,
                                      heads_per_pass=cfg.heads_per_pass, **kw)
    n = O.numel()
    n_exact = min(n, cfg.n_exact or max(8, 2 * count_from_fraction(0.1, n)))
    return screened_sensitivity(model, batches, n_exact=n_exact, prior_O=O, how=cfg.combine,
                                heads_per_pass=cfg.heads_per_pass, screen=screen, **kw)


def diagnose(
    model: Model,
    safety_data: ChatDataset,
    utility_data: ChatDataset,
    config: Optional[DiagnosisConfig] = None,
    *,
    progress: bool = False,
) -> ConflictMap:
    """The conflict map of `model`: O and S for every head (and K/V group under GQA), into C.

    Args:
        safety_data: D_safe, harmful prompts with refusal responses (see `data.with_refusals`).
        utility_data: D_util, benign prompts (with reference answers when
            `config.utility_reference == "dataset"`; by default the model's own are generated).
        config: a `DiagnosisConfig` (defaults if None).

    Returns a `ConflictMap`; `config` holds `diagnosis` (the settings), `model` (`model_id`), `data`
    (each set's `describe()`), `conflict` and `sensitivity` (each part's own record), `combine`,
    `seeds`, `versions` and `timings_s`; `summary` the Spearman and concentration-vs-null numbers.
    """
    cfg = config or DiagnosisConfig()
    if not isinstance(cfg, DiagnosisConfig):
        raise TypeError(f"config must be a DiagnosisConfig, got {type(cfg).__name__}.")
    for what, ds in (("safety_data", safety_data), ("utility_data", utility_data)):
        if not isinstance(ds, ChatDataset):
            raise TypeError(f"{what} must be a ChatDataset (e.g. load_bundled(...)), got "
                            f"{type(ds).__name__}.")
        if len(ds) == 0:
            raise DataError(f"{what} ({ds.name!r}) is empty.")
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    safe = safety_data.take(cfg.n_calibration)
    util = utility_data.take(cfg.n_calibration)
    if cfg.utility_reference == "self":
        t = time.perf_counter()
        util = self_reference(model, util, max_new_tokens=cfg.max_new_tokens)
        timings["self_reference"] = time.perf_counter() - t

    t = time.perf_counter()
    kw = dict(batch_size=cfg.batch_size, max_length=cfg.max_length,
              end_of_turn_in_loss=cfg.include_end_of_turn)
    safe_batches = make_batches(model, safe, **kw)
    util_batches = make_batches(model, util, **kw)
    util_sens = util.take(cfg.n_sensitivity) if cfg.n_sensitivity else util
    sens_batches = util_batches if util_sens is util else make_batches(model, util_sens, **kw)
    timings["tokenize"] = time.perf_counter() - t

    t = time.perf_counter()
    conflict = optimization_conflict(model, safe_batches, util_batches, n_bootstrap=cfg.n_bootstrap,
                                     ci=cfg.ci, seed=cfg.seed, progress=progress)
    timings["conflict"] = time.perf_counter() - t

    sens, screen = {}, None
    for unit in (("head", "group") if uses_gqa(model) else ("head",)):
        t = time.perf_counter()
        sens[unit] = _sensitivity(model, sens_batches, cfg, unit, conflict.units(unit)["O"],
                                  progress, screen=screen)
        screen = sens[unit].screen
        timings[f"sensitivity_{unit}"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    meta = {
        "diagnosis": cfg.to_dict(),
        "model": {**model_id(model), "weights": weight_fingerprint(model)},
        "device": str(model.cfg.device),
        "data": {"safety": safe.describe(), "utility": util.describe(),
                 "sensitivity": util_sens.describe()},
        "loss_tokens": "response content and end-of-turn" if cfg.include_end_of_turn
        else "response content only (end-of-turn excluded, v2)",
        "seeds": {"bootstrap": cfg.seed, "resample_ablation": cfg.seed, "tie_break": cfg.seed},
        "versions": _versions(),
        "timings_s": timings,
    }
    return ConflictMap.from_results(conflict, sens["head"], sens.get("group"), how=cfg.combine,
                                    alpha=cfg.alpha, seed=cfg.seed, config=meta)


def _versions() -> dict:
    import torch

    from . import backend, conflict, conflict_map

    try:
        from importlib.metadata import version

        pkg = version("cast_interp")
    except Exception:  # not installed (source checkout)
        pkg = None
    return {"cast_interp": pkg, "diagnose": DIAGNOSIS_VERSION, "conflict": conflict.METHOD_VERSION,
            "conflict_map": conflict_map.MAP_METHOD_VERSION, "torch": torch.__version__,
            "transformer_lens": backend.TL_VERSION}
