"""The whole CAST experiment as one resumable run: diagnose -> tune every arm -> evaluate -> report.

    run_experiment(RunConfig.from_preset("cpu", out_dir="runs/default"))

1. Diagnosis (stage 1) on the calibration splits: the pre-alignment `ConflictMap`.
2. Safety fine-tuning (stage 2) of a fresh copy of the model per *piece*: an arm (full tuning, CAST,
   random k, bottom-k by C, top-k by O, top-k by S, a band of whole layers) at a budget k, on one
   training seed. The design is paired (METHOD v2):
   - every arm runs on every training seed of `train_seeds` (the seed sets the data order and any
     randomness of training, nothing else), so arms on one seed see the same batches;
   - the random arm has `n_draws` draws: draw d skips the units drawn with seed d and trains on
     seed `train_seeds[d % len(train_seeds)]`, so draws and training seeds are crossed, every seed
     has draws, and each draw can be compared with CAST on its own training seed;
   - every arm at one k freezes the same number of parameters (`sparse_tuning`: units own
     disjoint slices; under GQA a head arm trains the shared K/V, a `unit="group"` arm skips whole
     groups), recorded per piece.
   Along training each piece logs a generation-free refusal score on harmful validation prompts
   and KL to the original on benign validation answers (`sparse_tuning.ValidationMonitor`), so the
   report can compare arms at equal safety.
3. Evaluation (stage 3) of the original and of every piece on the held-out test sets, per prompt.
4. Post-hoc attribution (stage 4) of the full-tuning arm on the first training seed (optional).
Then `report.py` computes every comparison as a paired difference with a 95% CI over seeds and
prompts, CAST's rank among the random draws, and the matched-safety comparison, and writes
`report.md` and the figures.

Validation splits (ours): the last `n_val` examples of the harmful and benign *train* splits are
held out of training for the curves; the benign ones get the original model's own answers.

Every finished piece is written atomically to `out_dir/arms/<piece>.json` with a key of the
configuration fields it depends on (and its skipped units); a piece is re-used only when both
match, so an interrupted run resumes where it stopped, more seeds or draws add pieces to a finished
run, and a changed setting redoes the pieces it affects instead of mixing them in.

Under `torchrun` (`distributed.py`) the missing pieces are shared out round-robin over the ranks,
each rank on its own device; rank 0 alone writes the shared files and, after every piece is on
disk, the results. A piece's numbers do not depend on the rank that ran it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .checks import check_int, check_number, check_types
from . import backend, distributed
from .io import atomic_write_json, atomic_write_text, json_field, read_json, to_jsonable
from .units import UNIT_KINDS

PIPELINE_VERSION = "pipeline-2"
# The built-in baselines (the "bottom", "top_o", "top_s", "layer_band" controls). Every arm a run may
# add is read from the arms registry (`registry/arms.py`); `ALL_BASELINES` in a preset means every
# registered one at the time the config is built.
BASELINES = ("bottom", "top_o", "top_s", "layer_band")
ALL_BASELINES = "all"
ATTRIBUTABLE = ("full", "cast", "random")  # arms whose first-seed tuned weights are kept

# Sized with `estimate_seconds` (per-unit times measured on SmolLM2, 2 CPU cores; the measured run
# times are in benchmarks/README.md, "Where the cost model's numbers come from").
PRESETS: dict[str, dict[str, Any]] = {
    # Plumbing (the tiny model): the same design, minimal sizes. k = 10% as in `cpu`
    # (1 of the tiny model's 8 heads, 7 of Gemma-3-270m's 72, 27 of SmolLM2's 270): at 50% the
    # screen (2k exact) and stage 4 (2k candidates) swept every head of a real model.
    "smoke": {"n_calibration": 4, "n_sensitivity": 4, "n_bootstrap": 10, "steps": 2,
              "batch_size": 4, "n_eval": 4, "n_task": 4, "eval_max_new_tokens": 32,
              "k_fractions": [0.1], "baselines": ALL_BASELINES, "train_seeds": [0, 1],
              "n_draws": 2, "eval_every": 1, "n_val": 2, "generation_seeds": None,
              "attribution_examples": 4, "attribution_candidates": None, "attribution_spread": 4,
              "attribution_max_new_tokens": 16, "n_boot": 200,
              "self_reference_tokens": 16, "utility_reference": "dataset", "attribute": True},
    # The default (RunConfig's defaults): a quick look, sized for about 20 minutes on 2 CPU cores.
    # Same design (paired seeds, draws, curves, CIs) on full tuning, CAST and random only, 2 seeds,
    # 4 draws, small test sets, no generation: the CIs are wide and the report says so. Stage 4
    # is left to `cast-interp attribute`, sized down: 8 examples (halves of 4), answers cut at 64
    # tokens and 10 spread units per kind.
    "cpu": {},
    # Sized for under 2 hours on 2 CPU cores: 8 training seeds shared by full tuning, CAST and random, 20
    # random draws, S on 16 examples (as `diagnose`), all test prompts (40 task items), generated
    # refusals on the first seed; tuned weights of the first seed kept for `cast-interp attribute`.
    "cpu-full": {"train_seeds": list(range(8)), "n_draws": 20, "n_eval": None, "n_task": 40,
                 "n_sensitivity": 16, "generation_seeds": 1, "attribute": False,
                 "attribution_examples": 16, "attribution_max_new_tokens": 128,
                 "attribution_spread": 30},
    # A GPU (the `device` machine): every baseline, more calibration data, steps, seeds and draws
    # (not timed yet).
    "gpu": {"n_calibration": 128, "n_sensitivity": 64, "n_bootstrap": 500, "steps": 40,
            "batch_size": 16, "k_fractions": [0.05, 0.1, 0.2], "baselines": ALL_BASELINES,
            "train_seeds": list(range(10)), "n_draws": 40, "n_val": 16, "eval_every": 4,
            "n_eval": None, "n_task": None, "generation_seeds": None, "attribute": True,
            "attribution_examples": 32, "attribution_max_new_tokens": 128,
            "attribution_spread": 30, "attribution_arms": ["full", "cast", "random"]},
}


@dataclass
class RunConfig:
    """Everything that defines a CAST run (saved in `config.json` and `results.json`).

    Stage 2 (paired design): `train_seeds` are the training seeds every arm runs on; `n_draws` the
    random arm's draws (draw d: units drawn with seed d, training seed
    `train_seeds[d % len(train_seeds)]`; at least one draw per seed, 0 = no random arm);
    `unit` what the arms skip ("head", or "group" for key/value groups under GQA); `k_fractions`
    the budgets of the full set of arms, `k_sweep` extra budgets for CAST and random only;
    `baselines` the other arms. `eval_every`, `n_val`: the safety/utility-cost curves (generation-
    free, every `eval_every` steps on `n_val` harmful and `n_val` benign validation examples).
    Stage 3: `n_eval` test examples per set (None: all), `eval_max_new_tokens` generated tokens.
    Inference: `ci`, `n_boot` of the paired bootstrap (`stats.paired_difference`).
    """

    out_dir: str = "runs/default"
    model: str = "smollm2-135m-instruct"
    # A spec (one set, split into calibration/train/test by `split_seed`, or "bundled:KIND",
    # split as shipped) or a list of three specs [calibration, train, test].
    safety_data: Union[str, list] = "bundled:harmful"
    utility_data: Union[str, list] = "bundled:benign"
    over_refusal_data: str = "bundled:over_refusal"
    # Stage 1
    n_calibration: int = 32
    n_sensitivity: int = 8
    diag_batch_size: int = 8
    ablation: str = "mean"
    sensitivity_method: str = "screened"
    combine: str = "rank_product"
    n_bootstrap: int = 200
    utility_reference: str = "self"
    seed: int = 0                    # diagnosis: bootstraps, tie-breaks; evaluation
    split_seed: int = 0              # the split of a single data file into calibration/train/test
    # Stage 2
    unit: str = "head"
    k_fractions: list = field(default_factory=lambda: [0.1])
    k_sweep: list = field(default_factory=list)
    baselines: list = field(default_factory=list)
    train_seeds: list = field(default_factory=lambda: [0, 1])
    n_draws: int = 4
    steps: int = 8
    batch_size: int = 8
    lr: Optional[float] = None       # None: TuningConfig's default
    benign_mix: float = 0.25         # share of benign examples per batch (tempers over-refusal)
    benign_reference: str = "self"   # benign answers trained on: the model's own ("self") or the data's
    self_reference_tokens: int = 64  # longest self-reference answer for training and validation
    scope: str = "attention"
    eval_every: int = 4
    n_val: int = 4
    # Stage 3
    n_eval: Optional[int] = 10       # held-out examples per evaluation set (None: all)
    n_task: Optional[int] = 16       # multiple-choice items for task accuracy (None: all)
    eval_max_new_tokens: int = 32
    # Generated refusal rates on the pieces of the first `generation_seeds` training seeds (None:
    # all, 0: none); generation is most of an evaluation's cost on CPU (ours).
    generation_seeds: Optional[int] = 0
    # Inference
    ci: float = 0.95
    n_boot: int = 2000
    # Stage 4
    attribute: bool = False          # stage 4 in the run (or later: `cast-interp attribute`)
    # Arms attributed on the first training seed: "full", "cast" (first budget), "random" (draw 0).
    attribution_arms: list = field(default_factory=lambda: ["full"])
    attribution_examples: int = 8             # split into halves A (choose) and B (measure)
    attribution_candidates: Optional[int] = None  # exact reverts of the top first-order units (2k)
    # Exact reverts spread over the first-order range, per kind: they check first order against
    # exact beyond the candidates. 10 in the quick look (the committed run's 30 put first order at
    # Spearman 0.998 with exact, so fewer suffice there); cpu-full and gpu keep 30.
    attribution_spread: int = 10
    attribution_draws: int = 20               # random revert sets
    attribution_max_new_tokens: int = 64      # cap on the original's own answers
    # Utility answers for stage 4: the original model's own greedy answers ("self", default, ours)
    # or the dataset's ("dataset").
    attribution_reference: str = "self"
    preset: str = "cpu"
    device: Optional[str] = None
    # A model too large for one GPU: its blocks split over this many GPUs (TransformerLens 3).
    n_devices: int = 1
    # Weights of the diagnosis: "float32", or "bfloat16" (a bf16 copy of the model; losses and
    # the accumulation of gradients over examples stay float32). Training and evaluation: float32.
    diag_dtype: str = "float32"
    # Data text that tokenizes into the chat template's special tokens (turn markers) is refused
    # unless allowed here.
    allow_special_tokens: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        seeds = self.train_seeds
        if not seeds or len(set(seeds)) != len(seeds) or not all(
                isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise ValueError(f"train_seeds must be a non-empty list of distinct ints, got "
                             f"{seeds!r}.")
        if any(s < 0 for s in seeds):
            raise ValueError(f"train_seeds must be integers >= 0, got {seeds!r}.")
        self.train_seeds = list(seeds)
        check_int("seed", self.seed, 0)
        check_int("split_seed", self.split_seed, 0)
        # A learning rate above 1 sends every weight far from the model (uniform output or inf).
        check_number("lr", self.lr, lo=0, hi=1, lo_open=True, none_ok=True)
        check_int("n_draws", self.n_draws, 0)
        if 0 < self.n_draws < len(seeds):
            raise ValueError(f"n_draws must be 0 (no random arm) or at least len(train_seeds) = "
                             f"{len(seeds)} (every training seed needs a random draw to pair "
                             f"with), got {self.n_draws!r}.")
        for name in ("safety_data", "utility_data"):
            _check_spec(name, getattr(self, name))
        from .registry.arms import baseline_names

        bad = [b for b in self.baselines if b not in baseline_names()]
        if bad:
            raise ValueError(f"Unknown baselines {bad}; choose from {baseline_names()} (a new arm: "
                             "cast_interp.registry.register_arm).")
        for name in ("k_fractions", "k_sweep"):
            for f in getattr(self, name):
                if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
                    raise ValueError(f"{name} holds fractions of all units in (0, 1), got {f!r}.")
        if not self.k_fractions:
            raise ValueError("k_fractions is empty: give at least one budget (e.g. [0.1]).")
        for name, lo in (("steps", 1), ("batch_size", 1), ("eval_every", 0), ("n_val", 2),
                         ("eval_max_new_tokens", 1), ("n_boot", 100), ("self_reference_tokens", 1),
                         ("attribution_examples", 4), ("attribution_spread", 1),
                         ("attribution_draws", 20), ("attribution_max_new_tokens", 1)):
            check_int(name, getattr(self, name), lo)
        check_int("attribution_candidates", self.attribution_candidates, 1, none_ok=True)
        for name in ("n_eval", "n_task"):
            check_int(name, getattr(self, name), 2, none_ok=True, what=" (None: all test examples)")
        check_int("generation_seeds", self.generation_seeds, 0, none_ok=True, what=" (None: all)")
        check_number("ci", self.ci, lo=0, hi=1, lo_open=True, hi_open=True)
        _check_choices(self)
        arms = self.attribution_arms
        if (not isinstance(arms, (list, tuple)) or not arms
                or any(a not in ATTRIBUTABLE for a in arms) or len(set(arms)) != len(arms)):
            raise ValueError(f"attribution_arms must be distinct names from {list(ATTRIBUTABLE)}, "
                             f"got {arms!r}.")
        if "random" in arms and self.n_draws == 0:
            raise ValueError("attribution_arms has 'random' but n_draws is 0: there is no random "
                             "arm to attribute.")
        self.attribution_arms = list(arms)
        # The stage configs check their own fields: one source of the rules.
        self.diagnosis_config()
        self.tuning_config(seeds[0])

    def diagnosis_config(self):
        """Stage 1's `DiagnosisConfig` from this run's fields."""
        from .diagnose import DiagnosisConfig

        return DiagnosisConfig(n_calibration=self.n_calibration, n_sensitivity=self.n_sensitivity,
                               batch_size=self.diag_batch_size, ablation=self.ablation,
                               sensitivity_method=self.sensitivity_method, combine=self.combine,
                               n_bootstrap=self.n_bootstrap, seed=self.seed,
                               utility_reference=self.utility_reference, dtype=self.diag_dtype)

    def tuning_config(self, train_seed: int):
        """Stage 2's `TuningConfig` of a piece on `train_seed`."""
        from .sparse_tuning import TuningConfig

        return TuningConfig(seed=train_seed, steps=self.steps, batch_size=self.batch_size,
                            scope=self.scope, benign_mix=self.benign_mix,
                            **({"lr": self.lr} if self.lr is not None else {}))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown RunConfig field(s) {unknown}: this config.json was written "
                             "by another version of cast_interp (v1 runs had random_seeds and "
                             "kv_policy). Start a new run directory.")
        return cls(**d)

    @classmethod
    def from_preset(cls, preset: str = "cpu", **overrides) -> "RunConfig":
        if preset not in PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose from {sorted(PRESETS)}.")
        values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
        if values.get("baselines") == ALL_BASELINES:
            from .registry.arms import baseline_names

            values["baselines"] = baseline_names()
        return cls(preset=preset, **values)

    def key(self, *names: str, extra: Any = None) -> str:
        """Hash of the named fields (and `extra`): a finished piece is re-used only if unchanged."""
        d = self.to_dict()
        what = {"version": PIPELINE_VERSION, **{n: d[n] for n in names}, "extra": extra}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()
                              ).hexdigest()[:12]


