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

Cost (SmolLM2-135M, 8 examples, 2 CPU cores; `benchmarks/bench_sensitivity.py`): a CPU pass is
compute-bound, so stacking saves little there and "exact" gains mostly from skipping layers < l and
unembedding only response positions: ~2.2x faster than the naive loop over a spread of layers
(~5 min for all 270 heads); "attribution" is ~10 s for all heads. Stacking pays more on a GPU.
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
from transformer_lens import HookedTransformer
from transformer_lens.utilities.activation_functions import apply_softcap

from .data import ChatBatch, DataError
from .heads import Head, rank_heads, validate_heads
from .model import model_id
from .objectives import NonFiniteLossError, token_nll

AblationKind = Literal["mean", "zero", "resample"]
SensitivityMethod = Literal["exact", "attribution"]
ABLATIONS: tuple[str, ...] = ("mean", "zero", "resample")
METHODS: tuple[str, ...] = ("exact", "attribution")

# Peak activation memory we allow one stacked exact pass to take when choosing heads_per_pass (ours).
_PASS_MEMORY_BYTES = 1 << 30
# Stacked tokens per pass on CPU (ours): SmolLM2 on 2 cores, 8 x 82 tokens per copy, ran 3 copies
# per pass ~15% faster than 9 (and than 1).
_CPU_PASS_TOKENS = 2048
# Rows of the final residual turned into logits at once (bounds the [rows, d_vocab] tensor).
_LOGIT_ROWS = 1024


def _z_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_z"


def _resid_pre_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


# --------------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------------


@dataclass
class SensitivityResult:
    """S(h) for every head, `[n_layers, n_heads]` float32, NaN for heads not computed.

    `S[l, h] = L_util(head (l, h) ablated) - L_util(base)`; `base_loss` is L_util(base); `config`
    records how it was computed (ablation, method, seed, heads_per_pass, model_id, n_tokens, ...).
    """

    S: Float[Tensor, "layer head"]
    base_loss: float
    config: dict = field(default_factory=dict)

    def ranking(self) -> list[Head]:
        """Computed heads, most sensitive first (largest S); heads with NaN S are left out."""
        return rank_heads(self.S)

    def to_dict(self) -> dict:
        """Plain JSON-able values (NaN S entries become None)."""
        from .io import to_jsonable

        return {"S": to_jsonable(self.S), "base_loss": self.base_loss,
                "config": to_jsonable(self.config)}

    @classmethod
    def from_dict(cls, d: dict) -> "SensitivityResult":
        S = torch.tensor([[math.nan if v is None else v for v in row] for row in d["S"]],
                         dtype=torch.float32)
        return cls(S=S, base_loss=float(d["base_loss"]), config=dict(d.get("config", {})))

    def save(self, path: Union[str, Path]) -> None:
        """safetensors (`S`) with `base_loss` and `config` as JSON metadata, written atomically."""
        from .io import atomic_save_safetensors

        atomic_save_safetensors({"S": self.S.float()}, path,
                                {"base_loss": self.base_loss, "config": self.config})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SensitivityResult":
        from safetensors import safe_open

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist.")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            S = f.get_tensor("S")
        if "base_loss" not in meta:
            raise ValueError(f"{path} is not a saved SensitivityResult (no base_loss metadata).")
        return cls(S=S, base_loss=float(json.loads(meta["base_loss"])),
                   config=json.loads(meta.get("config", "{}")))


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


