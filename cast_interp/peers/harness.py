"""The peer comparison (issue 25): which way of lowering the alignment tax wins at matched safety.

Every peer method runs as a piece of the v3 verdict's harness (`verdict.py`): the same regime
(pure safety SFT of attention, constant lr after warmup, bf16 steps), the same data splits, the
same training seeds, the same validation curves every `curve_every` steps (`CurveEvaluator`) and
the same test checkpoints (`test_evaluator`) recorded from `on_step`. The arms:

- ``full``: full tuning (the tax itself); ``cast``: CAST, the top-k heads of the general map
  (`verdict_maps`) frozen;
- ``interp_<src>``: weight interpolation theta(a) = (1 - a) theta_original + a theta_tuned of the
  tuned ``full`` or ``cast`` piece of the same seed, evaluated at every a in `alphas` (no training:
  its curve runs along a instead of along steps; ``interp_cast`` is CAST + interpolation);
- ``anchor_s<share>``: the model's own benign answers mixed into every batch at a share;
  ``cast_anchor_s<share>``: CAST + anchor;
- ``bottom_layers`` / ``top_layers``: whole layers frozen at CAST's k (rounded up to whole layers);
- ``lora_r<rank>_<components>``: LoRA adapters, merged for evaluation, at `lora_lr`;
- ``projection_<mode>``: the safety gradient projected off a utility gradient where they conflict;
- ``act_tune`` / ``act_skip``: the k heads whose output shifts most between harmful (D_safe's
  prompts, `data.safety_cal`) and harmless prompts (`data.benign_diag`) tuned alone / frozen.

The anchor set and the projection's utility batches are `data.benign_diag`: benign prompts with the
model's own answers before training, disjoint from every validation and test prompt (also the
general map's D_util).

Reading (`summarize_peers`): the tax of full tuning; safety levels common to the methods' test
curves (an arm whose curve does not reach the common range is left out, named, with the reason:
otherwise one weak arm would leave no level at all; full and CAST are never left out); per arm the
primary cost (over-refusal score, tuned - original, per prompt) at matched safety with a 95% CI
over seeds and prompts, paired against full tuning and as CAST minus the arm
(`stats.paired_difference`); the arm with the lowest cost and by how much; the compositions
against their baselines; budgets and times.

Fair tuning (ours, stated): every arm uses the regime's lr, except LoRA, which uses its published
default (`lora_lr`, 3e-4, alpaca-lora's): with B = 0 at the start, the regime's lr barely moves
the adapters in 16 steps. No per-arm learning-rate sweep is run.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..backend import Model
from ..checks import check_int, check_number
from ..io import atomic_save_safetensors, atomic_write_json, read_json, to_jsonable
from ..model import model_id
from .anchor import ANCHOR_SHARES, anchor_config
from .interpolation import INTERPOLATION_ALPHAS, interpolate_weights, parameter_state
from .lora import LoraConfig
from .projection import PROJECTION_MODES

PEERS_FORMAT = 1
PRIMARY = "over_refusal_score"
#: Every method of the plan, in running order (`PeersConfig.methods` picks a subset).
PEER_METHODS = ("full", "cast", "interp", "anchor", "lora", "projection", "bottom_layers",
                "top_layers", "act_tune", "act_skip", "cast_anchor")
#: Methods every comparison needs: the tax (full) and the method the issue is about (CAST).
REQUIRED = ("full", "cast")
INTERP_SOURCES = ("full", "cast")
FAMILIES = {"full": "full tuning", "cast": "CAST", "interp": "weight interpolation",
            "anchor": "utility anchor", "lora": "LoRA", "projection": "gradient projection",
            "bottom_layers": "layer freeze", "top_layers": "layer freeze",
            "act_tune": "activation-based heads", "act_skip": "activation-based heads",
            "cast_anchor": "composition"}
DEFAULT_LORA = ({"rank": 8, "alpha": 16.0, "components": ["q", "v"]},
                {"rank": 8, "alpha": 16.0, "components": ["q", "k", "v", "o"]})

#: Per-piece costs on SmolLM2 on one core (the v3 verdict's measured pieces, seconds): training
#: per step, a validation curve point, a test checkpoint. Projection takes two gradients per step.
PIECE_COST_S = {"train_step": 45 / 16, "curve_point": 60 / 8, "test_checkpoint": 50.0}
TRAIN_COST_FACTOR = {"projection": 2.0}
#: Data, self-reference answers, the general map, the original's evaluation and the activation
#: scores, once per run (ours: an estimate, not measured here).
SETUP_S = 600.0


def _share_label(share: float) -> str:
    return f"s{round(100 * share):d}"


def _lora_label(d: dict) -> str:
    c = LoraConfig.from_dict(d)
    alpha = "" if c.alpha == 2 * c.rank else f"_a{c.alpha:g}"
    layers = "" if c.layers is None else "_L" + "-".join(str(l) for l in c.layers)
    return f"r{c.rank}_{''.join(c.components)}{alpha}{layers}"


@dataclass
class PeersConfig:
    """Settings of a peer comparison (saved in `peers.json`; `from_dict` refuses unknown keys).

    The regime and data sizes are `verdict.VerdictConfig`'s (same meaning, same defaults), with
    `test_checkpoints` at three steps so that arms that learn safety at other rates still share a
    range of matched safety. Peer settings: `methods` (a subset of `PEER_METHODS`, "full" and
    "cast" always), `alphas` of the interpolation of each of `interp_sources`, `anchor_shares`,
    `compose_shares` (CAST + anchor), `lora` settings (`LoraConfig` fields) trained at `lora_lr`,
    `projection_modes`. `k_fraction`: CAST's budget, which the layer freezes and the activation
    arms match. `min_range_share`: the matched-safety range kept when arms are left out, as a
    share of the range full tuning and CAST share (`common_levels`).
    """

    preset: str = "peers"
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
    methods: list = field(default_factory=lambda: list(PEER_METHODS))
    alphas: list = field(default_factory=lambda: list(INTERPOLATION_ALPHAS))
    interp_sources: list = field(default_factory=lambda: list(INTERP_SOURCES))
    anchor_shares: list = field(default_factory=lambda: list(ANCHOR_SHARES))
    compose_shares: list = field(default_factory=lambda: [ANCHOR_SHARES[0]])
    lora: list = field(default_factory=lambda: [dict(d) for d in DEFAULT_LORA])
    lora_lr: float = 3e-4
    projection_modes: list = field(default_factory=lambda: ["global"])
    curve_every: int = 2
    val_dtype: str = "bfloat16"
    test_checkpoints: list = field(default_factory=lambda: [6, 11, 16])
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
    min_range_share: float = 0.5
    n_boot: int = 2000
    split_seed: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, lo in (("steps", 1), ("batch_size", 2), ("warmup_steps", 0), ("curve_every", 1),
                         ("n_val", 2), ("n_over_val", 2), ("n_benign_test", 2),
                         ("n_calibration", 2), ("n_sensitivity", 2), ("n_over_diag", 2),
                         ("n_levels", 1), ("n_boot", 100)):
            check_int(name, getattr(self, name), lo)
        for name, choices in (("precision", ("float32", "bf16")), ("scope", ("attention", "all")),
                              ("val_dtype", ("float32", "bfloat16"))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {list(choices)}, got "
                                 f"{getattr(self, name)!r}.")
        check_number("lr", self.lr, lo=0, hi=1, lo_open=True)
        check_number("lora_lr", self.lora_lr, lo=0, hi=1, lo_open=True)
        check_number("min_range_share", self.min_range_share, lo=0, hi=1)
        if not (isinstance(self.k_fraction, float) and 0 < self.k_fraction < 1):
            raise ValueError(f"k_fraction must be a fraction in (0, 1), got {self.k_fraction!r}.")
        seeds = list(self.train_seeds)
        if not seeds or len(set(seeds)) != len(seeds) or any(
                not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
            raise ValueError(f"train_seeds must be distinct ints >= 0, got {self.train_seeds!r}.")
        self.train_seeds = seeds
        bad = [m for m in self.methods if m not in PEER_METHODS]
        if bad or len(set(self.methods)) != len(self.methods) or not set(REQUIRED) <= set(
                self.methods):
            raise ValueError(f"methods must be distinct names from {list(PEER_METHODS)} including "
                             f"{list(REQUIRED)}, got {self.methods!r}.")
        self.methods = [m for m in PEER_METHODS if m in self.methods]  # running order
        alphas = [float(a) for a in self.alphas]
        if len(alphas) < 2 or len(set(alphas)) != len(alphas) or not all(
                0 < a <= 1 for a in alphas):
            raise ValueError(f"alphas must be at least 2 distinct values in (0, 1] (a = 0 is the "
                             f"untrained model, never a trained checkpoint), got {self.alphas!r}.")
        self.alphas = sorted(alphas)
        if not self.interp_sources or any(s not in INTERP_SOURCES for s in self.interp_sources) \
                or len(set(self.interp_sources)) != len(self.interp_sources):
            raise ValueError(f"interp_sources must be distinct names from {list(INTERP_SOURCES)}, "
                             f"got {self.interp_sources!r}.")
        self.interp_sources = [s for s in INTERP_SOURCES if s in self.interp_sources]
        for name in ("anchor_shares", "compose_shares"):
            shares = [float(s) for s in getattr(self, name)]
            for s in shares:
                anchor_config(self.tuning(0), s)  # one line naming a share no batch can hold
            labels = [_share_label(s) for s in shares]
            if len(set(labels)) != len(labels):
                raise ValueError(f"{name} must differ by at least 0.01, got {shares!r}.")
            setattr(self, name, shares)
        if "anchor" in self.methods and not self.anchor_shares:
            raise ValueError("methods holds 'anchor' but anchor_shares is empty.")
        if "cast_anchor" in self.methods and not self.compose_shares:
            raise ValueError("methods holds 'cast_anchor' but compose_shares is empty.")
        loras = []
        for d in self.lora:
            if not isinstance(d, dict):
                raise ValueError(f"lora must be a list of LoraConfig fields (dicts), got {d!r}.")
            loras.append(LoraConfig.from_dict(dict(d)).to_dict())
        labels = [_lora_label(d) for d in loras]
        if len(set(labels)) != len(labels) or ("lora" in self.methods and not loras):
            raise ValueError(f"lora must hold distinct LoRA settings (at least one when 'lora' is "
                             f"run), got {self.lora!r}.")
        self.lora = loras
        if any(m not in PROJECTION_MODES for m in self.projection_modes) or len(
                set(self.projection_modes)) != len(self.projection_modes) or (
                "projection" in self.methods and not self.projection_modes):
            raise ValueError(f"projection_modes must be distinct names from "
                             f"{list(PROJECTION_MODES)}, got {self.projection_modes!r}.")
        self.projection_modes = list(self.projection_modes)
        self.test_checkpoints = sorted(int(c) for c in self.test_checkpoints)
        if len(self.test_checkpoints) < 2 or len(set(self.test_checkpoints)) != len(
                self.test_checkpoints) or not all(1 <= c <= self.steps
                                                  for c in self.test_checkpoints) or \
                self.test_checkpoints[-1] != self.steps:
            raise ValueError(f"test_checkpoints must be at least 2 distinct steps in "
                             f"1..{self.steps} ending at {self.steps} (matched safety is read "
                             f"between trained checkpoints; the tax at the last step), got "
                             f"{self.test_checkpoints!r}.")
        if self.preset not in PEERS_PRESETS:
            raise ValueError(f"preset must be one of {sorted(PEERS_PRESETS)}, got "
                             f"{self.preset!r}.")

    @property
    def maps(self) -> list:
        """The conflict maps `verdict.verdict_maps` computes for this run: CAST's general map."""
        return ["general"]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PeersConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown PeersConfig field(s) {unknown}: written by another version "
                             "of cast_interp. Start a new run directory.")
        return cls(**d)

    @classmethod
    def from_preset(cls, preset: str = "peers", **overrides) -> "PeersConfig":
        if preset not in PEERS_PRESETS:
            raise ValueError(f"Unknown preset {preset!r}; choose from {sorted(PEERS_PRESETS)}.")
        unknown = sorted(set(overrides) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"Unknown PeersConfig field(s) {unknown}.")
        return cls(preset=preset, **{**PEERS_PRESETS[preset],
                                     **{k: v for k, v in overrides.items() if v is not None}})

    def tuning(self, seed: int, *, lr: Optional[float] = None):
        """The regime's `TuningConfig` for a training seed (benign share 0; `lr` for LoRA)."""
        from ..sparse_tuning import TuningConfig

        return TuningConfig(steps=self.steps, batch_size=self.batch_size,
                            lr=self.lr if lr is None else lr, schedule="constant",
                            warmup_steps=self.warmup_steps, scope=self.scope, benign_mix=0.0,
                            seed=seed, precision=self.precision)