def _check_spec(name: str, spec: Any) -> None:
    if isinstance(spec, str) and spec:
        return
    if isinstance(spec, (list, tuple)) and len(spec) == 3 and all(
            isinstance(x, str) and x for x in spec):
        return
    raise ValueError(f"{name} must be one dataset spec (split by split_seed) or a list of three "
                     f"[calibration, train, test], got {spec!r}.")


def _check_choices(cfg: RunConfig) -> None:
    from .data import UTILITY_REFERENCES

    choices = {"unit": UNIT_KINDS, "benign_reference": UTILITY_REFERENCES,
               "attribution_reference": UTILITY_REFERENCES, "preset": tuple(sorted(PRESETS))}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(cfg, name)!r}.")
    from .model import check_device

    check_device(cfg.device, available=False)  # availability: when the run loads the model
    check_int("n_devices", cfg.n_devices, 1)


DIAG_FIELDS = ("model", "safety_data", "utility_data", "n_calibration", "n_sensitivity",
               "diag_batch_size", "ablation", "sensitivity_method", "combine", "n_bootstrap", "seed",
               "utility_reference")
# What a tuned-and-evaluated piece depends on (its own method, k, seeds are the `extra` of its
# key; the map enters through the skipped units, checked separately).
TUNE_FIELDS = ("model", "safety_data", "utility_data", "steps", "batch_size", "lr", "benign_mix",
               "benign_reference", "self_reference_tokens", "scope", "unit", "eval_every", "n_val")
