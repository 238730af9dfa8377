"""cast_interp: CAST (head-level diagnosis of safety-utility conflicts, surgical safety fine-tuning)
on TransformerLens: its 3.x `HookedTransformer` or its 4.x `TransformerBridge`, the same code.

The layout follows the method, stage by stage (a folder is a package; its `__init__` lists its
modules and exports every public name):

    data/, model.py            D_safe / D_util and the hooked model
    backend.py, hf_models.py   what differs between TransformerLens 3 and 4; bridge models (TL 4)
    units.py                   what a query head and a key/value group own (every stage's units)
    conflict.py                stage 1: Optimization Conflict O(u) = 1 - cos(g_safe, g_util)
    sensitivity.py             stage 1: Functional Sensitivity S(u) (unit ablation, screened)
    conflict_map.py            stage 1: the conflict map C(u), `ConflictMap`, nulls
    diagnose.py                stage 1 end to end
    regime.py                  v3: the sweep of full tuning that finds a tax before arms compare
    harness.py                 v3: what the verdict and the peer comparison share (regime settings,
                               data, maps, checkpoint evaluators, worker claims)
    verdict.py                 v3: the map against random / layer-matched / graded head sets at
                               matched safety (verdict_report.py: its report and figures)
    peers/                     v3: the peer methods (interpolation, anchor, LoRA, projection,
                               layer freezes, activation choice) compared with CAST
    sparse_tuning/             stage 2: safety fine-tuning that skips units, budget-matched arms
    safety.py, utility.py      stage 3: the refusal judge and safety metrics; utility and task accuracy
    evaluate.py                stage 3: both, per prompt, as one `EvalResult`
    attribution/               stage 4: which units caused the utility drop
    stats.py                   paired bootstrap CIs, nulls, seeded ranks (shared by every stage)
    inference.py               v3 verdict: CAST against random sets (sets x seeds x prompts),
                               rank ranges, matched-safety reads, the graded slope
    figures/, report/          the paper figures; the run's report and its inference
    head_attention.py          looking inside the flagged heads (where they attend)
    planted.py                 tiny models with a planted conflict (known answers, teaching)
    pipeline/, cli.py          the whole experiment, `cast-interp`
"""

__version__ = "0.2.0"

from .conflict_map import ConflictMap
from .data import ChatBatch, ChatDataset, ChatExample, load_bundled, load_dataset, make_batches
from .diagnose import DiagnosisConfig, diagnose
from .evaluate import EvalConfig, OriginalLogprobs, evaluate
from .model import load_model, tiny_model
from .peers import PeersConfig, run_peers, summarize_peers, write_peers_report
from .pipeline import RunConfig, run_experiment
from .regime import SweepConfig, run_regime_sweep
from .regime_report import write_sweep_report
from .sparse_tuning import TuningConfig, safety_finetune
from .verdict import VerdictConfig, estimate_verdict_seconds, run_verdict, summarize_verdict
from .verdict_report import write_verdict_report

__all__ = ["ChatBatch", "ChatDataset", "ChatExample", "load_bundled", "load_dataset",
           "make_batches", "load_model", "tiny_model", "ConflictMap", "DiagnosisConfig", "diagnose",
           "TuningConfig", "safety_finetune", "EvalConfig", "evaluate", "OriginalLogprobs",
           "RunConfig", "run_experiment", "SweepConfig", "run_regime_sweep", "write_sweep_report",
           "VerdictConfig", "estimate_verdict_seconds", "run_verdict", "summarize_verdict",
           "write_verdict_report",
           "PeersConfig", "run_peers", "summarize_peers", "write_peers_report"]
