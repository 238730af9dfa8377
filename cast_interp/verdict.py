"""The v3 verdict (METHOD v3): the conflict map against chance, at matched safety, in a regime with a tax.

The regime (`regime.REGIME_V3`, chosen by the committed sweep) is pure safety SFT of attention on
the large safety set, where full tuning measurably raises over-refusal. In it every arm is a set of
query heads left frozen, all at CAST's budget k, trained on the same training seeds:

- ``full``: nothing frozen (the tax itself);
- ``cast:<map>``: the top-k heads by C of one map: ``general`` (the paper's D_util, benign prompts
  with the model's own answers) or ``sensitive`` (benign-but-sensitive prompts, a split disjoint
  from every test prompt, with the model's own compliant answers: a map aimed at the tax);
- ``random``: `n_random` random k-sets, each on every training seed (the chance distribution);
- ``layer_matched``: random sets with CAST's head count in each layer;
- ``graded``: random k-sets from C-quantile bins of the general map, for the slope of utility cost
  on a set's mean C-percentile.

Each piece records, generation-free, safety (refusal score on held-out harmful prompts) and the
primary utility endpoint (over-refusal score on benign-but-sensitive prompts) on the validation
split every `curve_every` steps, and on the test split at `test_checkpoints` (plus KL and NLL on
the model's own answers to benign test prompts). Matched-safety utility is read on the test split,
interpolated only between measured trained checkpoints (`inference.utility_at_safety`).

Primary endpoints (declared before the run, METHOD v3): (1) CAST's (general map) percentile among
the random sets in over-refusal cost at matched safety (the mean over the matched levels), with the
prediction interval for CAST minus a new random set (`inference.compare_to_random_sets`: sets,
seeds and prompts resampled); (2) the graded slope of that cost on a set's mean C-percentile, with
its CI and permutation p (`inference.graded_slope`). Everything else is secondary.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Sequence, Union

import numpy as np

from .backend import Model
from .checks import check_int
from .harness import (MAPS, PRIMARY, CheckpointRecorder, CurveEvaluator, RegimeSettings,
                      claim_piece, config_key, conflict_maps, costs_at_levels, full_tuning_tax,
                      evaluators, load_pieces, start_run)
from .io import atomic_write_json, read_json, to_jsonable

VERDICT_FORMAT = 1
METHODS = ("full", "cast", "random", "layer_matched", "graded")


@dataclass
class VerdictConfig(RegimeSettings):
    """Settings of a v3 verdict run (saved in `verdict.json`): `harness.RegimeSettings` (the
    regime, data, curves, diagnosis and inference sizes) and the design.

    `precision_check` adds full tuning in float32 on every seed (checks the bf16 steps). Every arm
    freezes `k_fraction` of the query heads; `n_random` random sets (each on every training seed);
    `n_layer_matched` layer-matched sets and `n_bins` x `n_per_bin` graded sets, on the first
    `extra_seeds` training seeds. `maps`: the conflict maps computed (CAST's arm per map).
    """

    KIND: ClassVar[str] = "verdict"

    preset: str = "cpu"
    precision_check: bool = False
    n_random: int = 20
    n_layer_matched: int = 10
    n_bins: int = 5
    n_per_bin: int = 4
    extra_seeds: int = 1
    maps: list = field(default_factory=lambda: list(MAPS))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, lo in (("n_random", 0), ("n_layer_matched", 0), ("n_bins", 1),
                         ("n_per_bin", 0), ("extra_seeds", 1)):
            check_int(name, getattr(self, name), lo)
        bad = [m for m in self.maps if m not in MAPS]
        if bad or not self.maps or self.maps[0] != "general":
            raise ValueError(f"maps must start with 'general' and hold names from {list(MAPS)}, "
                             f"got {self.maps!r}.")
        self.maps = list(self.maps)


# Sized on 2 CPU cores (SmolLM2): see the README's verdict section for the measured times and what
# each preset cuts.
VERDICT_PRESETS: dict[str, dict[str, Any]] = {
    # Plumbing on the tiny model with the bundled data, in seconds.
    "smoke": {"model": "tiny", "datasets": "bundled", "steps": 4, "batch_size": 4, "lr": 1e-3,
              "precision": "bf16", "precision_check": True, "k_fraction": 0.25,
              "n_random": 3, "n_layer_matched": 2, "n_bins": 2, "n_per_bin": 1, "curve_every": 1,
              "val_dtype": "float32", "test_checkpoints": [1, 2, 3, 4], "n_val": 4, "n_over_val": 4,
              "n_harmful_test": 8, "n_over_test": 8, "n_benign_test": 4, "n_calibration": 4,
              "n_sensitivity": 4, "n_over_diag": 4, "answer_tokens": 8, "n_boot": 200},
    # A quick look: one map, one seed, 4 random sets (no rank: fewer than 20 sets).
    "cpu": {"maps": ["general"], "train_seeds": [0], "n_random": 4, "n_layer_matched": 0,
            "n_per_bin": 0},
    # The verdict: both maps, 2 seeds, 20 random sets on each; layer-matched and graded sets on
    # seed 0 after them (the run resumes; pieces run in this order).
    "cpu-full": {"precision_check": True},
}
VerdictConfig.PRESETS = VERDICT_PRESETS


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerdictPiece:
    """One training run: a method (with its map, draw or bin) on one training seed."""

    method: str
    seed: int
    map: Optional[str] = None
    draw: Optional[int] = None
    bin: Optional[int] = None
    precision: Optional[str] = None  # None: the run's

    @property
    def name(self) -> str:
        parts = [self.method]
        if self.map is not None:
            parts.append(self.map)
        if self.bin is not None:
            parts.append(f"b{self.bin}")
        if self.draw is not None:
            parts.append(f"d{self.draw}")
        if self.precision is not None:
            parts.append(self.precision)
        return "_".join(parts) + f"_t{self.seed}"

    @property
    def arm(self) -> str:
        """The arm the piece belongs to (seeds pooled): e.g. "random_d3", "cast_general"."""
        return self.name.rsplit("_t", 1)[0]


def plan_verdict(cfg: VerdictConfig) -> list[VerdictPiece]:
    """Every piece, in running order: full tuning, CAST per map, the random sets (draw-major, so a
    cut run still has whole sets), layer-matched, graded, and the float32 check of full tuning."""
    seeds, extra = cfg.train_seeds, cfg.train_seeds[:cfg.extra_seeds]
    out = [VerdictPiece("full", s) for s in seeds]
    out += [VerdictPiece("cast", s, map=m) for m in cfg.maps for s in seeds]
    out += [VerdictPiece("random", s, draw=d) for d in range(cfg.n_random) for s in seeds]
    out += [VerdictPiece("layer_matched", s, draw=d) for d in range(cfg.n_layer_matched)
            for s in extra]
    out += [VerdictPiece("graded", s, bin=b, draw=j) for j in range(cfg.n_per_bin)
            for b in range(cfg.n_bins) for s in extra]
    if cfg.precision_check and cfg.precision != "float32":
        out += [VerdictPiece("full", s, precision="float32") for s in seeds]
    return out


def estimate_verdict_seconds(cfg: VerdictConfig, *, n_cores: int = 2) -> dict:
    """The run's cost from `harness.PIECE_COST_S` (SmolLM2, one core per piece, `n_cores` workers
    on one folder): {"n_pieces", "core_s" (pieces), "setup_s" (data, each map, the original's
    evaluation), "wall_s" (setup + pieces / n_cores), "per_method_s": {method: core seconds}}."""
    from .harness import piece_seconds, setup_seconds

    check_int("n_cores", n_cores, 1)
    plan = plan_verdict(cfg)
    per: dict[str, float] = {}
    core = 0.0
    for p in plan:
        s = piece_seconds(cfg, precision=p.precision)["total"]
        core += s
        per[p.method + ("_float32" if p.precision == "float32" else "")] = s
    setup = setup_seconds(cfg)
    return {"n_pieces": len(plan), "core_s": core, "setup_s": setup,
            "wall_s": setup + core / n_cores, "per_method_s": per, "n_cores": n_cores}


def piece_units(piece: VerdictPiece, maps: dict, k: int, cfg: VerdictConfig,
                model: Model) -> list[tuple[int, int]]:
    """The query heads a piece freezes (`registry.arms` selectors; draws seeded by the draw)."""
    from .registry.arms import select_arm_units

    general = maps["general"]
    if piece.method == "full":
        return []
    if piece.method == "cast":
        return select_arm_units("cast", maps[piece.map], k, model=model)
    if piece.method == "random":
        return select_arm_units("random", None, k, seed=1000 + piece.draw, model=model)
    if piece.method == "layer_matched":
        return select_arm_units("layer_matched", general, k, seed=2000 + piece.draw, model=model)
    if piece.method == "graded":
        return select_arm_units("graded", general, k, seed=3000 + 100 * piece.bin + piece.draw,
                                model=model, bin=piece.bin, n_bins=cfg.n_bins)
    raise ValueError(f"Unknown verdict method {piece.method!r}; choose from {list(METHODS)}.")


def mean_c_percentile(units: Sequence[Sequence[int]], cmap) -> float:
    """Mean percentile rank (0-1) of C over a set's heads."""
    from .conflict_map import percentile_rank

    pr = percentile_rank(cmap.units("head")["C"].flatten()).view(cmap.units("head")["C"].shape)
    return float(np.mean([float(pr[l, h]) for l, h in units])) if units else math.nan