ATTR_FIELDS = ("attribution_examples", "attribution_candidates", "attribution_spread",
               "attribution_draws", "attribution_reference", "attribution_max_new_tokens")
EVAL_FIELDS = ("model", "safety_data", "utility_data", "over_refusal_data", "n_eval", "n_task",
               "eval_max_new_tokens", "seed")


@dataclass(frozen=True)
class Piece:
    """One fine-tuning run of the grid: an arm (method at budget k) on one training seed; a random
    arm's piece also has its draw (the seed of its unit draw)."""

    method: str
    k: int
    train_seed: int
    draw: Optional[int] = None

    @property
    def arm(self) -> str:
        return f"{self.method}_k{self.k}"

    @property
    def name(self) -> str:
        d = f"_d{self.draw}" if self.draw is not None else ""
        return f"{self.arm}{d}_t{self.train_seed}"


def plan_pieces(cfg: RunConfig, n_units_total: int) -> list[Piece]:
    """Every piece of the run, in running order: full tuning, then per k CAST, the baselines and the
    random draws; CAST and random again at each `k_sweep` budget not already in `k_fractions`."""
    from .sparse_tuning import k_from_fraction

    seeds = cfg.train_seeds
    pieces = [Piece("full", 0, s) for s in seeds]
    ks = [k_from_fraction(float(f), n_units_total) for f in cfg.k_fractions]
    sweep = [k for k in (k_from_fraction(float(f), n_units_total) for f in cfg.k_sweep)
             if k not in ks]
    for k in dict.fromkeys(ks + sweep):
        methods = ["cast"] + (list(cfg.baselines) if k in ks else [])
        pieces += [Piece(m, k, s) for m in methods for s in seeds]
        pieces += [Piece("random", k, seeds[d % len(seeds)], d) for d in range(cfg.n_draws)]
    return pieces


# --------------------------------------------------------------------------------------------------
# Cost estimate (sizes the presets)
# --------------------------------------------------------------------------------------------------

# Seconds on SmolLM2-135M-Instruct with 2 free CPU cores, per unit of work. Each number and the
# measurement it comes from: benchmarks/README.md, "Where the cost model's numbers come from".
COST_S = {
    "train_step": 5.34,          # one optimizer step, batch 8
    "refusal_score": 0.16,       # per prompt, harmful or over-refusal
    "kl_nll": 0.144,             # per benign prompt, KL and NLL
    "task_item": 0.063,          # per multiple-choice item, 4 choices
    "generate_32": 0.30,         # per prompt, 32 greedy tokens
    "val_pair": 0.58,            # per harmful + benign validation pair and curve point
    "diagnosis": 508.0,          # v2 library defaults (S on 16 examples); S on 8 costs less
    "attribution_eval": 6.7,     # stage 4: per exact revert (utility and safety examples)
    "attribution_first_order": 25.0,  # stage 4: the first-order pass, per arm
    "attribution_reference": 77.0,    # stage 4: the original's own answers, once per run directory
}
# Stage 4's cost scales with the examples and their length (prompt ~40 tokens + the answer cap).
ATTRIBUTION_COST_AT = {"examples": 16, "max_new_tokens": 128, "prompt_tokens": 40}
BUNDLED_TEST_SIZES = {"harmful": 50, "benign": 50, "over_refusal": 60, "task": 95}


def _n(limit: Optional[int], size: int) -> int:
    return size if limit is None else min(limit, size)


def _units_total(cfg: RunConfig, n_units: Optional[int], where: str) -> int:
    """Units of `cfg.unit` in `cfg.model` (all layers): `n_units` if given, else from the model
    registry's shape of its family (`registry.models.n_units_of`; SmolLM2: 270 heads, 90 groups)."""
    if n_units is not None:
        check_int("n_units", n_units, 1)
        return n_units
    from .registry.models import n_units_of, resolve

    n = n_units_of(cfg.model, cfg.unit)
    if n is None:
        raise ValueError(f"{where}: model family {resolve(cfg.model).name!r} of {cfg.model!r} "
                         f"registers no shape for unit={cfg.unit!r} (n_layers, n_heads, n_kv_heads): "
                         "pass n_units=, the number of units of that kind in the model.")
    return n


def attribution_seconds(cfg: RunConfig, *, cost: Optional[dict] = None,
                        n_units: Optional[int] = None) -> dict:
    """Estimated stage-4 time (SmolLM2, 2 free CPU cores), whether or not `cfg.attribute` is on
    (`cast-interp attribute` on the run costs the same): {"total", "per_arm", "n_evaluations",
    "reference"}. Exact reverts are counted without the overlap of candidates and spread sample,
    so this is an upper bound on their number (132 of at most 139 in the committed run).
    `n_units`: units of `cfg.unit` in the model (default: from the model registry)."""
    from .sparse_tuning import k_from_fraction

    n_units = _units_total(cfg, n_units, "attribution_seconds")
    c, at = {**COST_S, **(cost or {})}, ATTRIBUTION_COST_AT
    scale = (cfg.attribution_examples / at["examples"]
             * (at["prompt_tokens"] + cfg.attribution_max_new_tokens)
             / (at["prompt_tokens"] + at["max_new_tokens"]))
    k = k_from_fraction(float(cfg.k_fractions[0]), n_units)
    n_joint = 5  # selected on A, top-k by C, every unit, all heads, all groups (attribution._joint_sets)
    # A spread sample per kind: heads and (SmolLM2 has GQA) key/value groups.
    n_evals = ((cfg.attribution_candidates or 2 * k) + 2 * cfg.attribution_spread + n_joint
               + cfg.attribution_draws)
    per_arm = (n_evals * c["attribution_eval"] + c["attribution_first_order"]) * scale
    reference = c["attribution_reference"] * scale
    return {"total": reference + per_arm * len(cfg.attribution_arms), "per_arm": per_arm,
            "n_evaluations": n_evals, "reference": reference}


