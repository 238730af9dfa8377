"""Peer methods (issue 25): other ways to lower the alignment tax, run like CAST's arms.

CAST freezes the heads where safety and utility conflict. The methods a reader compares it with do
other things; each is here as a tested function that a verdict piece can call in place of
`safety_finetune`, with its trainable-parameter budget in its result (`config["peer"]`):

    interpolation.py   theta(a) = (1 - a) theta_original + a theta_tuned: a curve from one run
    anchor.py          the model's own benign answers mixed into every safety batch
    lora.py            rank-r adapters on Q/V (K/O) through hooks, merged for evaluation
    projection.py      safety gradient projected off the utility gradient where they conflict
    activation.py      heads ranked by how far harmful prompts move their output (ALPS-like)
    loop.py            what LoRA's and projection's loops share with `safety_finetune`
    config.py          the comparison's design: `PeersConfig` (the v3 regime of `harness.py`, as
                       the verdict's), the plan, the arms' names, the cost model
    run.py             all of them as pieces of the v3 harness (`run_peers`)
    summary.py         compared at matched safety (`summarize_peers`; report.py:
                       `write_peers_report`)

Layer freezes ("bottom_layers", "top_layers") and the activation arms ("act_tune", "act_skip")
are head sets, registered in `registry/arms.py` and trained by `safety_finetune(skip_heads=...)`.

What a verdict piece calls in place of `safety_finetune(model, data.safety_train,
skip_heads=units, config=cfg.tuning(seed), on_step=on_step)` (the same keywords where they apply):

    interpolation   train as usual, then for a in INTERPOLATION_ALPHAS:
                    interpolate_weights(model, original, parameter_state(tuned), a) and evaluate
    anchor          anchor_finetune(model, safety, anchor_set(model, benign, exclude=[tests]),
                                    share=s, skip_heads=units, config=..., on_step=...)
    LoRA            lora_finetune(model, safety, lora=LoraConfig(rank=8), config=..., on_step=...)
    projection      projected_finetune(model, safety, anchor, mode="global", skip_heads=units,
                                       config=..., on_step=...)
    layer freeze    select_arm_units("bottom_layers" | "top_layers", None, k, model=model)
    activation      activation_arm_units("act_tune" | "act_skip",
                                         head_activation_shift(model, harmful, harmless), k,
                                         model=model)
"""

from .activation import (ACTIVATION_ARMS, activation_arm_units, head_activation_shift,
                         head_outputs)
from .anchor import ANCHOR_SHARES, anchor_config, anchor_finetune, anchor_set
from .interpolation import INTERPOLATION_ALPHAS, interpolate_weights, parameter_state
from .lora import LoraAdapters, LoraConfig, lora_finetune, merge_lora, merged
from .projection import (PROJECTION_MODES, UnitBlocks, project_gradient, projected_finetune)
from .config import (PEER_METHODS, PEERS_PRESETS, PeerPiece, PeersConfig, estimate_peers_seconds,
                     plan_peers)
from .run import run_peers
from .summary import best_method, common_levels, pairwise_difference, summarize_peers
from .report import write_peers_report

__all__ = ["ACTIVATION_ARMS", "activation_arm_units", "head_activation_shift", "head_outputs",
           "ANCHOR_SHARES", "anchor_config", "anchor_finetune", "anchor_set",
           "INTERPOLATION_ALPHAS", "interpolate_weights", "parameter_state",
           "LoraAdapters", "LoraConfig", "lora_finetune", "merge_lora", "merged",
           "PROJECTION_MODES", "UnitBlocks", "project_gradient", "projected_finetune",
           "PEER_METHODS", "PEERS_PRESETS", "PeerPiece", "PeersConfig", "estimate_peers_seconds",
           "plan_peers", "run_peers", "summarize_peers", "best_method", "common_levels", "pairwise_difference",
           "write_peers_report"]
