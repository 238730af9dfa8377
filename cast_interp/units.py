"""Units: what a query head and a key/value group own (METHOD.md v2, "Objects").

Every stage (measurement, selection, freezing, attribution) asks this module which parameters a
unit owns; none computes slices itself, so a shared parameter is never counted once per head.

- A query head (l, h) owns `W_Q[h]`, `b_Q[h]` and `W_O[h]` (its rows of the output projection).
- A key/value group (l, g) owns `W_K[g]`, `b_K[g]`, `W_V[g]`, `b_V[g]` (TransformerLens 3 stores
  them as `_W_K`, `_b_K`, ... under grouped-query attention; on TransformerLens 4's bridge they are
  rows of the Hugging Face `k_proj`/`v_proj`, see `backend.UnitParam`). Query head h reads group
  h // (n_heads // n_kv_heads) (`repeat_interleave` order).
- Without GQA each head is its own group and owns all four; there are no group units then.
- `b_O` is shared by all heads of a layer and belongs to no unit. Biases the architecture does not
  have (TransformerLens keeps zero `b_Q`/`b_K`/`b_V` for Llama-style models such as SmolLM2) belong
  to no unit either, and are never trained (`absent_param_names`).

Units are indexed `(layer, index)` with a `kind` of "head" or "group"; per-unit tensors are
`[n_layers, n_units]`.
"""

from __future__ import annotations

from typing import Iterable, Literal, Sequence, get_args

import torch
from torch import Tensor

from . import backend
from .backend import BIAS_FREE_ARCHITECTURES, UnitParam  # noqa: F401  (re-exported)

Component = Literal["q", "k", "v", "o"]
UnitKind = Literal["head", "group"]
UNIT_KINDS: tuple[str, ...] = get_args(UnitKind)
Unit = tuple[int, int]

class UnitError(IndexError):
    """A unit outside the model, a kind the model does not have, or a selection of the wrong shape.

    `heads.HeadIndexError` is this class under its v1 name (kept for callers that import it)."""


def n_kv_heads(model) -> int:
    return model.cfg.n_key_value_heads or model.cfg.n_heads


def uses_gqa(model) -> bool:
    return n_kv_heads(model) != model.cfg.n_heads


def group_of(model, head: int) -> int:
    """The key/value group g(h) of query head `head`."""
    return head // (model.cfg.n_heads // n_kv_heads(model))


def group_heads(model, group: int) -> list[int]:
    """Query heads that read key/value group `group`."""
    size = model.cfg.n_heads // n_kv_heads(model)
    return list(range(group * size, (group + 1) * size))


def has_attn_bias(model) -> bool:
    """Whether the architecture has Q/K/V biases (False for Llama-style models)."""
    return backend.has_attn_bias(model)


def check_kind(model, kind: str) -> None:
    if kind not in UNIT_KINDS:
        raise UnitError(f"unit kind must be one of {UNIT_KINDS}, got {kind!r}.")
    if kind == "group" and not uses_gqa(model):
        raise UnitError("unit='group' needs grouped-query attention; this model has one key/value "
                        "head per query head, so every head owns its K/V: use unit='head'.")


def n_units(model, kind: UnitKind) -> int:
    """Units per layer: query heads, or key/value groups."""
    check_kind(model, kind)
    return model.cfg.n_heads if kind == "head" else n_kv_heads(model)


def unit_components(model, kind: UnitKind) -> tuple[Component, ...]:
    """Components a unit owns: a head Q and O (all four without GQA); a group K and V."""
    check_kind(model, kind)
    if kind == "group":
        return ("k", "v")
    return ("q", "o") if uses_gqa(model) else ("q", "k", "v", "o")


def component_params(model, layer: int, component: Component) -> list[UnitParam]:
    """The parameters of a component in one layer (absent biases left out), each laid out along
    the component's units (query heads for q/o, K/V groups for k/v): `p.unit(i)` is what unit i
    owns of `p`, on either backend (`backend.component_params`)."""
    return backend.component_params(model, layer, component, n_kv=n_kv_heads(model))


def _owned(model, kind: UnitKind) -> list[tuple[int, UnitParam]]:
    """(layer, parameter) for every parameter units of `kind` are laid out along."""
    return [(l, p) for l in range(model.cfg.n_layers) for c in unit_components(model, kind)
            for p in component_params(model, l, c)]


