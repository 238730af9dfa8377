"""Which units caused the utility drop (stage 4, post hoc, ours; METHOD.md v2).

After safety tuning, we ask unit by unit how much of the utility tax the unit's *update* caused:
put the unit's parameters back to their values before training, keep every other parameter tuned,
and measure the utility loss recovered,

    recovered(u) = L_util(tuned) - L_util(tuned, u reverted)       (> 0: u's update hurt utility)

with L_util the same objective as the diagnosis (METHOD v2, stage 4): the token-mean NLL of the
ORIGINAL model's own answers (self-reference, natural end), on response *content* tokens only
(`make_batches(..., end_of_turn_in_loss=False)`). Comparing recovered(u) with the map's C, made
before training, tests whether the diagnosis predicted the damage.

Units are the map's (`units.py`): reverting query head (l, h) swaps only the slices it owns (Q and O
under GQA; all four without GQA), reverting key/value group (l, g) swaps its K and V. No parameter
belongs to two units, so the first-order shares add up exactly: the sum over all units is the first-
order estimate of reverting them all. The exact single-unit recoveries need not add up (units
interact); the result reports their sum beside the exact joint revert of every unit and the drop
left after it (parameters no unit owns: `b_O`, biases the architecture lacks, anything outside
attention).

How it is measured (all our choices):
- First order for every unit: recovered(u) ~ -(theta_orig - theta_tuned)_u . grad L(tuned), one
  backward per example, kept per example `[n_examples, L, n]`.
- Exact reverts (`revert_units`, a weight swap restored bit-exactly) for the top `n_candidates`
  units of the selected kind by the first-order estimate on half A, and for `n_spread` units of
  each kind at evenly spaced ranks of the first-order range (the agreement check of first order vs
  exact, with a bootstrap CI).
  A revert in layer l reuses the tuned model's cached `resid_pre` of layer l and runs layers
  l..L-1 only; each example's summed NLL is kept, so every bootstrap below is free.
- Out of sample: the examples are split in two halves by a seeded permutation, each tokenized and
  batched apart. The top-k units by exact recovery on half A (among half A's first-order
  candidates) are reverted jointly and their recovery is measured on half B.
- Random revert sets: `n_draws` (>= 20) seeded draws of k units, each reverted jointly; the share
  recovered by the map's top-k by C is placed in that distribution (`stats.empirical_p`).
- Spearman(recovered, C / O / S) with bootstrap CIs over examples (how stable the number is) and
  a permutation p-value over units (whether the map is related at all: a CI over examples holds
  the units fixed and can exclude 0 for a random map).

`attribute(tuned, original, ...)` works for any tuned model (full tuning, the CAST arm, a random arm):
it reports what drop is left and in which units. It needs `original`, the model before training.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from . import backend, distributed
from .backend import Model

from . import stats
from .data import (ChatBatch, ChatDataset, DataError, encode_example, example_lengths,
                   UtilityReference, make_batches, self_reference, with_refusals)
from .model import model_id
from .objectives import NonFiniteLossError, response_nll_from_resid
from .units import (Unit, UnitError, UnitKind, all_units, component_params, n_units,
                    owned_param_names, unit_components, unit_slices, uses_gqa, validate_units)
from .units import label as unit_label

ExactScope = Literal["screened", "all"]
ATTRIBUTION_VERSION = "attribution-2"
FORMAT = "cast_interp.attribution"
FORMAT_VERSION = 2
# Not "attribution.json": the pipeline writes its own summary piece under that name in the same folder.
TENSORS_FILE = "attribution_result.safetensors"
META_FILE = "attribution_result.json"
MIN_DRAWS = 20


# --------------------------------------------------------------------------------------------------
# Model pairs and reverting
# --------------------------------------------------------------------------------------------------


def check_pair(tuned: Model, original: Model) -> None:
    """Clear ValueError unless the two are distinct models of one architecture and parameter shapes."""
    if tuned is original:
        raise ValueError("tuned and original are the same object: pass the model before training "
                         "as `original` (e.g. a copy.deepcopy taken before fine-tuning).")
    a, b = model_id(tuned), model_id(original)
    diff = {k: (a[k], b[k]) for k in a if k != "model_name" and a[k] != b[k]}
    if diff:
        desc = ", ".join(f"{k}: tuned {x} vs original {y}" for k, (x, y) in diff.items())
        raise ValueError(f"tuned and original are different architectures ({desc}); attribution "
                         "needs the same model before and after fine-tuning.")
    pa, pb = dict(tuned.named_parameters()), dict(original.named_parameters())
    if pa.keys() != pb.keys():
        raise ValueError("tuned and original have different parameter names (only in tuned: "
                         f"{sorted(pa.keys() - pb.keys())[:3]}, only in original: "
                         f"{sorted(pb.keys() - pa.keys())[:3]}); pass the same model before/after.")
    for n, p in pa.items():
        if p.shape != pb[n].shape:
            raise ValueError(f"Parameter {n} is {tuple(p.shape)} in tuned but {tuple(pb[n].shape)} "
                             "in original; pass the same model before and after fine-tuning.")


def _slice_pairs(tuned, original, heads, groups) -> list[tuple[Tensor, Tensor]]:
    """(tuned view, original view) of every slice the given units own."""
    out = []
    for kind, us in (("head", heads), ("group", groups)):
        for l, i in us:
            src = unit_slices(original, l, i, kind)
            out += [(dst, src[name]) for name, dst in unit_slices(tuned, l, i, kind).items()]
    return out


@contextlib.contextmanager
def revert_units(tuned: Model, original: Model, *,
                 heads: Sequence[Sequence[int]] = (),
                 groups: Sequence[Sequence[int]] = ()) -> Iterator[Model]:
    """Context manager: `tuned` with these units' own slices set to `original`'s values.

    A head reverts only what it owns (`units.unit_slices`: Q and O under GQA), a group its K and V.
    On exit (also after an exception) the tuned values are restored bit-exactly; `original` is
    never modified. Yields `tuned`.
    """
    check_pair(tuned, original)
    heads = validate_units(tuned, heads, "head")
    groups = validate_units(tuned, groups, "group") if len(groups) else []
    saved = []
    with torch.no_grad():
        try:
            for dst, src in _slice_pairs(tuned, original, heads, groups):
                saved.append((dst, dst.clone()))
                dst.copy_(src.to(dst.device, dst.dtype))
            yield tuned
        finally:
            for dst, old in reversed(saved):
                dst.copy_(old)


def changed_units(tuned: Model, original: Model,
                  kind: UnitKind = "head") -> torch.BoolTensor:
    """`[n_layers, n_units]` True where some slice the unit owns differs between the models."""
    out = torch.zeros(tuned.cfg.n_layers, n_units(tuned, kind), dtype=torch.bool)
    with torch.no_grad():
        for l, i in all_units(tuned, kind):
            heads, groups = ([(l, i)], []) if kind == "head" else ([], [(l, i)])
            out[l, i] = any(not torch.equal(d, s.to(d.device))
                            for d, s in _slice_pairs(tuned, original, heads, groups))
    return out


def changed_outside_units(tuned: Model, original: Model) -> list[str]:
    """Names of changed parameters that no unit owns (`b_O`, absent biases, MLP, embeddings...):
    the part of the drop no unit revert can recover."""
    owned, po = owned_param_names(tuned), dict(original.named_parameters())
    with torch.no_grad():
        return [n for n, p in tuned.named_parameters()
                if n not in owned and not torch.equal(p, po[n].to(p.device))]


# --------------------------------------------------------------------------------------------------
# Per-example losses: full forward, and from a cached layer
# --------------------------------------------------------------------------------------------------


def per_example_nll(model: Model, batches: Sequence[ChatBatch]) -> Float[Tensor, "example"]:
    """Each example's summed loss-token NLL by a full forward, `[n_examples]` float64 (CPU)."""
    with torch.no_grad():
        return torch.cat([response_nll_from_resid(
            model, backend.final_residual(model, b.tokens.to(model.cfg.device)), b).cpu()
            for b in batches])


