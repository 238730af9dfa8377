"""Post-hoc causal attribution (stage 4, ours): which heads caused the utility drop of safety tuning.

After safety fine-tuning we ask, head by head, how much of the utility tax the head's *update* caused:
revert head h's parameters to their pre-training values, keep every other parameter tuned, and
measure

    utility_recovered(h) = L_util(tuned) - L_util(tuned, h reverted)   (> 0: h's update hurt utility)
    safety_lost(h)       = L_safe(tuned, h reverted) - L_safe(tuned)   (> 0: h's update bought safety)

with L_x the token-mean response NLL (`objectives.dataset_nll`) of D_util's reference responses and
of D_safe's harmful prompts with refusals. Reverting is a weight swap (`revert_heads`), not
retraining. Comparing utility_recovered with the pre-alignment conflict map C (Spearman, top-k
overlap, and the share of the total drop recovered by reverting the top-k heads of C jointly vs the
top-k by utility_recovered vs random k) tests whether the diagnosis predicted the damage.

What a head owns (`heads.py`): `W_Q[h]`, `b_Q[h]`, `W_O[h]` and, through its key/value group g(h),
`W_K/b_K/W_V/b_V[g]`. `kv_policy` (ours) says whether reverting h also reverts its group's K/V:
"any" (default, matching `sparse_tuning`'s freezing: h's own computation is then fully original,
but the other heads of the group see original keys/values too) or "own" (Q and O only). `b_O` is
shared by the layer and belongs to no head: per-head reverts keep it tuned, so the per-head numbers
never include it; `revert_heads(..., b_O=True)` also reverts the b_O of the layers touched, and
reverting every head with `b_O=True` gives back the original model exactly when training touched only
attention (`sparse_tuning`'s default scope). `config["changed_outside_attention"]` lists parameters
that changed elsewhere (then no head revert can recover the whole drop).

Two ways to compute it, sharing one signature (`causal_attribution(method=...)`):
- "exact" (default): real reverts. Reverting a head of layer l changes nothing before layer l, so the
  tuned `blocks.{l}.hook_resid_pre` is cached once per batch; for each head of layer l the block's
  attention output with that head reverted is computed from the cache (one block call per head),
  and layers l..L-1 run once for several heads at once, copies stacked along the batch, copy i's
  `blocks.{l}.hook_attn_out` replaced by head i's reverted output; only response positions are
  unembedded (`sensitivity`'s machinery). Equals `attribution_naive` (revert + full forward) to float
  tolerance. A head whose slices are identical in both models gets exactly 0 without a pass.
- "first_order": the linearisation L(reverted) ~ L(tuned) + (theta_orig - theta_tuned) .
  grad L(tuned) over the head's slices, so utility_recovered ~ -(theta_orig - theta_tuned) . grad
  L_util and safety_lost ~ (theta_orig - theta_tuned) . grad L_safe, for all heads from one backward
  per objective. An approximation: it ignores every nonlinear effect of the revert, which is not small
  after real training. Check it with `compare_attribution` against "exact" on a subset of heads
  (`heads=`) before trusting its ranking.
"""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from .data import ChatBatch, ChatDataset, DataError, make_batches, with_refusals
from .heads import (COMPONENTS, Head, all_heads, component_index, component_param_names,
                    rank_heads, validate_heads)
from .model import model_id
from .objectives import NonFiniteLossError, dataset_nll, token_nll
from .sensitivity import (_check_batches, _data_sha, _default_heads_per_pass, _heads_by_layer,
                          _resid_pre_name, _copies_nll_from_layer, compare_sensitivity)

AttributionMethod = Literal["exact", "first_order"]
RevertKV = Literal["any", "own"]
METHODS: tuple[str, ...] = ("exact", "first_order")
KV_POLICIES: tuple[str, ...] = ("any", "own")
FORMAT = "cast_interp.attribution"
FORMAT_VERSION = 1
# Not "attribution.json": the pipeline writes its own summary piece under that name in the same folder.
TENSORS_FILE = "attribution_result.safetensors"
META_FILE = "attribution_result.json"
# Random k-head draws averaged for the "random k" baseline share (ours).
_N_RANDOM = 3