def example_lengths(batch: ChatBatch) -> Tensor:
    """Number of real (non-pad) tokens of each example: prompt, response and end-of-turn.

    Computed from the masks, not from the pad id (SmolLM2 pads with a token that also ends turns).
    """
    T = batch.tokens.shape[1]
    pos = torch.arange(1, T + 1).expand_as(batch.loss_mask)
    last_resp = (pos * batch.loss_mask.cpu()).amax(dim=1)
    prompt = torch.tensor(batch.prompt_lengths, dtype=torch.long)
    return torch.maximum(last_resp, prompt)


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

    def __init__(self, model: HookedTransformer, kind: str, means: Optional[Tensor],
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


def _clean_pass(model: HookedTransformer, batches: Sequence[ChatBatch], *, kind: str,
                seed: int) -> tuple[float, _Ablation, Optional[Tensor]]:
    """One clean forward per batch: L_util(base) and what the ablation needs (means, donor z)."""
    cfg = model.cfg
    n_tokens = _check_batches(batches)
    L, H, d = cfg.n_layers, cfg.n_heads, cfg.d_head
    total = torch.zeros((), dtype=torch.float64)
    sums = torch.zeros(L, H, d, dtype=torch.float64, device=cfg.device)
    n_real = 0
    store: list[Tensor] = []
    offsets, off = [], 0
    want_z = kind in ("mean", "resample")
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
            total += token_nll(logits, b).sum().double().cpu()
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
    return base, _Ablation(model, kind, means, store or None, donors, offsets), means


def head_means(model: HookedTransformer, batches: list[ChatBatch]) -> Float[Tensor, "layer head d_head"]:
    """Mean of `blocks.{l}.attn.hook_z` per head over D_util tokens, from a cached clean run.

    Which tokens (ours): every real token of every example (prompt, response and end-of-turn; not
    padding), each token weighted equally. float32, on the model's device.
    """
    return _clean_pass(model, batches, kind="mean", seed=0)[2]


# --------------------------------------------------------------------------------------------------
# Exact ablation
# --------------------------------------------------------------------------------------------------


def _heads_by_layer(model: HookedTransformer, heads) -> dict[int, list[int]]:
    if heads is not None and len(heads) == 0:
        raise ValueError("heads is an empty list: pass None for all heads, or some (layer, head).")
    heads = validate_heads(model, [(l, h) for l in range(model.cfg.n_layers)
                                   for h in range(model.cfg.n_heads)] if heads is None else heads)
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    return by_layer


def _default_heads_per_pass(model: HookedTransformer, batch_size: int, width: int) -> int:
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


def _copies_nll_from_layer(model: HookedTransformer, layer: int, hook_name: str, hook,
                           resid: Tensor, shortformer: Optional[Tensor],
                           attn_mask: Optional[Tensor], batch: ChatBatch, n_copies: int) -> Tensor:
    """Summed response NLL of each of `n_copies` stacked copies of `batch`, run from `layer` on
    (from its cached `resid_pre`, repeated along the batch) with `hook` on `hook_name`, which
    edits copy i for head i. Layers before `layer` are not recomputed: they cannot change."""
    rep = lambda t: None if t is None else t.repeat(n_copies, *([1] * (t.dim() - 1)))
    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        final = model(rep(resid), start_at_layer=layer, stop_at_layer=model.cfg.n_layers,
                      shortformer_pos_embed=rep(shortformer), attention_mask=rep(attn_mask))
    return _response_nll_from_resid(model, final, batch, n_copies)


def _response_nll_from_resid(model: HookedTransformer, resid: Tensor, batch: ChatBatch,
                             n_copies: int) -> Tensor:
    """Summed response NLL of each of `n_copies` stacked copies of `batch`, from the final residual.

    Only response positions are unembedded (the rest have no loss), in chunks of rows, with the same
    float32 log-softmax as `objectives.token_nll`. `ln_final` runs as a module (its hooks fire);
    the unembedding is applied from its weights (hooks on `unembed` do not fire here).
    """
    mask = batch.loss_mask[:, 1:].to(resid.device)  # position p predicts token p + 1
    target = batch.tokens[:, 1:].to(resid.device)[mask]  # [n_resp]
    b, d = len(batch), resid.shape[-1]
    x = resid[:, :-1].reshape(n_copies, b, -1, d)[:, mask]  # [copies, n_resp, d_model]
    x = x.reshape(-1, d)
    target = target.repeat(n_copies)
    nll = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for s in range(0, x.shape[0], _LOGIT_ROWS):
        chunk = x[s: s + _LOGIT_ROWS][None]
        if model.cfg.normalization_type is not None:
            chunk = model.ln_final(chunk)
        # x @ W_U directly: TL's Unembed copies W_U.T to contiguous memory on every call, which
        # on CPU costs as much as the product itself for a 49k vocabulary.
        logits = chunk @ model.unembed.W_U + model.unembed.b_U
        logits = apply_softcap(logits, model.cfg.output_logits_soft_cap)[0]
        lp = logits.float().log_softmax(-1)
        nll[s: s + _LOGIT_ROWS] = -lp.gather(-1, target[s: s + _LOGIT_ROWS, None])[:, 0]
    return nll.view(n_copies, -1).sum(-1)


def _exact(model: HookedTransformer, batches: Sequence[ChatBatch], ablation: _Ablation,
           by_layer: dict[int, list[int]], heads_per_pass: Optional[int],
           progress: bool) -> Tensor:
    """Summed ablated response NLL `[n_layers, n_heads]` (NaN where not computed)."""
    cfg = model.cfg
    sums = torch.full((cfg.n_layers, cfg.n_heads), math.nan, dtype=torch.float64)
    for l, hs in by_layer.items():
        sums[l, hs] = 0.0
    layers = sorted(by_layer)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(batches) * len(layers), desc="sensitivity (exact)")
    with torch.no_grad():
        for bi, batch in enumerate(batches):
            b = batch.to(cfg.device)
            # What forward() derives from the tokens (attention mask under left padding, shortformer
            # positions), so the partial runs see exactly what a full run does.
            _, _, shortformer, attn_mask = model.input_to_embed(b.tokens)
            _, cache = model.run_with_cache(
                b.tokens, names_filter=[_resid_pre_name(l) for l in layers],
                stop_at_layer=layers[-1] + 1)
            B, T = b.tokens.shape
            k_max = heads_per_pass or _default_heads_per_pass(model, B, T)
            for l in layers:
                resid = cache[_resid_pre_name(l)]
                repl = ablation.values(bi, l, b)
                hs_all = by_layer[l]
                for s in range(0, len(hs_all), k_max):
                    hs = hs_all[s: s + k_max]
                    k = len(hs)

                    def hook(z, hook, hs=hs, k=k):
                        z = z.clone(memory_format=torch.contiguous_format)
                        zz = z.view(k, B, *z.shape[1:])  # copy i ablates head hs[i]
                        for i, h in enumerate(hs):
                            zz[i, :, :, h] = repl[:, :, h]
                        return z

                    sums[l, hs] += _copies_nll_from_layer(model, l, _z_name(l), hook, resid,
                                                          shortformer, attn_mask, b, k).double().cpu()
                if bar is not None:
                    bar.update(1)
            del cache
    if bar is not None:
        bar.close()
    return sums


