"""The grid of a run and what it costs: its pieces (an arm at a budget on a training seed) in
running order, and the cost model that sizes the presets (`estimate_seconds`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from ..checks import check_int
from .config import RunConfig


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
    from ..sparse_tuning import k_from_fraction

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


def _generates(cfg: RunConfig, train_seed: Optional[int]) -> bool:
    """Whether a piece on `train_seed` (None: the original model) measures generated refusals."""
    g = cfg.generation_seeds
    if g is None:
        return True
    return g > 0 if train_seed is None else train_seed in cfg.train_seeds[:g]


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
    from ..registry.models import n_units_of, resolve

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
    from ..sparse_tuning import k_from_fraction

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
    from ..registry.metrics import METRIC_REGISTRY

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