class FromLayer:
    """Batches with the model's `blocks.{l}.hook_resid_pre` cached for every layer, so a forward
    under a weight change confined to layers >= l re-runs only layers l..L-1 (`nll(l)`).

    Cache with the weights every evaluation shares (the tuned model); a revert in layer l must not
    touch layers < l, which `nll` trusts (`attribute` starts a joint revert at its lowest layer).
    """

    def __init__(self, model: Model, batches: Sequence[ChatBatch]):
        self.model = model
        L = model.cfg.n_layers
        names = [f"blocks.{l}.hook_resid_pre" for l in range(L)]
        self.items = []
        with torch.no_grad():
            for batch in batches:
                b = batch.to(model.cfg.device)
                # What forward() derives from the tokens (attention mask, shortformer positions).
                inputs = backend.forward_inputs(model, b.tokens)
                _, cache = model.run_with_cache(b.tokens, names_filter=names)
                self.items.append((b, inputs, [cache[n] for n in names]))

    def nll(self, layer: int) -> Float[Tensor, "example"]:
        """Summed NLL per example with the model's current weights, run from `layer` on."""
        m = self.model
        with torch.no_grad():
            return torch.cat([response_nll_from_resid(
                m, backend.forward_from_layer(m, resid[layer], layer, **inputs), b).cpu()
                for b, inputs, resid in self.items])


