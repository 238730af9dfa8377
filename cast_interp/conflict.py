"""Optimization Conflict: do the safety and utility gradients of a unit point in opposite directions?

For a unit u (a query head, or under grouped-query attention a key/value group; see `units.py`),
g_safe(u) and g_util(u) are the gradients of the mean response-content NLL over the whole safety set
D_safe and utility set D_util with respect to the parameters u *owns*, flattened. The paper's
Optimization Conflict is

    O(u) = 1 - cos(g_safe(u), g_util(u))      in [0, 2]: 0 aligned, 1 orthogonal, 2 opposed.

A head's O is computed over its own Q/O slices only: the shared K/V gradient of its group is the
group's, measured once for the group, never copied into its heads (METHOD.md v2). Without GQA a
head owns Q, K, V and O.

What this module adds (ours, recorded in every result's `config`):
- `O_balanced`: 1 - mean of the per-component cosines (Q and O for a head under GQA; K and V for a
  group), so that no component wins by its gradient norm (V carried 77% of SmolLM2's norm);
- per-component O, gradient norms and the raw dot product g_safe . g_util;
- a percentile bootstrap over calibration *examples*. The cosine of a resampled sum
  sum_i w_i g_i needs only inner products between per-example gradients, so per-unit Gram matrices
  <g_i, g_j> are kept (safe-safe, util-util, safe-util, per component) and the bootstrap costs no
  extra model pass. Its draws are kept (`O_boot`) for the concentration null of the map.
- the count of units with O > 1 (opposed gradients); "high conflict" is relative otherwise.

Undefined values are NaN, never a number: a unit whose safety or utility gradient is exactly zero has
no direction, so its O is NaN (with a warning naming it). Gradients are taken on the weights as
loaded (`load_model` keeps them unfolded).

Memory: the bootstrap keeps one copy of the owned-parameter gradient per example until the Gram
matrices are built: (n_safe + n_util) x (owned attention parameters) x 4 bytes; SmolLM2-135M has
~26.5M, so ~106 MB per example (6.8 GB for 32 + 32). `n_bootstrap=0` keeps nothing per example.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .data import ChatBatch, example_lengths
from .objectives import NonFiniteLossError, token_nll
from .units import UnitKind, label, unit_components, unit_grads, unit_params, uses_gqa

METHOD_VERSION = "conflict-2"


class ZeroGradientWarning(UserWarning):
    """Some units have an exactly zero gradient: their cosine, and so O, is undefined (NaN)."""


# --------------------------------------------------------------------------------------------------
# Gradients, one example at a time
# --------------------------------------------------------------------------------------------------


def _check_batches(batches: Sequence[ChatBatch], what: str) -> int:
    if isinstance(batches, ChatBatch):
        raise TypeError(f"{what}: pass a list of ChatBatch (e.g. make_batches(model, data)), "
                        "not a single batch.")
    if len(batches) == 0:
        raise ValueError(f"{what}: no batches. Tokenize the data with make_batches(model, data).")
    for i, b in enumerate(batches):
        if not isinstance(b, ChatBatch):
            raise TypeError(f"{what}: batch {i} is a {type(b).__name__}, expected a ChatBatch "
                            "(from make_batches).")
    n = sum(b.n_response_tokens for b in batches)
    if n == 0:
        raise ValueError(f"{what}: the batches contain no response tokens, so the loss is "
                         "undefined. Check that the examples have non-empty responses.")
    return n


def split_examples(batches: Sequence[ChatBatch]) -> list[tuple[Tensor, Tensor]]:
    """Each example of `batches` as `(tokens [1, len], loss_mask [1, len])` without padding."""
    return [(b.tokens[r:r + 1, :n], b.loss_mask[r:r + 1, :n])
            for b in batches for r, n in enumerate(example_lengths(b).tolist())]


def _kinds(model) -> tuple[UnitKind, ...]:
    return ("head", "group") if uses_gqa(model) else ("head",)


def _grads(model) -> dict[tuple[str, str], Tensor]:
    return {(k, c): g for k in _kinds(model) for c, g in unit_grads(model, k).items()}


def example_gradients(
    model, batches: Sequence[ChatBatch], *, what: str, keep_per_example: bool,
    progress: bool = False,
) -> tuple[dict, list[dict], float, int]:
    """Gradients of the token-mean response NLL over all of `batches`, one example at a time.

    Example i contributes (summed NLL of i) / (response tokens of all examples), so the sum over
    examples is the gradient of the whole-set loss. Returns (the total `{(kind, component): [L, n,
    numel]}`, the per-example gradients if kept, the loss, the token count). Only owned parameters
    get `.grad`; `requires_grad` is restored and every `.grad` cleared afterwards.
    """
    n_tokens = _check_batches(batches, what)
    examples = split_examples(batches)
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    owned = {id(p) for p in unit_params(model)}
    total, per, loss_sum = None, [], 0.0
    it = enumerate(examples)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(examples), desc=f"gradients ({what})")
    try:
        for p in params:
            p.requires_grad_(id(p) in owned)
            p.grad = None
        for i, (tokens, mask) in it:
            with torch.enable_grad():
                logits = model(tokens.to(model.cfg.device))
                nll = token_nll(logits, ChatBatch(tokens=tokens, loss_mask=mask, prompt_lengths=[0]))
                loss = nll.sum() / n_tokens
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLossError(
                    f"The {what} loss is {float(loss.detach())} on {what} example {i} (of "
                    f"{len(examples)}). Check the model weights and that the response is "
                    "non-empty; use float32.")
            loss.backward()
            g = _grads(model)
            for p in params:
                p.grad = None
            loss_sum += float(loss.detach())
            if keep_per_example:
                per.append(g)
            total = {k: v.clone() for k, v in g.items()} if total is None else \
                {k: total[k] + g[k] for k in total}
    finally:
        for p, r in zip(params, saved):
            p.grad = None
            p.requires_grad_(r)
    return total, per, loss_sum, n_tokens


# --------------------------------------------------------------------------------------------------
# Conflict
# --------------------------------------------------------------------------------------------------


@dataclass
class ConflictResult:
    """Optimization Conflict of every unit, with its parts and uncertainty.

    `head` and (under GQA) `group` map names to `[n_layers, n_units]` float32 tensors (NaN where
    undefined): "O", "O_low", "O_high" (bootstrap interval), "O_balanced" (+ "_low"/"_high"),
    "O_{c}" per component c the unit owns, "dot" (g_safe . g_util; -dot is the first-order L_util
    increase of a unit safety step), "norm_safe", "norm_util", "norm_safe_{c}", "norm_util_{c}";
    and "O_boot" `[n_bootstrap, n_layers, n_units]` (the bootstrap draws).
    config: options, data sizes, losses, timings, method version, counts of O > 1.
    """

    head: dict[str, Tensor]
    group: dict[str, Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    @property
    def O(self) -> Tensor:
        return self.head["O"]

    @property
    def dot(self) -> Tensor:
        return self.head["dot"]

    def units(self, kind: UnitKind = "head") -> dict[str, Tensor]:
        return self.head if kind == "head" else self.group


def _one_minus_cos(dot: Tensor, nss: Tensor, nuu: Tensor) -> Tensor:
    """1 - cos from a dot product and squared norms; NaN where a norm is zero."""
    denom = (nss.clamp_min(0) * nuu.clamp_min(0)).sqrt()
    cos = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(denom.dtype).tiny),
                      torch.full_like(dot, float("nan")))
    return 1.0 - cos.clamp(-1.0, 1.0)


def _dots(a: Tensor, b: Tensor) -> Tensor:
    return (a.double() * b.double()).sum(-1)


def _point(gs: dict, gu: dict, kind: str, comps: Sequence[str]) -> dict[str, Tensor]:
    """Point estimates for one kind of unit from the whole-set gradients."""
    d = {c: _dots(gs[kind, c], gu[kind, c]) for c in comps}
    ss = {c: _dots(gs[kind, c], gs[kind, c]) for c in comps}
    uu = {c: _dots(gu[kind, c], gu[kind, c]) for c in comps}
    out = {"O": _one_minus_cos(sum(d.values()), sum(ss.values()), sum(uu.values())),
           "O_balanced": 1.0 - torch.stack([1.0 - _one_minus_cos(d[c], ss[c], uu[c])
                                            for c in comps]).mean(0),
           "dot": sum(d.values()), "norm_safe": sum(ss.values()).sqrt(),
           "norm_util": sum(uu.values()).sqrt()}
    for c in comps:
        out[f"O_{c}"] = _one_minus_cos(d[c], ss[c], uu[c])
        out[f"norm_safe_{c}"], out[f"norm_util_{c}"] = ss[c].sqrt(), uu[c].sqrt()
    return out


def _gram(A: list[dict], B: list[dict], key) -> Tensor:
    """Per-unit Gram matrix `[L, n, len(A), len(B)]` of per-example gradients (float64 result)."""
    a = torch.stack([g[key] for g in A])  # [na, L, n, numel]
    b = torch.stack([g[key] for g in B])
    # float32 products (float64 is several times slower on CPU); sums of O(1e6) terms lose ~1e-6
    # relative, far below the bootstrap spread they feed.
    return torch.einsum("ilun,jlun->luij", a, b).double()


def _bootstrap(per_s: list[dict], per_u: list[dict], kind: str, comps: Sequence[str], *,
               n_bootstrap: int, ci: float, seed: int) -> dict[str, Tensor]:
    """Percentile bootstrap over examples of O and O_balanced, exact from Gram matrices."""
    gen = torch.Generator().manual_seed(seed)

    def counts(n: int) -> Tensor:
        idx = torch.randint(n, (n_bootstrap, n), generator=gen)
        w = torch.zeros(n_bootstrap, n, dtype=torch.float64)
        return w.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))

    Ws, Wu = counts(len(per_s)), counts(len(per_u))
    cos, parts = {}, {}
    for c in comps:
        key = (kind, c)
        # Resampling weights scale each sum; cosine is scale-free, so token normalisation drops out.
        parts[c] = (torch.einsum("bi,luij,bj->blu", Ws, _gram(per_s, per_u, key), Wu),
                    torch.einsum("bi,luij,bj->blu", Ws, _gram(per_s, per_s, key), Ws),
                    torch.einsum("bi,luij,bj->blu", Wu, _gram(per_u, per_u, key), Wu))
        cos[c] = 1.0 - _one_minus_cos(*parts[c])
    draws = {"O": _one_minus_cos(*(sum(p[i] for p in parts.values()) for i in range(3))),
             "O_balanced": 1.0 - torch.stack([cos[c] for c in comps]).mean(0)}
    q = torch.tensor([(1 - ci) / 2, (1 + ci) / 2], dtype=torch.float64)
    out = {"O_boot": draws["O"].float()}
    for name, t in draws.items():
        lo_hi = torch.nanquantile(t, q, dim=0)
        out[f"{name}_low"], out[f"{name}_high"] = lo_hi[0], lo_hi[1]
    return out


def _warn_zero(kind: str, ns: Tensor, nu: Tensor) -> None:
    zero = (ns == 0) | (nu == 0)
    if not zero.any():
        return
    units = [tuple(x) for x in zero.nonzero().tolist()]
    names = [f"{label(u, kind)} ({' and '.join(n for n, t in (('safety', ns), ('utility', nu)) if t[u] == 0)})"
             for u in units[:10]]
    more = f" and {len(units) - 10} more" if len(units) > 10 else ""
    warnings.warn(
        f"{len(units)} {kind}(s) have an exactly zero gradient, so their Optimization Conflict is "
        f"undefined and set to NaN: {', '.join(names)}{more}. Such a unit does not affect that loss "
        "(e.g. a zeroed output projection); NaN units are never selected.",
        ZeroGradientWarning, stacklevel=3)


def optimization_conflict(
    model,
    safety_batches: Sequence[ChatBatch],
    utility_batches: Sequence[ChatBatch],
    *,
    n_bootstrap: int = 200,
    ci: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> ConflictResult:
    """O(u) = 1 - cos(g_safe(u), g_util(u)) for every head and (under GQA) every K/V group.

    Args:
        safety_batches: D_safe (harmful prompt -> refusal) as `ChatBatch`es; the loss is on their
            `loss_mask` (the diagnosis builds them with `end_of_turn_in_loss=False`: content only).
        utility_batches: D_util (benign prompt -> reference answer) as `ChatBatch`es.
        n_bootstrap: bootstrap resamples of the *examples* (ours; 0 skips it: intervals are NaN and
            nothing per example is kept). Needs at least 2 examples per set.
        ci: coverage of the percentile interval.
        seed: seed of the resampling (the gradients themselves are deterministic).

    Cost: one forward and backward per example; the bootstrap adds no model pass.
    Raises `NonFiniteLossError` naming the objective and example if a loss is NaN/inf.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), got {ci}.")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}.")
    if model.cfg.normalization_type in ("LNPre", "RMSPre"):
        warnings.warn("The model's LayerNorm weights are folded (fold_ln=True): gradients and so "
                      "cosines are in the folded coordinates. Load it with load_model (unfolded) to "
                      "match the method.", stacklevel=2)
    keep = n_bootstrap > 0
    t0 = time.perf_counter()
    gs, per_s, loss_s, ntok_s = example_gradients(model, safety_batches, what="safety",
                                                  keep_per_example=keep, progress=progress)
    gu, per_u, loss_u, ntok_u = example_gradients(model, utility_batches, what="utility",
                                                  keep_per_example=keep, progress=progress)
    if keep and min(len(per_s), len(per_u)) < 2:
        raise ValueError(f"The bootstrap resamples examples, but there are {len(per_s)} safety and "
                         f"{len(per_u)} utility example(s): use at least 2 of each, or n_bootstrap=0.")
    t1 = time.perf_counter()
    results: dict[str, dict[str, Tensor]] = {}
    counts = {}
    for kind in _kinds(model):
        comps = unit_components(model, kind)
        r = _point(gs, gu, kind, comps)
        _warn_zero(kind, r["norm_safe"], r["norm_util"])
        if keep:
            r.update(_bootstrap(per_s, per_u, kind, comps, n_bootstrap=n_bootstrap, ci=ci,
                                seed=seed))
        else:
            nan = torch.full_like(r["O"], float("nan"))
            r.update({f"{n}_{s}": nan.clone() for n in ("O", "O_balanced") for s in ("low", "high")})
        results[kind] = {k: v.float() for k, v in r.items()}
        counts[kind] = {"n_units": int(r["O"].numel()),
                        "n_O_above_1": int((r["O"] > 1).sum()),
                        "n_O_low_above_1": int((r["O_low"] > 1).sum()),
                        "n_O_balanced_above_1": int((r["O_balanced"] > 1).sum())}
    del per_s, per_u
    t2 = time.perf_counter()
    config = {
        "method_version": METHOD_VERSION,
        "definition": "O = 1 - cos(g_safe, g_util) over the parameters each unit owns "
                      "(head: Q/O under GQA, Q/K/V/O otherwise; group: K/V)",
        "balanced": "O_balanced = 1 - mean of per-component cosines (ours)",
        "loss": "token-mean NLL over the batches' loss_mask tokens, whole set",
        "grad_dtype": "float32", "dot_dtype": "float64",
        "n_bootstrap": n_bootstrap, "ci": ci, "seed": seed,
        "bootstrap_unit": "calibration example (v2)",
        "n_examples_safe": sum(len(b) for b in safety_batches),
        "n_examples_util": sum(len(b) for b in utility_batches),
        "n_tokens_safe": ntok_s, "n_tokens_util": ntok_u,
        "loss_safe": loss_s, "loss_util": loss_u,
        "counts": counts,
        "timings_s": {"gradients": t1 - t0, "bootstrap_and_cosines": t2 - t1},
    }
    return ConflictResult(head=results["head"], group=results.get("group", {}), config=config)