PEERS_PRESETS: dict[str, dict[str, Any]] = {
    # Plumbing on the tiny model with the bundled data, in seconds. k = half the heads (one whole
    # layer of the tiny model), so the layer freezes match CAST's parameter count exactly.
    "smoke": {"model": "tiny", "datasets": "bundled", "steps": 4, "batch_size": 4, "lr": 1e-3,
              "lora_lr": 3e-3, "k_fraction": 0.5, "curve_every": 1, "val_dtype": "float32",
              "test_checkpoints": [2, 3, 4], "n_val": 4, "n_over_val": 4, "n_harmful_test": 8,
              "n_over_test": 8, "n_benign_test": 4, "n_calibration": 4, "n_sensitivity": 4,
              "n_over_diag": 4, "answer_tokens": 8, "n_boot": 200},
    # The comparison on SmolLM2, sized for about 2 h on 2 cores (`estimate_peers_seconds`).
    "peers": {},
}


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerPiece:
    """One piece: a method with its setting on one training seed. `setting`: the source arm of an
    interpolation ("full", "cast"), an anchor's share label ("s25"), a LoRA label ("r8_qv"), a
    projection mode ("global"); None otherwise."""

    method: str
    seed: int
    setting: Optional[str] = None

    @property
    def arm(self) -> str:
        """The arm (seeds pooled): e.g. "interp_cast", "anchor_s25", "lora_r8_qv"."""
        return self.method if self.setting is None else f"{self.method}_{self.setting}"

    @property
    def name(self) -> str:
        return f"{self.arm}_t{self.seed}"

    @property
    def trains(self) -> bool:
        return self.method != "interp"

    @property
    def source(self) -> Optional["PeerPiece"]:
        """The tuned piece an interpolation reads (None for a trained piece)."""
        return PeerPiece(self.setting, self.seed) if self.method == "interp" else None