# --------------------------------------------------------------------------------------------------
# First order
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _grad_only(model: Model, names: set[str]) -> Iterator[None]:
    """Gradients for the named parameters only (no weight gradients elsewhere); flags restored."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        with torch.enable_grad():
            yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


def _single_examples(batch: ChatBatch) -> Iterator[ChatBatch]:
    """Each example of a batch alone, trimmed to its real tokens."""
    for r, n in enumerate(example_lengths(batch).tolist()):
        yield ChatBatch(batch.tokens[r: r + 1, :n], batch.loss_mask[r: r + 1, :n],
                        [batch.prompt_lengths[r]], batch.content_mask[r: r + 1, :n])


def _per_unit(model: Model, prod: dict[str, Tensor], kind: str) -> Tensor:
    """`[L, n]`: per unit, the sum of the elementwise `prod[name]` over the entries the unit owns
    (`units.component_params` says which, on either backend)."""
    return torch.stack([sum(p.per_unit(prod[p.name]).sum(1).double().cpu()
                            for c in unit_components(model, kind)
                            for p in component_params(model, l, c))
                        for l in range(model.cfg.n_layers)])


def first_order(tuned: Model, original: Model,
                batches: Sequence[ChatBatch], kinds: Sequence[str]) -> dict[str, Tensor]:
    """First-order recovered loss of reverting each unit, per example: `{kind: [n_examples, L, n]}`
    float64, -(theta_orig - theta_tuned)_u . grad NLL_e(tuned) (one backward per example)."""
    names = owned_param_names(tuned)
    pt, po = dict(tuned.named_parameters()), dict(original.named_parameters())
    order = sorted(names)
    delta = {n: po[n].detach().to(pt[n].device, pt[n].dtype) - pt[n].detach() for n in order}
    out: dict[str, list[Tensor]] = {k: [] for k in kinds}
    with _grad_only(tuned, names):
        for batch in batches:
            for ex in _single_examples(batch.to(tuned.cfg.device)):
                loss = response_nll_from_resid(tuned, backend.final_residual(tuned, ex.tokens),
                                               ex).sum()
                grads = torch.autograd.grad(loss, [pt[n] for n in order], allow_unused=True)
                prod = {n: torch.zeros_like(delta[n]) if g is None else -(delta[n] * g)
                        for n, g in zip(order, grads)}
                for k in kinds:
                    out[k].append(_per_unit(tuned, prod, k))
    return {k: torch.stack(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------------
# What to measure exactly
# --------------------------------------------------------------------------------------------------


def split_halves(n: int, *, seed: int) -> tuple[list[int], list[int]]:
    """A seeded split of example indices 0..n-1 into halves A (floor(n/2)) and B (the rest),
    disjoint and covering, each sorted."""
    if n < 4:
        raise DataError(f"The out-of-sample split needs at least 4 examples (2 per half), got {n}: "
                        "pass more utility examples (n_examples).")
    perm = np.random.default_rng([seed, 1]).permutation(n)
    return sorted(int(i) for i in perm[: n // 2]), sorted(int(i) for i in perm[n // 2:])


def _flat_units(shape: tuple[int, int], flat: Sequence[int]) -> list[Unit]:
    return [(int(i) // shape[1], int(i) % shape[1]) for i in flat]


def spread_sample(scores: Tensor, n: int, *, seed: int, eligible: Optional[Tensor] = None) -> list[Unit]:
    """`n` units at evenly spaced ranks of `scores` `[L, n_units]` (largest first, both ends kept):
    a sample that covers the whole range, for checking an estimate against exact values.
    Only `eligible` units (bool mask, default all) are sampled; ties in a seeded order."""
    v = scores.double().clone()
    if eligible is not None:
        v[~eligible] = math.nan
    order = stats.rank_order(v.flatten(), seed=seed)[: int(torch.isfinite(v).sum())]
    if len(order) == 0 or n < 1:
        return []
    pos = np.unique(np.round(np.linspace(0, len(order) - 1, min(n, len(order)))).astype(int))
    return sorted(_flat_units(tuple(v.shape), order[pos]))


def _count(k: Union[int, float, None], n: int, what: str) -> int:
    """A count of units from an int or a fraction of n in (0, 1) (round half up, >= 1; ours)."""
    if k is None:
        k = 0.1
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"{what} must be an int count or a float fraction in (0, 1), got {k!r}.")
    if isinstance(k, float):
        if not 0.0 < k < 1.0:
            raise ValueError(f"{what} as a fraction must be in (0, 1), got {k}.")
        return stats.count_from_fraction(k, n)
    if not 1 <= k <= n:
        raise ValueError(f"{what} = {k} is out of range: pick 1..{n} (the model has {n} units of "
                         "this kind).")
    return int(k)


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------


@dataclass
class AttributionResult:
    """Which units of `tuned` caused its utility drop against `original`.

    head / group: `[n_layers, n_units]` tensors per kind of unit (group only under GQA):
        "first_order" (recovered loss, nats per content token, first-order estimate, all units),
        "exact" (by a real revert; NaN where not measured), "recovered" (exact where measured, else
        first order), "share" (recovered / total drop), "candidate", "spread", "measured",
        "changed" (bool: the unit's slices differ between the models), and with safety data "safety_first_order" / "safety_exact" (safety loss lost, > 0: the
        update bought safety).
    per_example: summed-NLL values per utility example `[n_examples, ...]`, rows in the order of
        `config["split"]["order"]` (half A first): "tokens", "nll_tuned", "nll_original", "drop",
        "{kind}_first_order", "{kind}_exact" `[n_ex, L, n]`, "joint_{name}" `[n_ex]` (a set reverted
        together), "random_draws" `[n_ex, n_draws]`; and "safety_*" on the safety examples.
    analysis: totals, additivity, agreement, joint and random shares with CIs, Spearman with the map.
    config: model, data, seeds, split, k, n_draws, unit sets, versions, timings.
    """

    head: dict[str, Tensor]
    group: dict[str, Tensor] = field(default_factory=dict)
    per_example: dict[str, Tensor] = field(default_factory=dict)
    analysis: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def kinds(self) -> tuple[str, ...]:
        return ("head", "group") if self.group else ("head",)

    def units(self, kind: UnitKind = "head") -> dict[str, Tensor]:
        if kind not in self.kinds:
            raise UnitError(f"This result has no {kind!r} units (kinds: {self.kinds}).")
        return self.head if kind == "head" else self.group

    @property
    def total_drop(self) -> float:
        return float(self.analysis["drop"]["total"])

    @property
    def utility_recovered(self) -> Tensor:
        """Head units' best estimate of recovered loss (exact where measured), `[L, H]`."""
        return self.head["recovered"]

    def ranking(self, kind: UnitKind = "head", *, by: str = "recovered") -> list[Unit]:
        """Units ordered by `by` ("recovered", "exact", "first_order"), largest first; NaN left out;
        ties in a seeded order."""
        v = self.units(kind)[by]
        order = stats.rank_order(v.flatten(), seed=int(self.config.get("seed", 0)))
        return _flat_units(tuple(v.shape), order[: int(torch.isfinite(v).sum())])

    def rows(self, half: Literal["A", "B"]) -> list[int]:
        """Row indices of `per_example` that belong to half A or B."""
        n_a = len(self.config["split"]["A"])
        n = int(self.per_example["drop"].shape[0])
        return list(range(n_a)) if half == "A" else list(range(n_a, n))

    def summary(self) -> dict:
        """Flat dict of scalars (numbers and short strings) for a report."""
        return _summary(self)

    def to_dict(self) -> dict:
        from .io import to_jsonable

        return to_jsonable({"analysis": self.analysis, "config": self.config})

    def save(self, directory: Union[str, Path]) -> Path:
        """`attribution_result.safetensors` (every tensor) + `attribution_result.json` (analysis and
        config, written last: its presence marks a complete result). Atomic, no pickle."""
        from .io import atomic_save_safetensors, atomic_write_json

        d = Path(directory)
        tensors = {f"{part}.{k}": v for part in ("head", "group", "per_example")
                   for k, v in getattr(self, part).items()}
        atomic_save_safetensors(tensors, d / TENSORS_FILE, {"format": FORMAT})
        atomic_write_json({"format": FORMAT, "format_version": FORMAT_VERSION,
                           "analysis": self.analysis, "config": self.config}, d / META_FILE)
        return d

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "AttributionResult":
        from safetensors.torch import load_file

        from .io import read_json

        d = Path(directory)
        for p in (d / META_FILE, d / TENSORS_FILE):
            if not p.exists():
                raise FileNotFoundError(f"{p} does not exist: {d} holds no saved AttributionResult.")
        meta = read_json(d / META_FILE)
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{d / META_FILE} is not a version-{FORMAT_VERSION} attribution result "
                             f"(format {meta.get('format')!r}, version "
                             f"{meta.get('format_version')!r}); re-run the attribution.")
        parts: dict[str, dict] = {"head": {}, "group": {}, "per_example": {}}
        for key, t in load_file(str(d / TENSORS_FILE)).items():
            part, name = key.split(".", 1)
            parts[part][name] = t
        return cls(analysis=meta["analysis"], config=meta["config"], **parts)


# --------------------------------------------------------------------------------------------------
# Statistics from per-example sums (no model needed)
# --------------------------------------------------------------------------------------------------


def _ratio(num: np.ndarray, den: np.ndarray) -> Any:
    """sum(num) / sum(den) over rows (num may have more columns); NaN when sum(den) <= 0."""
    d = den.sum()
    return num.sum(0) / d if d > 0 else np.full(num.shape[1:], np.nan)


def _ratio_ci(num: Tensor, den: Tensor, rows: Sequence[int], boot: dict) -> dict:
    """sum(num) / sum(den) over `rows` with a percentile bootstrap over those rows."""
    x, y = num.double().numpy()[rows], den.double().numpy()[rows]
    r = stats.bootstrap_statistic(lambda i: _ratio(x[i], y[i]), len(rows), **boot)
    return {"estimate": r["estimate"], "low": r["low"], "high": r["high"]}


