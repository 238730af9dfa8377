"""The whole CAST experiment as one resumable run: diagnose -> tune every arm -> evaluate -> report.

    run_experiment(RunConfig.from_preset("cpu", out_dir="runs/default"))

1. Diagnosis (stage 1) on the calibration splits: the pre-alignment `ConflictMap`.
2. Safety fine-tuning (stage 2) of a fresh copy of the model per *piece*: an arm (full tuning, CAST,
   random k, bottom-k by C, top-k by O, top-k by S, a band of whole layers) at a budget k, on one
   training seed. The design is paired (METHOD v2):
   - every arm runs on every training seed of `train_seeds` (the seed sets the data order and any
     randomness of training, nothing else), so arms on one seed see the same batches;
   - the random arm has `n_draws` draws: draw d skips the units drawn with seed d and trains on
     seed `train_seeds[d % len(train_seeds)]`, so draws and training seeds are crossed, every seed
     has draws, and each draw can be compared with CAST on its own training seed;
   - every arm at one k freezes the same number of parameters (`sparse_tuning`: units own
     disjoint slices; under GQA a head arm trains the shared K/V, a `unit="group"` arm skips whole
     groups), recorded per piece.
   Along training each piece logs a generation-free refusal score on harmful validation prompts
   and KL to the original on benign validation answers (`sparse_tuning.ValidationMonitor`), so the
   report can compare arms at equal safety.
3. Evaluation (stage 3) of the original and of every piece on the held-out test sets, per prompt.
4. Post-hoc attribution (stage 4) of the full-tuning arm on the first training seed (optional).
Then `report` computes every comparison as a paired difference with a 95% CI over seeds and
prompts, CAST's rank among the random draws, and the matched-safety comparison, and writes
`report.md` and the figures.

Validation splits (ours): the last `n_val` examples of the harmful and benign *train* splits are
held out of training for the curves; the benign ones get the original model's own answers.

Every finished piece is written atomically to its file in the run directory (`RunDir`) with a key
of the settings it depends on (the stage configs and run settings it reads, hashed) and its skipped
units; a piece is re-used only when both match, so an interrupted run resumes where it stopped,
more seeds or draws add pieces to a finished run, and a changed setting redoes the pieces it
affects instead of mixing them in.

Under `torchrun` (`distributed.py`) the missing pieces are shared out round-robin over the ranks,
each rank on its own device; rank 0 alone writes the shared files and, after every piece is on
disk, the results. A piece's numbers do not depend on the rank that ran it.

The package, by what each module owns:

    config.py   `RunConfig` (holding the stage configs), the presets, what each stage depends on
    plan.py     the grid of pieces (`plan_pieces`) and the cost model (`estimate_seconds`)
    rundir.py   the run directory: its layout (`RunDir`), manifest, claiming and locking it,
                re-using finished files
    runner.py   `run_experiment`: every stage, in order, re-using what is finished
"""

from __future__ import annotations

from .config import (ADDITIVE_FIELDS, ALL_BASELINES, ATTR_FIELDS, ATTRIBUTABLE, BASELINES,
                     DIAG_FIELDS, EVAL_FIELDS, PIPELINE_DEFAULTS, PIPELINE_VERSION, PRESETS,
                     RUN_CONFIG_FORMAT, RUN_NAMES, STAGES, TUNE_FIELDS, RunConfig)
from .plan import (ATTRIBUTION_COST_AT, BUNDLED_TEST_SIZES, COST_S, Piece, attribution_seconds,
                   estimate_seconds, plan_pieces)
from .rundir import RunDir, RunMismatchError, check_piece, claim_run_dir, run_manifest
from .runner import (DegenerateTrainingError, check_not_degenerate, report_markdown, run_experiment,
                     run_figures, summarize)

# Internals that tests reach through `pipeline.` (the run's splits, keys, locks and piece files).
from dataclasses import asdict  # noqa: E402,F401
from ..io import read_json  # noqa: E402,F401
from .plan import _generates  # noqa: E402,F401
from .rundir import _load_piece, _release_locks, _state_key  # noqa: E402,F401
from .runner import _datasets, _diag_key, _splits  # noqa: E402,F401

__all__ = ["RunConfig", "PRESETS", "PIPELINE_DEFAULTS", "RUN_NAMES", "STAGES", "RUN_CONFIG_FORMAT",
           "RunDir", "BASELINES", "ALL_BASELINES", "ATTRIBUTABLE", "PIPELINE_VERSION",
           "DIAG_FIELDS", "TUNE_FIELDS", "ATTR_FIELDS", "EVAL_FIELDS", "ADDITIVE_FIELDS", "Piece",
           "plan_pieces", "COST_S", "ATTRIBUTION_COST_AT", "BUNDLED_TEST_SIZES",
           "attribution_seconds", "estimate_seconds", "RunMismatchError", "run_manifest",
           "claim_run_dir", "check_piece", "run_experiment", "DegenerateTrainingError",
           "check_not_degenerate", "run_figures", "summarize", "report_markdown"]
