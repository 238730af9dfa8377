"""Functional Sensitivity S(h): how much the utility loss rises when head h is knocked out.

CAST's conflict map weighs a head's gradient conflict by how much utility *depends* on the head. The
paper names this quantity only; the definition is ours (METHOD.md, stage 1, item 2):

    S(h) = L_util(model with head h ablated) - L_util(model),

with L_util the token-mean NLL of all response tokens of D_util (`objectives.dataset_nll`) and the
ablation applied to the head's output `z` (hook `blocks.{l}.attn.hook_z`, head index h) at every
position. S > 0: utility needs the head; S ~ 0: it does not.

Ablations (`AblationKind`, all ours):
- "mean" (default): z_h is replaced by its mean over D_util tokens (`head_means`), which keeps the
  head's average contribution and removes only the information it carries per token.
- "zero": z_h = 0, i.e. the head's output (not `b_O`) is deleted; harsher, off-distribution.
- "resample": z_h is taken from another calibration example at the same position (see
  `resample_donors`), the "resampling ablation" of causal scrubbing.

Two ways to compute it, sharing one signature (`functional_sensitivity(method=...)`):
- "exact" (default): real ablations. Ablating a head of layer l cannot change the residual stream
  before layer l, so `blocks.{l}.hook_resid_pre` is cached once per batch and only layers l..L-1
  are re-run, with several heads of layer l ablated at once by stacking copies of the batch along
  the batch dimension (copy i ablates head i). Equals `sensitivity_naive` (one full forward per head
  and batch) to float tolerance.
- "attribution": attribution patching, the first-order estimate
  S(h) ~ sum_{positions, d_head} (z_ablate - z) . dL_util/dz, for all heads from one forward and one
  backward per batch. An approximation (it misses every nonlinear effect of the ablation): validate
  it against "exact" with `compare_sensitivity` before trusting a ranking from it.

Units (METHOD.md v2): `unit="head"` ablates one head's z; `unit="group"` (under GQA) ablates every
head that reads a key/value group. Every path returns each example's summed NLL increase, so S gets a
bootstrap CI over examples (`n_bootstrap`) without another model pass, and `screened_sensitivity`
combines the two methods: attribution for every unit, exact ablation for the candidates.

Cost: exact grows with the layers touched and the tokens per example; attribution is one forward and
backward per batch for all units. Measured times are in `benchmarks/` and the README, not here.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from . import backend, distributed
from .backend import Model

from .data import ChatBatch, DataError, example_lengths  # noqa: F401  (re-exported)
from .heads import Head, rank_heads
from .units import (UnitKind, all_units, check_kind, group_heads, n_kv_heads, n_units,
                    validate_units)
from .model import model_id
from .objectives import NonFiniteLossError, response_nll_from_resid, token_nll

AblationKind = Literal["mean", "zero", "resample"]
SensitivityMethod = Literal["exact", "attribution"]
ABLATIONS: tuple[str, ...] = ("mean", "zero", "resample")
METHODS: tuple[str, ...] = ("exact", "attribution")

# Peak activation memory we allow one stacked exact pass to take when choosing heads_per_pass (ours).
_PASS_MEMORY_BYTES = 1 << 30
# Stacked tokens per pass on CPU (ours): on SmolLM2, 3 copies of 8 x 82 tokens per pass ran faster
# than 9 or 1 (benchmarks/README.md).
_CPU_PASS_TOKENS = 2048


def _z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _resid_pre_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------


@dataclass
class SensitivityResult:
    """S(u) for every unit of one kind, `[n_layers, n_units]` float32, NaN for units not computed.

    `S[l, i] = L_util(unit (l, i) ablated) - L_util(base)`; `S_low`/`S_high` its percentile bootstrap
    interval over examples (NaN when not bootstrapped), `S_boot` the draws `[n_boot, L, n]`;
    `exact` marks units measured by real ablation (the rest, if any, are first-order estimates);
    `base_loss` is L_util(base); `per_example` the summed NLL increase of each example
    `[n_examples, L, n]` and `tokens` each example's response tokens `[n_examples]`, from which any
    resample of examples is recomputed; `kind` is "head" or "group"; `config` records how.
    """

    S: Float[Tensor, "layer unit"]
    base_loss: float
    config: dict = field(default_factory=dict)
    S_low: Optional[Tensor] = None
    S_high: Optional[Tensor] = None
    S_boot: Optional[Tensor] = None
    exact: Optional[Tensor] = None
    per_example: Optional[Tensor] = None
    tokens: Optional[Tensor] = None
    kind: str = "head"
    screen: Optional["SensitivityResult"] = field(default=None, repr=False)  # not saved

    def ranking(self) -> list[Head]:
        """Computed units, most sensitive first (largest S); units with NaN S are left out."""
        return rank_heads(self.S)

    def tensors(self) -> dict[str, Tensor]:
        out = {"S": self.S}
        for name in ("S_low", "S_high", "S_boot", "exact", "per_example", "tokens"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}

    def save(self, path: Union[str, Path]) -> None:
        """safetensors with `base_loss`, `kind` and `config` as JSON metadata, written atomically."""
        from .io import atomic_save_safetensors

        atomic_save_safetensors(self.tensors(), path, {"base_loss": self.base_loss,
                                                       "kind": self.kind, "config": self.config})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SensitivityResult":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist.")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
        if "base_loss" not in meta or "S" not in t:
            raise ValueError(f"{path} is not a saved SensitivityResult (no S / base_loss).")
        if "exact" in t:
            t["exact"] = t["exact"].bool()
        return cls(base_loss=float(json.loads(meta["base_loss"])),
                   config=json.loads(meta.get("config", "{}")),
                   kind=json.loads(meta.get("kind", '"head"')), **t)


# --------------------------------------------------------------------------------------------------
# Inputs and clean statistics
# --------------------------------------------------------------------------------------------------


def _check_batches(batches: Sequence[ChatBatch]) -> int:
    """Total response tokens; clear errors for an empty list or no response tokens."""
    if isinstance(batches, ChatBatch):
        raise DataError("Pass a list of ChatBatch (e.g. make_batches(model, ds)), not one batch.")
    if len(batches) == 0:
        raise DataError("No batches: Functional Sensitivity needs D_util. Build them with "
                        "make_batches(model, dataset) from a non-empty dataset.")
    n = sum(b.n_response_tokens for b in batches)
    if n == 0:
        raise DataError("The batches hold no response tokens, so L_util is undefined. Check that "
                        "D_util has non-empty reference responses.")
    return n


def _check_options(ablation: str, method: str = "exact") -> None:
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {ABLATIONS}, got {ablation!r}.")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}.")


def resample_donors(n_examples: int, seed: int = 0) -> list[int]:
    """Donor example of each example for resample ablation (global index over all batches).

    A seeded random cycle, so no example is its own donor (that would be no ablation at all):
    donor[perm[i]] = perm[(i + 1) % n]. Needs at least 2 examples.
    """
    if n_examples < 2:
        raise DataError(f"Resample ablation needs at least 2 examples to swap between, got "
                        f"{n_examples}. Use more calibration examples or ablation='mean'.")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_examples, generator=g).tolist()
    donors = [0] * n_examples
    for i in range(n_examples):
        donors[perm[i]] = perm[(i + 1) % n_examples]
    return donors


class _Ablation:
    """Replacement values for `hook_z`, shared by the naive, exact and attribution paths, so they
    ablate identically. `values(bi, layer, batch)` broadcasts against z `[batch, pos, head, d_head]`.
    """

    def __init__(self, model: Model, kind: str, means: Optional[Tensor],
                 store: Optional[list[Tensor]], donors: Optional[list[int]],
                 offsets: list[int]):
        self.model, self.kind, self.means = model, kind, means
        self.store, self.donors, self.offsets = store, donors, offsets

    def values(self, bi: int, layer: int, batch: ChatBatch) -> Tensor:
        cfg = self.model.cfg
        if self.kind == "mean":
            return self.means[layer][None, None].to(cfg.dtype)
        if self.kind == "zero":
            return torch.zeros(1, 1, cfg.n_heads, cfg.d_head, dtype=cfg.dtype, device=cfg.device)
        # Resample: donor's z at the same position; positions past the donor's last real token
        # take the donor's last real token (ours; such positions are then padding or late response
        # tokens, and clipping keeps every value a real activation of the donor).
        T = batch.tokens.shape[1]
        rows = []
        for r in range(len(batch)):
            donor = self.store[self.donors[self.offsets[bi] + r]]  # [n_d, L, H, d_head]
            idx = torch.arange(T, device=donor.device).clamp(max=donor.shape[0] - 1)
            rows.append(donor[idx, layer])
        return torch.stack(rows)


def _clean_pass(model: Model, batches: Sequence[ChatBatch], *, kind: str,
                seed: int) -> tuple[float, _Ablation, Optional[Tensor], Tensor, Tensor]:
    """One clean forward per batch: L_util(base), what the ablation needs (means, donor z), and
    each example's summed base NLL and response-token count (`[n_examples]` each)."""
    cfg = model.cfg
    n_tokens = _check_batches(batches)
    L, H, d = cfg.n_layers, cfg.n_heads, cfg.d_head
    total = torch.zeros((), dtype=torch.float64)
    sums = torch.zeros(L, H, d, dtype=torch.float64, device=cfg.device)
    n_real = 0
    store: list[Tensor] = []
    offsets, off = [], 0
    want_z = kind in ("mean", "resample")
    base_sums, tokens = [], []
    with torch.no_grad():
        for batch in batches:
            offsets.append(off)
            off += len(batch)
            b = batch.to(cfg.device)
            if want_z:
                logits, cache = model.run_with_cache(
                    b.tokens, names_filter=lambda n: n.endswith("attn.hook_z"))
            else:
                logits = model(b.tokens)
            per = token_nll(logits, b).sum(-1).double().cpu()
            base_sums.append(per)
            tokens.append(batch.loss_mask[:, 1:].sum(-1).double())
            total += per.sum()
            del logits
            if not want_z:
                continue
            z = torch.stack([cache[_z_name(l)] for l in range(L)], dim=2)  # [b, pos, L, H, d]
            lengths = example_lengths(batch)
            real = (torch.arange(z.shape[1])[None] < lengths[:, None]).to(cfg.device)
            n_real += int(real.sum())
            sums += (z.double() * real[..., None, None, None]).sum(dim=(0, 1))
            if kind == "resample":
                store.extend(z[r, : int(lengths[r])].clone() for r in range(len(batch)))
            del cache, z
    base = float(total) / n_tokens
    if not math.isfinite(base):
        raise NonFiniteLossError(
            f"The base utility loss L_util is {base} before any ablation, so Functional "
            "Sensitivity is undefined. Check the model weights for NaN/inf (e.g. a diverged "
            "checkpoint) or use float32.")
    means = (sums / max(n_real, 1)).float() if kind == "mean" else None
    donors = resample_donors(off, seed) if kind == "resample" else None
    return (base, _Ablation(model, kind, means, store or None, donors, offsets), means,
            torch.cat(base_sums), torch.cat(tokens))