def estimate_seconds(cfg: RunConfig, *, cost: Optional[dict] = None,
                     n_units: Optional[int] = None) -> dict:
    """Estimated wall time of a run on the bundled data (SmolLM2, 2 free CPU cores), by stage.

    A linear model: pieces x (steps x a step + curve points x validation examples + evaluation
    of the test prompts), plus diagnosis, self-reference answers and the original's evaluation,
    with the per-unit seconds of `COST_S` (pass `cost` to use other measurements), and stage 4
    when `cfg.attribute` (`attribution_seconds`, returned either way). `n_units`: units of
    `cfg.unit` in the model, which size k (default: from the model registry's shape of
    `cfg.model`'s family). Returns {"total", "diagnosis", "self_reference", "attribution",
    "per_piece", "n_pieces", "pieces", "original"}.
    """
    from .registry.metrics import METRIC_REGISTRY

    n_units = _units_total(cfg, n_units, "estimate_seconds")
    c = {**COST_S, **(cost or {})}
    n = {s: _n(cfg.n_eval, BUNDLED_TEST_SIZES[s]) for s in ("harmful", "benign", "over_refusal")}
    n["task"] = _n(cfg.n_task, 95)
    # Each metric's cost per example of its set (the metrics registry); generation scales with
    # the answer length.
    specs = METRIC_REGISTRY.values()
    free = sum(n[m.on] * m.cost_s(c) for m in specs if not m.generation)
    gen = sum(n[m.on] * m.cost_s(c) for m in specs if m.generation) * cfg.eval_max_new_tokens / 32
    n_points = (cfg.steps // cfg.eval_every + (cfg.steps % cfg.eval_every > 0)
                if cfg.eval_every else 1)
    curve = n_points * cfg.n_val * c["val_pair"]
    train = cfg.steps * c["train_step"] * cfg.batch_size / 8
    pieces = plan_pieces(cfg, n_units)
    piece_s = [train + curve + free + (gen if _generates(cfg, p.train_seed) else 0.0)
               for p in pieces]
    n_mix = math.ceil(cfg.steps * cfg.batch_size * cfg.benign_mix) if cfg.benign_mix else 0
    self_ref = (cfg.n_val + n_mix) * c["generate_32"] * cfg.self_reference_tokens / 32
    original = free + (gen if _generates(cfg, None) else 0.0) + curve / n_points
    attribution = attribution_seconds(cfg, cost=c, n_units=n_units)
    total = (c["diagnosis"] + self_ref + original + sum(piece_s)
             + (attribution["total"] if cfg.attribute else 0.0))
    return {"total": total, "diagnosis": c["diagnosis"], "self_reference": self_ref,
            "attribution": attribution,
            "original": original, "n_pieces": len(pieces), "pieces": sum(piece_s),
            "per_piece": {"train": train, "curve": curve, "eval_generation_free": free,
                          "eval_generation": gen}}


_T0 = time.time()


def _log(msg: str) -> None:
    w = distributed.world()
    who = f" r{w.rank}/{w.world_size}" if w.world_size > 1 else ""
    print(f"[cast{who} {time.time() - _T0:7.1f}s] {msg}", flush=True)


def _splits(spec, split_seed: int) -> dict:
    """{"calibration", "train", "test"} of a data setting: "bundled:KIND" as shipped, three specs as
    given (the test one checked for overlap), any other single spec split by `split_seed`."""
    from .data import SPLITS, check_held_out, load_dataset, split_dataset

    if isinstance(spec, (list, tuple)):
        parts = dict(zip(SPLITS, (load_dataset(s) for s in spec)))
    elif spec in ("bundled:harmful", "bundled:benign"):
        parts = {s: load_dataset(f"{spec}:{s}") for s in SPLITS}
    else:
        parts = split_dataset(load_dataset(spec), seed=split_seed)
    check_held_out(parts)
    return parts


def _datasets(cfg: RunConfig) -> dict:
    """The splits: calibration (stage 1), train minus validation (stage 2), validation (curves),
    test (stage 3). Validation = the last `n_val` examples of each train split (ours)."""
    from .data import DataError, load_dataset

    out = {}
    for kind, spec in (("safe", cfg.safety_data), ("util", cfg.utility_data)):
        parts = _splits(spec, cfg.split_seed)
        train = parts["train"]
        if len(train) < cfg.n_val + 2:
            raise DataError(f"The train split of {spec!r} has {len(train)} examples: too few to "
                            f"hold out n_val={cfg.n_val} for validation and train on the rest.")
        out[f"{kind}_cal"] = parts["calibration"]
        out[f"{kind}_train"] = train.take(len(train) - cfg.n_val)
        out[f"{kind}_val"] = type(train)(f"{train.name}:val", train.examples[-cfg.n_val:],
                                         train.source)
        out[f"{kind}_test"] = parts["test"].take(cfg.n_eval)
    out["harmful_test"], out["benign_test"] = out.pop("safe_test"), out.pop("util_test")
    out["over_refusal"] = load_dataset(cfg.over_refusal_data).take(cfg.n_eval)
    return out


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


@dataclass
class _Context:
    """What every piece needs: the model, its frozen original, data, map and settings."""

    cfg: RunConfig
    model: Any
    original: Any
    original_state: dict
    data: dict
    cmap: Any
    monitor: Any
    curve_start: dict
    out: Path
    original_logprobs: Any = None  # the original's log-probs on the benign test set, built once


# Settings that only add pieces (seeds, draws, budgets, baselines) or recompute the report and
# stage 4: a run directory takes new values of these. Any other change makes another run.
ADDITIVE_FIELDS = ("out_dir", "device", "n_devices", "preset", "train_seeds", "n_draws", "k_sweep",
                   "baselines", "attribute", "attribution_arms", "ci", "n_boot", *ATTR_FIELDS)


class RunMismatchError(ValueError):
    """The run directory holds pieces of another run (other settings, data or model); `.reason`
    says what differs (the message adds the fix)."""

    def __init__(self, reason: str):
        super().__init__(f"{reason}. Pass --overwrite (overwrite=True) to delete that run's files "
                         "and start over, or use another --out.")
        self.reason = reason


def run_manifest(cfg: RunConfig, model, data: dict) -> dict:
    """What produced a run's pieces: the settings they depend on, a fingerprint of each data split
    (before self-reference answers) and the model's identity with a weight fingerprint."""
    from .data import SPLIT_FRACTIONS
    from .model import model_id, weight_fingerprint

    d = cfg.to_dict()
    return {"version": PIPELINE_VERSION,
            "settings": {k: v for k, v in d.items() if k not in ADDITIVE_FIELDS},
            "data": {k: v.fingerprint() for k, v in data.items()},
            "split": {"seed": cfg.split_seed, "fractions": list(SPLIT_FRACTIONS)},
            "model": {**model_id(model), "weights": weight_fingerprint(model)}}


def _recorded_manifest(out: Path) -> Optional[dict]:
    """The manifest of the run in `out` (its run.json, checked against the run directory's
    manifest.json), or None for a directory without a run."""
    from .io import RunDirectory

    if not (out / "run.json").exists():
        return None
    RunDirectory(out).verify(out / "run.json")
    doc = read_json(out / "run.json", expect=dict)
    json_field(doc, "settings", dict, out / "run.json")
    return doc
def _manifest_difference(old: dict, new: dict) -> list[str]:
    new = to_jsonable(new)
    diff = [f"{k} ({old['settings'].get(k)!r} -> {v!r})" for k, v in new["settings"].items()
            if k in old.get("settings", {}) and old["settings"][k] != v]
    diff += [f"{part} fingerprint" for part in ("data", "model")
             if part in old and old[part] != new[part]]
    return diff