def _attn_out_name(layer: int) -> str:
    return f"blocks.{layer}.hook_attn_out"


# --------------------------------------------------------------------------------------------------
# Model pairs and reverting
# --------------------------------------------------------------------------------------------------


def _check_pair(tuned: HookedTransformer, original: HookedTransformer) -> None:
    """Clear ValueError unless the two models have the same architecture and parameter shapes."""
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
        raise ValueError("tuned and original have different parameter names "
                         f"(only in tuned: {sorted(pa.keys() - pb.keys())[:3]}, only in original: "
                         f"{sorted(pb.keys() - pa.keys())[:3]}); pass the same model before/after.")
    for n, p in pa.items():
        if p.shape != pb[n].shape:
            raise ValueError(f"Parameter {n} is {tuple(p.shape)} in tuned but "
                             f"{tuple(pb[n].shape)} in original; pass the same model before/after.")


def _check_kv(kv_policy: str) -> None:
    if kv_policy not in KV_POLICIES:
        raise ValueError(f"kv_policy must be one of {KV_POLICIES}, got {kv_policy!r}.")


def _head_slices(model: HookedTransformer, layer: int, head: int,
                 kv_policy: str) -> list[tuple[str, int]]:
    """(full parameter name, index along dim 0) of every slice reverting this head swaps."""
    out = []
    for c in COMPONENTS:
        if c in ("k", "v") and kv_policy == "own":
            continue
        for n in component_param_names(model, c):
            out.append((f"blocks.{layer}.attn.{n}", component_index(model, c, head)))
    return out


@contextlib.contextmanager
def revert_heads(
    tuned: HookedTransformer, original: HookedTransformer, heads: Sequence[Sequence[int]], *,
    kv_policy: RevertKV = "any", b_O: bool = False,
) -> Iterator[HookedTransformer]:
    """Context manager: `tuned` with these heads' parameter slices set to `original`'s values.

    Swaps each head's Q and O slices and, with `kv_policy="any"` (default, ours), its K/V group's
    slices (under GQA this also changes the keys/values the group's other heads see); "own" swaps only
    Q and O. `b_O=True` also reverts `b_O` of every layer with a listed head (b_O belongs to no
    head). On exit the tuned values are restored bit-exactly, also after an exception. `original` is
    never modified. Yields `tuned`.
    """
    _check_kv(kv_policy)
    _check_pair(tuned, original)
    heads = validate_heads(tuned, heads)
    targets: dict[tuple[str, Optional[int]], None] = {}
    for l, h in heads:
        for key in _head_slices(tuned, l, h, kv_policy):
            targets[key] = None
        if b_O:
            targets[(f"blocks.{l}.attn.b_O", None)] = None
    pt, po = dict(tuned.named_parameters()), dict(original.named_parameters())
    saved = []
    with torch.no_grad():
        try:
            for name, idx in targets:
                dst = pt[name] if idx is None else pt[name][idx]
                src = po[name] if idx is None else po[name][idx]
                saved.append((dst, dst.clone()))
                dst.copy_(src.to(dst.device, dst.dtype))
            yield tuned
        finally:
            for dst, old in saved:
                dst.copy_(old)


def changed_heads(tuned: HookedTransformer, original: HookedTransformer, *,
                  kv_policy: RevertKV = "any") -> torch.BoolTensor:
    """`[n_layers, n_heads]` True where some slice reverting the head would swap differs."""
    _check_kv(kv_policy)
    pt, po = dict(tuned.named_parameters()), dict(original.named_parameters())
    L, H = tuned.cfg.n_layers, tuned.cfg.n_heads
    out = torch.zeros(L, H, dtype=torch.bool)
    with torch.no_grad():
        for l, h in all_heads(tuned):
            out[l, h] = any(not torch.equal(pt[n][i], po[n][i].to(pt[n].device))
                            for n, i in _head_slices(tuned, l, h, kv_policy))
    return out