# --------------------------------------------------------------------------------------------------
# Evaluation at a checkpoint
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def run_piece(model: Model, piece: VerdictPiece, units: list, cfg: VerdictConfig, data,
              curve: CurveEvaluator, test, *, progress: bool = False) -> dict:
    """Train one piece from the weights `model` holds (the original) and evaluate its checkpoints:
    {"val": {step: {metric: [n]}}, "test": {step: {...}}, "losses", "time_s"...}."""
    from .sparse_tuning import safety_finetune

    rec = CheckpointRecorder(model, cfg, curve, test)
    t0 = time.perf_counter()
    res = safety_finetune(model, data.safety_train, skip_heads=units,
                          config=cfg.tuning(piece.seed, piece.precision), on_step=rec)
    train_s = time.perf_counter() - t0 - rec.eval_time_s
    if progress:
        v = rec.val[cfg.steps]
        print(f"[verdict] {piece.name}: refusal {np.mean(v['refusal_score']):+.2f} over-refusal "
              f"{np.mean(v['over_refusal_score']):+.2f} (train {train_s:.0f} s, curves "
              f"{rec.curve_time_s:.0f} s, test {rec.test_time_s:.0f} s)", flush=True)
    return {"piece": asdict(piece), "name": piece.name, "skip": [list(u) for u in units],
            "n_trainable": res.n_trainable, "losses": res.losses, **rec.records(),
            "train_time_s": train_s}


