"""The peer comparison (issue 25): which way of lowering the alignment tax wins at matched safety.

This module holds its design (`PeersConfig`, the plan, the arms' names, the cost model);
`run.py` runs it (`run_peers`), `summary.py` reads it (`summarize_peers`).

Every peer method runs as a piece of the v3 harness (`harness.py`, shared with `verdict.py`):
the same regime (pure safety SFT of attention, constant lr after warmup, bf16 steps), the same
data splits, the same training seeds, the same validation curves every `curve_every` steps
(`CurveEvaluator`) and the same test checkpoints (`test_evaluator`) recorded from `on_step`.
The arms:

- ``full``: full tuning (the tax itself); ``cast``: CAST, the top-k heads of the general map
  (`harness.conflict_maps`) frozen;
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

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from ..checks import check_int, check_number
from ..harness import RegimeSettings
from .anchor import ANCHOR_SHARES, anchor_config
from .interpolation import INTERPOLATION_ALPHAS
from .lora import LoraConfig
from .projection import PROJECTION_MODES

PEERS_FORMAT = 1
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

#: Gradients per training step, where not 1 (projection takes two).
TRAIN_COST_FACTOR = {"projection": 2.0}


def _share_label(share: float) -> str:
    return f"s{round(100 * share):d}"


def _lora_label(d: dict) -> str:
    c = LoraConfig.from_dict(d)
    alpha = "" if c.alpha == 2 * c.rank else f"_a{c.alpha:g}"
    layers = "" if c.layers is None else "_L" + "-".join(str(l) for l in c.layers)
    return f"r{c.rank}_{''.join(c.components)}{alpha}{layers}"


@dataclass
class PeersConfig(RegimeSettings):
    """Settings of a peer comparison (saved in `peers.json`): `harness.RegimeSettings` (the v3
    regime and data sizes, as the verdict's), with `test_checkpoints` at three steps ending at the
    last, so that arms that learn safety at other rates still share a range of matched safety.

    Peer settings: `methods` (a subset of `PEER_METHODS`, "full" and "cast" always), `alphas` of
    the interpolation of each of `interp_sources`, `anchor_shares`, `compose_shares` (CAST +
    anchor), `lora` settings (`LoraConfig` fields) trained at `lora_lr`, `projection_modes`.
    `k_fraction`: CAST's budget, which the layer freezes and the activation arms match.
    `min_range_share`: the matched-safety range kept when arms are left out, as a share of the
    range full tuning and CAST share (`common_levels`).
    """

    KIND: ClassVar[str] = "peers"

    preset: str = "peers"
    test_checkpoints: list = field(default_factory=lambda: [6, 11, 16])
    methods: list = field(default_factory=lambda: list(PEER_METHODS))
    alphas: list = field(default_factory=lambda: list(INTERPOLATION_ALPHAS))
    interp_sources: list = field(default_factory=lambda: list(INTERP_SOURCES))
    anchor_shares: list = field(default_factory=lambda: list(ANCHOR_SHARES))
    compose_shares: list = field(default_factory=lambda: [ANCHOR_SHARES[0]])
    lora: list = field(default_factory=lambda: [dict(d) for d in DEFAULT_LORA])
    lora_lr: float = 3e-4
    projection_modes: list = field(default_factory=lambda: ["global"])
    min_range_share: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("batch_size", self.batch_size, 2)
        check_number("lora_lr", self.lora_lr, lo=0, hi=1, lo_open=True)
        check_number("min_range_share", self.min_range_share, lo=0, hi=1)
        if self.test_checkpoints[-1] != self.steps:
            raise ValueError(f"test_checkpoints must end at the last step {self.steps} (the tax "
                             f"is read there), got {self.test_checkpoints!r}.")
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

    @property
    def maps(self) -> list:
        """The conflict maps `harness.conflict_maps` computes for this run: CAST's general map."""
        return ["general"]


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
PeersConfig.PRESETS = PEERS_PRESETS


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
    """The run's cost from `harness.PIECE_COST_S` (SmolLM2, one core per piece; `n_cores` workers
    share the pieces): {"n_pieces", "n_trained", "n_interp", "core_s" (pieces), "setup_s" (data,
    the maps, the original's evaluation; the activation scores are not counted), "wall_s" (setup
    + pieces / n_cores), "per_method_s": {method: core seconds of one piece}}. Interpolation
    pieces evaluate every a on both splits and train nothing."""
    from ..harness import PIECE_COST_S, piece_seconds, setup_seconds

    check_int("n_cores", n_cores, 1)
    c = PIECE_COST_S
    per = {}
    for m in cfg.methods:
        if m == "interp":
            per[m] = len(cfg.alphas) * (c["curve_point"] + c["test_checkpoint"])
        else:
            per[m] = piece_seconds(cfg, train_factor=TRAIN_COST_FACTOR.get(m, 1.0))["total"]
    plan = plan_peers(cfg)
    core = float(sum(per[p.method] for p in plan))
    setup = setup_seconds(cfg)
    return {"n_pieces": len(plan), "n_trained": sum(p.trains for p in plan),
            "n_interp": sum(not p.trains for p in plan), "core_s": core, "setup_s": setup,
            "wall_s": setup + core / n_cores, "per_method_s": per, "n_cores": n_cores}