def plan_peers(cfg: PeersConfig) -> list[PeerPiece]:
    """Every piece, in running order: full tuning and CAST first (the interpolations read their
    tuned weights), then each method's settings, seed-minor (a cut run holds whole arms)."""
    seeds = cfg.train_seeds
    settings: dict[str, list] = {
        "interp": list(cfg.interp_sources), "anchor": [_share_label(s) for s in cfg.anchor_shares],
        "cast_anchor": [_share_label(s) for s in cfg.compose_shares],
        "lora": [_lora_label(d) for d in cfg.lora], "projection": list(cfg.projection_modes)}
    out = []
    for m in cfg.methods:
        for s in settings.get(m, [None]):
            out += [PeerPiece(m, t, s) for t in seeds]
    return out


def arm_label(arm: str) -> str:
    """A readable name of an arm: "CAST + interpolation", "LoRA r8 on Q,V", ..."""
    if arm == "full":
        return "full tuning"
    if arm == "cast":
        return "CAST (general map)"
    if arm == "interp_full":
        return "interpolation of full tuning"
    if arm == "interp_cast":
        return "CAST + interpolation"
    for prefix, text in (("cast_anchor_s", "CAST + anchor (share {})"),
                         ("anchor_s", "utility anchor (share {})")):
        if arm.startswith(prefix):
            return text.format(f"{int(arm[len(prefix):]) / 100:g}")
    if arm.startswith("lora_r"):
        parts = arm[len("lora_r"):].split("_")
        extra = f", {' '.join(parts[2:])}" if len(parts) > 2 else ""
        return f"LoRA r{parts[0]} on {','.join(parts[1].upper())}{extra}"
    if arm.startswith("projection_"):
        return f"gradient projection ({arm[len('projection_'):]})"
    return {"bottom_layers": "bottom layers frozen", "top_layers": "top layers frozen",
            "act_tune": "tune only top-k by activation shift",
            "act_skip": "skip top-k by activation shift"}.get(arm, arm)


def arm_family(arm: str) -> str:
    """The method family of an arm (for the table): "weight interpolation", "composition", ..."""
    if arm == "interp_cast":
        return "composition"
    for m in sorted(PEER_METHODS, key=len, reverse=True):
        if arm == m or arm.startswith(m + "_"):
            return FAMILIES[m]
    return arm


def estimate_peers_seconds(cfg: PeersConfig, *, n_cores: int = 2) -> dict:
    """The run's cost from `PIECE_COST_S` (SmolLM2, one core per piece; `n_cores` workers share
    the pieces): {"n_pieces", "n_trained", "n_interp", "core_s" (pieces), "wall_s" (setup + pieces
    / n_cores), "per_method_s": {method: core seconds of one piece}}. Interpolation pieces evaluate
    every a on both splits and train nothing."""
    check_int("n_cores", n_cores, 1)
    c = PIECE_COST_S
    n_curve = len({s for s in range(1, cfg.steps + 1)
                   if s % cfg.curve_every == 0 or s == cfg.steps})
    evals = n_curve * c["curve_point"] + len(cfg.test_checkpoints) * c["test_checkpoint"]
    per = {}
    for m in cfg.methods:
        if m == "interp":
            per[m] = len(cfg.alphas) * (c["curve_point"] + c["test_checkpoint"])
        else:
            per[m] = cfg.steps * c["train_step"] * TRAIN_COST_FACTOR.get(m, 1.0) + evals
    plan = plan_peers(cfg)
    core = float(sum(per[p.method] for p in plan))
    return {"n_pieces": len(plan), "n_trained": sum(p.trains for p in plan),
            "n_interp": sum(not p.trains for p in plan), "core_s": core,
            "wall_s": SETUP_S + core / n_cores, "per_method_s": per, "n_cores": n_cores}


