"""The two objectives of CAST: L_safe and L_util, each the mean response-token NLL.

L_x = mean over all response tokens of D_x of -log P(token | prefix). "Mean over the whole set" is a
token mean, not a mean of per-batch means: batches are weighted by their number of response tokens,
so the gradient accumulated over batches equals the gradient of the full-set loss.

"Response tokens" are the batch's `loss_mask`. The diagnosis takes L_safe and L_util over response
*content* tokens only (batches from `make_batches(..., end_of_turn_in_loss=False)`, ours per METHOD
v2): the end-of-turn token teaches both objectives "stop here", which made g_safe and g_util look
aligned for a reason unrelated to content. Training keeps the end-of-turn token in the loss (the
default), since a tuned model must still learn to stop.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from . import backend
from .backend import Model

from .data import ChatBatch


class NonFiniteLossError(FloatingPointError):
    """A loss came out NaN or infinite; the message says where."""


def token_nll(
    logits: Float[Tensor, "batch pos vocab"], batch: ChatBatch
) -> Float[Tensor, "batch pos_minus_1"]:
    """Per-token NLL of the next token, zero outside response tokens (float32)."""
    logprobs = logits[:, :-1].float().log_softmax(-1)
    target = batch.tokens[:, 1:].to(logits.device)
    nll = -logprobs.gather(-1, target[..., None])[..., 0]
    return nll * batch.loss_mask[:, 1:].to(logits.device)


def response_nll(
    model: Model, batch: ChatBatch, *,
    reduction: Literal["mean", "sum", "per_example"] = "mean", **forward_kwargs,
) -> Tensor:
    """NLL of the response tokens of one batch.

    reduction: "mean" (token mean of this batch), "sum" (to weight batches by token count), or
    "per_example" ([batch], each example's token mean).
    """
    batch = batch.to(model.cfg.device)
    logits = model(batch.tokens, **forward_kwargs)
    nll = token_nll(logits, batch)
    mask = batch.loss_mask[:, 1:]
    if reduction == "sum":
        return nll.sum()
    if reduction == "per_example":
        return nll.sum(-1) / mask.sum(-1).clamp_min(1)
    n = int(mask.sum())
    if n == 0:
        raise ValueError("Batch has no response tokens: the loss is undefined.")
    return nll.sum() / n


# Rows of the final residual turned into logits at once (bounds the [rows, d_vocab] tensor).
LOGIT_ROWS = 1024


def response_nll_from_resid(model: Model, resid: Float[Tensor, "batch pos d_model"],
                            batch: ChatBatch) -> Float[Tensor, "batch"]:
    """Each example's summed NLL over its `loss_mask` tokens from the final residual (before
    `ln_final`): `[batch]` float64, differentiable.

    Only loss positions are unembedded, in chunks of rows; log-softmax in the model's dtype (at least
    float32, as `token_nll`), sums in float64 (a revert's or an ablation's effect is a small
    difference of two such sums). `ln_final` runs as a module (its hooks fire); the unembedding is
    applied from its weights (TL's Unembed copies W_U.T on every call: slow for a 49k vocabulary).
    """
    mask = batch.loss_mask[:, 1:].to(resid.device)  # position p predicts token p + 1
    target = batch.tokens[:, 1:].to(resid.device)[mask]
    x = resid[:, :-1][mask]  # [n_loss_tokens, d_model]
    parts = []
    for s in range(0, x.shape[0], LOGIT_ROWS):
        logits = backend.logits_from_residual(model, x[s: s + LOGIT_ROWS])
        lp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        parts.append(-lp.gather(-1, target[s: s + LOGIT_ROWS, None])[:, 0])
    nll = torch.cat(parts) if parts else x.new_zeros(0)
    owner = torch.arange(len(batch), device=mask.device)[:, None].expand_as(mask)[mask]
    return torch.zeros(len(batch), dtype=torch.float64, device=x.device).index_add(
        0, owner, nll.double())


def dataset_nll(model: Model, batches: Sequence[ChatBatch]) -> float:
    """Token-mean response NLL over a list of batches (no gradient)."""
    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            total += float(response_nll(model, b, reduction="sum"))
            n += b.n_response_tokens
    if n == 0:
        raise ValueError("No response tokens in these batches: the loss is undefined.")
    return total / n