def _changed_outside_attention(tuned: HookedTransformer, original: HookedTransformer) -> list[str]:
    po = dict(original.named_parameters())
    with torch.no_grad():
        return [n for n, p in tuned.named_parameters()
                if ".attn." not in n and not torch.equal(p, po[n].to(p.device))]


# --------------------------------------------------------------------------------------------------
# Exact
# --------------------------------------------------------------------------------------------------


def _exact_losses(tuned: HookedTransformer, original: HookedTransformer, batches: Sequence[ChatBatch],
                  by_layer: dict[int, list[int]], kv_policy: str, bar: Any) -> Tensor:
    """L(tuned with head (l, h) reverted), token mean, `[n_layers, n_heads]` float64 (NaN: not done)."""
    cfg = tuned.cfg
    n_tokens = _check_batches(batches)
    sums = torch.full((cfg.n_layers, cfg.n_heads), math.nan, dtype=torch.float64)
    for l, hs in by_layer.items():
        sums[l, hs] = 0.0
    layers = sorted(by_layer)
    with torch.no_grad():
        for batch in batches:
            b = batch.to(cfg.device)
            _, _, shortformer, attn_mask = tuned.input_to_embed(b.tokens)
            _, cache = tuned.run_with_cache(b.tokens, names_filter=[_resid_pre_name(l) for l in layers],
                                            stop_at_layer=layers[-1] + 1)
            B, T = b.tokens.shape
            k_max = _default_heads_per_pass(tuned, B, T)
            for l in layers:
                resid = cache[_resid_pre_name(l)]
                # Block l's attention output with each head reverted, from the cached input: the
                # block's own forward, so norms, masks and positional details are as in a full run.
                outs: dict[int, Tensor] = {}
                for h in by_layer[l]:
                    got = []
                    with revert_heads(tuned, original, [(l, h)], kv_policy=kv_policy), \
                            tuned.hooks(fwd_hooks=[(_attn_out_name(l),
                                                    lambda x, hook: got.append(x))]):
                        tuned.blocks[l](resid, shortformer_pos_embed=shortformer,
                                        attention_mask=attn_mask)
                    outs[h] = got[0]
                hs_all = by_layer[l]
                for s in range(0, len(hs_all), k_max):
                    hs = hs_all[s: s + k_max]
                    k = len(hs)
                    new = torch.cat([outs[h] for h in hs])  # copy i: head hs[i] reverted

                    def hook(x, hook, new=new):
                        return new

                    sums[l, hs] += _copies_nll_from_layer(tuned, l, _attn_out_name(l), hook, resid,
                                                          shortformer, attn_mask, b, k).double().cpu()
                del outs
                if bar is not None:
                    bar.update(1)
            del cache
    return sums / n_tokens


def attribution_naive(
    tuned: HookedTransformer, original: HookedTransformer, batches: list[ChatBatch], *,
    heads: Optional[list[Head]] = None, kv_policy: RevertKV = "any",
) -> Float[Tensor, "layer head"]:
    """The slow reference: `L(tuned) - L(tuned, h reverted)` on `batches`, one `revert_heads` and a
    full `dataset_nll` per head; NaN for heads not asked for."""
    _check_kv(kv_policy)
    _check_pair(tuned, original)
    _check_batches(batches)
    by_layer = _heads_by_layer(tuned, heads)
    base = dataset_nll(tuned, batches)
    out = torch.full((tuned.cfg.n_layers, tuned.cfg.n_heads), math.nan, dtype=torch.float64)
    for l, hs in by_layer.items():
        for h in hs:
            with revert_heads(tuned, original, [(l, h)], kv_policy=kv_policy):
                out[l, h] = base - dataset_nll(tuned, batches)
    return out