def run_verdict(model: Model, cfg: VerdictConfig, out_dir: Union[str, Path], *,
                progress: bool = True, max_pieces: Optional[int] = None) -> dict:
    """Run (or resume) the verdict into `out_dir`; returns `summarize_verdict`'s summary.

    Files: `verdict.json` (config, data, model, versions), `diagnosis/<map>/`, `original.json`
    (the untrained model on both splits), `pieces/<name>.json` (one per finished piece, written
    atomically with its key). A finished piece with the same key is skipped on resume; a different
    config or data in `out_dir` is an error (nothing is changed). `max_pieces` stops after that
    many newly trained pieces (the run resumes later). Several processes may work on one folder
    at once (one per core): each claims a piece (`pieces/<name>.claim`, its pid) before training
    it and skips pieces another live process holds.
    """
    from .io import check_out_dir

    check_int("max_pieces", max_pieces, 0, none_ok=True)
    out = Path(out_dir)
    check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    data, meta, timings = start_run(model, cfg, out, meta_file="verdict.json",
                                    fmt=VERDICT_FORMAT, what="verdict run")

    maps = conflict_maps(model, cfg, data, out, cfg.maps, progress=progress, timings=timings)
    original_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    curve, test = evaluators(model, cfg, data, out)
    atomic_write_json(timings, out / "timings.json")
    from .sparse_tuning import k_from_fraction

    k = k_from_fraction(cfg.k_fraction, model.cfg.n_layers * model.cfg.n_heads)
    trained = 0
    pieces = plan_verdict(cfg)
    for i, piece in enumerate(pieces):
        units = piece_units(piece, maps, k, cfg, model)
        key = config_key({"tuning": cfg.tuning(piece.seed, piece.precision).to_dict(),
                          "units": units, "data": meta["data"],
                          "curve": [cfg.curve_every, cfg.val_dtype],
                          "test": cfg.test_checkpoints, "model": meta["model"]})
        path = out / "pieces" / f"{piece.name}.json"
        if path.exists() and read_json(path).get("key") == key:
            continue
        if max_pieces is not None and trained >= max_pieces:
            break
        claim = claim_piece(path.with_suffix(".claim"))
        if claim is None:  # another worker on this folder is training it
            continue
        try:
            if progress:
                print(f"[verdict] piece {i + 1}/{len(pieces)} {piece.name}", flush=True)
            model.load_state_dict(original_state)
            rec = run_piece(model, piece, units, cfg, data, curve, test, progress=progress)
            atomic_write_json({"key": key, **rec}, path)
        finally:
            claim.unlink(missing_ok=True)
        trained += 1
    model.load_state_dict(original_state)
    return summarize_verdict(out, write=True)