# --------------------------------------------------------------------------------------------------
# Attribution patching
# --------------------------------------------------------------------------------------------------


def _attribution(model: HookedTransformer, batches: Sequence[ChatBatch], ablation: _Ablation,
                 n_tokens: int, progress: bool) -> Tensor:
    """First-order estimate of L_util(ablated) - L_util(base), `[n_layers, n_heads]` float64."""
    cfg = model.cfg
    est = torch.zeros(cfg.n_layers, cfg.n_heads, dtype=torch.float64)
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

        with torch.enable_grad():
            logits = model.run_with_hooks(
                b.tokens, fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), save)])
            # The same L_util as everywhere: token sum over all batches / all response tokens.
            loss = token_nll(logits, b).sum() / n_tokens
            layers = sorted(zs)
            grads = torch.autograd.grad(loss, [zs[l] for l in layers], allow_unused=True)
        with torch.no_grad():
            for l, g in zip(layers, grads):
                if g is None:
                    continue
                delta = ablation.values(bi, l, b) - zs[l].detach()
                est[l] += (delta * g).sum(dim=(0, 1, 3)).double().cpu()
        del logits, loss, zs, grads
    return est


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def _data_sha(batches: Sequence[ChatBatch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(b.tokens.cpu().numpy().tobytes())
        h.update(b.loss_mask.cpu().numpy().tobytes())
    return h.hexdigest()[:12]


def functional_sensitivity(
    model: HookedTransformer,
    batches: list[ChatBatch],
    *,
    ablation: AblationKind = "mean",
    method: SensitivityMethod = "exact",
    heads: Optional[list[tuple[int, int]]] = None,
    heads_per_pass: Optional[int] = None,
    seed: int = 0,
    progress: bool = False,
) -> SensitivityResult:
    """Functional Sensitivity S(h) = L_util(h ablated) - L_util on D_util `batches`.

    Args:
        ablation: "mean" (default, ours), "zero" or "resample" (see module docstring).
        method: "exact" (default; real ablations, equal to `sensitivity_naive`) or "attribution"
            (first-order estimate from one forward+backward per batch; much cheaper, approximate:
            check it with `compare_sensitivity` on a slice before relying on it).
        heads: only these `(layer, head)`s (others are NaN in S); default all. Exact cost grows with
            the layers touched, attribution costs the same for any subset.
        heads_per_pass: heads of one layer ablated together in one stacked pass (exact only);
            default (ours): all heads of the layer, fewer when the stacked activations would exceed
            ~1 GiB or, on CPU, ~2k stacked tokens. Lower it if memory runs out.
        seed: seeds the donor mapping of resample ablation (no other randomness). Resample keeps
            every example's clean z in memory (n_tokens x n_layers x n_heads x d_head floats).
        progress: show a progress bar.
    """
    _check_options(ablation, method)
    if heads_per_pass is not None and int(heads_per_pass) < 1:
        raise ValueError(f"heads_per_pass must be >= 1 (or None for automatic), got {heads_per_pass}.")
    n_tokens = _check_batches(batches)
    by_layer = _heads_by_layer(model, heads)
    base, abl, _ = _clean_pass(model, batches, kind=ablation, seed=seed)
    cfg = model.cfg
    if method == "exact":
        S = (_exact(model, batches, abl, by_layer, heads_per_pass, progress) / n_tokens - base)
    else:
        est = _attribution(model, batches, abl, n_tokens, progress)
        S = torch.full_like(est, math.nan)
        for l, hs in by_layer.items():
            S[l, hs] = est[l, hs]
    n_heads_done = sum(len(hs) for hs in by_layer.values())
    config = {
        "ablation": ablation,
        "method": method,
        "seed": seed,
        "heads_per_pass": heads_per_pass,
        "model_id": model_id(model),
        "n_tokens": n_tokens,
        "n_examples": sum(len(b) for b in batches),
        "n_batches": len(batches),
        "data_sha": _data_sha(batches),
        "n_heads_computed": n_heads_done,
        "heads": None if heads is None else [list(x) for x in validate_heads(model, heads)],
        "loss": "token-mean response NLL over all batches (objectives.dataset_nll)",
        "hook": "blocks.{l}.attn.hook_z, all positions",
        "mean_over": "all real (non-pad) tokens of D_util, prompt and response (ours)",
        "resample_positions": "donor z at the same position, clipped to the donor's last real "
                              "token; donors a seeded random cycle (ours)",
        "dtype": str(cfg.dtype),
    }
    return SensitivityResult(S=S.float(), base_loss=base, config=config)


def sensitivity_naive(
    model: HookedTransformer,
    batches: list[ChatBatch],
    *,
    ablation: AblationKind = "mean",
    seed: int = 0,
    heads: Optional[list[tuple[int, int]]] = None,
) -> Float[Tensor, "layer head"]:
    """The slow reference for exact S: one full `model.run_with_hooks` per head per batch.

    Same ablation values (means, donors) as `functional_sensitivity`; NaN for heads not asked for.
    """
    _check_options(ablation)
    n_tokens = _check_batches(batches)
    by_layer = _heads_by_layer(model, heads)
    base, abl, _ = _clean_pass(model, batches, kind=ablation, seed=seed)
    cfg = model.cfg
    S = torch.full((cfg.n_layers, cfg.n_heads), math.nan, dtype=torch.float64)
    with torch.no_grad():
        for l, hs in by_layer.items():
            for h in hs:
                total = 0.0
                for bi, batch in enumerate(batches):
                    b = batch.to(cfg.device)
                    repl = abl.values(bi, l, b)

                    def hook(z, hook, h=h, repl=repl):
                        z = z.clone()
                        z[:, :, h] = repl[:, :, h]
                        return z

                    logits = model.run_with_hooks(b.tokens, fwd_hooks=[(_z_name(l), hook)])
                    total += float(token_nll(logits, b).sum().double())
                S[l, h] = total / n_tokens - base
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