def all_units(model, kind: UnitKind = "head") -> list[Unit]:
    return [(l, i) for l in range(model.cfg.n_layers) for i in range(n_units(model, kind))]


def validate_units(model, units: Iterable[Sequence[int]], kind: UnitKind = "head") -> list[Unit]:
    """Units as a sorted list of `(layer, index)` int tuples; a clear error for any out of range."""
    n = n_units(model, kind)
    L = model.cfg.n_layers
    out = set()
    for item in units:
        try:
            l, i = (int(x) for x in item)
        except (TypeError, ValueError) as exc:
            raise UnitError(f"A {kind} must be a (layer, index) pair, got {item!r}.") from exc
        if not (0 <= l < L and 0 <= i < n):
            raise UnitError(f"{kind.capitalize()} ({l}, {i}) does not exist: the model has {L} layers x "
                            f"{n} {kind}s (layer in 0..{L - 1}, index in 0..{n - 1}).")
        out.add((l, i))
    return sorted(out)


def label(unit: Sequence[int], kind: UnitKind = "head") -> str:
    """`L3H2` for head 2 of layer 3, `L3G1` for key/value group 1."""
    return f"L{unit[0]}{'H' if kind == 'head' else 'G'}{unit[1]}"


def unit_slices(model, layer: int, index: int, kind: UnitKind = "head") -> dict[str, Tensor]:
    """Views of the parameter slices the unit owns, keyed by full parameter name."""
    return {p.name: p.unit(index) for c in unit_components(model, kind)
            for p in component_params(model, layer, c)}


def owned_param_names(model) -> set[str]:
    """Full names of every attention parameter some unit owns."""
    kinds = ("head", "group") if uses_gqa(model) else ("head",)
    return {p.name for k in kinds for _, p in _owned(model, k)}


def absent_param_names(model) -> set[str]:
    """Attention biases TransformerLens 3 keeps but the architecture does not have (never trained;
    empty on the bridge, which has no such parameters)."""
    return backend.absent_param_names(model)


def unit_masks(model, *, heads: Iterable[Sequence[int]] = (),
               groups: Iterable[Sequence[int]] = ()) -> dict[str, Tensor]:
    """Boolean masks (True = owned by one of the given units) over every owned parameter.

    Keys are full parameter names; values have the parameter's shape. Skipping these units freezes
    exactly the True entries.
    """
    heads = validate_units(model, heads, "head")
    groups = validate_units(model, groups, "group") if uses_gqa(model) else []
    if not uses_gqa(model) and list(groups):
        raise UnitError("This model has no key/value groups (no GQA): select heads.")
    kinds = ("head", "group") if uses_gqa(model) else ("head",)
    masks = {p.name: torch.zeros_like(p.param, dtype=torch.bool)
             for k in kinds for _, p in _owned(model, k)}
    for kind, units in (("head", heads), ("group", groups)):
        for l, i in units:
            for c in unit_components(model, kind):
                for p in component_params(model, l, c):
                    p.unit(i, masks[p.name]).fill_(True)
    return masks


def unit_param_count(model, *, heads: Iterable[Sequence[int]] = (),
                     groups: Iterable[Sequence[int]] = ()) -> int:
    """Number of scalar parameters the given units own (what skipping them freezes)."""
    return int(sum(int(m.sum()) for m in unit_masks(model, heads=heads, groups=groups).values()))


def unit_grads(model, kind: UnitKind = "head") -> dict[str, Tensor]:
    """`.grad` of the parameters units of `kind` own, flattened per unit, float32:
    `{component: [n_layers, n_units, numel_c]}`; a missing gradient counts as zeros."""
    out = {}
    for c in unit_components(model, kind):
        rows = []
        for l in range(model.cfg.n_layers):
            parts = []
            for p in component_params(model, l, c):
                g = p.param.grad if p.param.grad is not None else torch.zeros_like(p.param)
                parts.append(p.per_unit(g.detach().float()))
            rows.append(torch.cat(parts, dim=1))
        out[c] = torch.stack(rows)
    return out


def unit_params(model) -> list[torch.nn.Parameter]:
    """The parameter tensors units own (for gradient passes that need nothing else)."""
    named = dict(model.named_parameters())
    return [named[n] for n in sorted(owned_param_names(model))]
