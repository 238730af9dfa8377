"""Which units an arm skips: the arms registry's selectors (`registry/arms.py`: one table of
selectors and styles), by their v1 names (`select_arm_heads`: head units)."""

from __future__ import annotations

from typing import Optional, Protocol, Union

from torch import Tensor

from ..backend import Model
from ..registry.arms import select_arm_units
from .config import ArmMethod, Unit


class _HasScores(Protocol):
    O: Tensor
    S: Tensor
    C: Tensor


def select_arm_heads(arm: ArmMethod, conflict_map: Optional[_HasScores], k: Union[int, float], *,
                     seed: int = 0, model: Optional[Model] = None,
                     start_layer: Optional[int] = None) -> list[Unit]:
    """`select_arm_units(..., unit="head")`: the query heads an arm skips."""
    return select_arm_units(arm, conflict_map, k, unit="head", seed=seed, model=model,
                            start_layer=start_layer)
