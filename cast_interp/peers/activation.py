"""Activation-based head choice (ALPS-like): the heads whose output moves most between harmful and
harmless prompts.

ALPS ("Attention Localization and Pruning Strategy") picks the attention heads whose activations a
task moves most and tunes only those. Here the task is safety, and a head's score is how far its
output moves between harmful prompts (e.g. D_safe's) and harmless ones (e.g. D_util's):

    score(l, h) = || mean_harmful(o) - mean_harmless(o) ||_2
                  / sqrt((tr Cov_harmful(o) + tr Cov_harmless(o)) / 2)

o is the head's write to the residual stream, z_h W_O[h] (`[d_model]`), averaged over each
prompt's tokens (chat template included; no response is fed), so each prompt gives one vector per
head. `normalize="pooled_sd"` (default, ours) divides by the pooled spread within the two sets, so
a head is not chosen for the size of its output alone; "none" keeps the raw distance of the means.
`space="z"` scores `hook_z` (before W_O) instead. Responses are never used: only activations.

Two arms read the scores (`registry/arms.py`), at CAST's k: "act_tune" tunes only the top-k heads
(every other head is frozen: what it owns, as every arm freezes; b_O and, under GQA, the K/V groups
still train) and "act_skip" freezes the top-k (the mirror). `activation_arm_units` selects them.
"""

from __future__ import annotations

from typing import Literal, Union, get_args

import torch
from jaxtyping import Float
from torch import Tensor

from .. import units as U
from ..backend import Model
from ..data import ChatDataset, ChatExample, make_batches

Normalize = Literal["pooled_sd", "none"]
Space = Literal["result", "z"]
ACTIVATION_ARMS = ("act_tune", "act_skip")


def _w_o(model: Model, layer: int) -> Float[Tensor, "n_heads d_head d_model"]:
    """W_O per head on either line (TL 3's tensor; the bridge's o_proj.weight `[d_model, n_heads *
    d_head]` cut by columns)."""
    cfg = model.cfg
    w = U.component_params(model, layer, "o")[0]
    if w.stacked:
        return w.param.detach()
    return w.param.detach().T.reshape(cfg.n_heads, cfg.d_head, cfg.d_model)


def head_outputs(model: Model, prompts: ChatDataset, *, batch_size: int = 16,
                 space: Space = "result") -> Float[Tensor, "n_prompts n_layers n_heads d"]:
    """Each head's output averaged over each prompt's tokens, float64: d = d_model for
    space="result" (z_h W_O[h]), d_head for "z" (`blocks.{l}.attn.hook_z`)."""
    if space not in get_args(Space):
        raise ValueError(f"space={space!r} is not one of {list(get_args(Space))}.")
    cfg = model.cfg
    only = ChatDataset(prompts.name, [ChatExample(e.prompt) for e in prompts], prompts.source)
    batches = make_batches(model, only, batch_size=batch_size, require_response=False)
    w_o = [_w_o(model, l).double() for l in range(cfg.n_layers)] if space == "result" else None
    rows = []
    for b in batches:
        lengths = torch.tensor(b.prompt_lengths)
        mask = (torch.arange(b.tokens.shape[1])[None] < lengths[:, None]).double()  # [B, T]
        means: dict[int, Tensor] = {}

        def grab(l: int):
            def hook(z: Tensor, hook) -> None:
                zz = z.detach().double().cpu()  # [B, T, n_heads, d_head]
                means[l] = (zz * mask[:, :, None, None]).sum(1) / lengths[:, None, None].double()
            return hook

        hooks = [(f"blocks.{l}.attn.hook_z", grab(l)) for l in range(cfg.n_layers)]
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            model(b.tokens.to(cfg.device))  # right padding: no attention mask needed (causal)
        per_layer = [means[l] for l in range(cfg.n_layers)]
        if w_o is not None:
            per_layer = [torch.einsum("bhd,hdm->bhm", m, w.cpu()) for m, w in zip(per_layer, w_o)]
        rows.append(torch.stack(per_layer, dim=1))  # [B, n_layers, n_heads, d]
    return torch.cat(rows)


def head_activation_shift(model: Model, harmful: ChatDataset, harmless: ChatDataset, *,
                          batch_size: int = 16, space: Space = "result",
                          normalize: Normalize = "pooled_sd") -> Float[Tensor, "n_layers n_heads"]:
    """The score of every query head (module docstring), float32 `[n_layers, n_heads]`.

    A head whose output does not move and does not vary scores 0; one that moves while it does
    not vary within the sets scores inf. "pooled_sd" needs at least 2 prompts per set.
    """
    if normalize not in get_args(Normalize):
        raise ValueError(f"normalize={normalize!r} is not one of {list(get_args(Normalize))}.")
    for what, ds in (("harmful", harmful), ("harmless", harmless)):
        if not isinstance(ds, ChatDataset):
            raise TypeError(f"{what} must be a ChatDataset of prompts, got {type(ds).__name__}.")
        need = 2 if normalize == "pooled_sd" else 1
        if len(ds) < need:
            raise ValueError(f"{what} has {len(ds)} prompts; normalize={normalize!r} needs at "
                             f"least {need} per set.")
    a = head_outputs(model, harmful, batch_size=batch_size, space=space)
    b = head_outputs(model, harmless, batch_size=batch_size, space=space)
    mu_a, mu_b = a.mean(0), b.mean(0)
    dist = (mu_a - mu_b).norm(dim=-1)  # [n_layers, n_heads]
    if normalize == "none":
        return dist.float()
    var_a = ((a - mu_a) ** 2).sum(-1).sum(0) / (len(a) - 1)  # trace of each head's covariance
    var_b = ((b - mu_b) ** 2).sum(-1).sum(0) / (len(b) - 1)
    pooled = ((var_a + var_b) / 2).sqrt()
    score = torch.where(pooled > 0, dist / pooled.clamp_min(1e-300),
                        torch.where(dist > 0, torch.full_like(dist, float("inf")),
                                    torch.zeros_like(dist)))
    return score.float()


def activation_arm_units(arm: str, scores: Float[Tensor, "n_layers n_heads"],
                         k: Union[int, float], *, model: Model) -> list[tuple[int, int]]:
    """The query heads an activation arm freezes at budget k (a count or a fraction of all heads):
    "act_skip" the top-k by `scores`, "act_tune" every head but the top-k (ties in a seeded order,
    `registry.arms.ranked`)."""
    from ..registry.arms import k_from_fraction, select_arm_units

    if arm not in ACTIVATION_ARMS:
        raise ValueError(f"arm={arm!r} is not one of {list(ACTIVATION_ARMS)}.")
    n = model.cfg.n_layers * model.cfg.n_heads
    if arm == "act_tune" and k_from_fraction(k, n) == 0:
        raise ValueError("act_tune with k=0 would tune no head at all: use k >= 1 (full tuning "
                         "is the 'full' arm).")
    return select_arm_units(arm, None, k, model=model, act_scores=scores)