def _spearman_ci(x: Tensor, refs: dict[str, Tensor], rows: Sequence[int], boot: dict) -> dict:
    """Spearman of summed per-example values `x` `[n_ex, n_units]` with each reference: fixed
    `[n_units]`, or per example `[n_ex, n_units]` (resampled with x). Bootstrap over examples."""
    xs = x.double().numpy()[rows]
    ys = {k: v.double().numpy()[rows] if v.dim() == 2 else v.double().numpy()
          for k, v in refs.items()}

    def fn(i):
        return [stats.spearman(xs[i].sum(0), y[i].sum(0) if y.ndim == 2 else y) for y in ys.values()]

    r = stats.bootstrap_statistic(fn, len(rows), **boot)
    est, low, high = (np.atleast_1d(r[k]) for k in ("estimate", "low", "high"))
    out = {k: {"spearman": float(est[j]), "low": float(low[j]), "high": float(high[j]),
               "n_units": int(x.shape[1])} for j, k in enumerate(ys)}
    for k, y in ys.items():
        if y.ndim == 1:
            out[k]["p_permutation"] = _permutation_p(xs.sum(0), y, out[k]["spearman"],
                                                     boot["n_boot"], boot["seed"])
    return out


def _permutation_p(x: np.ndarray, y: np.ndarray, rho: float, n_perm: int, seed: int) -> float:
    """Two-sided p of Spearman(x, y) against y permuted across units (what an unrelated map
    gives). The bootstrap CI holds the units fixed, so it can exclude 0 for a random map; this
    p-value is the test of association (ours)."""
    if not math.isfinite(rho):
        return math.nan
    null = np.array([stats.spearman(x, stats.permute_within(y, seed=seed + j))
                     for j in range(n_perm)])
    null = null[np.isfinite(null)]
    return float((1 + (np.abs(null) >= abs(rho) - 1e-12).sum()) / (null.size + 1))


def _agreement(fo: Tensor, ex: Tensor, mask: Tensor, n_tok: float, rows, boot) -> dict:
    """First order vs exact on the `mask` units (per example `[n_ex, L, n]`): Spearman with CI,
    max abs diff and relative L2 error of the token-mean values."""
    if int(mask.sum()) < 3:
        return {"n_units": int(mask.sum()), "spearman": math.nan}
    a, e = fo[:, mask], ex[:, mask]
    out = _spearman_ci(a, {"exact": e}, rows, boot)["exact"]
    a, e = a.sum(0) / n_tok, e.sum(0) / n_tok
    rel = float((a - e).norm() / e.norm()) if float(e.norm()) > 0 else math.nan
    return {**out, "max_abs_diff": float((a - e).abs().max()), "relative_error": rel}


def _analyze(res: AttributionResult, cmap: Any, *, k: dict[str, int], n_bootstrap: int,
             ci: float, seed: int) -> dict:
    """Everything the report needs, from the per-example sums (and the map, if any)."""
    pe, boot = res.per_example, {"n_boot": n_bootstrap, "ci": ci, "seed": seed}
    every, B = list(range(len(pe["drop"]))), res.rows("B")
    tok, drop = pe["tokens"], pe["drop"]
    n_tok = float(tok.sum())
    halves = (("", every), ("_A", res.rows("A")), ("_B", B))
    # each half's drop with its CI: a share over a drop whose CI reaches 0 is not reported as a
    # share (`inference.share_or_difference`), so the report needs the denominators' CIs
    out: dict[str, Any] = {"unit": res.config["unit"], "drop": {
        "total": float(drop.sum()) / n_tok, "total_ci": _ratio_ci(drop, tok, every, boot),
        **{f"ci{t}": _ratio_ci(drop, tok, rows, boot) for t, rows in halves[1:]},
        "L_util_tuned": float(pe["nll_tuned"].sum()) / n_tok,
        "L_util_original": float(pe["nll_original"].sum()) / n_tok, "n_tokens": n_tok}}
    joint = {name[len("joint_"):]: v for name, v in pe.items() if name.startswith("joint_")}
    out["joint"] = {name: {"recovered": float(v.sum()) / n_tok,
                           **{f"share{t}": _ratio_ci(v, drop, rows, boot) for t, rows in halves},
                           **{f"recovered_ci{t}": _ratio_ci(v, tok, rows, boot)
                              for t, rows in halves}}
                    for name, v in joint.items()}
    out["additivity"] = _additivity(res, joint.get("all_units"), n_tok)
    out["agreement"] = {}
    for kind in res.kinds:
        d = res.units(kind)
        fo, ex = pe[f"{kind}_first_order"], pe[f"{kind}_exact"]
        out["agreement"][kind] = _agreement(fo, ex, d["measured"] & d["changed"], n_tok, every,
                                            boot)
        out["agreement"][f"{kind}_spread"] = _agreement(fo, ex, d["spread"], n_tok, every, boot)
    out["random"] = _random(pe["random_draws"], drop, every, B, out["joint"], k[res.config["unit"]])
    if cmap is not None:
        out["map"] = {kind: _map_agreement(res, cmap, kind, every, boot, k[kind])
                      for kind in res.kinds}
    if "safety_tokens" in pe:
        n_s = float(pe["safety_tokens"].sum())
        out["safety_lost"] = {name[len("safety_joint_"):]: float(v.sum()) / n_s
                              for name, v in pe.items() if name.startswith("safety_joint_")}
    return out


def _additivity(res: AttributionResult, all_units_pe: Optional[Tensor], n_tok: float) -> dict:
    """The per-unit recoveries summed, beside the joint revert of every unit: what the exact
    singles miss (interaction) and what no unit owns (drop left)."""
    out: dict[str, Any] = {"sum_first_order": 0.0, "sum_exact_singles": 0.0, "n_exact": 0,
                           "n_units": 0}
    for kind in res.kinds:
        d = res.units(kind)
        out["sum_first_order"] += float(d["first_order"].sum())
        out["sum_exact_singles"] += float(d["exact"].nan_to_num(0.0).sum())
        out["n_exact"] += int(d["measured"].sum())
        out["n_units"] += d["first_order"].numel()
    out["all_exact"] = out["n_exact"] == out["n_units"]
    if all_units_pe is not None:
        rec = float(all_units_pe.sum()) / n_tok
        total = float(res.per_example["drop"].sum()) / n_tok
        out.update(recovered_all_units=rec, drop_left_after_all_units=total - rec,
                   interaction=out["sum_exact_singles"] - rec if out["all_exact"] else math.nan)
    return out