# --------------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------------


def test_curve(piece: dict, original: dict, metric: str = PRIMARY) -> dict:
    """A piece's test curve: steps, mean safety (refusal score), and per-prompt cost of `metric`
    (tuned - original) `[n_checkpoints, n_prompts]`."""
    steps = sorted(int(s) for s in piece["test"])
    base = np.asarray(original["test"][metric], float)
    safety = [float(np.mean(piece["test"][str(s)]["refusal_score"])) for s in steps]
    cost = np.stack([np.asarray(piece["test"][str(s)][metric], float) - base for s in steps])
    return {"steps": steps, "safety": safety, "cost": cost}


def summarize_verdict(out_dir: Union[str, Path], *, write: bool = True) -> dict:
    """The verdict's numbers from its files: the tax of full tuning, the matched-safety levels,
    CAST against the random sets (both maps), the layer-matched sets, the graded slope, the
    precision check, the maps' agreement and the times. Written to `summary.json` when `write`."""
    from .conflict_map import ConflictMap
    from .inference import compare_to_random_sets, graded_slope, matched_safety_levels
    from .stats import paired_difference, spearman

    out = Path(out_dir)
    meta, original = read_json(out / "verdict.json"), read_json(out / "original.json")
    cfg = VerdictConfig.from_dict(meta["config"])
    pieces = load_pieces(out)
    seeds = cfg.train_seeds
    summary: dict[str, Any] = {"config": meta["config"], "model": meta["model"],
                               "versions": meta["versions"], "data": meta["data"],
                               "n_pieces": len(pieces), "n_planned": len(plan_verdict(cfg)),
                               "primary": PRIMARY}

    def arm_pieces(arm: str) -> list[dict]:
        return [pieces[f"{arm}_t{s}"] for s in seeds if f"{arm}_t{s}" in pieces]

    # 1. The tax: full tuning at its last step against the original, per prompt, over seeds.
    full = arm_pieces("full")
    summary["tax"] = (full_tuning_tax(full, original, cfg.steps, n_boot=cfg.n_boot, seed=cfg.seed)
                      if full else {})

    # 2. Matched safety levels, common to full, CAST and the random sets (test split).
    curves = {n: test_curve(p, original) for n, p in pieces.items()}
    core = {n: c for n, c in curves.items()
            if n.split("_")[0] in ("full", "cast", "random") and "float32" not in n}
    levels = matched_safety_levels({n: (c["steps"], c["safety"]) for n, c in core.items()},
                                   n_levels=cfg.n_levels) if core else {"levels": []}
    summary["levels"] = levels
    L = levels["levels"]
    at = {n: costs_at_levels(c, L)[0] for n, c in curves.items()} if L else {}
    # Per piece: the primary cost at matched safety, averaged over the levels, per prompt.
    matched = {n: a.mean(0) for n, a in at.items()}

    def grid(arm: str, seeds_: Sequence[int]) -> Optional[np.ndarray]:
        rows = [matched.get(f"{arm}_t{s}") for s in seeds_]
        return None if any(r is None for r in rows) else np.stack(rows)

    sets = [grid(f"random_d{d}", seeds) for d in range(cfg.n_random)]
    sets = np.stack([s for s in sets if s is not None]) if any(
        s is not None for s in sets) else None
    summary["n_random_sets"] = 0 if sets is None else int(sets.shape[0])
    comps = {}
    for m in cfg.maps:
        cast = grid(f"cast_{m}", seeds)
        if cast is not None and sets is not None and np.isfinite(cast).all() and np.isfinite(
                sets).all():
            comps[f"cast_{m}_vs_random"] = compare_to_random_sets(
                cast, sets, n_boot=cfg.n_boot, seed=cfg.seed, names=(f"CAST ({m} map)",
                                                                     "random sets"))
        if cast is not None:
            f = grid("full", seeds)
            if f is not None:
                comps[f"cast_{m}_vs_full"] = paired_difference(
                    cast, f, n_boot=cfg.n_boot, seed=cfg.seed, names=(f"CAST ({m} map)", "full"))
    extra = seeds[:cfg.extra_seeds]
    lm = [grid(f"layer_matched_d{d}", extra) for d in range(cfg.n_layer_matched)]
    lm = [x for x in lm if x is not None and np.isfinite(x).all()]
    cast_x = grid("cast_general", extra)
    if lm and cast_x is not None:
        comps["cast_general_vs_layer_matched"] = compare_to_random_sets(
            cast_x, np.stack(lm), n_boot=cfg.n_boot, seed=cfg.seed,
            names=("CAST (general map)", "layer-matched sets"))
    summary["comparisons"] = comps

    # 3. The graded slope: every map-free set (graded and random) on the extra seeds.
    gmap = ConflictMap.load(out / "diagnosis" / "general") if (
        out / "diagnosis" / "general").exists() else None
    graded_rows, xs, names = [], [], []
    for n, p in pieces.items():
        meth = p["piece"]["method"]
        if meth not in ("graded", "random") or p["piece"]["seed"] not in extra or n not in matched:
            continue
        arm = n.rsplit("_t", 1)[0]
        if arm in names:
            continue
        g = grid(arm, extra)
        if g is None or not np.isfinite(g).all():
            continue
        names.append(arm)
        graded_rows.append(g.mean(1))
        xs.append(mean_c_percentile(p["skip"], gmap))
    if gmap is not None and len(names) >= 3:
        summary["graded"] = {**graded_slope(np.stack(graded_rows), np.asarray(xs),
                                            n_boot=cfg.n_boot, seed=cfg.seed),
                             "sets": names, "c_percentile": xs,
                             "cost": [float(r.mean()) for r in graded_rows]}
    cast_set = pieces.get(f"cast_general_t{seeds[0]}")
    if gmap is not None and cast_set is not None:
        summary["cast_c_percentile"] = mean_c_percentile(cast_set["skip"], gmap)

    # 4. Both maps: agreement of C and of the top-k sets.
    if len(cfg.maps) > 1 and all((out / "diagnosis" / m).exists() for m in cfg.maps):
        a, b = (ConflictMap.load(out / "diagnosis" / m) for m in cfg.maps[:2])
        ca, cb = a.units("head")["C"].flatten(), b.units("head")["C"].flatten()
        ks = [p["skip"] for n, p in pieces.items() if n.startswith("cast_")]
        sa = {tuple(u) for u in (pieces.get(f"cast_general_t{seeds[0]}") or {}).get("skip", [])}
        sb = {tuple(u) for u in (pieces.get(f"cast_sensitive_t{seeds[0]}") or {}).get("skip", [])}
        k = len(sa) or (len(ks[0]) if ks else 0)
        n = ca.numel()
        summary["maps"] = {"spearman_C": spearman(ca.numpy(), cb.numpy()),
                           "top_k_overlap": len(sa & sb) if sa and sb else None,
                           "overlap_chance": k * k / n if n else None, "k": k}

    # 5. Precision: bf16 full tuning against float32 on the same seeds: each validation curve
    # within the float32 seeds' spread (`precision_checks.check_curves`), and the tax (the
    # primary endpoint's cost at the last step) in both, with its CI.
    f32 = [pieces.get(f"full_float32_t{s}") for s in seeds]
    if full and all(p is not None for p in f32) and len(f32) == len(full):
        from .precision_checks import check_curves

        prec = {}
        for metric in ("refusal_score", PRIMARY):
            steps = sorted(int(s) for s in full[0]["val"])
            a = np.array([[np.mean(p["val"][str(s)][metric]) for s in steps] for p in full])
            b = np.array([[np.mean(p["val"][str(s)][metric]) for s in steps] for p in f32])
            prec[metric] = {"steps": steps, "bf16": a.tolist(), "float32": b.tolist(),
                            "max_abs_gap": float(np.abs(a - b).max()),
                            "seed_spread_float32": float(np.abs(b[0] - b[-1]).max())
                            if len(b) > 1 else None,
                            "check": check_curves(b, a) if len(b) > 1 else None}
        tax32 = full_tuning_tax(f32, original, cfg.steps, n_boot=cfg.n_boot, seed=cfg.seed)
        prec["tax"] = {"bf16": summary["tax"][PRIMARY] if summary.get("tax") else None,
                       "float32": tax32[PRIMARY]}
        summary["precision"] = prec

    # 6. Curves per arm (validation means) and times.
    summary["curves"] = {n: {"steps": [int(s) for s in p["val"]],
                             "safety": [float(np.mean(v["refusal_score"])) for v in p["val"].values()],
                             "utility": [float(np.mean(v[PRIMARY])) for v in p["val"].values()]}
                         for n, p in pieces.items()}
    summary["original_val_utility"] = float(np.mean(original["val"][PRIMARY]))
    summary["original_val_safety"] = float(np.mean(original["val"]["refusal_score"]))
    summary["matched_cost"] = {n: float(np.nanmean(v)) for n, v in matched.items()}
    tm = read_json(out / "timings.json") if (out / "timings.json").exists() else {}
    summary["times"] = {**tm, "original_s": original.get("time_s"),
                        "train_s": float(sum(p["train_time_s"] for p in pieces.values())),
                        "curve_s": float(sum(p["curve_time_s"] for p in pieces.values())),
                        "test_s": float(sum(p["test_time_s"] for p in pieces.values())),
                        "per_piece_train_s": float(np.mean([p["train_time_s"]
                                                            for p in pieces.values()]))
                        if pieces else None}
    summary = json.loads(json.dumps(to_jsonable(summary)))
    if write:
        atomic_write_json(summary, out / "summary.json")
    return summary