# --------------------------------------------------------------------------------------------------
# Running one piece
# --------------------------------------------------------------------------------------------------


def _restore(model: Model, original: dict) -> None:
    """Every parameter back to its original value (buffers never change in training)."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(original[n].to(p.device, p.dtype))


def _setting_value(cfg: PeersConfig, piece: PeerPiece) -> Any:
    if piece.method in ("anchor", "cast_anchor"):
        shares = cfg.anchor_shares if piece.method == "anchor" else cfg.compose_shares
        return next(s for s in shares if _share_label(s) == piece.setting)
    if piece.method == "lora":
        return next(d for d in cfg.lora if _lora_label(d) == piece.setting)
    return piece.setting


def piece_units(piece: PeerPiece, cast_units: list, k: int, model: Model,
                act_scores: Optional[torch.Tensor]) -> list[tuple[int, int]]:
    """The query heads a piece freezes (none for full tuning, interpolation, anchor, LoRA and
    projection; CAST's for CAST and CAST + anchor)."""
    from ..registry.arms import select_arm_units
    from .activation import activation_arm_units

    m = piece.method
    if m in ("cast", "cast_anchor"):
        return [tuple(u) for u in cast_units]
    if m in ("bottom_layers", "top_layers"):
        return select_arm_units(m, None, k, model=model)
    if m in ("act_tune", "act_skip"):
        if act_scores is None:
            raise ValueError(f"{piece.name} needs the activation scores (run_peers computes them).")
        return activation_arm_units(m, act_scores, k, model=model)
    return []


def run_peer_piece(model: Model, piece: PeerPiece, units: list, cfg: PeersConfig, data, curve,
                   test, anchor, *, progress: bool = False) -> dict:
    """Train one piece from the weights `model` holds (the original) and record its checkpoints as
    `verdict.run_piece` does: {"val": {step: {metric: [n]}}, "test": {step: ...}, "budget",
    "n_trainable", "losses", "train_time_s", "curve_time_s", "test_time_s", "wall_time_s", "peer"}.
    `anchor`: benign prompts with the model's own answers (anchor and projection)."""
    from ..sparse_tuning import parameter_budget, safety_finetune
    from .anchor import anchor_finetune
    from .lora import lora_finetune
    from .projection import projected_finetune

    if not piece.trains:
        raise ValueError(f"{piece.name} trains nothing: run it with run_interp_piece.")
    val, tst = {}, {}
    t_val, t_test = [0.0], [0.0]

    def on_step(step: int, loss: float) -> None:
        done = step + 1
        if done % cfg.curve_every == 0 or done == cfg.steps:
            t = time.perf_counter()
            val[done] = curve(model)
            t_val[0] += time.perf_counter() - t
        if done in cfg.test_checkpoints:
            t = time.perf_counter()
            tst[done] = test(model)
            t_test[0] += time.perf_counter() - t

    tcfg = cfg.tuning(piece.seed)
    m, value = piece.method, _setting_value(cfg, piece)
    t0 = time.perf_counter()
    if m in ("anchor", "cast_anchor"):
        res = anchor_finetune(model, data.safety_train, anchor, share=value, skip_heads=units,
                              config=tcfg, on_step=on_step)
    elif m == "lora":
        res, _ = lora_finetune(model, data.safety_train, lora=LoraConfig.from_dict(dict(value)),
                               config=cfg.tuning(piece.seed, lr=cfg.lora_lr), on_step=on_step)
    elif m == "projection":
        res = projected_finetune(model, data.safety_train, anchor, mode=value, skip_heads=units,
                                 config=tcfg, on_step=on_step)
    else:
        res = safety_finetune(model, data.safety_train, skip_heads=units, config=tcfg,
                              on_step=on_step)
    total = time.perf_counter() - t0
    peer = res.config.get("peer")
    budget = dict(peer["budget"]) if peer else parameter_budget(model, units, scope=cfg.scope)
    budget["n_trainable"] = int(res.n_trainable)
    if progress:
        v = val[cfg.steps]
        print(f"[peers] {piece.name}: refusal {np.mean(v['refusal_score']):+.2f} over-refusal "
              f"{np.mean(v[PRIMARY]):+.2f} (train {total - t_val[0] - t_test[0]:.0f} s, curves "
              f"{t_val[0]:.0f} s, test {t_test[0]:.0f} s)", flush=True)
    peer_rec = None
    if peer:
        peer_rec = {k: v for k, v in peer.items() if k not in ("budget",)}
    return {"piece": asdict(piece), "name": piece.name, "arm": piece.arm,
            "family": arm_family(piece.arm), "skip": [list(u) for u in units],
            "n_trainable": int(res.n_trainable), "budget": budget, "losses": res.losses,
            "lr": res.config["lr"], "peer": peer_rec,
            "val": {str(k): v for k, v in val.items()}, "test": {str(k): v for k, v in tst.items()},
            "train_time_s": total - t_val[0] - t_test[0], "curve_time_s": t_val[0],
            "test_time_s": t_test[0], "wall_time_s": total}


def run_interp_piece(model: Model, piece: PeerPiece, cfg: PeersConfig, original: dict,
                     tuned: dict, source: dict, curve, test, *, progress: bool = False) -> dict:
    """Evaluate theta(a) of a tuned piece at every a of `cfg.alphas` (no training), both splits:
    {"val": {a: {metric: [n]}}, "test": {a: ...}, "alphas", "source", "budget" (the source's),
    "n_changed", "eval_time_s", "wall_time_s"}. `original`, `tuned`: `parameter_state`s (the
    tuned one may hold only the parameters that changed); `source`: the tuned piece's record."""
    if piece.trains:
        raise ValueError(f"{piece.name} is a trained piece: run it with run_peer_piece.")
    val, tst, changed = {}, {}, None
    t_val = t_test = 0.0
    t0 = time.perf_counter()
    for a in cfg.alphas:
        info = interpolate_weights(model, original, tuned, a)
        changed = info["n_changed"]
        t = time.perf_counter()
        val[f"{a:g}"] = curve(model)
        t_val += time.perf_counter() - t
        t = time.perf_counter()
        tst[f"{a:g}"] = test(model)
        t_test += time.perf_counter() - t
    total = time.perf_counter() - t0
    if progress:
        v = val[f"{cfg.alphas[-1]:g}"]
        print(f"[peers] {piece.name}: at a={cfg.alphas[-1]:g} refusal "
              f"{np.mean(v['refusal_score']):+.2f} over-refusal {np.mean(v[PRIMARY]):+.2f} "
              f"({len(cfg.alphas)} points, curves {t_val:.0f} s, test {t_test:.0f} s)", flush=True)
    return {"piece": asdict(piece), "name": piece.name, "arm": piece.arm,
            "family": arm_family(piece.arm), "source": source["name"], "alphas": list(cfg.alphas),
            "skip": source["skip"], "n_trainable": source["n_trainable"],
            "budget": {**source["budget"], "n_changed": changed}, "losses": [], "lr": source["lr"],
            "peer": {"method": "weight_interpolation", "formula": "(1 - a) theta_original + a "
                     "theta_tuned", "alphas": list(cfg.alphas)},
            "val": val, "test": tst, "train_time_s": 0.0, "curve_time_s": t_val,
            "test_time_s": t_test, "wall_time_s": total,
            "source_train_time_s": source["train_time_s"]}


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def _activation_scores(model: Model, data, out: Path, progress: bool) -> torch.Tensor:
    """`head_activation_shift(model, data.safety_cal, data.benign_diag)`, computed once into
    `out/activation_shift.json` (re-used while the prompts and model match)."""
    from ..verdict import _key
    from .activation import head_activation_shift

    key = _key({"harmful": data.safety_cal.fingerprint(),
                "harmless": data.benign_diag.fingerprint(), "model": model_id(model)})
    f = out / "activation_shift.json"
    if f.exists():
        rec = read_json(f)
        if rec.get("key") == key:
            return torch.tensor(rec["scores"], dtype=torch.float32)
    if progress:
        print(f"[peers] activation shift: {len(data.safety_cal)} harmful vs "
              f"{len(data.benign_diag)} harmless prompts", flush=True)
    s = head_activation_shift(model, data.safety_cal, data.benign_diag)
    atomic_write_json({"key": key, "scores": s.tolist(), "harmful": data.safety_cal.describe(),
                       "harmless": data.benign_diag.describe(), "normalize": "pooled_sd",
                       "space": "result"}, f)
    return s


def _state_key(path: Path) -> Optional[str]:
    """The key a saved tuned state was written with (None when there is no such file)."""
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("key", "null"))