def head_means(model: Model, batches: list[ChatBatch]) -> Float[Tensor, "layer head d_head"]:
    """Mean of `blocks.{l}.attn.hook_z` per head over D_util tokens, from a cached clean run.

    Which tokens (ours): every real token of every example (prompt, response and end-of-turn; not
    padding), each token weighted equally. float32, on the model's device.
    """
    return _clean_pass(model, batches, kind="mean", seed=0)[2]


# --------------------------------------------------------------------------------------------------
# Exact ablation
# --------------------------------------------------------------------------------------------------


def _default_heads_per_pass(model: Model, batch_size: int, width: int) -> int:
    """Heads ablated per stacked pass: as many copies as fit `_PASS_MEMORY_BYTES` of activations,
    and on CPU at most ~`_CPU_PASS_TOKENS` stacked tokens (CPU passes are compute-bound, so
    stacking saves little, and activations that overflow the caches slow them down)."""
    cfg = model.cfg
    per_token = 2 * cfg.n_heads * width + 6 * cfg.d_model + 3 * (cfg.d_mlp or 4 * cfg.d_model)
    per_copy = 4 * batch_size * width * per_token
    k = _PASS_MEMORY_BYTES // max(per_copy, 1)
    if str(cfg.device).startswith("cpu"):
        k = min(k, _CPU_PASS_TOKENS // max(batch_size * width, 1))
    return max(1, min(cfg.n_heads, k))


def _copies_nll_from_layer(model: Model, layer: int, hook_name: str, hook,
                           resid: Tensor, shortformer: Optional[Tensor],
                           attn_mask: Optional[Tensor], batch: ChatBatch, n_copies: int) -> Tensor:
    """Each example's summed response NLL in each of `n_copies` stacked copies of `batch`,
    `[n_copies, batch]` float64, run from `layer` on (from its cached `resid_pre`, repeated along
    the batch) with `hook` on `hook_name`, which edits copy i for unit i. Layers before `layer` are
    not recomputed: they cannot change."""
    rep = lambda t: None if t is None else t.repeat(n_copies, *([1] * (t.dim() - 1)))  # noqa: E731
    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        final = backend.forward_from_layer(model, rep(resid), layer,
                                           shortformer_pos_embed=rep(shortformer),
                                           attention_mask=rep(attn_mask))
    copies = ChatBatch(tokens=rep(batch.tokens), loss_mask=rep(batch.loss_mask),
                       prompt_lengths=batch.prompt_lengths * n_copies)
    return response_nll_from_resid(model, final, copies).view(n_copies, len(batch))


def _ablation_sets(model: Model, units, kind: str) -> dict[int, list[tuple[int, list[int]]]]:
    """`{layer: [(unit index, query heads whose z it ablates), ...]}` for the units asked for (all
    units of `kind` if None): a head ablates itself, a K/V group all the heads that read it."""
    check_kind(model, kind)
    if units is not None and len(units) == 0:
        raise ValueError("An empty list of units: pass None for all units, or some (layer, index).")
    units = all_units(model, kind) if units is None else validate_units(model, units, kind)
    by_layer: dict[int, list[tuple[int, list[int]]]] = {}
    for l, i in units:
        by_layer.setdefault(l, []).append((i, [i] if kind == "head" else group_heads(model, i)))
    return by_layer


def _exact(model: Model, batches: Sequence[ChatBatch], ablation: _Ablation,
           sets: dict[int, list[tuple[int, list[int]]]], n_units_: int,
           heads_per_pass: Optional[int], progress: bool) -> Tensor:
    """Summed ablated response NLL of each example `[n_examples, n_layers, n_units]` (NaN where not
    computed).

    The work is a list of stacked passes (batch, layer, chunk of units), the same list whatever
    runs it; under torchrun the passes are shared out over the ranks (`distributed.map_shared`)
    and each pass is the one a single process runs, so S is the same number."""
    cfg = model.cfg
    offsets = [0]
    for b in batches:
        offsets.append(offsets[-1] + len(b))
    sums = torch.full((offsets[-1], cfg.n_layers, n_units_), math.nan, dtype=torch.float64)
    layers = sorted(sets)
    passes = []
    for bi, batch in enumerate(batches):
        B, T = batch.tokens.shape
        k_max = heads_per_pass or _default_heads_per_pass(model, B, T)
        passes += [(bi, l, sets[l][s: s + k_max]) for l in layers
                   for s in range(0, len(sets[l]), k_max)]
    bar = None
    if progress and distributed.is_main():
        from tqdm.auto import tqdm

        bar = tqdm(total=len(distributed.share(passes)), desc="sensitivity (exact)")
    cached: dict = {}  # the last batch's cached residuals (a rank's passes come in batch order)

    def one_pass(item) -> tuple:
        bi, l, chunk = item
        if cached.get("bi") != bi:
            cached.clear()
            b = batches[bi].to(cfg.device)
            # What forward() derives from the tokens (attention mask under left padding,
            # shortformer positions), so the partial runs see exactly what a full run does.
            inputs = backend.forward_inputs(model, b.tokens)
            with torch.no_grad():
                _, cache = model.run_with_cache(
                    b.tokens, names_filter=[_resid_pre_name(x) for x in layers],
                    stop_at_layer=layers[-1] + 1)
            cached.update(bi=bi, b=b, inputs=inputs, cache=cache)
        b, inputs = cached["b"], cached["inputs"]
        B = b.tokens.shape[0]
        repl = ablation.values(bi, l, b)
        k = len(chunk)

        def hook(z, hook):
            z = z.clone(memory_format=torch.contiguous_format)
            zz = z.view(k, B, *z.shape[1:])  # copy i ablates unit chunk[i]
            for i, (_, hs) in enumerate(chunk):
                zz[i, :, :, hs] = repl[:, :, hs]
            return z

        with torch.no_grad():
            nll = _copies_nll_from_layer(model, l, _z_name(l), hook,
                                         cached["cache"][_resid_pre_name(l)],
                                         inputs["shortformer_pos_embed"],
                                         inputs["attention_mask"], b, k)
        if bar is not None:
            bar.update(1)
        return bi, l, [i for i, _ in chunk], nll.double().cpu().T  # nll: [B, k]

    # Each result names its own units (the list rank 0 sent), so every rank fills in the same.
    for bi, l, idx, nll in distributed.map_shared(one_pass, passes):
        sums[offsets[bi]: offsets[bi + 1], l, idx] = nll
    cached.clear()
    if bar is not None:
        bar.close()
    return sums


# --------------------------------------------------------------------------------------------------
# Attribution patching
# --------------------------------------------------------------------------------------------------


def _attribution(model: Model, batches: Sequence[ChatBatch], ablation: _Ablation,
                 progress: bool) -> Tensor:
    """First-order estimate of each example's summed NLL change when one head is ablated,
    `[n_examples, n_layers, n_heads]` float64 (a group's is the sum over its heads: first order
    is additive)."""
    cfg = model.cfg
    per: list[Tensor] = []
    it = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc="sensitivity (attribution)")
    for bi, batch in enumerate(it):
        b = batch.to(cfg.device)
        zs: dict[int, Tensor] = {}

        def save(z, hook):
            # z itself, not a detached copy: dL/dz of layer l must include the paths through the
            # later heads' queries/keys/values. Only when nothing upstream needs a gradient (frozen
            # parameters) is z made a leaf, which then cuts no path.
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            zs[hook.layer()] = z
            return z

        est = torch.zeros(len(batch), cfg.n_layers, cfg.n_heads, dtype=torch.float64)
        with torch.enable_grad():
            logits = model.run_with_hooks(
                b.tokens, fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), save)])
            # Summed NLL: examples do not interact, so d(sum)/dz_b is example b's own gradient.
            loss = token_nll(logits, b).sum()
            layers = sorted(zs)
            grads = torch.autograd.grad(loss, [zs[l] for l in layers], allow_unused=True)
        with torch.no_grad():
            for l, g in zip(layers, grads):
                if g is not None:
                    delta = ablation.values(bi, l, b) - zs[l].detach()
                    est[:, l] = (delta * g).sum(dim=(1, 3)).double().cpu()
        per.append(est)
        del logits, loss, zs, grads
    return torch.cat(per)


