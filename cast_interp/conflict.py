"""Optimization Conflict: do the safety and utility gradients of a head point in opposite directions?

For head h, g_safe(h) and g_util(h) are the gradients of the mean response-token NLL over the whole
safety set D_safe and utility set D_util with respect to the head's parameters, flattened and
concatenated over its components (Q, K, V, O). The paper's Optimization Conflict is

    O(h) = 1 - cos(g_safe(h), g_util(h))        in [0, 2]: 0 aligned, 1 orthogonal, 2 opposed.

A head with O near 2 cannot be moved towards safety without moving it away from what utility wants.

What this module adds (ours, recorded in every result's `config`):
- per-component conflict (`component_O`: Q, K, V, O slices alone), gradient norms and the raw dot
  product g_safe . g_util (the first-order utility harm of a safety step is its negative);
- under grouped-query attention the K/V part of g(h) is the gradient of the group's shared K/V
  weights (every head of a group sees the same K/V gradient), and `kv_group_O` gives the conflict of
  each group's K/V parameters alone;
- a percentile bootstrap over calibration *batches*. The cosine of a resampled sum
  sum_b w_b g_b needs only inner products between per-batch gradients, so we keep per-head Gram
  matrices <g_b, g_b'> (safe-safe, util-util, safe-util, per component) and the bootstrap is exact and
  costs no extra forward or backward pass.

Undefined values are NaN, never a number: a head whose safety or utility gradient is exactly zero
has no direction, so its O is NaN (with a warning naming it). Gradients are taken on the weights as
loaded (`load_model` keeps them unfolded: folding LayerNorm changes the coordinates and so the cosines).

Memory: the bootstrap keeps one copy of the attention-parameter gradient per batch until the Gram
matrices are built: (B_safe + B_util) x (number of attention parameters) x 4 bytes, K/V stored once
per group. SmolLM2-135M has ~26.5M attention parameters, so ~106 MB per batch (~850 MB for the
default 32 + 32 examples in batches of 8). With `n_bootstrap=0` nothing per batch is kept.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from .data import ChatBatch
from .heads import COMPONENTS, Component, component_index, component_param_names, n_kv_heads
from .objectives import NonFiniteLossError, response_nll

METHOD_VERSION = "conflict-1"


class ZeroGradientWarning(UserWarning):
    """Some heads have an exactly zero gradient: their cosine, and so O, is undefined (NaN)."""


# --------------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------------


def _head_params(model: HookedTransformer) -> list[torch.nn.Parameter]:
    """The parameters heads own (Q/K/V/O weights and Q/K/V biases; b_O belongs to no head)."""
    return [getattr(model.blocks[l].attn, n)
            for l in range(model.cfg.n_layers) for c in COMPONENTS
            for n in component_param_names(model, c)]


def _compact_grads(model: HookedTransformer) -> dict[Component, Tensor]:
    """`.grad` of head parameters as `{c: [n_layers, n_c, numel_c]}` float32, with n_c = n_heads for
    Q/O and n_kv_heads for K/V (a group's shared gradient stored once)."""
    out = {}
    for c in COMPONENTS:
        rows = []
        for l in range(model.cfg.n_layers):
            attn = model.blocks[l].attn
            parts = []
            for n in component_param_names(model, c):
                p = getattr(attn, n)
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                parts.append(g.detach().float().reshape(p.shape[0], -1))
            rows.append(torch.cat(parts, dim=1))
        out[c] = torch.stack(rows)
    return out


def _head_index(model: HookedTransformer, c: Component, device) -> Tensor:
    """For each query head, its row in the compact storage of component c (the group for K/V)."""
    return torch.tensor([component_index(model, c, h) for h in range(model.cfg.n_heads)],
                        device=device)


def _expand(model: HookedTransformer, compact: dict[Component, Tensor]) -> dict[Component, Tensor]:
    return {c: t[:, _head_index(model, c, t.device)] for c, t in compact.items()}


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


def _gradient_pass(
    model: HookedTransformer, batches: Sequence[ChatBatch], *, what: str, keep_per_batch: bool,
    progress: bool = False,
) -> tuple[dict[Component, Tensor], list[dict[Component, Tensor]], float, int]:
    """One forward+backward per batch of (summed NLL of the batch) / (tokens in all batches).

    Returns (compact gradient of the token-mean loss, per-batch compact gradients if kept, the loss,
    the number of response tokens). Only head parameters get `.grad` during the pass (cheaper: no
    embedding/MLP weight gradients); `requires_grad` is restored and all `.grad` cleared afterwards.
    """
    n_tokens = _check_batches(batches, what)
    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    head_ids = {id(p) for p in _head_params(model)}
    total: Optional[dict[Component, Tensor]] = None
    per_batch: list[dict[Component, Tensor]] = []
    loss_sum = 0.0
    it = enumerate(batches)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(batches), desc=f"gradients ({what})")
    try:
        for p in params:
            p.requires_grad_(id(p) in head_ids)
            p.grad = None
        for i, batch in it:
            with torch.enable_grad():
                loss = response_nll(model, batch, reduction="sum") / n_tokens
            if not torch.isfinite(loss.detach()):
                raise NonFiniteLossError(
                    f"The {what} loss is {float(loss.detach())} on {what} batch {i} (of {len(batches)}). "
                    "Check the model weights and that this batch's responses are non-empty; use "
                    "float32.")
            loss.backward()
            g = _compact_grads(model)
            for p in params:
                p.grad = None
            loss_sum += float(loss.detach())
            if keep_per_batch:
                per_batch.append(g)
            total = g if total is None else {c: total[c] + g[c] for c in COMPONENTS}
    finally:
        for p, r in zip(params, saved):
            p.grad = None
            p.requires_grad_(r)
    assert total is not None
    if keep_per_batch:  # `total` aliases the first batch's tensors otherwise: make it its own
        total = {c: t.clone() for c, t in total.items()}
    return total, per_batch, loss_sum, n_tokens


