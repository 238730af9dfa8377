"""Safety and utility cost along training, generation-free (`ValidationMonitor`)."""

from __future__ import annotations

from torch import Tensor

from .. import backend
from ..backend import Model
from ..data import ChatDataset, make_batches


class ValidationMonitor:
    """Generation-free safety and utility cost of a model, for curves along training.

    The same measures as the final evaluation's generation-free endpoints, on validation data.
    Safety: the refusal score of each harmful validation prompt (`safety.refusal_logprobs`: log
    P(a refusal opening | prompt), higher is safer). Utility cost: KL(original || model) on the
    benign validation examples (prompt + answer, teacher forced), mean over each example's content
    tokens (`utility.utility_per_prompt`). Call it on a model for the means over prompts
    {"refusal_score", "kl"}; `per_prompt` gives the values per prompt. Deterministic: no sampling,
    no random numbers.

    Args:
        original: a frozen copy of the model before training (same tokenizer).
        harmful: harmful prompts (responses unused).
        benign: benign prompts with answers (ours: the model's own, `data.self_reference`).
        group_by_length: batch the benign examples sorted by length (less padding, the same
            per-prompt values to float rounding, in dataset order); the harmful prompts are
            always batched by length (`safety.prefix_logprobs`).
    """

    def __init__(self, original: Model, harmful: ChatDataset, benign: ChatDataset, *,
                 batch_size: int = 8, group_by_length: bool = False):
        if len(harmful) == 0 or len(benign) == 0:
            raise ValueError("ValidationMonitor needs at least one harmful and one benign example.")
        from ..utility import OriginalLogprobs

        benign.require_responses()
        self.harmful, self.batch_size = harmful, batch_size
        self.benign_batches = make_batches(original, benign, batch_size=batch_size,
                                           group_by_length=group_by_length)
        # The original is frozen: its log-probs on the benign answers are computed once, so each
        # point of a curve costs one forward of the tuned model, not two.
        self.original_logprobs = OriginalLogprobs(original, self.benign_batches,
                                                  batch_size=batch_size, tokens="content")
        self.describe = {"harmful": harmful.describe(), "benign": benign.describe()}

    def per_prompt(self, model: Model) -> dict[str, Tensor]:
        from ..registry.metrics import curve_key
        from ..safety import refusal_logprobs
        from ..utility import utility_per_prompt

        with backend.inference_layout(model):  # once for both measures
            kl = utility_per_prompt(model, self.benign_batches, original=self.original_logprobs,
                                    batch_size=self.batch_size, tokens="content")["kl_to_original"]
            # The curves' keys are the metrics registry's (`registry/metrics.py`).
            return {curve_key("refusal_score"): refusal_logprobs(model, self.harmful,
                                                                 batch_size=self.batch_size),
                    curve_key("kl_to_original"): kl}

    def __call__(self, model: Model) -> dict[str, float]:
        return {k: float(v.nanmean()) for k, v in self.per_prompt(model).items()}
