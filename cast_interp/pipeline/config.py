"""The run's settings: `RunConfig` (every field a run depends on, with its checks), the presets,
and which fields each stage's results depend on (the keys that decide what a resumed run re-uses)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from ..checks import check_int, check_number, check_types
from ..units import UNIT_KINDS

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
        from ..registry.arms import baseline_names

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
        from ..diagnose import DiagnosisConfig

        return DiagnosisConfig(n_calibration=self.n_calibration, n_sensitivity=self.n_sensitivity,
                               batch_size=self.diag_batch_size, ablation=self.ablation,
                               sensitivity_method=self.sensitivity_method, combine=self.combine,
                               n_bootstrap=self.n_bootstrap, seed=self.seed,
                               utility_reference=self.utility_reference, dtype=self.diag_dtype)

    def tuning_config(self, train_seed: int):
        """Stage 2's `TuningConfig` of a piece on `train_seed`."""
        from ..sparse_tuning import TuningConfig

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
            from ..registry.arms import baseline_names

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
    from ..data import UTILITY_REFERENCES

    choices = {"unit": UNIT_KINDS, "benign_reference": UTILITY_REFERENCES,
               "attribution_reference": UTILITY_REFERENCES, "preset": tuple(sorted(PRESETS))}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(cfg, name)!r}.")
    from ..model import check_device

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


# Settings that only add pieces (seeds, draws, budgets, baselines) or recompute the report and
# stage 4: a run directory takes new values of these. Any other change makes another run.
ADDITIVE_FIELDS = ("out_dir", "device", "n_devices", "preset", "train_seeds", "n_draws", "k_sweep",
                   "baselines", "attribute", "attribution_arms", "ci", "n_boot", *ATTR_FIELDS)
