"""Gradient projection (PCGrad-style, Yu et al. 2020): safety steps that never oppose utility.

At each step the safety gradient g_s (the safety batch's loss) and a utility gradient g_u (a batch
of benign prompts with the model's own answers: utility = keeping what the model does) are taken
over the trainable parameters. Where they conflict (g_s . g_u < 0) the step uses

    g = g_s - (g_s . g_u / |g_u|^2) g_u,

g_s without its component along g_u, so g . g_u = 0: to first order the step leaves the utility
loss where it is instead of raising it. Where they do not conflict, g = g_s. The utility loss is a
constraint on the step's direction, never a second objective that is descended.

`mode` (ours; recorded): "global" (default) projects once over the whole trainable gradient (the
frozen entries are zero in both gradients, so they take no part). "unit" projects per block, as
CAST's diagnosis looks at conflicts per unit: every query head's own entries, every key/value
group's under GQA (`units.py`), and one block for the trainable entries no unit owns (`b_O`,
QK-norm weights; with scope "all", every weight outside attention).

Everything else is `safety_finetune`'s: the same safety batches for a training seed (benign share
0), schedule, optimizer, clipping of the projected gradient, exact freezing of skipped units (so
CAST + projection is `skip_heads=` CAST's heads).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Callable, Literal, Optional, Sequence, Union, get_args

import torch
from torch import Tensor
from torch.nn import Parameter

from .. import units as U
from ..backend import Model
from ..data import ChatBatch, ChatDataset
from ..model import model_id
from ..sparse_tuning import (TuningConfig, TuningResult, batch_fingerprint, parameter_budget,
                             trainable_parameters)
from .loop import (Batches, Compute, Recorder, check_config, frozen_model, global_norm,
                   lr_factor, make_optimizer, nonfinite, update_)

ProjectionMode = Literal["global", "unit"]
PROJECTION_MODES: tuple[str, ...] = get_args(ProjectionMode)
#: The utility stream's default seed is the training seed plus this (ours): its own order, drawn
#: from the training seed alone, so the safety batches stay those of full tuning.
UTILITY_SEED_OFFSET = 7919

Grads = list[Optional[Tensor]]


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.sum(a.double() * b.double())


def project_gradient(g_s: Sequence[Optional[Tensor]],
                     g_u: Sequence[Optional[Tensor]]) -> tuple[Grads, dict]:
    """g_s projected off g_u when they conflict, over all tensors at once (mode "global").

    Args:
        g_s, g_u: per-parameter gradients (same shapes, pairwise; None = zero).
    Returns:
        (g, info): g per parameter (None where g_s is None: no conflict can move it; a new tensor
        otherwise, g_s untouched); info {"dot": g_s . g_u, "cos": cosine, "conflict": bool}.
    """
    if len(g_s) != len(g_u):
        raise ValueError(f"g_s has {len(g_s)} tensors but g_u has {len(g_u)}: pass one gradient "
                         "per trainable parameter in each.")
    pairs = [(a, b) for a, b in zip(g_s, g_u) if a is not None and b is not None]
    for a, b in pairs:
        if a.shape != b.shape:
            raise ValueError(f"Gradient shapes differ ({tuple(a.shape)} vs {tuple(b.shape)}): g_s "
                             "and g_u must list the same parameters in the same order.")
    dot = sum((_dot(a, b) for a, b in pairs), torch.zeros((), dtype=torch.float64))
    nu = sum((_dot(b, b) for b in g_u if b is not None), torch.zeros((), dtype=torch.float64))
    ns = sum((_dot(a, a) for a in g_s if a is not None), torch.zeros((), dtype=torch.float64))
    conflict = bool(dot < 0) and bool(nu > 0)
    c = float(dot / nu) if conflict else 0.0
    out: Grads = []
    for a, b in zip(g_s, g_u):
        if a is None:
            out.append(None)
        elif conflict and b is not None:
            out.append(a - c * b)
        else:
            out.append(a.clone())
    cos = float(dot / (ns.sqrt() * nu.sqrt())) if ns > 0 and nu > 0 else float("nan")
    return out, {"dot": float(dot), "cos": cos, "conflict": conflict}


class UnitBlocks:
    """The trainable gradient cut into blocks for mode "unit": each query head's own entries, each
    key/value group's (GQA only), and "rest" (trainable entries no unit owns), for `params` (the
    trainable parameters, as `sparse_tuning.trainable_parameters` lists them)."""

    def __init__(self, model: Model, params: Sequence[Parameter]):
        name_of = {id(p): n for n, p in model.named_parameters()}
        index = {name_of[id(p)]: i for i, p in enumerate(params)}
        kinds = ("head", "group") if U.uses_gqa(model) else ("head",)
        self.labels: list[str] = []
        self.units: list[list[tuple[int, U.UnitParam, int]]] = []
        for kind in kinds:
            for l, i in U.all_units(model, kind):
                views = [(index[p.name], p, i) for c in U.unit_components(model, kind)
                         for p in U.component_params(model, l, c) if p.name in index]
                if views:
                    self.labels.append(U.label((l, i), kind))
                    self.units.append(views)
        owned = U.unit_masks(model, heads=U.all_units(model, "head"),
                             groups=U.all_units(model, "group") if U.uses_gqa(model) else [])
        # Entries no unit owns: a whole parameter (b_O) or nothing of a per-unit tensor.
        self.rest: list[tuple[int, Optional[Tensor]]] = []
        for name, i in index.items():
            m = owned.get(name)
            if m is None:
                self.rest.append((i, None))
            elif not bool(m.all()):
                self.rest.append((i, ~m.to(params[i].device)))
        if self.rest:
            self.labels.append("rest")
        self.n_params = len(params)

    def __len__(self) -> int:
        return len(self.labels)

    def project(self, g_s: Sequence[Optional[Tensor]],
                g_u: Sequence[Optional[Tensor]]) -> tuple[Grads, dict]:
        """Per block: g_s projected off g_u where they conflict. Returns (g, info) with info
        {"dot": [n_blocks] per-block g_s . g_u, "conflict": [n_blocks] bools, "n_conflicting"}."""
        if len(g_s) != self.n_params or len(g_u) != self.n_params:
            raise ValueError(f"Expected {self.n_params} gradients (one per trainable parameter) "
                             f"in g_s and g_u, got {len(g_s)} and {len(g_u)}.")
        g: Grads = [None if a is None else a.clone() for a in g_s]
        zero = torch.zeros((), dtype=torch.float64)
        dots, flags = [], []
        for views in self.units:
            live = [(i, p, u) for i, p, u in views if g[i] is not None and g_u[i] is not None]
            dot = sum((_dot(p.unit(u, g_s[i]), p.unit(u, g_u[i])) for i, p, u in live), zero)
            nu = sum((_dot(p.unit(u, g_u[i]), p.unit(u, g_u[i])) for i, p, u in live), zero)
            conflict = bool(dot < 0) and bool(nu > 0)
            if conflict:
                c = float(dot / nu)
                for i, p, u in live:
                    p.unit(u, g[i]).sub_(c * p.unit(u, g_u[i]))  # a view: writes into g[i]
            dots.append(float(dot))
            flags.append(conflict)
        if self.rest:
            live = [(i, m) for i, m in self.rest if g[i] is not None and g_u[i] is not None]
            part = (lambda t, m: t if m is None else t[m])
            dot = sum((_dot(part(g_s[i], m), part(g_u[i], m)) for i, m in live), zero)
            nu = sum((_dot(part(g_u[i], m), part(g_u[i], m)) for i, m in live), zero)
            conflict = bool(dot < 0) and bool(nu > 0)
            if conflict:
                c = float(dot / nu)
                for i, m in live:
                    step = c * g_u[i]
                    g[i] = g[i] - (step if m is None else torch.where(m, step, 0.0))
            dots.append(float(dot))
            flags.append(conflict)
        return g, {"dot": dots, "conflict": flags, "n_conflicting": int(sum(flags))}


def projected_finetune(
    model: Model,
    safety_data: Union[ChatDataset, Sequence[ChatBatch]],
    utility_data: Union[ChatDataset, Sequence[ChatBatch]],
    *,
    mode: ProjectionMode = "global",
    skip_heads: Sequence[Sequence[int]] = (),
    skip_groups: Sequence[Sequence[int]] = (),
    config: Optional[TuningConfig] = None,
    utility_batch_size: Optional[int] = None,
    utility_seed: Optional[int] = None,
    monitor: Optional[Callable[[Model], dict]] = None,
    eval_every: int = 0,
    curve_start: Optional[dict] = None,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> TuningResult:
    """Safety fine-tuning of `model` IN PLACE with each step's gradient projected off the utility
    gradient where they conflict (module docstring).

    Args:
        safety_data: as `safety_finetune`'s (the same batches for `config.seed`).
        utility_data: benign prompts with the model's own answers (`data.self_reference`; e.g.
            `peers.anchor_set`), disjoint from every test prompt. Each step draws
            `utility_batch_size` (default `config.batch_size`) of them from a seeded stream.
        mode: "global" or "unit" (module docstring).
        skip_heads, skip_groups: units frozen bit-exactly, as in `safety_finetune` (CAST +
            projection).
        config: a `TuningConfig` with `benign_mix=0` and `group_by_length=False`.
        utility_seed: the utility stream's seed (default `config.seed + UTILITY_SEED_OFFSET`).
        monitor, eval_every, curve_start, on_step: as `safety_finetune`'s.

    Returns:
        A `TuningResult` (losses: the safety loss per step; grad_norms: the projected gradient's
        norm before clipping) whose `config["peer"]` records the method, mode, budget and per
        step the utility loss, whether (global) or in how many blocks (unit) the gradients
        conflicted, and their cosine (global).
    """
    cfg = check_config(config, "Gradient projection")
    if mode not in PROJECTION_MODES:
        raise ValueError(f"mode={mode!r} is not one of {list(PROJECTION_MODES)}.")
    heads = U.validate_units(model, skip_heads, "head")
    groups = U.validate_units(model, skip_groups, "group") if list(skip_groups) else []
    t0 = time.perf_counter()
    u_seed = cfg.seed + UTILITY_SEED_OFFSET if utility_seed is None else utility_seed
    u_bs = cfg.batch_size if utility_batch_size is None else utility_batch_size
    if isinstance(u_bs, bool) or not isinstance(u_bs, int) or u_bs < 1:
        raise ValueError(f"utility_batch_size must be an integer >= 1, got {u_bs!r}.")
    safety = Batches(model, safety_data, cfg.batch_size, cfg.seed, "safety")
    utility = Batches(model, utility_data, u_bs, u_seed, "utility")
    params, masks = trainable_parameters(model, heads, skip_groups=groups, scope=cfg.scope)
    budget = parameter_budget(model, heads, groups, scope=cfg.scope)
    name_of = {id(p): n for n, p in model.named_parameters()}
    masked = [(i, masks[name_of[id(p)]]) for i, p in enumerate(params) if name_of[id(p)] in masks]
    snapshots = [params[i].detach().clone() for i, _ in masked]
    blocks = UnitBlocks(model, params) if mode == "unit" else None
    compute = Compute(model, cfg, params)
    torch.manual_seed(cfg.seed)  # as safety_finetune (nothing here draws from it)
    optimizer = make_optimizer(params, cfg)
    rec = Recorder(model, lambda: nullcontext(model), monitor=monitor, eval_every=eval_every,
                   curve_start=curve_start, on_step=on_step, steps=cfg.steps)
    log: dict[str, list] = {k: [] for k in ("losses", "grad_norms", "lrs", "fingerprints",
                                            "utility_losses", "conflict", "cos",
                                            "safety_grad_norms")}
    last_good: Optional[list[Tensor]] = None

    def bad(msg: str, step: int):
        if last_good is not None:
            with torch.no_grad():
                for p, s in zip(params, last_good):
                    p.copy_(s)
        return nonfinite(msg + ". Lower the learning rate or check the data.", step, log["losses"])

    with frozen_model(model):
        rec.start()
        for step in range(cfg.steps):
            batch_s, batch_u = safety.next(), utility.next()
            lr = cfg.lr * lr_factor(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_s, g_s = compute.loss_and_grads(batch_s, params)
            loss_u, g_u = compute.loss_and_grads(batch_u, params)
            if not g_s or not g_u:
                what = "safety" if not g_s else "utility"
                raise bad(f"The {what} loss is {loss_s if not g_s else loss_u} at step {step}",
                          step)
            for i, m in masked:  # frozen entries: no gradient, no part in any dot product
                for g in (g_s[i], g_u[i]):
                    if g is not None:
                        g.masked_fill_(m, 0.0)
            if blocks is None:
                g, info = project_gradient(g_s, g_u)
                log["conflict"].append(info["conflict"])
                log["cos"].append(info["cos"])
            else:
                g, info = blocks.project(g_s, g_u)
                log["conflict"].append(info["n_conflicting"])
            norm = global_norm(g)
            if not bool(torch.isfinite(norm)):
                raise bad(f"The projected gradient's norm is {float(norm)} at step {step}", step)
            last_good = update_(optimizer, params, g, norm, cfg)
            with torch.no_grad():
                for (i, m), snap in zip(masked, snapshots):
                    params[i].copy_(torch.where(m, snap, params[i]))  # undo decay of frozen slices
            if not all(bool(torch.isfinite(p).all()) for p in params):
                raise bad(f"The update at step {step} made weights NaN/inf", step)
            log["losses"].append(loss_s)
            log["utility_losses"].append(loss_u)
            log["grad_norms"].append(float(norm))
            log["safety_grad_norms"].append(float(global_norm(g_s)))
            log["lrs"].append(lr)
            log["fingerprints"].append(batch_fingerprint(batch_s))
            rec.after(step, loss_s)

    peer = {"method": "gradient_projection", "mode": mode,
            "rule": "g = g_s - min(0, g_s.g_u) / |g_u|^2 g_u" + (" per unit block" if blocks
                                                                 else " over all trainable"),
            "utility_data": utility.describe, "utility_seed": u_seed,
            "utility_batch_size": u_bs, "n_blocks": len(blocks) if blocks else 1,
            "budget": budget, "utility_losses": log["utility_losses"],
            "conflict": log["conflict"], "cos": log["cos"],
            "safety_grad_norms": log["safety_grad_norms"]}
    meta = {**cfg.to_dict(), "model": model_id(model), "safety_data": safety.describe,
            "benign_data": None, "n_benign_per_batch": 0, "eval_every": eval_every,
            "compute": compute.describe(), "time_s": time.perf_counter() - t0, "peer": peer}
    return TuningResult(log["losses"], heads, budget["n_trainable"], budget["n_frozen"], meta,
                        log["grad_norms"], log["lrs"], groups, budget["n_absent"],
                        log["fingerprints"], rec.curve)