def claim_run_dir(out: Path, manifest: dict, *, overwrite: bool = False) -> None:
    """Make `out` this run's directory, before anything is written. Refused (before any change):
    a file or unwritable path, a non-empty folder that is not a run directory, a symbolic link
    inside, another run in progress (`RunLock`), or a run of other settings, data or model
    (`RunMismatchError`) unless `overwrite`, which deletes only the files that run wrote (its
    manifest.json lists them) first. Leftover `.partial` files of our killed writes are removed.
    Takes the folder's lock (released by `run_experiment`)."""
    from .io import RunDirectory, RunLock, check_out_dir, check_run_dir, remove_own_partials

    check_out_dir(out)
    check_run_dir(out, "run")
    lock = RunLock(out)
    lock.acquire()
    _LOCKS.append(lock)
    try:
        old = _recorded_manifest(out)
    except ValueError as exc:  # unreadable, edited or from another version
        if not overwrite:
            raise RunMismatchError(f"{out} holds a run this version cannot use ({exc})"
                                   ) from None
        old = None
    if overwrite:
        RunDirectory(out).remove_written()
    elif old is not None:
        diff = _manifest_difference(old, manifest)
        if diff:
            raise RunMismatchError(
                f"{out} holds a run made with other settings, data or model ({'; '.join(diff)}): "
                "its pieces cannot be mixed with this run's")
    remove_own_partials(out)
    RunDirectory(out).start()


_LOCKS: list = []  # the run locks this process holds (released when its run ends)


def _release_locks() -> None:
    while _LOCKS:
        _LOCKS.pop().release()


def _prepare(cfg: RunConfig, overwrite: bool):
    """Everything that can fail on bad input, before any work or write: data, model, lengths, the
    run directory; then config.json and run.json are written (by rank 0 alone, the others wait).
    Returns (model, data)."""
    from .io import check_out_dir
    from .model import load_model

    # Under torchrun: join the group; this rank's device (cuda:LOCAL_RANK on GPUs).
    device = distributed.setup(cfg.device)
    if cfg.n_devices > 1 and distributed.world().local_world_size > 1:
        # TransformerLens puts a split model's blocks on the GPUs with the most free memory,
        # which ranks of one node would then share.
        raise distributed.DistributedError(
            f"n_devices={cfg.n_devices} splits each rank's model over several GPUs: launch one "
            "rank per node (torchrun --nproc-per-node 1, or srun --ntasks-per-node 1).")
    # A file, read-only path or a folder of the user's: before loading anything (rank 0 alone
    # probes it: no race).
    from .io import check_run_dir

    distributed.main_only(lambda: (check_out_dir(cfg.out_dir), check_run_dir(cfg.out_dir, "run")))
    data = _datasets(cfg)
    torch.manual_seed(cfg.seed)  # before loading, as runs always did (a model's init draws)
    model = load_model(cfg.model, device=device, n_devices=cfg.n_devices)
    _check_lengths(cfg, model, data)
    _check_budgets(cfg, model)
    manifest = run_manifest(cfg, model, data)
    out = Path(cfg.out_dir)

    def claim() -> None:
        claim_run_dir(out, manifest, overwrite=overwrite)
        atomic_write_json(cfg.to_dict(), out / "config.json")
        atomic_write_json(manifest, out / "run.json")

    distributed.main_only(claim)
    return model, data


def _check_lengths(cfg: RunConfig, model, data: dict) -> None:
    """Every example fits the model's context as the stages will use it (a DataError naming the
    first that does not, before the diagnosis rather than after it)."""
    from .data import check_fits, check_special_tokens

    answers = {"safe_cal": True, "safe_train": True, "safe_val": True,
               "util_cal": cfg.utility_reference == "dataset",
               "util_train": cfg.benign_reference == "dataset", "util_val": False,
               "benign_test": True, "harmful_test": False, "over_refusal": False}
    for name, with_response in answers.items():
        check_special_tokens(model.tokenizer, data[name], allow=cfg.allow_special_tokens)
        check_fits(model, data[name], with_response=with_response,
                   new_tokens=0 if with_response else 1)  # room for at least one answer token
    if cfg.generation_seeds != 0:  # some evaluation generates refusals
        for name in ("harmful_test", "over_refusal"):
            check_fits(model, data[name], with_response=False, new_tokens=cfg.eval_max_new_tokens)


def _check_budgets(cfg: RunConfig, model) -> None:
    """Settings that depend on the model's size, before any work: stage 4 chooses its top-k among
    `attribution_candidates` exact reverts, so they must be at least k (of this model's units)."""
    from .registry.arms import get_arm
    from .sparse_tuning import k_from_fraction
    from .units import n_units

    n_total, per_layer = _n_units_total(model, cfg.unit), n_units(model, cfg.unit)
    for name in ("k_fractions", "k_sweep"):
        for f in getattr(cfg, name):
            k = k_from_fraction(float(f), n_total)
            # An arm may skip more than k (the layer band rounds up to whole layers).
            widest = max(((get_arm(b).max_units(k, per_layer), b) for b in cfg.baselines),
                         default=(k, None))
            band = max(k, widest[0])
            if band >= n_total:
                what = ("k" if k >= n_total else "the layer band (k rounded up to whole layers)"
                        if widest[1] == "layer_band" else f"the {widest[1]} arm's budget")
                raise ValueError(
                    f"{name} {f} gives {what} = {band} of the {n_total} {cfg.unit}s of "
                    f"{cfg.model}: skipping every unit leaves nothing to train. Use a smaller "
                    "fraction.")
    k = _k0(cfg, model)
    if cfg.attribute and cfg.attribution_candidates is not None and cfg.attribution_candidates < k:
        raise ValueError(
            f"attribution_candidates = {cfg.attribution_candidates} < k = {k} ({cfg.k_fractions[0]}"
            f" of {_n_units_total(model, cfg.unit)} {cfg.unit}s of {cfg.model}): stage 4 chooses "
            "the top-k among the candidates. Set attribution_candidates >= k (None: 2k), or "
            "attribute=False (--no-attribute).")


def run_experiment(cfg: RunConfig, *, progress: bool = True, overwrite: bool = False) -> dict:
    """Run (or resume) the whole experiment; returns the content of `results.json`.

    A directory holding a run with other settings (beyond more seeds, draws, budgets, baselines
    or stage-4 options), data or model is refused (`RunMismatchError`) unless `overwrite`, which
    deletes that run's files first.

    Under `torchrun` (or srun) every rank calls this with the same `cfg`: the pieces, the exact S
    sweep and attribution's exact reverts are shared out over the ranks (`distributed.py`), rank 0
    writes the shared files and returns the same document on every rank."""
    from .io import RunDirectory

    out = Path(cfg.out_dir)
    try:
        with RunDirectory(out, "run"):  # records what it writes, checks what it re-uses
            return _run(cfg, out, progress, overwrite)
    finally:
        _release_locks()


def _run(cfg: RunConfig, out: Path, progress: bool, overwrite: bool) -> dict:
    t_start = time.time()
    model, data = _prepare(cfg, overwrite)
    progress = progress and distributed.is_main()  # one set of progress bars; every rank logs
    timings: dict[str, float] = {}
    t = time.time()
    _self_references(cfg, model, data, out)
    timings["self_reference_s"] = time.time() - t
    t = time.time()
    cmap = _diagnosis(cfg, model, data, out, progress)
    timings["diagnosis_s"] = time.time() - t
    ctx = _context(cfg, model, data, cmap, out)

    pieces = plan_pieces(cfg, _n_units_total(model, cfg.unit))
    _run_grid(ctx, pieces, progress)
    model.load_state_dict(ctx.original_state)

    attribution = None
    if cfg.attribute:
        attribution = _attribution(ctx, progress)
    w = distributed.world()
    return distributed.main_only(lambda: _write_results(
        ctx, pieces, attribution, timings, t_start,
        {"world_size": w.world_size, "backend": w.backend}))