def _load_state(path: Path, key: str) -> dict:
    """The tuned parameters saved for interpolation `{name: tensor}` (checked against `key`)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        if json.loads((f.metadata() or {}).get("key", "null")) != key:
            raise ValueError(f"{path} holds the tuned weights of another run of that piece; delete "
                             "it and its piece file to train the piece again.")
        return {k: f.get_tensor(k) for k in f.keys()}


def run_peers(model: Model, cfg: PeersConfig, out_dir: Union[str, Path], *,
              progress: bool = True, max_pieces: Optional[int] = None,
              poll_s: float = 5.0) -> dict:
    """Run (or resume) the peer comparison into `out_dir`; returns `summarize_peers`'s summary.

    Files: `peers.json` (config, data, model, versions), `diagnosis/general/` (CAST's map),
    `activation_shift.json`, `original.json` (the untrained model on both splits),
    `pieces/<name>.json` (one per finished piece, written atomically with its key), and
    `states/<name>.safetensors` (the tuned parameters of full tuning and CAST that an
    interpolation piece reads; float32, only those that changed). A finished piece with the same
    key is skipped on resume; a different config or data in `out_dir` is an error (nothing is
    changed). `max_pieces` stops after that many newly run pieces. Several processes may share
    the folder (one per core): each claims a piece (`verdict._claim`) and skips pieces another
    live process holds; an interpolation whose source another process is still training waits
    for it (polling every `poll_s` seconds) after the rest of the plan.
    """
    from ..io import check_out_dir
    from ..sparse_tuning import k_from_fraction
    from ..verdict import (CurveEvaluator, _claim, _key, _versions, test_evaluator, verdict_data,
                           verdict_maps)

    if not isinstance(cfg, PeersConfig):
        raise TypeError(f"cfg must be a PeersConfig, got {type(cfg).__name__}.")
    check_int("max_pieces", max_pieces, 0, none_ok=True)
    check_number("poll_s", poll_s, lo=0)
    out = Path(out_dir)
    check_out_dir(out)
    if (out / "verdict.json").exists():
        raise ValueError(f"{out} holds a verdict run (verdict.json): give the peer comparison its "
                         "own directory (nothing was changed).")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = verdict_data(model, cfg, out)
    meta = {"format": PEERS_FORMAT, "config": cfg.to_dict(), "data": data.describe(),
            "model": model_id(model), "versions": _versions(), "primary": PRIMARY}
    meta = json.loads(json.dumps(to_jsonable(meta)))
    f = out / "peers.json"
    if f.exists():
        old = read_json(f)
        if old.get("config") != meta["config"] or old.get("data") != meta["data"]:
            raise ValueError(f"{out} holds a peer comparison with another config or data; use a "
                             "new directory (nothing was changed).")
    else:
        atomic_write_json(meta, f)
    timings = read_json(out / "timings.json") if (out / "timings.json").exists() else {}
    timings.setdefault("data_s", time.perf_counter() - t0)

    t = time.perf_counter()
    maps = verdict_maps(model, cfg, data, out, progress)
    timings.setdefault("diagnosis_s", time.perf_counter() - t)
    pieces = plan_peers(cfg)
    act = None
    if any(p.method in ("act_tune", "act_skip") for p in pieces):
        t = time.perf_counter()
        act = _activation_scores(model, data, out, progress)
        timings.setdefault("activation_s", time.perf_counter() - t)
    original = parameter_state(model)
    curve = CurveEvaluator(data, dtype=cfg.val_dtype)
    test = test_evaluator(model, data)
    if not (out / "original.json").exists():
        t = time.perf_counter()
        atomic_write_json({"val": curve(model), "test": test(model),
                           "time_s": time.perf_counter() - t}, out / "original.json")
    atomic_write_json(timings, out / "timings.json")

    from ..registry.arms import select_arm_units

    k = k_from_fraction(cfg.k_fraction, model.cfg.n_layers * model.cfg.n_heads)
    cast_units = select_arm_units("cast", maps["general"], k, model=model)
    anchor = data.benign_diag
    units = {p.name: piece_units(p, cast_units, k, model, act) for p in pieces}
    keys: dict[str, str] = {}
    for p in pieces:  # sources come first in the plan
        if p.trains:
            tcfg = cfg.tuning(p.seed, lr=cfg.lora_lr if p.method == "lora" else None)
            keys[p.name] = _key({"method": p.method, "setting": _setting_value(cfg, p),
                                 "tuning": tcfg.to_dict(), "units": units[p.name],
                                 "data": meta["data"], "curve": [cfg.curve_every, cfg.val_dtype],
                                 "test": cfg.test_checkpoints, "model": meta["model"]})
        else:
            keys[p.name] = _key({"method": "interp", "source": keys[p.source.name],
                                 "alphas": cfg.alphas, "curve": cfg.val_dtype})
    dependents = {s: [p.name for p in pieces if p.source is not None and p.source.name == s]
                  for s in keys}
    path_of = {p.name: out / "pieces" / f"{p.name}.json" for p in pieces}
    state_of = {s: out / "states" / f"{s}.safetensors" for s in keys}

    def finished(name: str) -> bool:
        path = path_of[name]
        return path.exists() and read_json(path).get("key") == keys[name]

    def done(name: str) -> bool:
        if not finished(name):
            return False
        waiting = [d for d in dependents[name] if not finished(d)]
        return not waiting or _state_key(state_of[name]) == keys[name]

    trained = 0
    while True:
        ran, blocked = False, False
        for i, piece in enumerate(pieces):
            if done(piece.name):
                continue
            src = piece.source
            if src is not None and not (finished(src.name) and
                                        _state_key(state_of[src.name]) == keys[src.name]):
                blocked = True  # its source is not trained yet (maybe by another process)
                continue
            if max_pieces is not None and trained >= max_pieces:
                _restore(model, original)
                return summarize_peers(out, write=True)
            claim = _claim(path_of[piece.name].with_suffix(".claim"))
            if claim is None:  # another worker on this folder is running it
                continue
            try:
                if progress:
                    print(f"[peers] piece {i + 1}/{len(pieces)} {piece.name}", flush=True)
                _restore(model, original)
                if src is None:
                    rec = run_peer_piece(model, piece, units[piece.name], cfg, data, curve, test,
                                         anchor, progress=progress)
                    if dependents[piece.name]:
                        changed = {n: p.detach().clone() for n, p in model.named_parameters()
                                   if not torch.equal(p, original[n])}
                        atomic_save_safetensors(changed, state_of[piece.name],
                                                metadata={"key": keys[piece.name],
                                                          "piece": piece.name})
                else:
                    tuned = _load_state(state_of[src.name], keys[src.name])
                    rec = run_interp_piece(model, piece, cfg, original, tuned,
                                           read_json(path_of[src.name]), curve, test,
                                           progress=progress)
                atomic_write_json({"key": keys[piece.name], **rec}, path_of[piece.name])
            finally:
                claim.unlink(missing_ok=True)
            trained += 1
            ran = True
        if not blocked:
            break
        if not ran:  # every piece left waits for a source another live worker is training
            time.sleep(poll_s)
    _restore(model, original)
    return summarize_peers(out, write=True)


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------


def piece_curve(piece: dict, original: dict, metric: str = PRIMARY, split: str = "test") -> dict:
    """A piece's curve on `split`: "x" (steps, or a for an interpolation), mean safety (refusal
    score), and per-prompt cost of `metric` (tuned - original) `[n_points, n_prompts]`."""
    rec = piece[split]
    xs = sorted(rec, key=float)
    base = np.asarray(original[split][metric], float)
    return {"steps": [float(x) for x in xs],
            "safety": [float(np.mean(rec[x]["refusal_score"])) for x in xs],
            "cost": np.stack([np.asarray(rec[x][metric], float) - base for x in xs])}


def common_levels(curves: dict, arm_of: dict, *, n_levels: int = 3,
                  protected: Sequence[str] = REQUIRED, min_range_share: float = 0.0) -> dict:
    """Safety levels common to the pieces' curves (`inference.matched_safety_levels`) of the
    largest set of arms that share a wide enough range, the others left out by name.

    curves: {piece name: {"steps", "safety"}}; arm_of: {piece name: arm}. An arm can be read on
    [its pieces' highest first-checkpoint safety, their lowest best safety]. Kept (ours): every
    arm of `protected` (full tuning and CAST) and as many others as possible whose ranges share a
    common range at least `min_range_share` of the one the protected arms share (so that one arm
    that barely reaches it does not shrink the comparison to a point); ties go to the widest
    common range. An arm that learns too little or too fast leaves itself out, not the others.
    With no range common to the protected arms there is no level.
    Returns matched_safety_levels' dict over the kept arms' pieces plus "arms" (kept),
    "excluded": [{"arm", "reason"}], "ranges": {arm: [low, high]} and "min_range_share".
    """
    from ..inference import matched_safety_levels

    check_number("min_range_share", min_range_share, lo=0, hi=1)
    by_arm: dict[str, dict] = {}
    for n, c in curves.items():
        by_arm.setdefault(arm_of[n], {})[n] = (c["steps"], c["safety"])
    ranges, excluded = {}, []
    for a, cs in by_arm.items():
        lv = matched_safety_levels(cs, n_levels=1)
        if lv["levels"]:
            ranges[a] = (float(lv["low"]), float(lv["high"]))
        else:
            excluded.append({"arm": a,
                             "reason": f"its seeds share no safety range ({lv['reason']})"})
    must = [a for a in protected if a in by_arm]
    none = {"levels": [], "low": math.nan, "high": math.nan, "low_set_by": None,
            "high_set_by": None, "arms": [], "excluded": excluded,
            "ranges": {a: list(r) for a, r in ranges.items()}, "min_range_share": min_range_share}
    if not ranges or any(a not in ranges for a in must):
        return {**none, "reason": "full tuning or CAST has no safety range of its own" if must
                else "no curve to read"}
    lo_m = max((ranges[a][0] for a in must), default=-math.inf)
    hi_m = min((ranges[a][1] for a in must), default=math.inf)
    if must and lo_m > hi_m:
        lo_a = max(must, key=lambda a: ranges[a][0])
        hi_a = min(must, key=lambda a: ranges[a][1])
        return {**none, "low": lo_m, "high": hi_m, "low_set_by": lo_a, "high_set_by": hi_a,
                "reason": f"{lo_a} starts at {lo_m:.4g}, past the best of {hi_a}, {hi_m:.4g}: "
                          "no level common to full tuning and CAST"}
    need = min_range_share * (hi_m - lo_m) if must else 0.0
    best = None
    for lo in sorted({r[0] for r in ranges.values()}):
        for hi in sorted({r[1] for r in ranges.values()}):
            if hi < lo:
                continue
            kept = [a for a, (l, h) in ranges.items() if l <= lo and h >= hi]
            if not kept or not all(a in kept for a in must):
                continue
            width = min(ranges[a][1] for a in kept) - max(ranges[a][0] for a in kept)
            if width < need:
                continue
            score = (len(kept), width)
            if best is None or score > best[0]:
                best = (score, kept)
    kept = [a for a in by_arm if a in best[1]]  # must alone always qualifies
    lv = matched_safety_levels({n: c for a in kept for n, c in by_arm[a].items()},
                               n_levels=n_levels)
    for a, (lo, hi) in ranges.items():
        if a in kept:
            continue
        if hi < lv["high"] and lo <= lv["low"]:
            why = f"its best safety {hi:.4g} is below the common range's top {lv['high']:.4g}"
        elif lo > lv["low"] and hi >= lv["high"]:
            why = (f"its first checkpoint's safety {lo:.4g} is above the common range's bottom "
                   f"{lv['low']:.4g}")
        else:
            why = f"it covers [{lo:.4g}, {hi:.4g}], not the whole common range"
        excluded.append({"arm": a, "reason": f"{why} ([{lv['low']:.4g}, {lv['high']:.4g}], "
                                             f"shared by {len(kept)} arms)"})
    return {**lv, "arms": kept, "excluded": excluded,
            "ranges": {a: list(r) for a, r in ranges.items()}, "min_range_share": min_range_share}


def best_method(grids: dict, *, n_boot: int = 2000, seed: int = 0,
                label: Callable[[str], str] = arm_label) -> dict:
    """Which arm has the lowest cost, and by how much.

    grids: {arm: per-prompt cost at matched safety `[n_seeds, n_prompts]`} (paired: same seeds
    and prompts). Returns {"best", "runner_up", "ranking" (arms by mean cost), "vs_runner_up"
    (`paired_difference(best, runner_up)`), "tied" (arms whose difference from the best has a CI
    that includes 0), "statement"}.
    """
    from ..stats import paired_difference

    if len(grids) < 2:
        raise ValueError(f"best_method needs at least 2 arms with a matched cost, got "
                         f"{sorted(grids)}.")
    ranking = sorted(grids, key=lambda a: float(np.mean(grids[a])))
    best, second = ranking[0], ranking[1]
    diffs = {a: paired_difference(grids[best], grids[a], n_boot=n_boot, seed=seed,
                                  names=(label(best), label(a))) for a in ranking[1:]}
    d = diffs[second]
    tied = [a for a in ranking[1:] if not diffs[a]["significant"]]
    mean = float(np.mean(grids[best]))
    if d["significant"]:
        text = (f"{label(best)} has the lowest over-refusal cost at matched safety "
                f"({mean:+.3f} nats), lower than the runner-up, {label(second)}, by "
                f"{-d['diff']:.3f} nats [95% CI {-d['high']:.3f}, {-d['low']:.3f}]")
    else:
        from ..inference import no_difference_text

        text = (f"{label(best)} has the lowest mean over-refusal cost at matched safety "
                f"({mean:+.3f} nats), but against the runner-up, {label(second)} "
                f"({d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]): "
                f"{no_difference_text(d['low'], d['high'], unit='nats')}")
    if tied:
        text += f"; statistically tied with the best: {', '.join(label(a) for a in tied)}"
    return {"best": best, "runner_up": second, "ranking": ranking, "vs_runner_up": d,
            "vs_best": diffs, "tied": tied, "statement": text + "."}


def summarize_peers(out_dir: Union[str, Path], *, write: bool = True) -> dict:
    """The comparison's numbers from its files: the tax of full tuning, the common matched-safety
    levels (and the arms left out), per arm the primary cost at matched safety (CI over seeds and
    prompts), arm - full and CAST - arm, the best arm, the compositions against their baselines,
    the interpolation's a = 1 check, budgets, times and the curves for the Pareto figure.
    Written to `summary.json` when `write`."""
    from ..stats import paired_difference
    from ..verdict import _at_levels, _load_pieces

    out = Path(out_dir)
    if not (out / "peers.json").exists():
        raise FileNotFoundError(f"{out} holds no peer comparison (no peers.json): run run_peers "
                                "first.")
    meta, original = read_json(out / "peers.json"), read_json(out / "original.json")
    cfg = PeersConfig.from_dict(meta["config"])
    plan = plan_peers(cfg)
    pieces = _load_pieces(out)
    pieces = {p.name: pieces[p.name] for p in plan if p.name in pieces}
    seeds = cfg.train_seeds
    arms = list(dict.fromkeys(p.arm for p in plan))
    arm_of = {p.name: p.arm for p in plan}
    summary: dict[str, Any] = {"config": meta["config"], "model": meta["model"],
                               "versions": meta["versions"], "data": meta["data"],
                               "n_pieces": len(pieces), "n_planned": len(plan),
                               "primary": PRIMARY, "arms": arms,
                               "labels": {a: arm_label(a) for a in arms},
                               "families": {a: arm_family(a) for a in arms},
                               "estimate": estimate_peers_seconds(cfg)}
    boot = {"n_boot": cfg.n_boot, "seed": cfg.seed}

    # 1. The tax: full tuning at its last step against the original, per prompt, over seeds.
    full = [pieces[f"full_t{s}"] for s in seeds if f"full_t{s}" in pieces]
    last = str(cfg.steps)
    tax = {}
    if full:
        for metric in (PRIMARY, "refusal_score", "kl", "nll"):
            a = np.stack([np.asarray(p["test"][last][metric], float) for p in full])
            b = np.broadcast_to(np.asarray(original["test"][metric], float), a.shape)
            keep = np.isfinite(a).all(0) & np.isfinite(b).all(0)
            tax[metric] = paired_difference(a[:, keep], np.array(b[:, keep]), **boot,
                                            names=("full tuning", "original"))
    summary["tax"] = tax

    # 2. Matched safety: levels common to the arms' test curves (interpolation: along a).
    curves = {n: piece_curve(p, original) for n, p in pieces.items()}
    levels = common_levels(curves, arm_of, n_levels=cfg.n_levels,
                           min_range_share=cfg.min_range_share) if curves else {
        "levels": [], "reason": "no finished piece", "excluded": [], "arms": []}
    summary["levels"] = levels
    L = levels["levels"]
    kept = set(levels.get("arms", []))
    matched = {n: _at_levels(c, L)[0].mean(0) for n, c in curves.items()
               if L and arm_of[n] in kept}
    kl_matched = {n: _at_levels(piece_curve(pieces[n], original, "kl"), L)[0].mean(0)
                  for n in matched}

    def grid(arm: str, values: dict) -> Optional[np.ndarray]:
        rows = [values.get(f"{arm}_t{s}") for s in seeds]
        if any(r is None for r in rows):
            return None
        g = np.stack(rows)
        return g if np.isfinite(g).all() else None

    grids = {a: g for a in arms if (g := grid(a, matched)) is not None}
    methods: dict[str, dict] = {}
    for a in arms:
        ps = [pieces[f"{a}_t{s}"] for s in seeds if f"{a}_t{s}" in pieces]
        row: dict[str, Any] = {"label": arm_label(a), "family": arm_family(a),
                               "n_pieces": len(ps), "complete": len(ps) == len(seeds)}
        if ps:
            row["budget"] = ps[0]["budget"]
            row["n_trainable"] = ps[0]["n_trainable"]
            row["lr"] = ps[0]["lr"]
            row["train_time_s"] = float(np.mean([p["train_time_s"] for p in ps]))
            row["wall_time_s"] = float(np.mean([p["wall_time_s"] for p in ps]))
            if "source_train_time_s" in ps[0]:
                row["source_train_time_s"] = float(np.mean([p["source_train_time_s"]
                                                            for p in ps]))
        ex = next((e for e in levels.get("excluded", []) if e["arm"] == a), None)
        if ex:
            row["excluded"] = ex["reason"]
        g = grids.get(a)
        if g is not None:
            zero = np.zeros_like(g)
            row["cost"] = paired_difference(g, zero, **boot, names=(arm_label(a), "original"))
            kg = grid(a, kl_matched)
            if kg is not None:
                row["kl_cost"] = paired_difference(kg, np.zeros_like(kg), **boot,
                                                   names=(arm_label(a), "original"))
            if a != "full" and "full" in grids:
                row["vs_full"] = paired_difference(g, grids["full"], **boot,
                                                   names=(arm_label(a), "full tuning"))
            if a != "cast" and "cast" in grids:
                row["cast_minus"] = paired_difference(grids["cast"], g, **boot,
                                                      names=("CAST", arm_label(a)))
        elif ps and L and not ex:
            row["note"] = ("not every seed finished" if len(ps) < len(seeds) else
                           "not readable at every level")
        methods[a] = row
    summary["methods"] = methods
    summary["best"] = best_method(grids, **boot) if len(grids) >= 2 else None

    # 3. Compositions: does head skipping add anything to a baseline?
    comps = {}
    pairs = [("interp_cast", "interp_full")] + [
        (f"cast_anchor_{_share_label(s)}", f"anchor_{_share_label(s)}") for s in cfg.compose_shares]
    for a, b in pairs:
        if a in grids and b in grids:
            comps[f"{a}_vs_{b}"] = paired_difference(grids[a], grids[b], **boot,
                                                     names=(arm_label(a), arm_label(b)))
    summary["compositions"] = comps

    # 4. The interpolation at a = 1 against its source's last test checkpoint (same weights).
    checks = {}
    for p in plan:
        if p.trains or p.name not in pieces or p.source.name not in pieces or "1" not in \
                pieces[p.name]["test"]:
            continue
        at1, src = pieces[p.name]["test"]["1"], pieces[p.source.name]["test"][last]
        checks[p.name] = max(float(np.max(np.abs(np.asarray(at1[m], float) -
                                                 np.asarray(src[m], float)))) for m in src)
    summary["interpolation_check"] = checks

    # 5. Curves per arm (means over seeds) for the Pareto figure: test and validation.
    base_safety = {sp: float(np.mean(original[sp]["refusal_score"])) for sp in ("val", "test")}
    pareto: dict[str, dict] = {}
    for a in arms:
        ps = [pieces[f"{a}_t{s}"] for s in seeds if f"{a}_t{s}" in pieces]
        if not ps:
            continue
        entry = {"along": "a" if ps[0]["piece"]["method"] == "interp" else "step",
                 "n_seeds": len(ps)}
        for sp in ("test", "val"):
            cs = [piece_curve(p, original, split=sp) for p in ps]
            n = min(len(c["steps"]) for c in cs)
            entry[sp] = {"x": cs[0]["steps"][:n],
                         "safety_gain": [float(np.mean([c["safety"][j] for c in cs])) -
                                         base_safety[sp] for j in range(n)],
                         "cost": [float(np.mean([c["cost"][j].mean() for c in cs]))
                                  for j in range(n)]}
        pareto[a] = entry
    summary["pareto"] = pareto
    summary["original_safety"] = base_safety
    summary["matched_cost"] = {n: float(np.nanmean(v)) for n, v in matched.items()}
    tm = read_json(out / "timings.json") if (out / "timings.json").exists() else {}
    summary["times"] = {**tm, "original_s": original.get("time_s"),
                        "pieces_s": float(sum(p["wall_time_s"] for p in pieces.values()))}
    summary = json.loads(json.dumps(to_jsonable(summary)))
    if write:
        atomic_write_json(summary, out / "summary.json")
    return summary