def _random(draws: Tensor, drop: Tensor, every, B, joint: dict, k: int) -> dict:
    """Shares recovered by the random k-sets (on all examples and on half B) and where the map's
    top-k by C and the half-A selection fall among them (`stats.empirical_p`, larger is extreme)."""
    d, dr = draws.double().numpy(), drop.double().numpy()
    out: dict[str, Any] = {"k": k, "n_draws": int(d.shape[1])}
    for tag, rows in (("", every), ("_B", B)):
        shares = _ratio(d[rows], dr[rows])
        fin = shares[np.isfinite(shares)]
        out[f"shares{tag}"] = shares.tolist()
        out[f"mean{tag}"] = float(fin.mean()) if fin.size else math.nan
        out[f"sd{tag}"] = float(fin.std(ddof=1)) if fin.size > 1 else math.nan
        lo, hi = np.quantile(fin, [0.025, 0.975]) if fin.size else (math.nan, math.nan)
        out[f"low{tag}"], out[f"high{tag}"] = float(lo), float(hi)
    for name, tag in (("top_k_C", ""), ("top_k_C", "_B"), ("selected", "_B")):
        v = joint.get(name, {}).get(f"share{tag}", {}).get("estimate", math.nan)
        if math.isfinite(v) and np.isfinite(out[f"shares{tag}"]).any():
            out[f"{name}{tag}_vs_random"] = stats.empirical_p(v, out[f"shares{tag}"],
                                                              alternative="greater")
    return out


def _map_agreement(res: AttributionResult, cmap: Any, kind: str, rows, boot, k: int) -> dict:
    """Spearman of recovered with C, O and S (first order over all units; exact over the
    measured units, a sample biased to the top), and the top-k overlap with C."""
    m = cmap.units(kind)
    d, pe = res.units(kind), res.per_example
    meas = d["measured"]
    out = {"first_order": _spearman_ci(pe[f"{kind}_first_order"].flatten(1),
                                       {by: m[by].flatten() for by in "COS"}, rows, boot),
           "exact": _spearman_ci(pe[f"{kind}_exact"][:, meas],
                                 {by: m[by][meas] for by in "COS"}, rows, boot)}
    kk = min(k, int(torch.isfinite(m["C"]).sum()))
    top_r = set(res.ranking(kind, by="recovered")[:kk])
    out["top_k_overlap"] = len(set(cmap.top_units(kk, by="C", unit=kind)) & top_r) / kk
    out["k"] = kk
    return out


def _summary(res: AttributionResult) -> dict:
    a, c = res.analysis, res.config
    unit = a["unit"]
    s: dict[str, Any] = {"label": c.get("label"), "unit": unit, "k": c.get("k"),
                         "n_examples": c.get("n_examples"), "n_draws": c.get("n_draws"),
                         "total_drop": a["drop"]["total"],
                         "total_drop_low": a["drop"]["total_ci"]["low"],
                         "total_drop_high": a["drop"]["total_ci"]["high"],
                         "L_util_tuned": a["drop"]["L_util_tuned"],
                         "L_util_original": a["drop"]["L_util_original"]}
    s.update({f"additivity_{k}": v for k, v in a["additivity"].items()})
    for kind, g in a["agreement"].items():
        s.update({f"agreement_{kind}_{k}": v for k, v in g.items()})
    for t in ("_A", "_B"):  # a half's drop and recovered amounts (nats/token), if recorded
        if f"ci{t}" in a["drop"]:
            h = a["drop"][f"ci{t}"]
            s.update({f"total_drop{t}": h["estimate"], f"total_drop{t}_low": h["low"],
                      f"total_drop{t}_high": h["high"]})
    for name, j in a["joint"].items():
        s[f"{name}_recovered"] = j["recovered"]
        for t in ("", "_A", "_B"):
            if f"recovered_ci{t}" in j:
                r = j[f"recovered_ci{t}"]
                s.update({f"{name}_recovered{t}": r["estimate"],
                          f"{name}_recovered{t}_low": r["low"],
                          f"{name}_recovered{t}_high": r["high"]})
        for part in ("share", "share_A", "share_B"):
            s.update({f"{name}_{part}": j[part]["estimate"], f"{name}_{part}_low": j[part]["low"],
                      f"{name}_{part}_high": j[part]["high"]})
    s.update({f"random_{k}": v for k, v in a["random"].items()})
    for key, v in a["random"].items():
        if key.endswith("_vs_random"):
            s[f"{key}_percentile"], s[f"{key}_p"] = v["percentile"], v["p"]
    for kind, m in a.get("map", {}).items():
        for est in ("first_order", "exact"):
            for by, v in m[est].items():
                s.update({f"spearman_{by}_{kind}_{est}": v["spearman"],
                          f"spearman_{by}_{kind}_{est}_low": v["low"],
                          f"spearman_{by}_{kind}_{est}_high": v["high"],
                          f"spearman_{by}_{kind}_{est}_p": v.get("p_permutation")})
        s[f"top_k_overlap_C_{kind}"] = m["top_k_overlap"]
    s.update({f"safety_lost_{k}": v for k, v in a.get("safety_lost", {}).items()})
    for kind in res.kinds:
        s[f"top_{kind}s_recovered"] = ", ".join(unit_label(u, kind) for u in res.ranking(kind)[:5])
    s["selected"] = ", ".join(unit_label(u, unit) for u in c.get("selected", []))
    s["time_s"] = c.get("timings_s", {}).get("total")
    return {k: v for k, v in s.items() if isinstance(v, (int, float, str)) or v is None}


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


def _prepare_data(tuned, original, utility_data, safety_data, *, n_examples, utility_reference,
                  max_new_tokens, reference_cache, batch_size, seed) -> dict:
    """Utility examples (self-reference answers of `original` by default), split into halves and
    batched per half with content-only losses; safety examples likewise (no split)."""
    for name, ds in (("utility_data", utility_data), ("safety_data", safety_data)):
        if ds is not None and (not isinstance(ds, ChatDataset) or len(ds) == 0):
            raise DataError(f"{name} must be a non-empty ChatDataset (e.g. load_bundled(...)), got "
                            f"{type(ds).__name__}" + (" of length 0." if ds is not None else "."))
    if utility_reference not in ("self", "dataset"):
        raise ValueError(f"utility_reference must be 'self' or 'dataset', got {utility_reference!r}.")
    util = utility_data.take(n_examples)
    if utility_reference == "self":  # under torchrun: rank 0 generates (and caches), all get it
        util = distributed.main_only(lambda: self_reference(
            original, util, max_new_tokens=max_new_tokens, cache_path=reference_cache))
    A, B = split_halves(len(util), seed=seed)
    kw = dict(batch_size=batch_size, end_of_turn_in_loss=False)
    # Each half batched on its own (half A's numbers cannot depend on half B's examples), longest
    # first so that batch-mates have similar lengths (self-reference answers vary: less padding).
    length = [len(encode_example(tuned.tokenizer, ex)[0]) for ex in util]
    order = [sorted(half, key=lambda i: (-length[i], i)) for half in (A, B)]
    batches = [b for half in order for b in make_batches(
        tuned, ChatDataset(util.name, [util[i] for i in half], util.source), **kw)]
    out = {"util": util, "A": A, "B": B, "order": order[0] + order[1], "batches": batches,
           "safe": None, "safe_batches": None}
    if safety_data is not None:
        out["safe"] = with_refusals(safety_data.take(n_examples), seed=seed)
        out["safe_batches"] = make_batches(tuned, out["safe"], **kw)
    return out