def accumulate_gradients(
    model: HookedTransformer, batches: Sequence[ChatBatch], *, progress: bool = False,
) -> dict[Component, Float[Tensor, "layer head numel"]]:
    """Per-head gradients of the token-mean response NLL over *all* `batches`, float32.

    Each batch's summed NLL is weighted by 1 / (response tokens in all batches), so the result equals
    the gradient of the loss on one big batch. One forward and backward per batch. Returns
    `{c: [n_layers, n_heads, numel_c]}` for c in q, k, v, o (under GQA the K/V entries of a head are
    its group's shared gradient). Leaves every `.grad` cleared (None) and `requires_grad` as it was.
    """
    total, _, _, _ = _gradient_pass(model, batches, what="calibration", keep_per_batch=False,
                                    progress=progress)
    return _expand(model, total)


# --------------------------------------------------------------------------------------------------
# Conflict
# --------------------------------------------------------------------------------------------------


@dataclass
class ConflictResult:
    """Optimization Conflict of every head, with its parts and uncertainty (all `[n_layers, n_heads]`
    unless said otherwise; NaN where undefined).

    O: 1 - cos(g_safe(h), g_util(h)) over the concatenated Q, K, V, O gradients of the head.
    component_O: `{c: [L, H]}`, the same on one component's slice only.
    kv_group_O: `[L, n_kv_heads]`, conflict of each K/V group's own K and V parameters (ours).
    norms: `{"safe", "util", "safe_q", "util_q", ...}` gradient norms (of the token-mean losses).
    dot: g_safe(h) . g_util(h) (float64 accumulation, stored float32); -dot is the first-order
        increase of L_util per unit safety step on head h.
    ci_low, ci_high: percentile bootstrap interval of O over calibration batches (ours);
        component_ci_low / component_ci_high the same per component.
    config: options, data sizes, losses, timings, method version.
    """

    O: Float[Tensor, "layer head"]
    component_O: dict[str, Tensor]
    kv_group_O: Float[Tensor, "layer kv_head"]
    norms: dict[str, Tensor]
    dot: Float[Tensor, "layer head"]
    ci_low: Float[Tensor, "layer head"]
    ci_high: Float[Tensor, "layer head"]
    component_ci_low: dict[str, Tensor] = field(default_factory=dict)
    component_ci_high: dict[str, Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Flat `{name: tensor}` plus `"config"`: the form results are saved in."""
        out: dict = {"O": self.O, "kv_group_O": self.kv_group_O, "dot": self.dot,
                     "ci_low": self.ci_low, "ci_high": self.ci_high}
        for prefix, d in (("component_O", self.component_O), ("norms", self.norms),
                          ("component_ci_low", self.component_ci_low),
                          ("component_ci_high", self.component_ci_high)):
            for k, v in d.items():
                out[f"{prefix}.{k}"] = v
        out["config"] = dict(self.config)
        return out


def _conflict_from(dot: Tensor, nsq_s: Tensor, nsq_u: Tensor) -> Tensor:
    """1 - cos from a dot product and squared norms; NaN where a norm is zero."""
    denom = (nsq_s * nsq_u).sqrt()
    cos = torch.where(denom > 0, dot / denom.clamp_min(torch.finfo(denom.dtype).tiny),
                      torch.full_like(dot, float("nan")))
    return 1.0 - cos.clamp(-1.0, 1.0)


def _dots(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise dot products over the last dim, accumulated in float64."""
    return (a.double() * b.double()).sum(-1)


def _grams(
    model: HookedTransformer, A: list[dict[Component, Tensor]], B: list[dict[Component, Tensor]],
) -> dict[Component, Tensor]:
    """Per-head Gram matrices `{c: [L, H, len(A), len(B)]}` (float64) of per-batch gradients."""
    out = {}
    for c in COMPONENTS:
        per_layer = []
        for l in range(model.cfg.n_layers):
            a = torch.stack([g[c][l] for g in A]).double()  # [Ba, n_c, numel]
            b = torch.stack([g[c][l] for g in B]).double()
            per_layer.append(torch.einsum("ain,bin->iab", a, b))
        g = torch.stack(per_layer)  # [L, n_c, Ba, Bb]
        out[c] = g[:, _head_index(model, c, g.device)]
    return out


def _bootstrap(
    model: HookedTransformer, per_safe, per_util, *, n_bootstrap: int, ci: float, seed: int,
) -> tuple[Tensor, Tensor, dict, dict]:
    """Percentile bootstrap of O over batches, exact from Gram matrices (see module docstring)."""
    G_ss, G_uu, G_su = _grams(model, per_safe, per_safe), _grams(model, per_util, per_util), \
        _grams(model, per_safe, per_util)
    dev = G_ss["q"].device
    gen = torch.Generator().manual_seed(seed)

    def counts(n_batches: int) -> Tensor:
        idx = torch.randint(n_batches, (n_bootstrap, n_batches), generator=gen)
        w = torch.zeros(n_bootstrap, n_batches, dtype=torch.float64)
        w.scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float64))
        return w.to(dev)

    Ws, Wu = counts(len(per_safe)), counts(len(per_util))
    q = torch.tensor([(1 - ci) / 2, (1 + ci) / 2], dtype=torch.float64, device=dev)

    def interval(gss, guu, gsu) -> tuple[Tensor, Tensor]:
        # Resampling weights scale each sum; cosine is scale-free, so token normalisation drops out.
        dot = torch.einsum("nb,lhbe,ne->nlh", Ws, gsu, Wu)
        nss = torch.einsum("nb,lhbe,ne->nlh", Ws, gss, Ws)
        nuu = torch.einsum("nb,lhbe,ne->nlh", Wu, guu, Wu)
        o = _conflict_from(dot, nss.clamp_min(0), nuu.clamp_min(0))
        lo_hi = torch.nanquantile(o, q, dim=0)
        return lo_hi[0].float(), lo_hi[1].float()

    comp_lo, comp_hi = {}, {}
    for c in COMPONENTS:
        comp_lo[c], comp_hi[c] = interval(G_ss[c], G_uu[c], G_su[c])
    lo, hi = interval(sum(G_ss.values()), sum(G_uu.values()), sum(G_su.values()))
    return lo, hi, comp_lo, comp_hi


