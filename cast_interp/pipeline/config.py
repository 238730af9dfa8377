"""The run's settings: `RunConfig` holds the stage configs (`DiagnosisConfig`, `TuningConfig`,
`EvalConfig`, `AttributionConfig`) beside the settings of the run itself (data, seeds, arms,
budgets, inference), with the presets and what each stage's results depend on (the keys that decide
what a resumed run re-uses).

Each setting has one default: a stage setting in its stage config, a run setting in `RunConfig`.
Where a run wants another value than a stage's standalone default, `PIPELINE_DEFAULTS` says so (the
base of every preset). The settings a run exposes by name (presets, CLI flags, config.json) are the
`RUN_NAMES`: each is a field of a stage config (`steps` is `tuning.steps`), read and set as
`cfg.steps`; every other stage field is set through the stage config itself,
`RunConfig(tuning=TuningConfig(weight_decay=0.0))`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Optional, Union

from ..attribution.config import AttributionConfig
from ..checks import check_int, check_number, check_types
from ..config_io import check_format, check_known
from ..diagnose import DiagnosisConfig
from ..evaluate import EvalConfig
from ..sparse_tuning.config import TuningConfig
from ..units import UNIT_KINDS

PIPELINE_VERSION = "pipeline-3"  # 3: keys hash the stage configs
# Format 1 (no "format" key): the flat config.json of the runs before the stage configs nested.
RUN_CONFIG_FORMAT = "run-config-2"
# The built-in baselines (the "bottom", "top_o", "top_s", "layer_band" controls). Every arm a run may
# add is read from the arms registry (`registry/arms.py`); `ALL_BASELINES` in a preset means every
# registered one at the time the config is built.
BASELINES = ("bottom", "top_o", "top_s", "layer_band")
ALL_BASELINES = "all"
ATTRIBUTABLE = ("full", "cast", "random")  # arms whose first-seed tuned weights are kept

# The stage configs a run holds, by field name.
STAGES: dict[str, type] = {"diagnosis": DiagnosisConfig, "tuning": TuningConfig,
                           "evaluation": EvalConfig, "attribution": AttributionConfig}

# Where a run departs from a stage's standalone default (all ours; the base of every preset).
PIPELINE_DEFAULTS: dict[str, dict[str, Any]] = {
    # DiagnosisConfig: S on 16 examples. The exact ablations, the diagnosis' largest cost, grow
    # with it: 8 keeps the quick look in its time budget (cpu-full and gpu set more).
    "diagnosis": {"n_sensitivity": 8},
    # TuningConfig: 12 steps of pure refusal SFT. A run tempers over-refusal with a benign share.
    "tuning": {"steps": 8, "benign_mix": 0.25},
    # EvalConfig: every test prompt. The quick look takes 10 per set and 16 task items.
    "evaluation": {"n_harmful": 10, "n_benign": 10, "n_over_refusal": 10, "n_task": 16},
    # AttributionConfig: 16 examples, answers up to 256 tokens, 30 spread units per kind. The quick
    # look: 8 examples (halves of 4), answers cut at 64 tokens, 10 spread units (the committed
    # run's 30 put first order at Spearman 0.998 with exact, so fewer suffice there).
    "attribution": {"n_examples": 8, "max_new_tokens": 64, "n_spread": 10},
}

# The stage settings a run names: presets, CLI flags and config.json use these names. Each is
# a field of a stage config; `n_eval` and `seed` are several, always equal in a run.
RUN_NAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "n_calibration": (("diagnosis", "n_calibration"),),
    "n_sensitivity": (("diagnosis", "n_sensitivity"),),
    "diag_batch_size": (("diagnosis", "batch_size"),),
    "ablation": (("diagnosis", "ablation"),),
    "sensitivity_method": (("diagnosis", "sensitivity_method"),),
    "combine": (("diagnosis", "combine"),),
    "n_bootstrap": (("diagnosis", "n_bootstrap"),),
    "utility_reference": (("diagnosis", "utility_reference"),),
    # Weights of the diagnosis: "float32", or "bfloat16" (a bf16 copy of the model; losses and
    # the accumulation of gradients over examples stay float32). Evaluation: always float32.
    "diag_dtype": (("diagnosis", "dtype"),),
    # Training steps: "float32", or "bf16" (mixed precision: float32 master weights and AdamW
    # state, frozen slices bit-exact; `TuningConfig.precision`).
    "train_precision": (("tuning", "precision"),),
    # Diagnosis: bootstraps, tie-breaks; evaluation; stage 4's split, draws and bootstraps.
    "seed": (("diagnosis", "seed"), ("evaluation", "seed"), ("attribution", "seed")),
    "steps": (("tuning", "steps"),),
    "batch_size": (("tuning", "batch_size"),),
    "lr": (("tuning", "lr"),),
    "benign_mix": (("tuning", "benign_mix"),),  # share of benign examples per batch
    "scope": (("tuning", "scope"),),
    "over_refusal_data": (("evaluation", "over_refusal"),),
    # Held-out examples per test set (None: all).
    "n_eval": (("evaluation", "n_harmful"), ("evaluation", "n_benign"),
               ("evaluation", "n_over_refusal")),
    "n_task": (("evaluation", "n_task"),),  # multiple-choice items for task accuracy (None: all)
    "eval_max_new_tokens": (("evaluation", "max_new_tokens"),),
    "attribution_examples": (("attribution", "n_examples"),),
    "attribution_candidates": (("attribution", "n_candidates"),),
    "attribution_spread": (("attribution", "n_spread"),),
    "attribution_draws": (("attribution", "n_draws"),),
    "attribution_max_new_tokens": (("attribution", "max_new_tokens"),),
    "attribution_reference": (("attribution", "utility_reference"),),
}

# Stage fields a run sets per piece (the training seed, whether it generates) or takes from its own
# data settings: a run config keeps them at these values.
PER_PIECE = {("tuning", "seed"): (0, "set per piece from train_seeds"),
             ("evaluation", "generation"): (True, "set per piece from generation_seeds"),
             ("evaluation", "harmful"): (EvalConfig.harmful, "the run evaluates the test split "
                                                             "of safety_data"),
             ("evaluation", "benign"): (EvalConfig.benign, "the run evaluates the test split "
                                                           "of utility_data")}

# Sized with `estimate_seconds` (per-unit times measured on SmolLM2, 2 CPU cores; the measured run
# times are in benchmarks/README.md, "Where the cost model's numbers come from"). Names: the
# fields of `RunConfig` and the `RUN_NAMES`; any other value is `PIPELINE_DEFAULTS` or the stage's.
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
    # The default (RunConfig's defaults): a quick look on 2 CPU cores (its time: the README).
    # Same design (paired seeds, draws, curves, CIs) on full tuning, CAST and random only, 2 seeds,
    # 4 draws, small test sets, no generation: the CIs are wide and the report says so. Stage 4
    # is left to `cast-interp attribute`, sized down (`PIPELINE_DEFAULTS["attribution"]`).
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


def _stage_default(name: str):
    return lambda: STAGES[name](**PIPELINE_DEFAULTS[name])


@dataclass(init=False)
class RunConfig:
    """Everything that defines a CAST run (saved in `config.json` and `results.json`).

    Build it from a preset (`RunConfig.from_preset("smoke", out_dir=...)`) or from keyword
    settings: its fields, the `RUN_NAMES` of stage settings (`steps=4`, `n_eval=10`), and the
    stage configs themselves (`tuning=TuningConfig(...)`, or a dict of its fields). A run name
    given beside its stage config replaces that field (`dataclasses.replace(cfg, steps=4)` works).

    Stage 2 (paired design): `train_seeds` are the training seeds every arm runs on; `n_draws` the
    random arm's draws (draw d: units drawn with seed d, training seed
    `train_seeds[d % len(train_seeds)]`; at least one draw per seed, 0 = no random arm);
    `unit` what the arms skip ("head", or "group" for key/value groups under GQA); `k_fractions`
    the budgets of the full set of arms, `k_sweep` extra budgets for CAST and random only;
    `baselines` the other arms. `eval_every`, `n_val`: the safety/utility-cost curves (generation-
    free, every `eval_every` steps on `n_val` harmful and `n_val` benign validation examples).
    Stage 3: `generation_seeds`: generated refusal rates on the pieces of the first
    `generation_seeds` training seeds (None: all, 0: none). Inference: `ci`, `n_boot` of the paired
    bootstrap (`stats.paired_difference`). Stage 4: `attribute` runs it in the run (else later:
    `cast-interp attribute`) on the first-seed pieces of `attribution_arms`.
    """

    out_dir: str = "runs/default"
    model: str = "smollm2-135m-instruct"
    # A spec (one set, split into calibration/train/test by `split_seed`, or "bundled:KIND",
    # split as shipped) or a list of three specs [calibration, train, test].
    safety_data: Union[str, list] = "bundled:harmful"
    utility_data: Union[str, list] = "bundled:benign"
    split_seed: int = 0              # the split of a single data file into calibration/train/test
    # Stage 1
    diagnosis: DiagnosisConfig = field(default_factory=_stage_default("diagnosis"))
    # Stage 2
    unit: str = "head"
    k_fractions: list = field(default_factory=lambda: [0.1])
    k_sweep: list = field(default_factory=list)
    baselines: list = field(default_factory=list)
    train_seeds: list = field(default_factory=lambda: [0, 1])
    n_draws: int = 4
    benign_reference: str = "self"   # benign answers trained on: the model's own ("self") or data's
    self_reference_tokens: int = 64  # longest self-reference answer for training and validation
    eval_every: int = 4
    n_val: int = 4
    tuning: TuningConfig = field(default_factory=_stage_default("tuning"))
    # Stage 3. Generation is most of an evaluation's cost on CPU (ours).
    generation_seeds: Optional[int] = 0
    evaluation: EvalConfig = field(default_factory=_stage_default("evaluation"))
    # Inference
    ci: float = 0.95
    n_boot: int = 2000
    # Stage 4. Arms attributed on the first training seed: "full", "cast" (first budget), "random"
    # (draw 0).
    attribute: bool = False
    attribution_arms: list = field(default_factory=lambda: ["full"])
    attribution: AttributionConfig = field(default_factory=_stage_default("attribution"))
    preset: str = "cpu"
    device: Optional[str] = None
    # A model too large for one GPU: its blocks split over this many GPUs (TransformerLens 3).
    n_devices: int = 1
    # Data text that tokenizes into the chat template's special tokens (turn markers) is refused
    # unless allowed here.
    allow_special_tokens: bool = False

    def __init__(self, **settings: Any) -> None:
        for name, value in _parse(settings).items():
            object.__setattr__(self, name, value)
        self.__post_init__()

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
        check_int("split_seed", self.split_seed, 0)
        _check_lr(self.lr)
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
        for name, lo in (("eval_every", 0), ("n_val", 2), ("n_boot", 100),
                         ("self_reference_tokens", 1)):
            check_int(name, getattr(self, name), lo)
        _check_stages(self)
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

    # The stage config each stage runs (a piece's training seed and generation are its own).
    def diagnosis_config(self) -> DiagnosisConfig:
        """Stage 1's settings."""
        return self.diagnosis

    def tuning_config(self, train_seed: int) -> TuningConfig:
        """Stage 2's settings for a piece on `train_seed`."""
        return replace(self.tuning, seed=train_seed)

    def evaluation_config(self, generation: bool) -> EvalConfig:
        """Stage 3's settings, generating refusals or not."""
        return replace(self.evaluation, generation=generation)

    def to_dict(self) -> dict:
        """The run's settings as JSON values, led by `"format"`: the run's own fields and the
        `RUN_NAMES` at the top (as config.json always had them), each stage's other fields under
        the stage's name. Every value appears once; `from_dict` reads it back."""
        named = {t for targets in RUN_NAMES.values() for t in targets}
        d: dict[str, Any] = {"format": RUN_CONFIG_FORMAT}
        for f in fields(self):
            if f.name not in STAGES:
                d[f.name] = _copy(getattr(self, f.name))
        d.update({name: _copy(getattr(self, name)) for name in RUN_NAMES})
        for stage in STAGES:
            sub = getattr(self, stage).to_dict()
            d[stage] = {k: v for k, v in sub.items() if (stage, k) not in named}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """The config of `to_dict`, or of a flat config.json of the runs before the stage configs
        nested (no "format": run fields and run names only, `lr` None for the stage's default)."""
        if not isinstance(d, dict):
            raise ValueError(f"A RunConfig is read from a dict (JSON object), got "
                             f"{type(d).__name__}.")
        if "format" not in d:
            d = _from_flat(d)
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
        """Hash of the named settings (and `extra`): a finished piece is re-used only if unchanged.
        A stage's name hashes its whole config (`to_dict()`)."""
        what = {"version": PIPELINE_VERSION, **{n: self._key_value(n) for n in names},
                "extra": extra}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()
                              ).hexdigest()[:12]

    def _key_value(self, name: str) -> Any:
        return getattr(self, name).to_dict() if name in STAGES else _copy(getattr(self, name))


