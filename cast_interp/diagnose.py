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

from transformer_lens import HookedTransformer

from .conflict import optimization_conflict
from .conflict_map import COMBINE_KINDS, CombineKind, ConflictMap
from .data import ChatDataset, DataError, make_batches, self_reference
from .model import model_id
from .io import check_fields

DIAGNOSIS_VERSION = "diagnose-1"
UtilityReference = Literal["dataset", "self"]


@dataclass
class DiagnosisConfig:
    """Settings of one diagnosis (saved in the map's `config["diagnosis"]`).

    n_calibration: examples taken from each calibration set (the first n).
    n_sensitivity: utility examples used for S (the first n of D_util; None = all n_calibration).
        Exact sensitivity costs about 15 forward passes per head-layer sweep on these examples
        (each head's pass restarts at its layer), so the default 8 (ours) keeps S on SmolLM2 to a
        few minutes on 2 CPU cores; raise it on a GPU.
    batch_size: examples per batch. The bootstrap resamples batches, so smaller batches give a
        finer-grained CI (at least two batches per set are needed for a non-degenerate one).
    ablation, sensitivity_method: how S is measured ("mean"/"zero"/"resample",
        "exact"/"attribution"); see `sensitivity.functional_sensitivity`.
    combine, alpha: how O and S make C; see `conflict_map.combine` (default "product", ours).
    n_bootstrap, ci: bootstrap resamples and coverage of the O interval (ours).
    seed: seeds the bootstrap and the resample ablation.
    utility_reference: "dataset" (D_util's own answers) or "self" (the model's greedy answers
        before training: L_util then measures preservation of what the model does).
    max_new_tokens: length of self-reference answers.
    max_length: longest tokenized example (None: the model's context); longer ones are an error.
    heads_per_pass: heads ablated together per stacked pass in exact sensitivity (None: automatic).
    """

    n_calibration: int = 32
    n_sensitivity: Optional[int] = 8
    batch_size: int = 8
    ablation: Literal["mean", "zero", "resample"] = "mean"
    sensitivity_method: Literal["exact", "attribution"] = "exact"
    combine: CombineKind = "product"
    alpha: float = 0.5
    n_bootstrap: int = 200
    ci: float = 0.9
    seed: int = 0
    utility_reference: UtilityReference = "dataset"
    max_new_tokens: int = 48
    max_length: Optional[int] = None
    heads_per_pass: Optional[int] = None

    def __post_init__(self) -> None:
        if self.n_calibration < 1:
            raise ValueError(f"n_calibration must be >= 1, got {self.n_calibration}.")
        if self.n_sensitivity is not None and self.n_sensitivity < 1:
            raise ValueError(f"n_sensitivity must be >= 1 or None, got {self.n_sensitivity}.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        choices = {"ablation": ("mean", "zero", "resample"),
                   "sensitivity_method": ("exact", "attribution"), "combine": COMBINE_KINDS,
                   "utility_reference": ("dataset", "self")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}.")
        if not 0.0 < self.ci < 1.0:
            raise ValueError(f"ci must be in (0, 1), got {self.ci}.")
        if self.n_bootstrap < 0:
            raise ValueError(f"n_bootstrap must be >= 0, got {self.n_bootstrap}.")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiagnosisConfig":
        check_fields(cls, d)
        return cls(**d)


def diagnose(
    model: HookedTransformer,
    safety_data: ChatDataset,
    utility_data: ChatDataset,
    config: Optional[DiagnosisConfig] = None,
    *,
    progress: bool = False,
) -> ConflictMap:
    """The conflict map of `model`: O and S for every head, combined into C.

    Args:
        safety_data: D_safe, harmful prompts with refusal responses (see `data.with_refusals`).
        utility_data: D_util, benign prompts with reference answers (or without, when
            `config.utility_reference == "self"`: the model's own answers are generated).
        config: a `DiagnosisConfig` (defaults if None).

    Returns a `ConflictMap`; `config` holds `diagnosis` (the settings), `model` (`model_id`), `data`
    (each set's `describe()`), `conflict` and `sensitivity` (each part's own record), `combine`,
    `seeds`, `versions` and `timings_s`.
    """
    from .sensitivity import functional_sensitivity

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
    safe_batches = make_batches(model, safe, batch_size=cfg.batch_size, max_length=cfg.max_length)
    util_batches = make_batches(model, util, batch_size=cfg.batch_size, max_length=cfg.max_length)
    util_sens = util.take(cfg.n_sensitivity) if cfg.n_sensitivity else util
    sens_batches = util_batches if util_sens is util else make_batches(
        model, util_sens, batch_size=cfg.batch_size, max_length=cfg.max_length)
    timings["tokenize"] = time.perf_counter() - t

    t = time.perf_counter()
    conflict = optimization_conflict(model, safe_batches, util_batches, n_bootstrap=cfg.n_bootstrap,
                                     ci=cfg.ci, seed=cfg.seed, progress=progress)
    timings["conflict"] = time.perf_counter() - t

    t = time.perf_counter()
    sens = functional_sensitivity(model, sens_batches, ablation=cfg.ablation,
                                  method=cfg.sensitivity_method, heads_per_pass=cfg.heads_per_pass,
                                  seed=cfg.seed, progress=progress)
    timings["sensitivity"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all

    meta = {
        "diagnosis": cfg.to_dict(),
        "model": model_id(model),
        "device": str(model.cfg.device),
        "data": {"safety": safe.describe(), "utility": util.describe(),
                 "sensitivity": util_sens.describe()},
        "seeds": {"bootstrap": cfg.seed, "resample_ablation": cfg.seed},
        "versions": _versions(),
        "timings_s": timings,
    }
    return ConflictMap.from_results(conflict, sens, how=cfg.combine, alpha=cfg.alpha, config=meta)


def _versions() -> dict:
    import torch
    import transformer_lens

    from . import conflict, conflict_map

    try:
        from importlib.metadata import version

        pkg = version("cast_interp")
    except Exception:  # not installed (source checkout)
        pkg = None
    return {"cast_interp": pkg, "diagnose": DIAGNOSIS_VERSION, "conflict": conflict.METHOD_VERSION,
            "conflict_map": conflict_map.MAP_METHOD_VERSION, "torch": torch.__version__,
            "transformer_lens": getattr(transformer_lens, "__version__", None)}
