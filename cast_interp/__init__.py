"""cast_interp: CAST (head-level diagnosis of safety-utility conflicts, surgical safety fine-tuning)
on TransformerLens's `HookedTransformer`.

The layout follows the method, stage by stage:

    data.py, model.py          D_safe / D_util and the hooked model
    conflict.py                stage 1: Optimization Conflict O(h) = 1 - cos(g_safe, g_util)
    sensitivity.py             stage 1: Functional Sensitivity S(h) (head ablation)
    conflict_map.py            stage 1: the conflict map C(h), `ConflictMap`
    diagnose.py                stage 1 end to end
    sparse_tuning.py           stage 2: safety fine-tuning that skips heads, budget-matched arms
    evaluate.py                stage 3: safety and utility
    attribution.py             stage 4: which heads caused the utility drop
    figures.py                 the paper figures
    inspect.py                 looking inside the flagged heads (where they attend)
    planted.py                 tiny models with a planted conflict (known answers, teaching)
    pipeline.py, cli.py        the whole experiment, `cast-interp`
"""

__version__ = "0.1.0"

from .data import ChatBatch, ChatDataset, ChatExample, load_bundled, load_dataset, make_batches
from .model import load_model, tiny_model

__all__ = ["ChatBatch", "ChatDataset", "ChatExample", "load_bundled", "load_dataset",
           "make_batches", "load_model", "tiny_model"]