def _copy(v: Any) -> Any:
    return list(v) if isinstance(v, (list, tuple)) else v


def _run_name(name: str, targets: tuple[tuple[str, str], ...]) -> property:
    def get(self):
        stage, f = targets[0]
        return getattr(getattr(self, stage), f)

    def set_(self, value) -> None:  # a new stage config, checked by its own rules
        for stage in dict.fromkeys(s for s, _ in targets):
            changes = {f: value for s, f in targets if s == stage}
            object.__setattr__(self, stage, replace(getattr(self, stage), **changes))

    where = ", ".join(f"{s}.{f}" for s, f in targets)
    return property(get, set_, doc=f"Run name of {where}.")


for _name, _targets in RUN_NAMES.items():
    setattr(RunConfig, _name, _run_name(_name, _targets))


def _parse(settings: dict) -> dict:
    """Field values from keyword settings (fields, run names, stage configs or their dicts, and
    the `format` of a saved dict): unknown names are an error naming them."""
    s = check_format("RunConfig", settings, RUN_CONFIG_FORMAT)
    own = {f.name: f for f in fields(RunConfig)}
    check_known("RunConfig", s, [*own, *RUN_NAMES], fix=(
        "Run settings are RunConfig's fields and the run names of stage settings (RUN_NAMES); any "
        "other stage setting goes under its stage, e.g. {\"tuning\": {\"weight_decay\": 0.0}}. A "
        "config.json of cast_interp v1 (random_seeds, kv_policy) needs a new run directory."))
    values = {}
    for name, f in own.items():
        if name in s:
            values[name] = s[name]
        else:
            values[name] = f.default if f.default is not MISSING else f.default_factory()
    if "lr" in s:  # the run's own bound, before the tuning config's looser one answers
        _check_lr(s["lr"])
    changes: dict[str, dict] = {stage: {} for stage in STAGES}
    for name, targets in RUN_NAMES.items():
        if name in s:
            for stage, f in targets:
                changes[stage][f] = s[name]
    for stage, cls in STAGES.items():
        v = values[stage]
        try:
            if isinstance(v, dict):  # missing fields: the run's defaults
                values[stage] = cls.from_dict({**PIPELINE_DEFAULTS[stage], **v, **changes[stage]})
            elif isinstance(v, cls) and changes[stage]:
                values[stage] = replace(v, **changes[stage])
        except TypeError as exc:  # a stage config rejecting a wrongly typed value it cannot hold
            raise ValueError(f"{stage}: {exc}") from None
    return values


