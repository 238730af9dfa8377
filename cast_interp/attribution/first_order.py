"""First order for every unit: recovered(u) ~ -(theta_orig - theta_tuned)_u . grad L(tuned), one
backward per example, kept per example `[n_examples, L, n]`."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor

from .. import backend
from ..backend import Model
from ..data import ChatBatch, example_lengths
from ..objectives import response_nll_from_resid
from ..units import component_params, owned_param_names, unit_components


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