def _run_grid(ctx: _Context, pieces: list[Piece], progress: bool) -> None:
    """Stages 2-3 of every piece not finished on disk (and the original's evaluation), shared
    out over the ranks: rank 0 lists what is missing, in plan order; rank r runs items r, r + W,
    ... of that list (`distributed.map_shared`); a piece is seeded by its own training seed and
    draw, so which rank runs it changes nothing. Returns when every item is on disk."""
    def missing() -> list:
        todo = [] if _finished_original(ctx) else [None]  # None: the original model
        todo += [(i, p) for i, p in enumerate(pieces) if _finished_piece(ctx, p) is None]
        return todo

    todo = distributed.main_only(missing)
    w = distributed.world()
    _log(f"grid: {len(todo)} of {len(pieces) + 1} pieces to run (the rest done before)"
         + (f", shared over {w.world_size} ranks" if w.world_size > 1 else ""))

    def run(item) -> None:
        if item is None:
            _original_eval(ctx)
        else:
            i, piece = item
            _run_piece(ctx, piece, f"{i + 1}/{len(pieces)}", progress)

    distributed.map_shared(run, todo)


def _write_results(ctx: _Context, pieces: list[Piece], attribution: Optional[dict],
                   timings: dict, t_start: float, world: dict) -> dict:
    """results.json, the figures and report.md from the finished pieces on disk (rank 0)."""
    from . import report
    from .model import model_id

    cfg, model, data, cmap, out = ctx.cfg, ctx.model, ctx.data, ctx.cmap, ctx.out
    base = _original_eval(ctx)
    results: dict[str, dict] = {}
    for piece in pieces:
        done = _finished_piece(ctx, piece)
        if done is None:
            raise RuntimeError(f"piece {piece.name} is not on disk after the grid ran: was "
                               f"{out / 'arms'} changed by another job? Run again to redo it.")
        results[piece.name] = done
    doc = {
        "config": cfg.to_dict(),
        "model": model_id(model),
        "data": {k: v.describe() for k, v in data.items()},
        "data_split": read_json(out / "run.json")["split"],
        "diagnosis": {"concentration": cmap.concentration(unit=cfg.unit),
                      "top_units": cmap.top_units(_k0(cfg, model), unit=cfg.unit),
                      "top_heads": cmap.top_heads(_k0(cfg, model)) if cfg.unit == "head" else None,
                      "summary": cmap.summary.get(cfg.unit), "config": cmap.config},
        "original": base["eval"],
        "original_per_prompt": base["per_prompt"],
        "arms": results,
        "attribution": attribution,
        "timings": timings,
        "distributed": world,
        "time_s": time.time() - t_start,
    }
    if cfg.model == "smollm2-135m-instruct":  # the per-unit costs are SmolLM2's
        doc["estimate_s"] = estimate_seconds(cfg)
    doc["summary"] = report.summarize(base, results)
    doc["comparisons"] = report.compare_arms(doc)
    doc["time_s"] = time.time() - t_start
    doc["invocations"] = _invocations(out, doc, cfg)
    atomic_write_json(doc, out / "results.json")
    report.run_figures(out)
    atomic_write_text(report.report_markdown(doc), out / "report.md")
    _log(f"done in {doc['time_s']:.0f} s: {out / 'report.md'}")
    return to_jsonable(doc)


def _n_units_total(model, unit: str) -> int:
    from .units import n_units

    return model.cfg.n_layers * n_units(model, unit)


def _k0(cfg: RunConfig, model) -> int:
    from .sparse_tuning import k_from_fraction

    return k_from_fraction(float(cfg.k_fractions[0]), _n_units_total(model, cfg.unit))


def _self_references(cfg: RunConfig, model, data: dict, out: Path) -> None:
    """The original model's own answers: for the benign validation set (always) and for the benign
    training mix (`benign_reference="self"`, ours: the mix keeps what the model already does rather
    than teaching the style of the dataset's answers). Cached in `out_dir`."""
    from .data import self_reference

    if cfg.benign_reference not in ("self", "dataset"):
        raise ValueError(f"benign_reference must be 'self' or 'dataset', got {cfg.benign_reference!r}.")
    n = cfg.self_reference_tokens
    _log(f"self-reference answers for {len(data['util_val'])} benign validation prompts")
    # Rank 0 writes the cached answers; every rank gets its answers (one list for all ranks).
    data["util_val"] = distributed.main_only(lambda: self_reference(
        model, data["util_val"], max_new_tokens=n, cache_path=out / "self_reference_val.jsonl"))
    if cfg.benign_mix > 0 and cfg.benign_reference == "self":
        n_mix = min(len(data["util_train"]), math.ceil(cfg.steps * cfg.batch_size * cfg.benign_mix))
        _log(f"benign mix: the model's own answers to {n_mix} training prompts")
        data["util_train"] = distributed.main_only(lambda: self_reference(
            model, data["util_train"].take(n_mix), max_new_tokens=n,
            cache_path=out / "self_reference_train.jsonl"))


def _invocations(out: Path, doc: dict, cfg: RunConfig) -> list[dict]:
    """The wall time of every invocation that worked on this directory, this one last: a resumed
    run or a later `attribute` re-uses finished stages, so its own `time_s` is not the run's cost.
    Stage times of re-used stages stay those of the invocation that computed them."""
    old: list[dict] = []
    if (out / "results.json").exists():
        try:
            if _changed(out / "results.json"):
                raise ValueError("changed")
            prev = read_json(out / "results.json", expect=dict)
            old = prev.get("invocations") or [{"time_s": prev["time_s"],
                                               "timings": prev.get("timings", {})}]
            for i, inv in enumerate(old):
                json_field(inv, "time_s", (int, float), out / "results.json",
                           where=f"invocations[{i}].")
            for name, v in (old[0].get("timings") or {}).items():
                json_field(old[0]["timings"], name, (int, float), out / "results.json",
                           where="invocations[0].timings.")
                doc["timings"][name] = max(v, doc["timings"].get(name, 0.0))
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            # Unreadable or edited: count this invocation alone, and say so.
            _log(f"earlier invocations not counted in the time ({exc})")
            old = []
    return old + [{"time_s": doc["time_s"], "timings": dict(doc["timings"]),
                   "world_size": doc["distributed"]["world_size"],
                   "attribute": bool(cfg.attribute), "attribution_arms": list(cfg.attribution_arms)}]


def _diag_key(cfg: RunConfig) -> str:
    """The key of a run's map (a float32 map keeps the key it had before `diag_dtype` existed)."""
    return cfg.key(*DIAG_FIELDS, extra=None if cfg.diag_dtype == "float32" else cfg.diag_dtype)


def _diagnosis(cfg: RunConfig, model, data: dict, out: Path, progress: bool):
    """Stage 1, re-used from disk when its settings are unchanged."""
    from .conflict_map import ConflictMap
    from .diagnose import diagnose

    diag_dir, diag_key = out / "diagnosis", _diag_key(cfg)

    def on_disk() -> bool:
        if not (diag_dir / "conflict_map.json").exists():
            return False
        if any(_changed(diag_dir / n) for n in ("conflict_map.json", "conflict_map.safetensors")):
            return False
        try:
            return ConflictMap.load(diag_dir).config.get("run_key") == diag_key
        except Exception:  # unreadable or of another version: recompute
            return False

    if distributed.main_only(on_disk):
        _log("stage 1: diagnosis re-used from disk")
        return ConflictMap.load(diag_dir)
    _log("stage 1: diagnosis")
    # Every rank takes part (the exact S sweep is shared out); rank 0 saves its map, and the
    # other ranks select units from that saved map, so all ranks select alike.
    cmap = diagnose(model, data["safe_cal"], data["util_cal"], cfg.diagnosis_config(),
                    progress=progress)
    cmap.config["run_key"] = diag_key
    distributed.main_only(lambda: cmap.save(diag_dir))
    return cmap if distributed.is_main() else ConflictMap.load(diag_dir)