def _from_flat(d: dict) -> dict:
    """A flat config.json (format 1) as keyword settings: the same names; `lr` None meant the
    tuning config's default."""
    nested = sorted(k for k in d if k in STAGES)
    if nested:
        raise ValueError(f"A run config with stage sections {nested} must carry its \"format\" "
                         f"({RUN_CONFIG_FORMAT!r}): add it, or write the flat names instead.")
    d = dict(d)
    if "lr" in d and d["lr"] is None:
        del d["lr"]
    return {"format": RUN_CONFIG_FORMAT, **d}


def _check_stages(cfg: RunConfig) -> None:
    """The stage configs as a run uses them: each a config of its class, the fields a run sets per
    piece at their fixed values, and the fields behind one run name equal."""
    for stage, cls in STAGES.items():
        if not isinstance(getattr(cfg, stage), cls):
            raise ValueError(f"{stage} must be a {cls.__name__} (or a dict of its fields), got "
                             f"{type(getattr(cfg, stage)).__name__}.")
    for (stage, f), (value, why) in PER_PIECE.items():
        if getattr(getattr(cfg, stage), f) != value:
            raise ValueError(f"{stage}.{f} must stay {value!r} in a run config ({why}), got "
                             f"{getattr(getattr(cfg, stage), f)!r}.")
    for name, targets in RUN_NAMES.items():
        got = [getattr(getattr(cfg, s), f) for s, f in targets]
        if any(g != got[0] for g in got):
            where = ", ".join(f"{s}.{f}" for s, f in targets)
            raise ValueError(f"{where} must be equal in a run (they are its {name!r}), got {got}: "
                             f"set {name} instead.")


