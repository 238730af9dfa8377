"""Utility anchor: the model's own answers to benign prompts mixed into every safety batch.

The anchor set is benign prompts with the model's greedy answers before training
(`data.self_reference`): training on them holds the model to what it already does while it learns
to refuse. `safety_finetune` mixes them in at a share (`TuningConfig.benign_mix`):
round(share * batch_size) examples of every batch are anchors, the rest safety examples. Nothing
else changes, so CAST + anchor is `skip_heads=` CAST's heads.

With a share, a batch holds fewer safety examples than full tuning's and both streams draw from the
one training-seed generator, so the safety batches differ from full tuning's at the same seed: the
share is the arm's difference. `ANCHOR_SHARES` (ours) are two shares for the comparison.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..backend import Model
from ..data import ChatBatch, ChatDataset, ChatExample, dedup_against, self_reference
from ..sparse_tuning import TuningConfig, TuningResult, parameter_budget, safety_finetune

ANCHOR_SHARES: tuple[float, ...] = (0.25, 0.5)


def anchor_set(model: Model, benign: ChatDataset, *, max_new_tokens: int = 64,
               batch_size: int = 16, exclude: Sequence[ChatDataset] = (),
               cache_path: Union[str, Path, None] = None,
               name: str = "utility-anchor") -> ChatDataset:
    """Benign prompts with the model's own greedy answers (any answers `benign` has are replaced),
    minus every prompt of `exclude` (the test and validation splits): the anchor set.

    `max_new_tokens` caps each answer (64: the v3 regime's `answer_tokens`); `cache_path` caches the
    answers as `self_reference` does. Call it on the original model, before any training.
    """
    if not isinstance(benign, ChatDataset):
        raise TypeError(f"benign must be a ChatDataset of benign prompts, got "
                        f"{type(benign).__name__}.")
    kept = dedup_against(benign, *exclude, name=name)
    if len(kept) == 0:
        raise ValueError(f"No prompt of {benign.name!r} is left after removing those in "
                         f"{[e.name for e in exclude]}: the anchor needs benign prompts that no "
                         "test or validation split holds.")
    prompts = ChatDataset(name, [ChatExample(e.prompt, None, e.category) for e in kept],
                          benign.source or benign.name)
    return self_reference(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          cache_path=cache_path)


def anchor_config(config: TuningConfig, share: float) -> TuningConfig:
    """`config` with `benign_mix=share`, checked: each batch of `config.batch_size` must then hold
    at least one anchor and at least one safety example."""
    if not isinstance(config, TuningConfig):
        raise TypeError(f"config must be a TuningConfig, got {type(config).__name__}.")
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 < share < 1.0:
        raise ValueError(f"share must be a fraction in (0, 1) (the anchors' part of each batch), "
                         f"got {share!r}.")
    n = int(round(share * config.batch_size))
    if not 1 <= n <= config.batch_size - 1:
        raise ValueError(f"share={share} of a batch of {config.batch_size} is {n} anchor "
                         f"examples: it must be 1..{config.batch_size - 1}; choose another share "
                         "or batch size.")
    return dataclasses.replace(config, benign_mix=float(share))


def anchor_finetune(
    model: Model,
    safety_data: Union[ChatDataset, Sequence[ChatBatch]],
    anchor: Union[ChatDataset, Sequence[ChatBatch]],
    *,
    share: float,
    config: Optional[TuningConfig] = None,
    skip_heads: Sequence[Sequence[int]] = (),
    skip_groups: Sequence[Sequence[int]] = (),
    **kwargs: Any,
) -> TuningResult:
    """`safety_finetune` with the anchor mixed into every batch at `share` (in place).

    `kwargs` go to `safety_finetune` (monitor, eval_every, curve_start, on_step, progress). The
    result's `config["peer"]` records the method, the share, the anchors per batch and the budget
    (`parameter_budget`: the anchor changes no parameter count).
    """
    cfg = anchor_config(config or TuningConfig(), share)
    res = safety_finetune(model, safety_data, skip_heads=skip_heads, skip_groups=skip_groups,
                          config=cfg, benign_data=anchor, **kwargs)
    budget = parameter_budget(model, res.skip_heads, res.skip_groups, scope=cfg.scope)
    res.config["peer"] = {"method": "utility_anchor", "share": float(share),
                          "n_anchor_per_batch": res.config["n_benign_per_batch"],
                          "budget": budget}
    return res