def _context(cfg: RunConfig, model, data: dict, cmap, out: Path) -> _Context:
    from .sparse_tuning import ValidationMonitor

    original = backend.copy_model(model)
    original.requires_grad_(False)
    monitor = ValidationMonitor(original, data["safe_val"], data["util_val"], batch_size=8)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    # Step 0 of every curve is the original model: measured once, not once per piece.
    return _Context(cfg, model, original, state, data, cmap, monitor, monitor(original), out)


def _generates(cfg: RunConfig, train_seed: Optional[int]) -> bool:
    """Whether a piece on `train_seed` (None: the original model) measures generated refusals."""
    g = cfg.generation_seeds
    if g is None:
        return True
    return g > 0 if train_seed is None else train_seed in cfg.train_seeds[:g]


def _evaluate(ctx: _Context, *, generation: bool) -> tuple[dict, dict]:
    """Stage 3 of the current weights on the test sets: (EvalResult dict, per-prompt values
    {metric: [n]}), the per-prompt values from `EvalResult.per_prompt` (NaN where undefined)."""
    from .evaluate import EvalConfig, OriginalLogprobs, as_dataset, evaluate

    cfg, data = ctx.cfg, ctx.data
    ecfg = EvalConfig(n_harmful=cfg.n_eval, n_benign=cfg.n_eval, n_over_refusal=cfg.n_eval,
                      n_task=cfg.n_task, max_new_tokens=cfg.eval_max_new_tokens, seed=cfg.seed,
                      generation=generation)
    if ctx.original_logprobs is None:  # every piece's KL reuses the frozen original's log-probs
        benign = as_dataset(data["benign_test"], "benign").take(ecfg.n_benign)
        ctx.original_logprobs = OriginalLogprobs(ctx.original, benign, tokens=ecfg.tokens,
                                                 batch_size=ecfg.batch_size)
    res = evaluate(ctx.model, original=ctx.original_logprobs, config=ecfg,
                   harmful=data["harmful_test"], benign=ctx.original_logprobs.data,
                   over_refusal=data["over_refusal"])
    per_prompt = {k: [math.nan if x is None else float(x) for x in v]
                  for k, v in res.per_prompt.items()}
    missing = [m for m in ("refusal_score", "kl_to_original") if m not in per_prompt]
    if missing:
        raise RuntimeError(f"evaluate() returned no per-prompt {missing}: the report's primary "
                           "endpoints need them (an original model must be given for KL).")
    return res.to_dict(), per_prompt


def _original_path_key(ctx: _Context) -> tuple[Path, str]:
    gen = _generates(ctx.cfg, None)
    return ctx.out / "arms" / "original.json", ctx.cfg.key(*EVAL_FIELDS, extra=gen)


def _finished_original(ctx: _Context) -> Optional[dict]:
    return _load_piece(*_original_path_key(ctx))


def _original_eval(ctx: _Context) -> dict:
    gen = _generates(ctx.cfg, None)
    path, key = _original_path_key(ctx)
    base = _load_piece(path, key)
    if base is None:
        _log("stage 3: evaluating the original model")
        ctx.model.load_state_dict(ctx.original_state)  # the rank may have tuned a piece before
        ev, per_prompt = _evaluate(ctx, generation=gen)
        base = {"key": key, "eval": ev, "per_prompt": per_prompt}
        atomic_write_json(base, path)
    return base


def _finished_piece(ctx: _Context, piece: Piece) -> Optional[dict]:
    """A piece's result on disk if it can be re-used (same key, same skipped units, its kept
    weights present and of the same key), else None."""
    path, key = ctx.out / "arms" / f"{piece.name}.json", _piece_key(ctx, piece)
    done = _load_piece(path, key)
    if done is not None and [tuple(u) for u in done["skip"]] == _skipped(ctx, piece) and (
            not _keeps_state(ctx, piece) or _state_key(_state_path(ctx, piece)) == key):
        return done
    return None


def _skipped(ctx: _Context, piece: Piece) -> list:
    from .sparse_tuning import select_arm_units

    seed = piece.draw if piece.draw is not None else 0
    return select_arm_units(piece.method, ctx.cmap, piece.k, unit=ctx.cfg.unit, seed=seed,
                            model=ctx.original)  # ctx.model may hold the last piece's weights


def _piece_key(ctx: _Context, piece: Piece) -> str:
    return ctx.cfg.key(*TUNE_FIELDS, *EVAL_FIELDS, extra={
        **asdict(piece), "generation": _generates(ctx.cfg, piece.train_seed)})


def _keeps_state(ctx: _Context, piece: Piece) -> bool:
    """Whether a piece's tuned weights are kept: exactly the pieces stage 4 attributes
    (`_attributed_piece`; attention weights only, ~0.1 GB each)."""
    return piece.method in ATTRIBUTABLE and piece == _attributed_piece(ctx, piece.method)


def _state_path(ctx: _Context, piece: Piece) -> Path:
    name = "full_state" if piece.method == "full" else f"{piece.name}_state"
    return ctx.out / "arms" / f"{name}.safetensors"


def _run_piece(ctx: _Context, piece: Piece, where: str, progress: bool) -> dict:
    """Train and evaluate one piece, or re-use it from disk (same key and same skipped units)."""
    from .sparse_tuning import safety_finetune

    cfg, path = ctx.cfg, ctx.out / "arms" / f"{piece.name}.json"
    key, skip = _piece_key(ctx, piece), _skipped(ctx, piece)
    keeps_state = _keeps_state(ctx, piece)
    done = _finished_piece(ctx, piece)
    if done is not None:
        _log(f"piece {where} {piece.name}: done before, re-used")
        return done
    if path.exists():
        _log(f"piece {where} {piece.name}: on disk from other settings: redone")
    _log(f"piece {where} {piece.name}: tuning")
    ctx.model.load_state_dict(ctx.original_state)
    tcfg = cfg.tuning_config(piece.train_seed)
    skip_kw = {"skip_groups": skip} if cfg.unit == "group" else {"skip_heads": skip}
    tres = safety_finetune(ctx.model, ctx.data["safe_train"], config=tcfg,
                           benign_data=ctx.data["util_train"] if cfg.benign_mix > 0 else None,
                           monitor=ctx.monitor, eval_every=cfg.eval_every,
                           curve_start=ctx.curve_start, progress=progress, **skip_kw)
    t = time.perf_counter()
    ev, per_prompt = _evaluate(ctx, generation=_generates(cfg, piece.train_seed))
    eval_s = time.perf_counter() - t
    check_not_degenerate(tres, per_prompt, ctx.model.cfg.d_vocab, piece.name)
    result = {"key": key, "piece": asdict(piece), "arm": {"method": piece.method, "k": piece.k,
                                                         "seed": piece.train_seed},
              "unit": cfg.unit, "skip": skip, "tuning": tres.to_dict(), "eval": ev,
              "per_prompt": per_prompt, "eval_time_s": eval_s}
    if keeps_state:
        from .io import atomic_save_safetensors

        state = {k: v.detach().cpu() for k, v in ctx.model.state_dict().items()
                 if ".attn." in k or cfg.scope == "all"}
        atomic_save_safetensors(state, _state_path(ctx, piece), {"key": key})
    atomic_write_json(result, path)  # written last: its presence means the piece is finished
    return read_json(path)  # as JSON (tuples -> lists), the same whether fresh or re-used


