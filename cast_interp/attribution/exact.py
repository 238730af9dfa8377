"""Exact reverts: put units' parameters back to their values before training (a weight swap,
restored bit-exactly) and measure per-example losses, from the reverted units' lowest layer on
(the tuned model's cached `resid_pre` of that layer feeds layers l..L-1 only)."""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .. import backend, distributed
from ..backend import Model
from ..data import ChatBatch
from ..model import model_id
from ..objectives import response_nll_from_resid
from ..units import UnitKind, all_units, n_units, owned_param_names, unit_slices, validate_units


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
