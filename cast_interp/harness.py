"""What the v3 verdict (`verdict.py`) and the peer comparison (`peers/`) share.

- `RegimeSettings`: the regime (pure safety SFT, constant lr after warmup, benign share 0), the
  data sizes, the curves and test checkpoints, the diagnosis sizes and the inference settings; each
  comparison's config subclasses it and adds its own design.
- `run_data`, `conflict_maps`: the run's data splits and its conflict maps, computed once into the
  run folder and re-used when their key matches.
- `CurveEvaluator`, `test_evaluator`: what a piece records at a validation curve point and at a
  test checkpoint (`on_step`).
- `claim_piece`, `config_key`: several worker processes (one per core) share one resumable run
  folder: each claims a piece with an exclusive pid file, and a finished piece is re-used only when
  its key (a hash of what it depends on) matches.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import torch

from . import backend
from .backend import Model
from .checks import check_int, check_number
from .config_io import config_from_dict, config_to_dict
from .io import atomic_write_json, package_versions, read_json, to_jsonable
from .regime import PRIMARY  # the v3 primary utility endpoint, declared with the sweep

MAPS = ("general", "sensitive")
PRECISIONS = ("float32", "bf16")
SCOPES = ("attention", "all")
VAL_DTYPES = ("float32", "bfloat16")


#: Per-piece costs on SmolLM2, one core per piece, seconds: medians over the committed verdict's
#: pieces (figures/run; benchmarks/README.md gives the spread): a bf16 training step (batch 8), a
#: bf16 validation curve point (32 + 32 prompts) and a float32 test checkpoint. A float32 step
#: costs `FLOAT32_STEP_FACTOR` bf16 steps (benchmarks/bench_precision.py).
PIECE_COST_S = {"train_step": 3.0, "curve_point": 8.2, "test_checkpoint": 49.0}
FLOAT32_STEP_FACTOR = 2.1
#: Once per run (the verdict's first start, 2 cores): the data with the self-reference answers,
#: one conflict map, the original's evaluation on both splits.
SETUP_COST_S = {"data": 105.0, "map": 385.0, "original": 240.0}


def curve_points(cfg: "RegimeSettings") -> int:
    """Validation curve points of a piece: every `curve_every` steps and the last."""
    return len({s for s in range(1, cfg.steps + 1) if s % cfg.curve_every == 0 or s == cfg.steps})


def setup_seconds(cfg: "RegimeSettings") -> float:
    """A run's once-only cost (`SETUP_COST_S`): the data, each of `cfg.maps`, the original."""
    c = SETUP_COST_S
    return c["data"] + len(cfg.maps) * c["map"] + c["original"]


def piece_seconds(cfg: "RegimeSettings", *, train_factor: float = 1.0,
                  precision: Optional[str] = None) -> dict:
    """A trained piece's estimated cost on one core (`PIECE_COST_S`): {"train", "curves", "test",
    "total"}. `train_factor`: gradients per step (projection: 2); `precision` (default the
    run's): float32 steps cost `FLOAT32_STEP_FACTOR` bf16 ones."""
    c = PIECE_COST_S
    f = FLOAT32_STEP_FACTOR if (precision or cfg.precision) == "float32" else 1.0
    out = {"train": cfg.steps * c["train_step"] * f * train_factor,
           "curves": curve_points(cfg) * c["curve_point"],
           "test": len(cfg.test_checkpoints) * c["test_checkpoint"]}
    out["total"] = sum(out.values())
    return out


