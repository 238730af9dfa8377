"""Which parameters train: the scope's parameters less the skipped units' slices (`frozen_masks`,
`trainable_parameters`), and the budget an arm trains (`parameter_budget`)."""

from __future__ import annotations

from typing import Optional, Sequence, get_args

from torch import Tensor
from torch.nn import Parameter

from .. import backend
from .. import units as U
from ..backend import Model
from ..heads import head_param_masks
from .config import Scope, _check_choice, _check_kv_policy


def _scope_names(model: Model, scope: Scope) -> Optional[set[str]]:
    """Names of the parameters in scope (None: all). "attention": every attention parameter,
    including what no unit owns (`b_O`, QK-norm weights), per `backend.attention_param_names`."""
    return None if scope == "all" else backend.attention_param_names(model)


def _in_scope(name: str, names: Optional[set[str]]) -> bool:
    return names is None or name in names


def frozen_masks(
    model: Model, skip_heads: Sequence[Sequence[int]] = (),
    skip_groups: Sequence[Sequence[int]] = (), *, kv_policy: Optional[str] = None,
) -> dict[str, Tensor]:
    """`{full parameter name: bool mask}` (True = frozen) for skipping these units.

    Default: exactly what the units own (`units.unit_masks`). `kv_policy` (deprecated) uses the v1
    head masks (`heads.head_param_masks`), which also freeze K/V groups; it takes no groups.
    Absent biases are left out of the masks (they never train anyway).
    """
    if kv_policy is None:
        masks = U.unit_masks(model, heads=skip_heads, groups=skip_groups)
    else:
        if list(skip_groups):
            raise ValueError("kv_policy (deprecated) applies to heads only; to skip key/value "
                             "groups leave kv_policy=None.")
        masks = head_param_masks(model, U.validate_units(model, skip_heads, "head"),
                                 kv_policy=kv_policy)
    absent = U.absent_param_names(model)
    return {n: m for n, m in masks.items() if n not in absent}


def trainable_parameters(
    model: Model, skip_heads: Sequence[Sequence[int]] = (), *,
    skip_groups: Sequence[Sequence[int]] = (), scope: Scope = "attention",
    kv_policy: Optional[str] = None,
) -> tuple[list[Parameter], dict[str, Tensor]]:
    """The parameters to optimise and the frozen masks of the partly frozen ones.

    Returns:
        params: in-scope parameters with at least one entry free to change. Left out: a parameter
            entirely frozen by the skip (e.g. `W_Q` of a layer whose every head is skipped) and the
            biases the architecture does not have (`units.absent_param_names`).
        masks: `{name: bool mask}` (True = frozen) for each returned parameter that is partly frozen.
    """
    _check_choice("scope", scope, get_args(Scope))
    _check_kv_policy(kv_policy)
    all_masks = frozen_masks(model, skip_heads, skip_groups, kv_policy=kv_policy)
    absent = U.absent_param_names(model)
    in_scope = _scope_names(model, scope)
    params, masks = [], {}
    for name, p in model.named_parameters():
        if not _in_scope(name, in_scope) or name in absent:
            continue
        m = all_masks.get(name)
        if m is not None and bool(m.all()):
            continue
        params.append(p)
        if m is not None and bool(m.any()):
            masks[name] = m.to(p.device)
    return params, masks


def parameter_budget(
    model: Model, skip_heads: Sequence[Sequence[int]] = (),
    skip_groups: Sequence[Sequence[int]] = (), *, scope: Scope = "attention",
    kv_policy: Optional[str] = None,
) -> dict[str, int]:
    """Scalar parameter counts of an arm: {"n_trainable", "n_frozen", "n_absent", "n_scope"}.

    n_scope: in-scope parameters; n_absent: of those, biases the architecture lacks (never
    trained); n_frozen: frozen by the skipped units; n_trainable = n_scope - n_absent - n_frozen.
    """
    absent = U.absent_param_names(model)
    in_scope = _scope_names(model, scope)
    named = [(n, p) for n, p in model.named_parameters() if _in_scope(n, in_scope)]
    n_scope = sum(p.numel() for _, p in named)
    n_absent = sum(p.numel() for n, p in named if n in absent)
    n_frozen = sum(int(m.sum()) for n, m in frozen_masks(model, skip_heads, skip_groups,
                                                         kv_policy=kv_policy).items()
                   if _in_scope(n, in_scope))
    return {"n_trainable": n_scope - n_absent - n_frozen, "n_frozen": n_frozen,
            "n_absent": n_absent, "n_scope": n_scope}