# --------------------------------------------------------------------------------------------------
# First order
# --------------------------------------------------------------------------------------------------


def _attn_params(model: HookedTransformer) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".attn." in n and not n.endswith("b_O")}


def _first_order_dot(tuned: HookedTransformer, original: HookedTransformer,
                     batches: Sequence[ChatBatch], kv_policy: str) -> Tensor:
    """(theta_orig - theta_tuned) . grad L(tuned) over each head's slices, `[L, H]` float64."""
    cfg = tuned.cfg
    n_tokens = _check_batches(batches)
    params = _attn_params(tuned)
    names = list(params)
    flags = {n: p.requires_grad for n, p in tuned.named_parameters()}
    grads = {n: torch.zeros_like(p) for n, p in params.items()}
    try:
        for n, p in tuned.named_parameters():
            p.requires_grad_(n in params)  # no gradient work for MLPs / embeddings
        with torch.enable_grad():
            for batch in batches:
                b = batch.to(cfg.device)
                loss = token_nll(tuned(b.tokens), b).sum() / n_tokens  # full-set token mean
                for n, g in zip(names, torch.autograd.grad(loss, [params[n] for n in names])):
                    grads[n] += g
    finally:
        for n, p in tuned.named_parameters():
            p.requires_grad_(flags[n])
    po = dict(original.named_parameters())
    # Per parameter, the dot product restricted to each index along dim 0 (head or K/V group).
    per_idx = {}
    with torch.no_grad():
        for n, p in params.items():
            d = (po[n].to(p.device, p.dtype) - p) * grads[n]
            per_idx[n] = d.reshape(d.shape[0], -1).double().sum(-1).cpu()
    out = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
    for l, h in all_heads(tuned):
        out[l, h] = sum(float(per_idx[n][i]) for n, i in _head_slices(tuned, l, h, kv_policy))
    return out


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------