def _warn_zero(model: HookedTransformer, ns: Tensor, nu: Tensor) -> None:
    zero = (ns == 0) | (nu == 0)
    if not zero.any():
        return
    heads = [(int(l), int(h)) for l, h in zero.nonzero().tolist()]
    which = []
    for l, h in heads[:10]:
        side = " and ".join(n for n, t in (("safety", ns), ("utility", nu)) if t[l, h] == 0)
        which.append(f"L{l}H{h} ({side})")
    more = f" and {len(heads) - 10} more" if len(heads) > 10 else ""
    warnings.warn(
        f"{len(heads)} head(s) have an exactly zero gradient, so their Optimization Conflict is "
        f"undefined and set to NaN: {', '.join(which)}{more}. Such a head does not affect that loss "
        "(e.g. a zeroed output projection); NaN heads are never selected by top_heads.",
        ZeroGradientWarning, stacklevel=3)


def optimization_conflict(
    model: HookedTransformer,
    safety_batches: Sequence[ChatBatch],
    utility_batches: Sequence[ChatBatch],
    *,
    n_bootstrap: int = 200,
    ci: float = 0.9,
    seed: int = 0,
    progress: bool = False,
) -> ConflictResult:
    """O(h) = 1 - cos(g_safe(h), g_util(h)) for every head, from whole-set gradients.

    Args:
        safety_batches: D_safe (harmful prompt -> refusal) as `ChatBatch`es.
        utility_batches: D_util (benign prompt -> reference answer) as `ChatBatch`es.
        n_bootstrap: bootstrap resamples of the calibration batches for `ci_low`/`ci_high` (ours;
            0 skips it, CIs are NaN, and no per-batch gradients are kept). With a single batch in a
            set, resampling cannot vary it and the interval collapses to the point estimate.
        ci: coverage of the percentile interval.
        seed: seed of the bootstrap resampling (the gradients themselves are deterministic).

    Cost: one forward and backward per batch; the bootstrap adds no model pass (Gram matrices).
    Raises `NonFiniteLossError` naming the objective and batch if a loss is NaN/inf.
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
    gs, per_s, loss_s, ntok_s = _gradient_pass(model, safety_batches, what="safety",
                                               keep_per_batch=keep, progress=progress)
    gu, per_u, loss_u, ntok_u = _gradient_pass(model, utility_batches, what="utility",
                                               keep_per_batch=keep, progress=progress)
    t1 = time.perf_counter()

    # Point estimates from the accumulated vectors; per-component dots and squared norms sum to the
    # whole head's because g(h) is the concatenation of its components.
    idx = {c: _head_index(model, c, gs[c].device) for c in COMPONENTS}
    dot_c = {c: _dots(gs[c], gu[c])[:, idx[c]] for c in COMPONENTS}
    ss_c = {c: _dots(gs[c], gs[c])[:, idx[c]] for c in COMPONENTS}
    uu_c = {c: _dots(gu[c], gu[c])[:, idx[c]] for c in COMPONENTS}
    dot, ss, uu = sum(dot_c.values()), sum(ss_c.values()), sum(uu_c.values())
    O = _conflict_from(dot, ss, uu).float()
    component_O = {c: _conflict_from(dot_c[c], ss_c[c], uu_c[c]).float() for c in COMPONENTS}
    kv_dot = _dots(gs["k"], gu["k"]) + _dots(gs["v"], gu["v"])
    kv_ss = _dots(gs["k"], gs["k"]) + _dots(gs["v"], gs["v"])
    kv_uu = _dots(gu["k"], gu["k"]) + _dots(gu["v"], gu["v"])
    kv_group_O = _conflict_from(kv_dot, kv_ss, kv_uu).float()
    norms = {"safe": ss.sqrt().float(), "util": uu.sqrt().float()}
    for c in COMPONENTS:
        norms[f"safe_{c}"] = ss_c[c].sqrt().float()
        norms[f"util_{c}"] = uu_c[c].sqrt().float()
    _warn_zero(model, ss, uu)

    if keep:
        if len(per_s) < 2 or len(per_u) < 2:
            warnings.warn(f"The bootstrap resamples batches, but there are {len(per_s)} safety and "
                          f"{len(per_u)} utility batch(es): with one batch the interval collapses "
                          "to the point estimate. Use smaller batches for a meaningful CI.",
                          stacklevel=2)
        ci_low, ci_high, comp_lo, comp_hi = _bootstrap(
            model, per_s, per_u, n_bootstrap=n_bootstrap, ci=ci, seed=seed)
        del per_s, per_u
    else:
        nan = torch.full_like(O, float("nan"))
        ci_low, ci_high = nan, nan.clone()
        comp_lo = {c: nan.clone() for c in COMPONENTS}
        comp_hi = {c: nan.clone() for c in COMPONENTS}
    t2 = time.perf_counter()

    config = {
        "method_version": METHOD_VERSION,
        "definition": "O = 1 - cos(g_safe, g_util) over concatenated q,k,v,o head gradients",
        "kv_gradient": "group-shared (ours)" if n_kv_heads(model) != model.cfg.n_heads else "own",
        "loss": "token-mean response NLL over the whole set",
        "grad_dtype": "float32", "dot_dtype": "float64",
        "n_bootstrap": n_bootstrap, "ci": ci, "seed": seed,
        "bootstrap_unit": "calibration batch (ours)",
        "n_batches_safe": len(safety_batches), "n_batches_util": len(utility_batches),
        "n_tokens_safe": ntok_s, "n_tokens_util": ntok_u,
        "loss_safe": loss_s, "loss_util": loss_u,
        "timings_s": {"gradients": t1 - t0, "bootstrap_and_cosines": t2 - t1},
    }
    return ConflictResult(O=O, component_O=component_O, kv_group_O=kv_group_O, norms=norms,
                          dot=dot.float(), ci_low=ci_low, ci_high=ci_high,
                          component_ci_low=comp_lo, component_ci_high=comp_hi, config=config)