def _to_groups(model: Model, per_head: Tensor) -> Tensor:
    """Sum per-head first-order terms over the heads of each group: `[..., L, H] -> [..., L, G]`."""
    return torch.stack([per_head[..., group_heads(model, g)].sum(-1)
                        for g in range(n_kv_heads(model))], dim=-1)


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def _data_sha(batches: Sequence[ChatBatch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(b.tokens.cpu().numpy().tobytes())
        h.update(b.loss_mask.cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def _bootstrap_S(delta: Tensor, tokens: Tensor, n_bootstrap: int, ci: float, seed: int) -> dict:
    """Ratio-of-sums bootstrap over examples of S = sum_i delta_i / sum_i tokens_i."""
    from .stats import ratio_of_sums_ci

    if n_bootstrap == 0 or delta.shape[0] < 2:
        nan = torch.full(delta.shape[1:], math.nan)
        return {"S_low": nan, "S_high": nan.clone(), "S_boot": None}
    done = torch.isfinite(delta).all(0)  # units not computed stay NaN
    r = ratio_of_sums_ci(delta[:, done].numpy(), tokens.numpy(), n_boot=n_bootstrap, ci=ci,
                         seed=seed)
    out = {k: torch.full(delta.shape[1:], math.nan) for k in ("S_low", "S_high")}
    out["S_boot"] = torch.full((n_bootstrap, *delta.shape[1:]), math.nan)
    out["S_low"][done] = torch.as_tensor(r["low"], dtype=torch.float32)
    out["S_high"][done] = torch.as_tensor(r["high"], dtype=torch.float32)
    out["S_boot"][:, done] = torch.as_tensor(r["draws"], dtype=torch.float32)
    return out


def functional_sensitivity(
    model: Model,
    batches: list[ChatBatch],
    *,
    unit: UnitKind = "head",
    units: Optional[list[tuple[int, int]]] = None,
    heads: Optional[list[tuple[int, int]]] = None,
    ablation: AblationKind = "mean",
    method: SensitivityMethod = "exact",
    heads_per_pass: Optional[int] = None,
    n_bootstrap: int = 0,
    ci: float = 0.95,
    seed: int = 0,
    progress: bool = False,
) -> SensitivityResult:
    """Functional Sensitivity S(u) = L_util(u ablated) - L_util on D_util `batches`.

    Args:
        unit: "head" (ablate one head's z) or "group" (under GQA: ablate every head that reads the
            K/V group, which is what removing the group's contribution does).
        units: only these `(layer, index)`s (others are NaN in S); default all. `heads` is an alias
            for head units. Exact cost grows with the layers touched; attribution costs the same.
        ablation: "mean" (default, ours), "zero" or "resample" (see module docstring).
        method: "exact" (default; real ablations, equal to `sensitivity_naive`) or "attribution"
            (first-order estimate from one forward+backward per batch; check it against exact).
        heads_per_pass: units of one layer ablated together in one stacked pass (exact only);
            default (ours): all, fewer when the stacked activations would exceed ~1 GiB or, on CPU,
            ~2k stacked tokens.
        n_bootstrap, ci: percentile bootstrap over *examples* of S (ratio of summed NLL increase to
            summed tokens, the same resample for every unit); 0 skips it.
        seed: seeds the resample-ablation donors and the bootstrap.
    """
    _check_options(ablation, method)
    if heads is not None:
        if units is not None or unit != "head":
            raise ValueError("Pass either heads= (head units) or unit=/units=, not both.")
        units = heads
    if heads_per_pass is not None and int(heads_per_pass) < 1:
        raise ValueError(f"heads_per_pass must be >= 1 (or None for automatic), got {heads_per_pass}.")
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}.")
    n_tokens = _check_batches(batches)
    sets = _ablation_sets(model, units, unit)
    n_u = n_units(model, unit)
    base, abl, _, base_sums, tok = _clean_pass(model, batches, kind=ablation, seed=seed)
    if method == "exact":
        delta = _exact(model, batches, abl, sets, n_u, heads_per_pass, progress) \
            - base_sums[:, None, None]
    else:
        est = _attribution(model, batches, abl, progress)
        est = est if unit == "head" else _to_groups(model, est)
        delta = torch.full_like(est, math.nan)
        for l, items in sets.items():
            idx = [i for i, _ in items]
            delta[:, l, idx] = est[:, l, idx]
    S = delta.sum(0) / n_tokens
    boot = _bootstrap_S(delta, tok, n_bootstrap, ci, seed)
    config = {
        "ablation": ablation, "method": method, "unit": unit, "seed": seed,
        "heads_per_pass": heads_per_pass, "model_id": model_id(model), "n_tokens": n_tokens,
        "n_examples": sum(len(b) for b in batches), "n_batches": len(batches),
        "data_sha": _data_sha(batches),
        "n_units_computed": sum(len(v) for v in sets.values()),
        "units": None if units is None else [list(x) for x in validate_units(model, units, unit)],
        "n_bootstrap": n_bootstrap, "ci": ci, "bootstrap_unit": "example (v2)",
        "loss": "token-mean NLL over the batches' loss_mask tokens (objectives.dataset_nll)",
        "hook": "blocks.{l}.attn.hook_z, all positions (a group: every head reading it)",
        "mean_over": "all real (non-pad) tokens of D_util, prompt and response (ours)",
        "resample_positions": "donor z at the same position, clipped to the donor's last real "
                              "token; donors a seeded random cycle (ours)",
        "dtype": str(model.cfg.dtype),
    }
    exact = torch.isfinite(S) & (method == "exact")
    return SensitivityResult(S=S.float(), base_loss=base, config=config, S_low=boot["S_low"],
                             S_high=boot["S_high"], S_boot=boot["S_boot"], exact=exact,
                             per_example=delta.float(), tokens=tok.float(), kind=unit)


def sensitivity_naive(
    model: Model,
    batches: list[ChatBatch],
    *,
    ablation: AblationKind = "mean",
    seed: int = 0,
    heads: Optional[list[tuple[int, int]]] = None,
    unit: UnitKind = "head",
) -> Float[Tensor, "layer unit"]:
    """The slow reference for exact S: one full `model.run_with_hooks` per unit per batch.

    Same ablation values (means, donors) as `functional_sensitivity`; NaN for units not asked for.
    """
    _check_options(ablation)
    n_tokens = _check_batches(batches)
    sets = _ablation_sets(model, heads, unit)
    base, abl, _, _, _ = _clean_pass(model, batches, kind=ablation, seed=seed)
    cfg = model.cfg
    S = torch.full((cfg.n_layers, n_units(model, unit)), math.nan, dtype=torch.float64)
    with torch.no_grad():
        for l, items in sets.items():
            for i, hs in items:
                total = 0.0
                for bi, batch in enumerate(batches):
                    b = batch.to(cfg.device)
                    repl = abl.values(bi, l, b)

                    def hook(z, hook, hs=hs, repl=repl):
                        z = z.clone()
                        z[:, :, hs] = repl[:, :, hs]
                        return z

                    logits = model.run_with_hooks(b.tokens, fwd_hooks=[(_z_name(l), hook)])
                    total += float(token_nll(logits, b).sum().double())
                S[l, i] = total / n_tokens - base
    return S.float()


def compare_sensitivity(approx: Tensor, exact: Tensor, *, k: int = 10) -> dict:
    """How well `approx` (e.g. attribution) reproduces `exact` S, over heads finite in both.

    Returns `spearman`, `pearson` (NaN when either side is constant), `top_k_overlap` (fraction of
    the k largest-S heads shared; k clipped to the number of heads compared), `max_abs_diff`,
    `n_heads` and `k`.
    """
    from scipy import stats

    if approx.shape != exact.shape:
        raise ValueError(f"Shapes differ: approx {tuple(approx.shape)} vs exact {tuple(exact.shape)}.")
    a, e = approx.detach().double().cpu().flatten(), exact.detach().double().cpu().flatten()
    ok = torch.isfinite(a) & torch.isfinite(e)
    n = int(ok.sum())
    if n == 0:
        raise ValueError("No head has a finite value in both maps: nothing to compare.")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    a, e = a[ok].numpy(), e[ok].numpy()
    k_eff = min(k, n)
    constant = n < 2 or a.std() == 0 or e.std() == 0
    spearman = math.nan if constant else float(stats.spearmanr(a, e).statistic)
    pearson = math.nan if constant else float(stats.pearsonr(a, e).statistic)
    top_a = set(sorted(range(n), key=lambda i: -a[i])[:k_eff])
    top_e = set(sorted(range(n), key=lambda i: -e[i])[:k_eff])
    return {
        "spearman": spearman,
        "pearson": pearson,
        "top_k_overlap": len(top_a & top_e) / k_eff,
        "max_abs_diff": float(abs(a - e).max()),
        "n_heads": n,
        "k": k_eff,
    }


def screened_sensitivity(
    model: Model,
    batches: list[ChatBatch],
    *,
    unit: UnitKind = "head",
    n_exact: int,
    prior_O: Optional[Tensor] = None,
    how: str = "rank_product",
    ablation: AblationKind = "mean",
    heads_per_pass: Optional[int] = None,
    n_bootstrap: int = 200,
    ci: float = 0.95,
    seed: int = 0,
    screen: Optional[SensitivityResult] = None,
    progress: bool = False,
) -> SensitivityResult:
    """S screened by attribution patching, then exact where it matters (METHOD.md v2, stage 1.2).

    `screen`: an attribution result to reuse (same batches and options); a head screen also screens
    groups (a group's first-order estimate is the sum of its heads'), which saves a backward pass.

    Attribution patching estimates S for every unit; the top `n_exact` by that estimate (or, with
    `prior_O`, the map's O, the top `n_exact` by the conflict score C it would give, plus the top
    `n_exact // 2` by S) are re-measured by exact ablation. Units outside the candidates keep the first-order value (`exact` False), so a
    top-k selected from this S with k <= n_exact / 2 (ours: at least 2k candidates) is exact where it
    counts. Bootstrap draws of both parts use the same example resamples (same seed and examples).
    """
    from .conflict_map import combine

    if n_exact < 1:
        raise ValueError(f"n_exact must be >= 1, got {n_exact}.")
    kw = dict(unit=unit, ablation=ablation, n_bootstrap=n_bootstrap, ci=ci, seed=seed,
              progress=progress)
    if screen is None:
        screen = functional_sensitivity(model, batches, method="attribution", **kw)
    elif screen.kind != unit:  # first order is additive: a group's screen is its heads' sum
        if screen.kind != "head" or unit != "group":
            raise ValueError(f"A {screen.kind} screen cannot screen {unit}s.")
        delta = _to_groups(model, screen.per_example.double())
        boot = _bootstrap_S(delta, screen.tokens.double(), n_bootstrap, ci, seed)
        screen = SensitivityResult(S=(delta.sum(0) / screen.tokens.sum()).float(),
                                   base_loss=screen.base_loss, config=screen.config,
                                   exact=torch.zeros(delta.shape[1:], dtype=torch.bool),
                                   per_example=delta.float(), tokens=screen.tokens, kind=unit,
                                   **boot)
    flat = lambda t: [(int(i // t.shape[1]), int(i % t.shape[1]))  # noqa: E731
                      for i in torch.argsort(-torch.nan_to_num(t.flatten(), nan=-math.inf))]
    if prior_O is None:
        cand = set(flat(screen.S)[:n_exact])
    else:  # the top by the C the map will rank by, and the strongest by S (for top-S arms)
        cand = set(flat(combine(prior_O.float(), screen.S, how=how))[:n_exact])
        cand |= set(flat(screen.S)[:max(1, n_exact // 2)])
    exact = functional_sensitivity(model, batches, method="exact", units=sorted(cand),
                                   heads_per_pass=heads_per_pass, **kw)
    m = exact.exact
    pick = lambda a, b: None if a is None or b is None else torch.where(m, b, a)  # noqa: E731
    config = dict(exact.config, method="screened", n_exact_requested=n_exact,
                  n_exact=int(m.sum()), candidates=[list(u) for u in sorted(cand)],
                  screen="attribution patching for all units (first order)")
    return SensitivityResult(
        S=pick(screen.S, exact.S), base_loss=exact.base_loss, config=config,
        S_low=pick(screen.S_low, exact.S_low), S_high=pick(screen.S_high, exact.S_high),
        S_boot=pick(screen.S_boot, exact.S_boot), exact=m,
        per_example=pick(screen.per_example, exact.per_example), tokens=exact.tokens, kind=unit,
        screen=screen)