@dataclass
class AttributionResult:
    """Per-head causal attribution of the utility drop, `[n_layers, n_heads]` float32 (NaN: not done).

    utility_recovered: L_util(tuned) - L_util(h reverted); > 0 means reverting h recovers utility.
    safety_lost: L_safe(h reverted) - L_safe(tuned); > 0 means reverting h loses safety.
    total_drop: L_util(tuned) - L_util(original), the whole tax.
    base: {"L_util_tuned", "L_util_original", "L_safe_tuned", "L_safe_original"}.
    comparison: agreement with the conflict map and joint-revert shares ({} without a map).
    config: method, kv_policy, n_examples, model_id, data describe(), heads, k, seed, ...
    """

    utility_recovered: Float[Tensor, "layer head"]
    safety_lost: Float[Tensor, "layer head"]
    total_drop: float
    base: dict = field(default_factory=dict)
    comparison: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def ranking(self) -> list[Head]:
        """Computed heads, largest utility_recovered first (NaN heads left out)."""
        return rank_heads(self.utility_recovered)

    def summary(self) -> dict:
        """Flat dict of scalars (numbers and short strings) for a report."""
        out: dict[str, Any] = {"method": self.config.get("method"),
                               "kv_policy": self.config.get("kv_policy"),
                               "n_examples": self.config.get("n_examples"),
                               "n_heads_computed": int(torch.isfinite(self.utility_recovered).sum()),
                               "total_drop": self.total_drop, **self.base}
        for name, t in (("utility_recovered", self.utility_recovered),
                        ("safety_lost", self.safety_lost)):
            v = t[torch.isfinite(t)]
            out[f"{name}_max"] = float(v.max()) if v.numel() else math.nan
            out[f"{name}_sum"] = float(v.double().sum()) if v.numel() else math.nan
        out["top_heads_recovered"] = ", ".join(f"L{l}H{h}" for l, h in self.ranking()[:5])
        for key, val in self.comparison.items():
            if isinstance(val, dict):
                out.update({f"{key}_{k}": v for k, v in val.items()
                            if isinstance(v, (int, float, str)) or v is None})
            elif isinstance(val, (int, float, str)) or val is None:
                out[key] = val
        return out

    def to_dict(self) -> dict:
        from .io import to_jsonable

        return to_jsonable({"utility_recovered": self.utility_recovered,
                            "safety_lost": self.safety_lost, "total_drop": self.total_drop,
                            "base": self.base, "comparison": self.comparison, "config": self.config})

    def save(self, directory: Union[str, Path]) -> Path:
        """`attribution_result.safetensors` (the two maps) + `attribution_result.json` (the rest,
        written last: its presence marks a complete result). Atomic, no pickle."""
        from .io import atomic_save_safetensors, atomic_write_json, to_jsonable

        d = Path(directory)
        atomic_save_safetensors({"utility_recovered": self.utility_recovered.float(),
                                 "safety_lost": self.safety_lost.float()}, d / TENSORS_FILE,
                                {"format": FORMAT})
        atomic_write_json({"format": FORMAT, "format_version": FORMAT_VERSION,
                           "total_drop": self.total_drop, "base": self.base,
                           "comparison": to_jsonable(self.comparison), "config": self.config},
                          d / META_FILE)
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
        if meta.get("format") != FORMAT:
            raise ValueError(f"{d / META_FILE} is not an attribution result "
                             f"(format {meta.get('format')!r}).")
        t = load_file(str(d / TENSORS_FILE))
        nan = lambda x: math.nan if x is None else float(x)  # noqa: E731 (JSON null = NaN)
        return cls(utility_recovered=t["utility_recovered"], safety_lost=t["safety_lost"],
                   total_drop=nan(meta["total_drop"]),
                   base={k: nan(v) for k, v in meta.get("base", {}).items()},
                   comparison=meta.get("comparison", {}), config=meta.get("config", {}))


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def _joint_share(tuned, original, batches, heads, kv_policy, L_tuned, total_drop) -> tuple[float, float]:
    """(recovered, share of total_drop) by reverting `heads` all at once (one exact evaluation)."""
    with revert_heads(tuned, original, heads, kv_policy=kv_policy):
        rec = L_tuned - dataset_nll(tuned, batches)
    return rec, (rec / total_drop if total_drop > 0 else math.nan)


def _compare(tuned, original, util_batches, result_u: Tensor, cmap, *, k: int, kv_policy: str,
             L_tuned: float, total_drop: float, seed: int) -> dict:
    out: dict[str, Any] = {"k": k}
    for by in ("C", "O", "S"):
        try:
            c = compare_sensitivity(getattr(cmap, by).float(), result_u.float(), k=k)
        except ValueError:  # no head finite in both
            c = {"spearman": math.nan, "top_k_overlap": math.nan}
        out[by] = {"spearman": c["spearman"], "pearson": c.get("pearson", math.nan),
                   "top_k_overlap": c["top_k_overlap"]}
    top_c = cmap.top_heads(k, by="C")
    ours = [h for h in AttributionResult(result_u, result_u, 0.0).ranking()][:k]
    rng = random.Random(seed)
    every = all_heads(tuned)
    draws = [sorted(rng.sample(every, k)) for _ in range(_N_RANDOM)]
    joint: dict[str, Any] = {}
    for name, hs in (("top_k_C", top_c), ("top_k_recovered", ours)):
        joint[f"recovered_{name}"], joint[f"share_{name}"] = _joint_share(
            tuned, original, util_batches, hs, kv_policy, L_tuned, total_drop)
    rand = [_joint_share(tuned, original, util_batches, hs, kv_policy, L_tuned, total_drop)
            for hs in draws]
    joint["recovered_random_k"] = sum(r for r, _ in rand) / len(rand)
    joint["share_random_k"] = (joint["recovered_random_k"] / total_drop if total_drop > 0
                               else math.nan)
    joint["recovered_all_heads"], joint["share_all_heads"] = _joint_share(
        tuned, original, util_batches, every, kv_policy, L_tuned, total_drop)
    out["joint"] = joint
    out["heads_top_k_C"] = [list(h) for h in top_c]
    out["heads_top_k_recovered"] = [list(h) for h in ours]
    out["random_draws"] = _N_RANDOM
    return out