@dataclass
class RegimeSettings:
    """Settings every comparison in the v3 regime shares (a subclass adds its design, `PRESETS`
    and `KIND`; `from_dict` refuses unknown keys).

    Tuning: `steps`, `batch_size`, `lr`, `warmup_steps`, `scope`, `precision` of the training step
    ("bf16": mixed precision, float32 master weights). `k_fraction`: CAST's budget, the share of
    query heads frozen. `train_seeds`: shared by every arm. Curves: validation every `curve_every`
    steps on `n_val` harmful and `n_over_val` over-refusal prompts in `val_dtype` (the test split,
    where endpoints are read, is always float32); the test split at `test_checkpoints`. Data:
    `datasets` (None: ../shared/datasets when present; "bundled"), test sizes, `n_calibration`
    examples per diagnosis set, S on `n_sensitivity`, `n_over_diag` benign-but-sensitive diagnosis
    prompts, token caps. Inference: `n_levels` matched-safety levels, `n_boot` resamples.
    """

    KIND: ClassVar[str] = "regime"
    FORMAT: ClassVar[str] = "regime-settings-1"
    PRESETS: ClassVar[dict] = {}

    preset: str = "cpu"
    model: str = "smollm2-135m-instruct"
    datasets: Optional[str] = None
    steps: int = 16
    batch_size: int = 8
    lr: float = 5e-5
    warmup_steps: int = 2
    scope: str = "attention"
    precision: str = "bf16"
    k_fraction: float = 0.1
    train_seeds: list = field(default_factory=lambda: [0, 1])
    curve_every: int = 2
    val_dtype: str = "bfloat16"
    test_checkpoints: list = field(default_factory=lambda: [10, 16])
    n_val: int = 32
    n_over_val: int = 32
    n_harmful_test: Optional[int] = 64
    n_over_test: Optional[int] = 128
    n_benign_test: int = 32
    n_calibration: int = 32
    n_sensitivity: int = 8
    n_over_diag: int = 48
    max_safety_tokens: int = 64
    answer_tokens: int = 64
    n_levels: int = 3
    n_boot: int = 2000
    split_seed: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, lo in (("steps", 1), ("batch_size", 1), ("warmup_steps", 0), ("curve_every", 1),
                         ("n_val", 2), ("n_over_val", 2), ("n_benign_test", 2),
                         ("n_calibration", 2), ("n_sensitivity", 2), ("n_over_diag", 2),
                         ("n_levels", 1), ("n_boot", 100), ("max_safety_tokens", 1),
                         ("answer_tokens", 1), ("split_seed", 0), ("seed", 0)):
            check_int(name, getattr(self, name), lo)
        for name in ("n_harmful_test", "n_over_test"):
            check_int(name, getattr(self, name), 2, none_ok=True, what=" (None: all)")
        check_number("lr", self.lr, lo=0, hi=1, lo_open=True)
        if not (isinstance(self.k_fraction, float) and 0 < self.k_fraction < 1):
            raise ValueError(f"k_fraction must be a fraction in (0, 1), got {self.k_fraction!r}.")
        seeds = list(self.train_seeds)
        if not seeds or len(set(seeds)) != len(seeds) or any(
                not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
            raise ValueError(f"train_seeds must be distinct ints >= 0, got {self.train_seeds!r}.")
        self.train_seeds = seeds
        self.test_checkpoints = sorted(int(c) for c in self.test_checkpoints)
        if len(self.test_checkpoints) < 2 or len(set(self.test_checkpoints)) != len(
                self.test_checkpoints) or not all(1 <= c <= self.steps
                                                  for c in self.test_checkpoints):
            raise ValueError(f"test_checkpoints must be at least 2 distinct steps in "
                             f"1..{self.steps} (matched safety is read between two trained "
                             f"checkpoints), got {self.test_checkpoints!r}.")
        for name, choices in (("precision", PRECISIONS), ("scope", SCOPES),
                              ("val_dtype", VAL_DTYPES)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got "
                                 f"{getattr(self, name)!r}.")
        if self.preset not in self.PRESETS:
            raise ValueError(f"preset must be one of {sorted(self.PRESETS)}, got "
                             f"{self.preset!r}.")

    def to_dict(self) -> dict:
        """The fields as JSON values, without a format key: the dict is compared on resume and
        hashed into piece keys; the run's record (`verdict.json`, `peers.json`) carries the
        format."""
        return config_to_dict(self, with_format=False)

    @classmethod
    def from_dict(cls, d: dict) -> "RegimeSettings":
        """`config_io.config_from_dict`: a format other than `FORMAT` or an unknown key is an
        error naming it."""
        return config_from_dict(cls, d)

    @classmethod
    def from_preset(cls, preset: Optional[str] = None, **overrides) -> "RegimeSettings":
        """The preset's settings (default: the class's default preset) with `overrides` (None
        values ignored: a CLI flag left out)."""
        preset = preset or next(f.default for f in fields(cls) if f.name == "preset")
        if preset not in cls.PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose from {sorted(cls.PRESETS)}.")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"Unknown {cls.__name__} field(s) {unknown}.")
        return cls(preset=preset, **{**cls.PRESETS[preset],
                                     **{k: v for k, v in overrides.items() if v is not None}})

    def tuning(self, seed: int, precision: Optional[str] = None, *, lr: Optional[float] = None):
        """The regime's `TuningConfig` for a training seed (benign share 0); `precision` and `lr`
        replace the run's (a float32 check; LoRA's own rate)."""
        from .sparse_tuning import TuningConfig

        return TuningConfig(steps=self.steps, batch_size=self.batch_size,
                            lr=self.lr if lr is None else lr, schedule="constant",
                            warmup_steps=self.warmup_steps, scope=self.scope, benign_mix=0.0,
                            seed=seed, precision=precision or self.precision)


# --------------------------------------------------------------------------------------------------
# Data and maps
# --------------------------------------------------------------------------------------------------


def config_key(obj: Any) -> str:
    """A short hash of `obj` (JSON, keys sorted): what a finished piece or map is re-used on."""
    return hashlib.sha256(json.dumps(to_jsonable(obj), sort_keys=True).encode()).hexdigest()[:12]


def run_data(model: Model, cfg: RegimeSettings, cache_dir: Union[str, Path, None] = None):
    """`regime.regime_data` with the run's sizes and its diagnosis splits (D_safe calibration,
    general D_util and benign-but-sensitive D_util, disjoint from every test prompt)."""
    from .regime import regime_data

    return regime_data(model, datasets=cfg.datasets, n_val=cfg.n_val, n_over_val=cfg.n_over_val,
                       n_benign_test=cfg.n_benign_test, n_over_test=cfg.n_over_test,
                       n_harmful_test=cfg.n_harmful_test, max_safety_tokens=cfg.max_safety_tokens,
                       answer_tokens=cfg.answer_tokens, n_mc_per_subject=0,
                       split_seed=cfg.split_seed, cache_dir=cache_dir,
                       n_safety_cal=cfg.n_calibration, n_benign_diag=cfg.n_calibration,
                       n_over_diag=cfg.n_over_diag)


def start_run(model: Model, cfg: RegimeSettings, out: Path, *, meta_file: str, fmt: int,
              what: str) -> tuple[Any, dict, dict]:
    """Open (or resume) a run folder: its data (`run_data`, cached in `out`), its record `meta_file`
    ({"format", "config", "data", "model", "versions", "primary"}: written at the first start;
    a resume with another config or data is refused, naming `what` the folder holds) and its
    `timings.json` so far. Returns (data, meta, timings)."""
    from .model import model_id

    t0 = time.perf_counter()
    data = run_data(model, cfg, out)
    meta = {"format": fmt, "config": cfg.to_dict(), "data": data.describe(),
            "model": model_id(model), "versions": package_versions(), "primary": PRIMARY}
    meta = json.loads(json.dumps(to_jsonable(meta)))
    f = out / meta_file
    if f.exists():
        old = read_json(f)
        if old.get("config") != meta["config"] or old.get("data") != meta["data"]:
            raise ValueError(f"{out} holds a {what} with another config or data; use a new "
                             "directory (nothing was changed).")
    else:
        atomic_write_json(meta, f)
    timings = read_json(out / "timings.json") if (out / "timings.json").exists() else {}
    timings.setdefault("data_s", time.perf_counter() - t0)  # the first start builds the data
    return data, meta, timings


def full_tuning_tax(full: list, original: dict, step: int, *, n_boot: int, seed: int) -> dict:
    """The tax: full tuning's pieces (one per training seed) at `step` against the original, per
    test prompt, over seeds (`stats.paired_difference`), for the primary endpoint, safety, KL and
    NLL: {metric: paired difference}. Prompts with a non-finite value are left out."""
    import numpy as np

    from .stats import paired_difference

    tax = {}
    for metric in (PRIMARY, "refusal_score", "kl", "nll"):
        a = np.stack([np.asarray(p["test"][str(step)][metric], float) for p in full])
        b = np.broadcast_to(np.asarray(original["test"][metric], float), a.shape)
        keep = np.isfinite(a).all(0) & np.isfinite(b).all(0)
        tax[metric] = paired_difference(a[:, keep], np.array(b[:, keep]), n_boot=n_boot,
                                        seed=seed, names=("full tuning", "original"))
    return tax


def load_pieces(out: Path) -> dict[str, dict]:
    """{piece name: record} of the finished pieces in `out/pieces` (claims are not pieces)."""
    return {p.stem: read_json(p) for p in sorted((Path(out) / "pieces").glob("*.json"))}


def costs_at_levels(curve: dict, levels) -> tuple[Any, list]:
    """A piece's per-prompt cost at each safety level `[n_levels, n_prompts]` (NaN rows where it
    cannot be read: `inference.utility_at_safety` never extrapolates), and the reasons.
    curve: {"steps", "safety", "cost" `[n_points, n_prompts]`}."""
    import numpy as np

    from .inference import utility_at_safety

    rows, reasons = [], []
    for lv in levels:
        r = utility_at_safety(curve["steps"], curve["safety"], curve["cost"], lv)
        rows.append(np.asarray(r["utility"], float))
        reasons.append(r["reason"])
    return np.stack(rows), reasons


def compliant(ds):
    """The examples whose (self-reference) answer the refusal judge does not call a refusal: the
    benign-but-sensitive D_util keeps what the model does when it helps."""
    from .data import ChatDataset
    from .safety import is_refusal

    return ChatDataset(ds.name + "-compliant", [e for e in ds if not is_refusal(e.response or "")],
                       ds.source)


def conflict_maps(model: Model, cfg: RegimeSettings, data, out: Path, maps=("general",), *,
                  progress: bool = True, timings: Optional[dict] = None) -> dict:
    """{map name: ConflictMap} for each of `maps` ("general": the paper's D_util, benign prompts
    with the model's own answers; "sensitive": benign-but-sensitive prompts with its own compliant
    answers), each computed once into `out/diagnosis/<name>` and re-used while its key matches.
    `timings`: gets "diagnosis_s" at the first start, the seconds spent or "re-used" when every
    map was found done."""
    from .conflict_map import ConflictMap
    from .diagnose import DiagnosisConfig, diagnose

    bad = [m for m in maps if m not in MAPS]
    if bad:
        raise ValueError(f"Unknown map(s) {bad}; choose from {list(MAPS)}.")
    util = {"general": data.benign_diag, "sensitive": compliant(data.over_diag)}
    out_maps, computed, t0 = {}, False, time.perf_counter()
    for name in maps:
        d = Path(out) / "diagnosis" / name
        # "verdict_key": the name maps of committed runs carry.
        key = config_key({"cfg": [cfg.n_calibration, cfg.n_sensitivity, cfg.seed, cfg.model],
                          "safe": data.safety_cal.fingerprint(),
                          "util": util[name].fingerprint()})
        if (d / "conflict_map.json").exists():
            cm = ConflictMap.load(d)
            if cm.config.get("verdict_key") == key:
                out_maps[name] = cm
                continue
        if progress:
            print(f"[{cfg.KIND}] diagnosis: the {name} map ({len(util[name])} D_util examples)",
                  flush=True)
        dcfg = DiagnosisConfig(n_calibration=cfg.n_calibration, n_sensitivity=cfg.n_sensitivity,
                               seed=cfg.seed, utility_reference="dataset")
        cm = diagnose(model, data.safety_cal, util[name], dcfg, progress=False)
        cm.config["verdict_key"] = key
        cm.save(d)
        out_maps[name] = ConflictMap.load(d)
        computed = True
    if timings is not None:
        timings.setdefault("diagnosis_s", time.perf_counter() - t0 if computed else "re-used")
    return out_maps


# --------------------------------------------------------------------------------------------------
# Evaluation at a checkpoint
# --------------------------------------------------------------------------------------------------


class CurveEvaluator:
    """Safety and the primary utility endpoint on the validation split (generation-free), in
    `dtype`: {"refusal_score": [n_harmful_val], "over_refusal_score": [n_over_val]}.

    In "bfloat16" the model's weights are copied into one bf16 model kept between calls (made at
    the first call, refreshed in place after): a curve point then costs no model copy.
    """

    def __init__(self, data, *, dtype: str = "float32", batch_size: int = 16):
        if dtype not in VAL_DTYPES:
            raise ValueError(f"dtype must be one of {list(VAL_DTYPES)}, got {dtype!r}.")
        self.harmful, self.over = data.harmful_val, data.over_val
        self.dtype, self.batch_size = dtype, batch_size
        self._shadow: Optional[tuple[Model, Model]] = None  # (source, its bf16 copy)

    def _in_dtype(self, model: Model) -> Model:
        if self.dtype == "float32":
            return model
        if self._shadow is None or self._shadow[0] is not model:
            self._shadow = (model, backend.copy_in_dtype(model, torch.bfloat16))
        else:
            copy = self._shadow[1]
            src = dict(model.named_parameters())
            with torch.no_grad():
                for n, p in copy.named_parameters():
                    p.copy_(src[n])  # rounds to bf16 as `copy_in_dtype` does
        return self._shadow[1]

    def __call__(self, model: Model) -> dict[str, list]:
        from .safety import refusal_logprobs

        m = self._in_dtype(model)
        with torch.no_grad(), backend.inference_layout(m):
            return {"refusal_score": refusal_logprobs(m, self.harmful,
                                                      batch_size=self.batch_size).float().tolist(),
                    "over_refusal_score": refusal_logprobs(
                        m, self.over, batch_size=self.batch_size).float().tolist()}


class CheckpointRecorder:
    """A piece's `on_step`: after every `curve_every`-th step (and the last) the validation curve
    point `curve(model)`, at each of `test_checkpoints` the test record `test(model)`, timed apart
    from training. `records()`: {"val": {step: {metric: [n]}}, "test": {...}, "curve_time_s",
    "test_time_s"} (steps as strings, as JSON keys)."""

    def __init__(self, model: Model, cfg: RegimeSettings, curve, test):
        self.model, self.cfg, self.curve, self.test = model, cfg, curve, test
        self.val: dict[int, dict] = {}
        self.tst: dict[int, dict] = {}
        self.curve_time_s = self.test_time_s = 0.0

    def __call__(self, step: int, loss: float) -> None:
        done = step + 1
        if done % self.cfg.curve_every == 0 or done == self.cfg.steps:
            t = time.perf_counter()
            self.val[done] = self.curve(self.model)
            self.curve_time_s += time.perf_counter() - t
        if done in self.cfg.test_checkpoints:
            t = time.perf_counter()
            self.tst[done] = self.test(self.model)
            self.test_time_s += time.perf_counter() - t

    @property
    def eval_time_s(self) -> float:
        return self.curve_time_s + self.test_time_s

    def records(self) -> dict:
        return {"val": {str(k): v for k, v in self.val.items()},
                "test": {str(k): v for k, v in self.tst.items()},
                "curve_time_s": self.curve_time_s, "test_time_s": self.test_time_s}


def evaluators(model: Model, cfg: RegimeSettings, data, out: Path) -> tuple[CurveEvaluator, Any]:
    """The validation-curve and test evaluators every piece of a run shares, and the untrained
    model's record on both splits, `out/original.json`, written once (what costs are taken from)."""
    curve = CurveEvaluator(data, dtype=cfg.val_dtype)
    test = test_evaluator(model, data)
    if not (Path(out) / "original.json").exists():
        t = time.perf_counter()
        atomic_write_json({"val": curve(model), "test": test(model),
                           "time_s": time.perf_counter() - t}, Path(out) / "original.json")
    return curve, test


def test_evaluator(model: Model, data, batch_size: int = 16):
    """The float32 evaluation of the test split at a checkpoint (`regime.RegimeEvaluator`): refusal
    and over-refusal scores, KL and NLL on the original's own answers to benign test prompts."""
    from .regime import RegimeEvaluator

    return RegimeEvaluator(model, data, "test", batch_size=batch_size)


def write_run_report(out_dir: Union[str, Path], summarize, plot, markdown) -> Path:
    """A comparison's report from its files alone (no model): `summarize(out, write=True)` (also
    writes summary.json), `plot(summary, out/"figures")`, then `markdown(summary)` into
    `report.md`; returns its path."""
    from .io import atomic_write_text

    out = Path(out_dir)
    summary = summarize(out, write=True)
    plot(summary, out / "figures")
    atomic_write_text(markdown(summary), out / "report.md")
    return out / "report.md"


# --------------------------------------------------------------------------------------------------
# Several workers, one run folder
# --------------------------------------------------------------------------------------------------


def claim_piece(path: Path) -> Optional[Path]:
    """Claim a piece for this process (a file holding its pid, created exclusively): the path, or
    None when a live process holds it. A claim left by a process that is gone is taken over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or 0)
                os.kill(pid, 0)
                return None  # alive
            except (ValueError, ProcessLookupError, FileNotFoundError):
                path.unlink(missing_ok=True)  # its owner is gone
                continue
            except PermissionError:
                return None  # alive, another user's
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return path
    return None
