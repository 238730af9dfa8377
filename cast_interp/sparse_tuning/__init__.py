"""Stage 2 of CAST: sparse safety fine-tuning that never touches the skipped units.

Safety fine-tuning (SFT on D_safe: harmful prompt -> refusal, loss on response tokens) costs general
ability. CAST's claim is that the cost comes mostly from updating a few units whose safety and
utility gradients conflict and on which utility depends; so it trains as usual but *skips* the top-k
units of the conflict map C.

Units (METHOD v2, `units.py`). Skipping a query head freezes exactly what the head owns: its
`W_Q[h]`, `b_Q[h]`, `W_O[h]` slices, plus its K/V slices only without grouped-query attention (then
the head is its own group). Under GQA the shared K/V of a group belong to the group, so they train
in every head arm, and every k-head arm freezes exactly the same number of parameters. With
`unit="group"` an arm skips whole key/value groups (`W_K/b_K/W_V/b_V[g]`). Biases the architecture
does not have (TransformerLens keeps zero `b_Q/b_K/b_V` for Llama-style models) never train, in any
arm (`units.absent_param_names`). (The v1 `kv_policy`, which froze a group's K/V with its heads and
so gave arms of one k different budgets, remains as a deprecated option.)

"Never change" is exact: the frozen slices are bit-identical after training, whatever the optimizer.
Masking gradients alone is not enough (AdamW's decoupled weight decay moves parameters whose
gradient is zero), so each step (1) zeroes the frozen entries of the gradient, which also keeps them out of
the clipping norm and the optimizer's moments, and (2) after the optimizer step, restores the frozen
entries from a snapshot taken before training (`torch.where(mask, snapshot, param)`).

Paired design (METHOD v2). Everything random in training (the data order, torch's global RNG) comes
from `TuningConfig.seed`, the *training* seed, and nothing else: the skipped units never change the
batches. So two arms on one training seed see the same batches in the same order (each step's batch
fingerprint is recorded in `TuningResult.batch_fingerprints`), and their difference is the units
alone. The random arms' unit draws have their own seeds (`select_arm_units(..., seed=)`).

Safety along training. With a `monitor` (e.g. `ValidationMonitor`: generation-free refusal score on
harmful validation prompts, KL to the original on benign validation answers) the run records the
monitor's values before training, every `eval_every` steps and at the end (`TuningResult.curve`), so
arms can be compared at equal safety. The monitor draws no random numbers and changes no weight.

Speed without other numbers (`TuningConfig.precision`, `group_by_length`; both off by default).
"bf16" runs each step's forward and backward on a bfloat16 copy of the model and keeps float32
master weights and optimizer state, so the frozen restore above stays exact; "bf16-autocast" uses
`torch.autocast` instead. `group_by_length` runs a step's examples as length-sorted micro-batches:
the same batch and loss, little padding (`config["compute"]["padded_token_share"]`). Whether bf16
keeps a run's curves is checked against float32 seeds (`precision_checks.check_curves`).

Choices that are ours, not the paper's, recorded in `TuningConfig`: `scope="attention"` (only
attention parameters train by default: the units' slices plus the per-layer `b_O`, which belongs
to no unit; MLPs, embeddings and norms stay frozen) and the defaults of lr / steps / schedule,
chosen so one arm trains SmolLM2-135M-Instruct to refuse quickly on a CPU (benchmarks/README.md).

The package:

    config.py     `TuningConfig`, `TuningResult`
    masks.py      which parameters train; an arm's parameter budget
    batches.py    seeded batches with the benign mix; length-grouped micro-batches
    monitor.py    `ValidationMonitor`: the safety/utility-cost curve, generation-free
    train.py      `safety_finetune`
    selection.py  which units an arm skips (the arms registry, by the v1 names)
"""

from __future__ import annotations

from ..registry.arms import _scores, k_from_fraction, layer_band_heads, select_arm_units
from ..registry.arms import ranked as _ranked
from .batches import LENGTH_GROUP_RATIO, _BatchSource, batch_fingerprint, length_groups
from .config import (ARMS, LEGACY_KV_POLICIES, PRECISIONS, Arm, ArmMethod, Optimizer, Precision,
                     Schedule, Scope, TuningConfig, TuningResult, Unit)
from .masks import frozen_masks, parameter_budget, trainable_parameters
from .monitor import ValidationMonitor
from .selection import select_arm_heads
from .train import safety_finetune

__all__ = ["TuningConfig", "TuningResult", "safety_finetune", "ValidationMonitor", "frozen_masks",
           "trainable_parameters", "parameter_budget", "batch_fingerprint", "length_groups",
           "LENGTH_GROUP_RATIO", "select_arm_heads", "select_arm_units", "k_from_fraction",
           "layer_band_heads", "Optimizer", "Schedule", "Scope", "Precision", "PRECISIONS",
           "ArmMethod", "ARMS", "Arm", "Unit", "LEGACY_KV_POLICIES",
           # internals other modules and benchmarks reach through `sparse_tuning.`
           "_BatchSource", "_scores", "_ranked"]