def _tokens(batches: Sequence[ChatBatch]) -> Tensor:
    return torch.cat([b.loss_mask[:, 1:].sum(-1).double() for b in batches])


class _Evaluator:
    """Exact reverts on the utility (and safety) examples, per example."""

    def __init__(self, tuned, original, util_batches, safe_batches, bar):
        self.tuned, self.original, self.bar = tuned, original, bar
        self.util = FromLayer(tuned, util_batches)
        self.safe = FromLayer(tuned, safe_batches) if safe_batches else None
        self.base_util = self.util.nll(0)
        self.base_safe = self.safe.nll(0) if self.safe else None

    def __call__(self, heads=(), groups=(), *, safety: bool = False):
        """(utility recovered `[n_ex]`, safety lost `[n_safe]` or None) of reverting these units
        jointly, from the lowest layer they touch; all slices unchanged: exactly 0, no pass."""
        if self.bar is not None:
            self.bar.update(1)
        safety = safety and self.safe is not None
        pairs = _slice_pairs(self.tuned, self.original, heads, groups)
        if all(torch.equal(d, s.to(d.device)) for d, s in pairs):
            return (torch.zeros_like(self.base_util),
                    torch.zeros_like(self.base_safe) if safety else None)
        layer = min(l for l, _ in [*heads, *groups])
        with revert_units(self.tuned, self.original, heads=heads, groups=groups):
            u = self.base_util - self.util.nll(layer)
            s = self.safe.nll(layer) - self.base_safe if safety else None
        return u, s


def _every(shape: tuple[int, int]) -> list[Unit]:
    return [(l, i) for l in range(shape[0]) for i in range(shape[1])]


def _exact_sets(fo: dict[str, Tensor], changed: dict[str, Tensor], rows_A, *, exact: str,
                n_candidates: dict[str, int], n_spread: int, seed: int) -> dict[str, dict]:
    """Per kind: candidates (top by first order on half A), the spread sample (evenly spaced ranks
    of first order on all examples, changed units only), and the units to measure exactly."""
    out = {}
    for kind, pe in fo.items():
        fo_a, fo_all = pe[rows_A].sum(0), pe.sum(0)
        shape = tuple(fo_all.shape)
        top = stats.rank_order(fo_a.flatten(), seed=seed)[: n_candidates[kind]]
        cand = sorted(_flat_units(shape, top))
        spread = spread_sample(fo_all, n_spread, seed=seed, eligible=changed[kind])
        todo = _every(shape) if exact == "all" else sorted(set(cand) | set(spread))
        out[kind] = {"candidates": cand, "spread": spread, "exact": todo}
    return out


def _exact_singles(ev: _Evaluator, sets: dict, shapes: dict, n_ex: int, n_safe: int):
    """Exact per-example recovered (and safety lost) of each unit of each kind's exact set,
    `[n_ex, L, n]` float64, NaN where not measured. Under torchrun the reverts are shared out
    over the ranks (each is restored bit-exactly, so none depends on another)."""
    util, safe = {}, {}
    for kind in sets:
        util[kind] = torch.full((n_ex, *shapes[kind]), math.nan, dtype=torch.float64)
        safe[kind] = torch.full((n_safe, *shapes[kind]), math.nan, dtype=torch.float64)
    todo = [(kind, tuple(u)) for kind, s in sets.items() for u in s["exact"]]
    done = distributed.map_shared(lambda x: (x, ev(**{f"{x[0]}s": [x[1]]}, safety=True)), todo)
    for (kind, (l, i)), (u, sl) in done:
        util[kind][:, l, i] = u
        if sl is not None:
            safe[kind][:, l, i] = sl
    return util, safe


def _select_on_A(exact_pe: Tensor, candidates: Sequence[Unit], rows_A, k: int, seed: int) -> list[Unit]:
    """Top-k candidates by exact recovery summed over half A only (ties in a seeded order)."""
    on_a = exact_pe[rows_A].sum(0)
    scores = torch.full_like(on_a, math.nan)
    for l, i in candidates:
        scores[l, i] = on_a[l, i]
    return sorted(_flat_units(tuple(on_a.shape), stats.rank_order(scores.flatten(), seed=seed)[:k]))


def _joint_sets(tuned, unit: str, selected, conflict_map, k: int) -> dict[str, tuple[list, list]]:
    """(heads, groups) reverted together: the half-A selection, the map's top-k by C, every unit,
    and under GQA all heads (Q/O) and all groups (K/V) apart."""
    as_kind = lambda us: (us, []) if unit == "head" else ([], us)  # noqa: E731
    out = {"selected": as_kind(selected)}
    if conflict_map is not None:
        out["top_k_C"] = as_kind(sorted(conflict_map.top_units(k, by="C", unit=unit)))
    heads = all_units(tuned, "head")
    groups = all_units(tuned, "group") if uses_gqa(tuned) else []
    out["all_units"] = (heads, groups)
    if groups:
        out.update(all_heads=(heads, []), all_groups=([], groups))
    return out


def _unit_tensors(fo_pe, ex_pe, sets, changed, total, n_tok, safety) -> dict[str, Tensor]:
    """The per-unit maps of one kind (token means) from the per-example sums."""
    shape = tuple(fo_pe.shape[1:])
    measured = _mask(shape, sets["exact"])
    fo, ex = fo_pe.sum(0) / n_tok, ex_pe.sum(0) / n_tok  # NaN where not measured
    rec = torch.where(measured, ex, fo)
    d = {"first_order": fo, "exact": ex, "recovered": rec,
         "share": rec / total if total > 0 else torch.full(shape, math.nan, dtype=torch.float64),
         "candidate": _mask(shape, sets["candidates"]), "spread": _mask(shape, sets["spread"]),
         "measured": measured, "changed": changed}
    if safety is not None:
        fo_s, ex_s, n_s = safety
        d["safety_first_order"], d["safety_exact"] = fo_s.sum(0) / n_s, ex_s.sum(0) / n_s
    return d