class DegenerateTrainingError(ValueError):
    """Training collapsed the model to a uniform next-token distribution: its comparisons would be
    "+0 [+0, +0]" between arms that all say nothing."""


def check_not_degenerate(tuning, per_prompt: dict, d_vocab: int, name: str = "the model",
                         *, tol: float = 1e-3) -> None:
    """`DegenerateTrainingError` when a tuned model's output is uniform: every benign test
    answer's NLL is ln(d_vocab) (a uniform distribution's), or training ended on a zero gradient
    at a loss of ln(d_vocab). `tuning`: its `TuningResult`; `per_prompt`: its evaluation's."""
    uniform = math.log(d_vocab)
    nll = [x for x in per_prompt.get("reference_nll", []) if x is not None and math.isfinite(x)]
    flat_eval = bool(nll) and all(abs(x - uniform) < tol for x in nll)
    losses, norms = list(tuning.losses), list(tuning.grad_norms)
    flat_train = bool(losses and norms) and norms[-1] == 0.0 and abs(losses[-1] - uniform) < tol
    if flat_eval or flat_train:
        where = (f"its benign answers' NLL is {uniform:.4f} = ln({d_vocab}) on every prompt"
                 if flat_eval else f"its last step had loss {losses[-1]:.4f} = ln({d_vocab}) and "
                 "gradient norm 0")
        raise DegenerateTrainingError(
            f"Training {name} collapsed the model to uniform output ({where}; lr "
            f"{tuning.config.get('lr') if isinstance(getattr(tuning, 'config', None), dict) else '?'}"
            "): its comparisons would mean nothing. Lower the learning rate.")


def _load_piece(path: Path, key: str) -> Optional[dict]:
    """A finished piece (or stage-4 summary) on disk with this key, else None. A file that is not
    what the run wrote (manifest.json) is recomputed, and the log says why; one that is but does
    not hold a valid piece is an error naming the file and field."""
    if not path.exists():
        return None
    if _changed(path):
        return None
    try:
        piece = read_json(path, expect=dict)
    except FileNotFoundError:
        return None
    if piece.get("key") != key:
        return None
    check_piece(piece, path)
    return piece


def _changed(path: Path) -> bool:
    """Whether a file about to be re-used differs from what the run wrote (logged: recomputed)."""
    from .io import changed_since_written

    why = changed_since_written(path)
    if why is not None:
        _log(f"{why}: recomputed")
    return why is not None


def check_piece(piece: dict, path: Path) -> None:
    """ValueError naming `path` and the field, unless `piece` (an arm's or the original's result)
    has an `eval` object and per-prompt values that are lists of finite numbers or null (NaN is
    written as null: undefined, never a number)."""
    if "summary" in piece or "per_prompt" not in piece and "eval" not in piece:
        return  # a stage-4 summary: checked by its reader
    json_field(piece, "eval", dict, path)
    per_prompt = json_field(piece, "per_prompt", dict, path)
    for metric, values in per_prompt.items():
        json_field(per_prompt, metric, list, path, where="per_prompt.")
        for i, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not math.isfinite(v)):
                raise ValueError(f"{path}: field 'per_prompt.{metric}[{i}]' must be a finite "
                                 f"number or null, got {v!r:.40}; delete the file and re-run to "
                                 "recompute it.")
    if "piece" in piece:
        json_field(piece, "tuning", dict, path)
        json_field(piece, "skip", list, path)


def _state_key(path: Path) -> Optional[str]:
    """The key stored in a safetensors file's metadata (None if absent or unreadable)."""
    if not path.exists() or _changed(path):
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("key")
        return None if raw is None else json.loads(raw)  # io stores metadata values as JSON
    except Exception:  # truncated or not a safetensors file: treat as missing
        return None


def _attributed_piece(ctx: _Context, arm: str) -> Piece:
    """The piece stage 4 attributes for `arm`: its first training seed (random: draw 0) at the
    first budget."""
    cfg = ctx.cfg
    k = 0 if arm == "full" else _k0(cfg, ctx.model)
    return Piece(arm, k, cfg.train_seeds[0], 0 if arm == "random" else None)


def _attribution(ctx: _Context, progress: bool) -> dict:
    """Stage 4 (`attribution.attribute`, METHOD.md v2) on the first-seed piece of each of
    `cfg.attribution_arms`: units as in the map, the diagnosis' utility objective (the original
    model's own answers, content tokens), first order for all units, exact reverts of the
    candidates and a spread sample, units chosen on half A and measured on half B, random revert
    sets. Returns {arm: summary}; each arm's files go to `attribution/<arm>/`."""
    return {arm: _attribute_arm(ctx, arm, progress) for arm in ctx.cfg.attribution_arms}


def _attribute_arm(ctx: _Context, arm: str, progress: bool) -> dict:
    from safetensors.torch import load_file

    from .attribution import attribute

    cfg, out, original = ctx.cfg, ctx.out, ctx.original
    piece = _attributed_piece(ctx, arm)
    state_path = _state_path(ctx, piece)
    if _state_key(state_path) != _piece_key(ctx, piece):
        raise RuntimeError(f"{state_path} is missing or from other settings; rerun "
                           "`cast-interp run` on this directory to retrain that piece.")
    key = cfg.key(*TUNE_FIELDS, *EVAL_FIELDS, *ATTR_FIELDS, *DIAG_FIELDS, extra=asdict(piece)
                  if cfg.diag_dtype == "float32" else {**asdict(piece), "dtype": cfg.diag_dtype})
    arm_dir = out / "attribution" / arm
    done = distributed.main_only(lambda: _load_piece(arm_dir / "attribution.json", key))
    if done is not None:
        return done
    tuned = backend.copy_model(original)
    tuned.load_state_dict(load_file(str(state_path)), strict=False)
    _log(f"stage 4: post-hoc attribution of {piece.name} ({cfg.attribution_examples} examples, "
         "halves A/B)")
    res = attribute(tuned, original, utility_data=ctx.data["benign_test"], conflict_map=ctx.cmap,
                    safety_data=ctx.data["harmful_test"], unit=cfg.unit,
                    k=_k0(cfg, ctx.model), n_examples=cfg.attribution_examples,
                    utility_reference=cfg.attribution_reference,
                    max_new_tokens=cfg.attribution_max_new_tokens,
                    reference_cache=out / "attribution" / "self_reference_test.jsonl",
                    n_candidates=cfg.attribution_candidates, n_spread=cfg.attribution_spread,
                    n_draws=cfg.attribution_draws, seed=cfg.seed, label=arm,
                    progress=progress)  # every rank: the exact reverts are shared out

    def save() -> dict:
        res.save(arm_dir)
        summary = {"key": key, "piece": piece.name, **res.summary()}
        atomic_write_json(summary, arm_dir / "attribution.json")
        return read_json(arm_dir / "attribution.json")

    return distributed.main_only(save)


def run_figures(out_dir, fig_dir=None) -> list[Path]:
    """Every figure of a finished run from its saved files alone (`report.run_figures`)."""
    from .report import run_figures as _run

    return _run(out_dir, fig_dir)


def summarize(base: dict, results: dict[str, dict]) -> list[dict]:
    """One row per arm: metric means and changes from the original (`report.summarize`)."""
    from .report import summarize as _summarize

    return _summarize(base, results)


def report_markdown(doc: dict) -> str:
    """The run's report (`report.report_markdown`)."""
    from .report import report_markdown as _md

    return _md(doc)
