"""Head helpers kept for v1 paths: validation, deterministic ranking, v1 `kv_policy` masks.

What a unit owns (METHOD.md v2) is `units.py`'s job; this module keeps the v1 view, in which a
head also "owned" its group's K/V, only for the deprecated `kv_policy` option of sparse tuning.

Head (l, h) owns, in layer l, `W_Q[h]`, `b_Q[h]`, `W_O[h]` (its rows of the output projection), and,
through its key/value group g(h), `W_K[g]`, `b_K[g]`, `W_V[g]`, `b_V[g]`. Without grouped-query
attention g(h) = h; with it (SmolLM2: 9 query heads, 3 key/value heads) K/V weights are stored per
group (`units.component_params` says where, on either backend) and head h uses group
h // (n_heads // n_kv_heads)
(`repeat_interleave` order). `b_O` is shared by all heads of a layer and belongs to none.

Everything here is indexed `[layer, head]`; components are "q", "k", "v", "o".
"""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from .backend import Model

Head = tuple[int, int]
COMPONENTS: tuple[Component, ...] = ("q", "k", "v", "o")
KVPolicy = Literal["any", "all", "none"]


# One notion of unit (units.py): the helpers below are its head-kind views, kept for old callers.
from .units import Component  # noqa: E402
# `HeadIndexError` is `units.UnitError` (one error for heads and groups), under its v1 name for
# callers that import it from here; the package raises and catches `UnitError`.
from .units import UnitError as HeadIndexError  # noqa: E402,F401
from .units import all_units, component_params, n_kv_heads, validate_units  # noqa: E402


def rank_heads(scores: Tensor, *, largest: bool = True, nan_last: bool = False) -> list[Head]:
    """Heads of a `[layer, head]` score tensor ordered by score (descending if `largest`); ties keep
    (layer, head) order, so a ranking is deterministic. Heads with a non-finite score are left out,
    or put last (in (layer, head) order) with `nan_last=True`."""
    v = scores.detach().double().cpu().flatten().numpy()
    H = scores.shape[1]
    finite = np.isfinite(v)
    key = np.where(finite, -v if largest else v, 0.0)
    order = np.lexsort((np.arange(v.size), key, ~finite))  # last key sorts first
    if not nan_last:
        order = order[: int(finite.sum())]
    return [(int(i // H), int(i % H)) for i in order]


def all_heads(model: Model) -> list[Head]:
    return all_units(model, "head")


def validate_heads(model: Model, heads: Iterable[Sequence[int]]) -> list[Head]:
    """Heads as a sorted list of `(layer, head)` int tuples; a clear error for any out of range
    (`units.validate_units` for head units)."""
    return validate_units(model, heads, "head")


def head_param_masks(
    model: Model,
    heads: Iterable[Sequence[int]],
    *,
    kv_policy: KVPolicy = "any",
) -> dict[str, Tensor]:
    """Boolean masks (True = frozen) over attention parameters for skipping `heads`.

    Keys are full parameter names (`units.component_params`), values have the parameter's shape.
    A skipped head freezes its Q and O slices; its K/V group is frozen when *any* head of the group
    is skipped (`kv_policy="any"`, default, ours: the skipped head's computation never changes) or
    only when *all* are (`"all"`: fewer frozen parameters, but a skipped head's keys may move), or
    never (`"none"`: only Q and O slices freeze, so under GQA every k-head selection freezes exactly
    the same number of parameters: exact budget matching, at the price of shared K/V moving).
    """
    heads = validate_heads(model, heads)
    if kv_policy not in ("any", "all", "none"):
        raise ValueError(f"kv_policy must be 'any', 'all' or 'none', got {kv_policy!r}.")
    params = {p.name: p for l in range(model.cfg.n_layers) for c in COMPONENTS
              for p in component_params(model, l, c)}
    masks = {n: torch.zeros_like(p.param, dtype=torch.bool) for n, p in params.items()}
    by_layer: dict[int, set[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, set()).add(h)
    group_size = model.cfg.n_heads // n_kv_heads(model)
    for l, hs in by_layer.items():
        for c in COMPONENTS:
            for p in component_params(model, l, c):
                m = masks[p.name]
                if c in ("q", "o"):
                    for h in hs:
                        p.unit(h, m).fill_(True)
                else:
                    for g in range(n_kv_heads(model)):
                        members = set(range(g * group_size, (g + 1) * group_size))
                        hit = members & hs
                        if (kv_policy == "any" and hit) or (kv_policy == "all" and hit == members):
                            p.unit(g, m).fill_(True)
    return masks
