"""Weight interpolation (model averaging, WiSE-FT): theta(a) = (1 - a) theta_orig + a theta_tuned.

Lin et al. ("Mitigating the Alignment Tax of RLHF", arXiv 2309.06256) found that averaging the
tuned weights with the original gave the best trade-off of every method they tried; WiSE-FT
(Wortsman et al. 2022) is the same idea. Sweeping a over [0, 1] turns one tuned model (full
tuning, CAST, any arm) into a curve at no extra training cost: a = 0 is the original model, exactly,
and a = 1 the tuned one, exactly.

`INTERPOLATION_ALPHAS` (ours) are five points that leave out a = 0: the untrained model is not a
trained checkpoint (METHOD v3 reads matched safety only between trained checkpoints).
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor

from ..backend import Model

INTERPOLATION_ALPHAS: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 1.0)


def parameter_state(model: Model, names: Optional[Iterable[str]] = None) -> dict[str, Tensor]:
    """Copies of the model's parameters `{name: tensor}`, named as in `model.named_parameters()`
    (all, or `names`): the states `interpolate_weights` takes. (On the TL 4 bridge
    `state_dict()` names differ from `named_parameters()`.)"""
    params = dict(model.named_parameters())
    wanted = list(params) if names is None else list(names)
    unknown = [n for n in wanted if n not in params]
    if unknown:
        raise KeyError(f"{unknown[:3]} are not parameters of this model (names come from "
                       "model.named_parameters()).")
    return {n: params[n].detach().clone() for n in wanted}


def interpolate_weights(model: Model, original_state: Mapping[str, Tensor],
                        tuned_state: Mapping[str, Tensor], a: float) -> dict:
    """Load theta(a) = (1 - a) theta_original + a theta_tuned into `model`, in place.

    Args:
        original_state: `{parameter name: tensor}` of the model before tuning (`parameter_state`);
            parameters it holds that `tuned_state` lacks are set to their original values, so the
            model holds theta(a) whatever it held before.
        tuned_state: `{name: tensor}` of the tuned parameters (all of them, or only those that
            trained), each with its original's shape.
        a: in [0, 1]. a = 0 gives the original and a = 1 the tuned weights bit for bit (the
            formula is (1 - a) * o + a * t, not o + a * (t - o), which would round at a = 1).

    Returns:
        {"a", "n_interpolated": scalars of `tuned_state`, "n_changed": of those, how many differ
        between the two states (the tuned run's effective budget)}.
    """
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not (
            math.isfinite(a) and 0.0 <= a <= 1.0):
        raise ValueError(f"a must be a number in [0, 1] (0: the original, 1: the tuned model), "
                         f"got {a!r}.")
    params = dict(model.named_parameters())
    for what, state in (("original_state", original_state), ("tuned_state", tuned_state)):
        unknown = [n for n in state if n not in params]
        if unknown:
            raise KeyError(f"{what} names {unknown[:3]}, which are not parameters of this model: "
                           "use names from model.named_parameters() (peers.parameter_state(model); "
                           "the TL 4 bridge's state_dict() names differ).")
    missing = [n for n in tuned_state if n not in original_state]
    if missing:
        raise KeyError(f"tuned_state has {missing[:3]} but original_state does not: interpolation "
                       "needs both ends of every tuned parameter.")
    for n, t in tuned_state.items():
        o = original_state[n]
        if tuple(t.shape) != tuple(o.shape) or tuple(t.shape) != tuple(params[n].shape):
            raise ValueError(f"{n}: tuned {tuple(t.shape)}, original {tuple(o.shape)} and model "
                             f"{tuple(params[n].shape)} shapes differ: the states are of another "
                             "model.")
    n_changed = 0
    with torch.no_grad():
        for n, o in original_state.items():
            p = params[n]
            o = o.to(p.device, p.dtype)
            if n not in tuned_state:
                p.copy_(o)
                continue
            t = tuned_state[n].to(p.device, p.dtype)
            p.copy_((1.0 - a) * o + a * t)
            n_changed += int((o != t).sum())
    return {"a": float(a), "n_interpolated": sum(t.numel() for t in tuned_state.values()),
            "n_changed": n_changed}