def _mask(shape, us: Sequence[Unit]) -> Tensor:
    m = torch.zeros(shape, dtype=torch.bool)
    for l, i in us:
        m[l, i] = True
    return m


def _assemble(data, ev, nll_orig, fo, fo_safe, ex_util, ex_safe, joint, rand, sets, changed):
    """(per_example, per-unit maps per kind) of a result from the measured pieces."""
    tokens = _tokens(data["batches"])
    drop = ev.base_util - nll_orig
    n_tok = float(tokens.sum())
    per_example = {"tokens": tokens, "nll_tuned": ev.base_util, "nll_original": nll_orig,
                   "drop": drop, "random_draws": rand,
                   **{f"{kind}_first_order": v for kind, v in fo.items()},
                   **{f"{kind}_exact": v for kind, v in ex_util.items()},
                   **{f"joint_{n}": u for n, (u, _) in joint.items()}}
    safety = {kind: None for kind in fo}
    if fo_safe is not None:
        s_tok = _tokens(data["safe_batches"])
        per_example.update({"safety_tokens": s_tok, "safety_nll_tuned": ev.base_safe,
                            **{f"safety_{kind}_first_order": -v for kind, v in fo_safe.items()},
                            **{f"safety_{kind}_exact": v for kind, v in ex_safe.items()},
                            **{f"safety_joint_{n}": s for n, (_, s) in joint.items()}})
        safety = {kind: (-fo_safe[kind], ex_safe[kind], float(s_tok.sum())) for kind in fo}
    maps = {kind: _unit_tensors(fo[kind], ex_util[kind], sets[kind], changed[kind],
                                float(drop.sum()) / n_tok, n_tok, safety[kind]) for kind in fo}
    return per_example, maps


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def _check_options(tuned, *, unit, exact, k, n_candidates, n_spread, n_draws, n_bootstrap,
                   n_examples) -> tuple[tuple[str, ...], dict[str, int], dict[str, int]]:
    """Clear errors for bad options; (kinds, k per kind, candidates per kind)."""
    kinds = ("head", "group") if uses_gqa(tuned) else ("head",)
    if unit not in kinds:
        raise UnitError(f"unit must be one of {kinds} for this model, got {unit!r}"
                        + (": it has no GQA, so no key/value groups." if unit == "group" else "."))
    if exact not in ("screened", "all"):
        raise ValueError(f"exact must be 'screened' or 'all', got {exact!r}.")
    if n_draws < MIN_DRAWS:
        raise ValueError(f"n_draws must be >= {MIN_DRAWS} (METHOD v2): a percentile among fewer "
                         f"random sets is too coarse to read; got {n_draws}.")
    for name, v, lo in (("n_spread", n_spread, 1), ("n_bootstrap", n_bootstrap, 2),
                        ("n_examples", n_examples, 4), ("n_candidates", n_candidates, 1)):
        if v is not None and v < lo:
            raise ValueError(f"{name} must be >= {lo}, got {v}.")
    L = tuned.cfg.n_layers
    sizes = {kind: L * n_units(tuned, kind) for kind in kinds}
    ks = {kind: _count(k if kind == unit else None, sizes[kind], "k") for kind in kinds}
    # Candidates (ours): 2k by default, as the screened sensitivity, so the top-k is chosen by exact
    # values among twice as many first-order candidates; only the selected kind has any (the other
    # kind, groups when heads are selected, gets the spread sample only).
    cand = {kind: 0 for kind in kinds}
    cand[unit] = min(sizes[unit], n_candidates or 2 * ks[unit])
    if cand[unit] < ks[unit]:
        raise ValueError(f"n_candidates = {n_candidates} < k = {ks[unit]}: the top-k is chosen among "
                         "the candidates, so pass n_candidates >= k.")
    return kinds, ks, cand