def _check_lr(lr: Any) -> None:
    # A learning rate above 1 sends every weight far from the model (uniform output or inf).
    check_number("lr", lr, lo=0, hi=1, lo_open=True)


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
               "preset": tuple(sorted(PRESETS))}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(cfg, name)!r}.")
    from ..model import check_device

    check_device(cfg.device, available=False)  # availability: when the run loads the model
    check_int("n_devices", cfg.n_devices, 1)


# What each stage's results depend on: run settings and stage configs (a stage's name hashes its
# whole config). The stage 1 map:
DIAG_FIELDS = ("model", "safety_data", "utility_data", "diagnosis")
# A tuned-and-evaluated piece (its own method, k, seeds are the `extra` of its key; the map enters
# through the skipped units, checked separately):
TUNE_FIELDS = ("model", "safety_data", "utility_data", "benign_reference", "self_reference_tokens",
               "unit", "eval_every", "n_val", "tuning")
EVAL_FIELDS = ("model", "safety_data", "utility_data", "evaluation")
ATTR_FIELDS = ("attribution",)

# Settings that only add pieces (seeds, draws, budgets, baselines) or recompute the report and
# stage 4: a run directory takes new values of these. Any other change makes another run.
ADDITIVE_FIELDS = ("out_dir", "device", "n_devices", "preset", "train_seeds", "n_draws", "k_sweep",
                   "baselines", "attribute", "attribution_arms", "ci", "n_boot", *ATTR_FIELDS,
                   *(n for n, t in RUN_NAMES.items() if all(s == "attribution" for s, _ in t)))