def causal_attribution(
    tuned: HookedTransformer,
    original: HookedTransformer,
    *,
    utility_data: ChatDataset,
    safety_data: ChatDataset,
    conflict_map: Any = None,
    method: AttributionMethod = "exact",
    heads: Optional[list[Head]] = None,
    kv_policy: RevertKV = "any",
    n_examples: Optional[int] = 16,
    batch_size: int = 8,
    k: Optional[int] = None,
    seed: int = 0,
    progress: bool = False,
) -> AttributionResult:
    """Per-head causal share of the utility drop of `tuned` relative to `original` (see module doc).

    Args:
        utility_data: D_util with reference responses (L_util). safety_data: harmful prompts; a
            prompt without a refusal gets one (`data.with_refusals`, seeded), giving L_safe.
        conflict_map: a `ConflictMap` of `original`; when given, `comparison` holds Spearman /
            Pearson / top-k overlap of utility_recovered with C, O and S, and the share of
            `total_drop` recovered by reverting jointly the top-k heads by C, the top-k by
            utility_recovered (among computed heads), `_N_RANDOM` random k-sets (mean) and all heads
            (b_O kept tuned). Shares are NaN when total_drop <= 0 (nothing to recover).
        method: "exact" (default; equals `attribution_naive`) or "first_order" (one backward per
            objective for all heads; approximate: validate with `compare_attribution`). On CPU use
            "first_order" for all heads and "exact" on a subset.
        heads: only these (layer, head)s (others NaN); default all.
        kv_policy: "any" (default, ours: reverting h also reverts its K/V group) or "own" (Q, O only).
        n_examples: first n examples of each dataset (None: all).
        k: heads in the top-k comparisons; default (ours) 10% of all heads, at least 1.
        seed: seeds the random k-sets and the refusals `with_refusals` draws.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")
    _check_kv(kv_policy)
    _check_pair(tuned, original)
    if n_examples is not None and int(n_examples) < 1:
        raise ValueError(f"n_examples must be >= 1 or None (all), got {n_examples}.")
    if heads is not None and len(heads) == 0:
        raise ValueError("heads is an empty list: pass None for all heads, or some (layer, head).")
    if conflict_map is not None:
        conflict_map.check_model(tuned)
    for name, ds in (("utility_data", utility_data), ("safety_data", safety_data)):
        if ds is None or len(ds) == 0:
            raise DataError(f"{name} is empty: attribution needs examples to measure L_util and "
                            "L_safe on. Pass a non-empty ChatDataset.")
    util_ds = utility_data.take(n_examples)
    safe_ds = with_refusals(safety_data.take(n_examples), seed=seed)
    util_b = make_batches(tuned, util_ds, batch_size=batch_size)
    safe_b = make_batches(tuned, safe_ds, batch_size=batch_size)
    by_layer = _heads_by_layer(tuned, heads)
    cfg = tuned.cfg
    L, H = cfg.n_layers, cfg.n_heads
    n_total = L * H
    k = max(1, round(0.1 * n_total)) if k is None else int(k)
    if not 1 <= k <= n_total:
        raise ValueError(f"k must be in 1..{n_total}, got {k}.")

    base = {"L_util_tuned": dataset_nll(tuned, util_b), "L_util_original": dataset_nll(original, util_b),
            "L_safe_tuned": dataset_nll(tuned, safe_b), "L_safe_original": dataset_nll(original, safe_b)}
    bad = {n: v for n, v in base.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(f"Non-finite base losses {bad}: check both models' weights for "
                                 "NaN/inf (a diverged checkpoint?).")
    total_drop = base["L_util_tuned"] - base["L_util_original"]

    changed = changed_heads(tuned, original, kv_policy=kv_policy)
    wanted = torch.zeros(L, H, dtype=torch.bool)
    for l, hs in by_layer.items():
        wanted[l, hs] = True
    util = torch.full((L, H), math.nan, dtype=torch.float64)
    safe = torch.full((L, H), math.nan, dtype=torch.float64)
    util[wanted & ~changed] = 0.0  # reverting an unchanged head is a no-op: exactly 0
    safe[wanted & ~changed] = 0.0
    if method == "exact":
        todo: dict[int, list[int]] = {}
        for l, hs in by_layer.items():
            hs = [h for h in hs if changed[l, h]]
            if hs:
                todo[l] = hs
        if todo:
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=len(todo) * (len(util_b) + len(safe_b)), desc="attribution (exact)")
            Lu = _exact_losses(tuned, original, util_b, todo, kv_policy, bar)
            Ls = _exact_losses(tuned, original, safe_b, todo, kv_policy, bar)
            if bar is not None:
                bar.close()
            m = torch.isfinite(Lu)
            util[m] = base["L_util_tuned"] - Lu[m]
            safe[m] = Ls[m] - base["L_safe_tuned"]
    else:
        du = _first_order_dot(tuned, original, util_b, kv_policy)
        ds = _first_order_dot(tuned, original, safe_b, kv_policy)
        m = wanted & changed
        util[m] = -du[m]
        safe[m] = ds[m]

    comparison = {}
    if conflict_map is not None:
        comparison = _compare(tuned, original, util_b, util.float(), conflict_map, k=k,
                              kv_policy=kv_policy, L_tuned=base["L_util_tuned"],
                              total_drop=total_drop, seed=seed)
    outside = _changed_outside_attention(tuned, original)
    config = {
        "method": method,
        "kv_policy": kv_policy,
        "n_examples": n_examples,
        "batch_size": batch_size,
        "k": k,
        "seed": seed,
        "model_id": model_id(tuned),
        "utility_data": util_ds.describe(),
        "safety_data": safe_ds.describe(),
        "utility_data_sha": _data_sha(util_b),
        "safety_data_sha": _data_sha(safe_b),
        "n_tokens": {"utility": _check_batches(util_b), "safety": _check_batches(safe_b)},
        "heads": None if heads is None else [list(x) for x in validate_heads(tuned, heads)],
        "n_heads_changed": int(changed.sum()),
        "changed_outside_attention": outside,
        "b_O": "kept tuned in every per-head and joint revert (belongs to no head)",
        "loss": "token-mean response NLL (objectives.dataset_nll)",
        "safety_refusals": "data.with_refusals(seed) for prompts without a refusal",
    }
    return AttributionResult(utility_recovered=util.float(), safety_lost=safe.float(),
                             total_drop=total_drop, base=base, comparison=comparison, config=config)


def compare_attribution(approx: Union[AttributionResult, Tensor],
                        exact: Union[AttributionResult, Tensor], *, k: int = 10) -> dict:
    """How well `approx` (e.g. first_order) reproduces `exact`, over heads finite in both:
    `{"utility": ..., "safety": ...}` each as `sensitivity.compare_sensitivity` (spearman, pearson,
    top_k_overlap, max_abs_diff, ...). Tensors are taken as utility_recovered maps (then only
    "utility")."""
    if isinstance(approx, Tensor) or isinstance(exact, Tensor):
        a = approx.utility_recovered if isinstance(approx, AttributionResult) else approx
        e = exact.utility_recovered if isinstance(exact, AttributionResult) else exact
        return {"utility": compare_sensitivity(a, e, k=k)}
    return {"utility": compare_sensitivity(approx.utility_recovered, exact.utility_recovered, k=k),
            "safety": compare_sensitivity(approx.safety_lost, exact.safety_lost, k=k)}