def attribute(
    tuned: Model,
    original: Model,
    *,
    utility_data: ChatDataset,
    conflict_map: Any = None,
    safety_data: Optional[ChatDataset] = None,
    unit: UnitKind = "head",
    k: Union[int, float, None] = None,
    n_examples: Optional[int] = 16,
    utility_reference: UtilityReference = "self",
    max_new_tokens: int = 256,
    reference_cache: Optional[Union[str, Path]] = None,
    exact: ExactScope = "screened",
    n_candidates: Optional[int] = None,
    n_spread: int = 30,
    n_draws: int = MIN_DRAWS,
    n_bootstrap: int = 1000,
    ci: float = 0.95,
    batch_size: int = 4,
    seed: int = 0,
    label: str = "tuned",
    progress: bool = False,
) -> AttributionResult:
    """Which units of `tuned` caused its utility drop relative to `original` (see module doc).

    Args:
        tuned, original: the same model after and before training (any arm: full, CAST, random).
            Neither is changed (tuned's weights are swapped and restored bit-exactly).
        utility_data: benign prompts; the first `n_examples` (>= 4; None: all) are used.
        conflict_map: the map of `original` (optional): its top-k by C is reverted jointly and placed
            among the random draws; Spearman(recovered, C/O/S) with CIs.
        safety_data: harmful prompts (refusals added by `data.with_refusals`); when given, the
            safety loss lost by each revert is measured too (first order for all units, exact where
            utility is exact and for the joint sets; not for the random draws).
        unit: the kind of unit selected, drawn at random and compared with the map ("head", or
            "group" under GQA). Per-unit numbers are computed for every kind the model has.
        k: units per selected, top-k and random set: a count or a fraction (default 0.1, ours).
        utility_reference: "self" (default, as the diagnosis: `original`'s greedy answers to their
            natural end, at most `max_new_tokens`, cached at `reference_cache`) or "dataset" (the
            examples' answers as given, e.g. already made by `data.self_reference`).
        exact: "screened" (default): exact reverts of the candidates and of the spread sample;
            "all": of every unit (slow; the sum of exact singles is then complete).
        n_candidates: units of the selected kind measured exactly from the top of the first-order
            estimate on half A (default, ours: 2k). Must be >= k. Other kinds: the spread only.
        n_spread: units per kind at evenly spaced first-order ranks, measured exactly (agreement).
        n_draws: random k-sets (>= 20). n_bootstrap, ci: every CI, a bootstrap over examples
            (and as many permutations for the Spearman p-values).
        batch_size: examples per forward pass; each half is batched longest first, so small
            batches waste little on padding (default 4, ours; a CPU pass gains nothing from more).
        seed: the split, the random draws, the bootstraps and the tie-breaks.
        label: names the tuned model in the result (e.g. "full", "cast", "random").
    """
    t_all, timings = time.perf_counter(), {}
    check_pair(tuned, original)
    kinds, ks, n_cand = _check_options(tuned, unit=unit, exact=exact, k=k, n_candidates=n_candidates,
                                       n_spread=n_spread, n_draws=n_draws, n_bootstrap=n_bootstrap,
                                       n_examples=n_examples)
    if conflict_map is not None:  # the map describes the model before tuning
        conflict_map.check_model(original)
    t = time.perf_counter()
    data = _prepare_data(tuned, original, utility_data, safety_data, n_examples=n_examples,
                         utility_reference=utility_reference, max_new_tokens=max_new_tokens,
                         reference_cache=reference_cache, batch_size=batch_size, seed=seed)
    rows_A = list(range(len(data["A"])))
    timings["data"] = time.perf_counter() - t

    t = time.perf_counter()
    fo = first_order(tuned, original, data["batches"], kinds)
    fo_safe = (first_order(tuned, original, data["safe_batches"], kinds)
               if data["safe"] is not None else None)
    timings["first_order"] = time.perf_counter() - t
    changed = {kind: changed_units(tuned, original, kind) for kind in kinds}
    sets = _exact_sets(fo, changed, rows_A, exact=exact, n_candidates=n_cand, n_spread=n_spread,
                       seed=seed)
    every = all_units(tuned, unit)
    rng = np.random.default_rng([seed, 2])
    draws = [sorted(every[i] for i in rng.choice(len(every), ks[unit], replace=False))
             for _ in range(n_draws)]
    n_joint = 2 + (conflict_map is not None) + 2 * (len(kinds) - 1)  # see _joint_sets
    n_evals = sum(len(s["exact"]) for s in sets.values()) + n_joint + n_draws
    bar = None
    if progress and distributed.is_main():  # this rank's share of the evaluations
        from tqdm.auto import tqdm

        mine = lambda n: len(distributed.share(range(n)))  # noqa: E731
        bar = tqdm(total=mine(n_evals - n_joint - n_draws) + mine(n_joint) + mine(n_draws),
                   desc=f"attribution ({label})")

    # Many small forwards from here on: no per-call weight copies (same numbers).
    with backend.inference_layout(tuned), backend.inference_layout(original):
        t = time.perf_counter()
        nll_orig = per_example_nll(original, data["batches"])
        ev = _Evaluator(tuned, original, data["batches"], data["safe_batches"], bar)
        if not (torch.isfinite(ev.base_util).all() and torch.isfinite(nll_orig).all()):
            raise NonFiniteLossError("Non-finite utility loss of tuned or original: check both "
                                     "models' weights for NaN/inf (a diverged checkpoint?).")
        shapes = {kind: tuple(changed[kind].shape) for kind in kinds}
        n_safe = len(data["safe"]) if data["safe"] is not None else 0
        ex_util, ex_safe = _exact_singles(ev, sets, shapes, len(data["util"]), n_safe)
        timings["exact_singles"] = time.perf_counter() - t

        t = time.perf_counter()
        selected = _select_on_A(ex_util[unit], sets[unit]["candidates"], rows_A, ks[unit], seed)
        joint_sets = _joint_sets(tuned, unit, selected, conflict_map, ks[unit])
        joint = dict(zip(joint_sets, distributed.map_shared(
            lambda hg: ev(*hg, safety=True), list(joint_sets.values()))))
        timings["joint"] = time.perf_counter() - t
        t = time.perf_counter()
        rand = torch.stack(distributed.map_shared(lambda d: ev(**{f"{unit}s": d})[0], draws), dim=1)
        timings["random_draws"] = time.perf_counter() - t
    if bar is not None:
        bar.close()

    per_example, maps = _assemble(data, ev, nll_orig, fo, fo_safe, ex_util, ex_safe, joint, rand,
                                  sets, changed)
    config = _config(tuned, original, data, label=label, unit=unit, k=ks[unit], n_draws=n_draws,
                     exact=exact, n_candidates=n_cand, n_spread=n_spread, n_bootstrap=n_bootstrap,
                     ci=ci, seed=seed, utility_reference=utility_reference,
                     max_new_tokens=max_new_tokens, batch_size=batch_size, sets=sets,
                     draws=draws, joint_sets=joint_sets, conflict_map=conflict_map)
    res = AttributionResult(head=maps["head"], group=maps.get("group", {}),
                            per_example=per_example, config=config)
    t = time.perf_counter()
    res.analysis = _analyze(res, conflict_map, k=ks, n_bootstrap=n_bootstrap, ci=ci, seed=seed)
    timings["analysis"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    res.config.update(timings_s=timings, n_exact_evaluations=n_evals)
    return res


def _config(tuned, original, data, *, sets, draws, joint_sets, conflict_map, **options) -> dict:
    """Everything needed to redo the attribution (options, data, split, unit sets, versions)."""
    util, seed = data["util"], options["seed"]
    as_lists = lambda us: [list(u) for u in us]  # noqa: E731
    return {
        **options,
        "model": model_id(tuned),
        "n_examples": len(util),
        "data": {"utility": util.describe(),
                 "safety": data["safe"].describe() if data["safe"] is not None else None},
        "loss": "summed NLL per example over response content tokens (end-of-turn and template "
                "excluded, as the diagnosis); per-unit maps and shares are token means",
        "split": {"seed": [seed, 1], "A": data["A"], "B": data["B"], "order": data["order"],
                  "how": "seeded permutation; each half batched apart, longest first; per_example "
                         "rows follow `order` (example indices, half A first)"},
        "seeds": {"split": [seed, 1], "draws": [seed, 2], "bootstrap": seed, "tie_break": seed},
        "candidates": {kind: as_lists(s["candidates"]) for kind, s in sets.items()},
        "spread": {kind: as_lists(s["spread"]) for kind, s in sets.items()},
        "random_draws": [as_lists(d) for d in draws],
        "selected": as_lists(joint_sets["selected"][0 if options["unit"] == "head" else 1]),
        "selected_on": "half A: top-k by exact recovery among half A's first-order candidates",
        "joint_sets": {n: {"heads": as_lists(h), "groups": as_lists(g)}
                       for n, (h, g) in joint_sets.items()},
        "changed_outside_units": changed_outside_units(tuned, original),
        "conflict_map": None if conflict_map is None else {
            "combine": conflict_map.config.get("combine"), "model": conflict_map.config.get("model")},
        "device": str(tuned.cfg.device), "dtype": str(tuned.cfg.dtype),
        "versions": {"attribution": ATTRIBUTION_VERSION, "torch": torch.__version__,
                     "transformer_lens": backend.TL_VERSION},
    }
