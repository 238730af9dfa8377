"""Utility metrics (stage 3): how much general ability a tuned model kept.

- `kl_to_original`: KL(original || tuned) of the next-token distributions along benign prompts and
  their reference (or self-reference) answers: how far behaviour moved where it should not.
- `reference_nll`: NLL of held-out reference answers (the L_util of held-out data).
- `over_refusal_rate`: refusals of safe prompts that only look alarming (XSTest "safe"), judged by
  `safety.is_refusal`: the utility cost safety training most often brings.
- `task_accuracy`: multiple choice by log-likelihood, with its chance level, on the bundled items
  (`bundled/mc_items.jsonl`, easy knowledge, arithmetic and word meaning, written for this project)
  or MMLU CSV files (`load_mmlu_csv`). `gsm8k_accuracy` is there for larger models.

**(v2)** KL and NLL are taken on the answer's *content* tokens: the end-of-turn token is excluded
(METHOD: "stop here" is shared by safety and utility and rewarded the format, not the content).
Each metric is the mean over prompts of a per-prompt token mean (ours: every prompt weighs the same,
so a bootstrap over prompts resamples exactly the unit the mean is over); the per-prompt values ride
along (`MetricValue.per_prompt`, or the "correct" list of `task_accuracy`).
"""

from __future__ import annotations

import csv
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from . import backend
from .backend import Model

from .data import (ChatBatch, ChatDataset, DataError, end_of_turn_id, in_dataset_order,
                   make_batches)
from .generation import generate
from .safety import (
    DataLike,
    MetricValue,
    as_dataset,
    encode_prompt,
    encode_text,
    prefix_logprobs,
    refusal_rate,
)

BatchesLike = Union[ChatDataset, str, Sequence[ChatBatch]]
Tokens = Literal["content", "response"]

# --------------------------------------------------------------------------------------------------
# KL to the original and reference NLL, per prompt
# --------------------------------------------------------------------------------------------------


def as_batches(model: Model, data: BatchesLike, batch_size: int, *,
               group_by_length: bool = False) -> list[ChatBatch]:
    """`ChatBatch`es from a dataset with responses (or a spec), or the batches themselves."""
    if isinstance(data, (ChatDataset, str)):
        ds = as_dataset(data)
        ds.require_responses()
        return make_batches(model, ds, batch_size=batch_size, group_by_length=group_by_length)
    batches = list(data)
    if not batches or not all(isinstance(b, ChatBatch) for b in batches):
        raise DataError("Expected a ChatDataset with responses or a non-empty list of ChatBatch.")
    if sum(b.n_response_tokens for b in batches) == 0:
        raise DataError("These batches have no response tokens: the metric is undefined.")
    return batches


def content_mask(batch: ChatBatch, end_of_turn: int) -> Bool[Tensor, "batch pos"]:
    """Response tokens without the end-of-turn token.

    Starts from `batch.content_mask` when the batch has one (`make_batches` sets it), else from
    `loss_mask`; either way a row's last masked token is dropped when it is `end_of_turn`, which
    covers batches built without a content mask (where it defaults to `loss_mask`). A truncated
    answer (no end-of-turn token) keeps all its tokens.
    """
    mask = getattr(batch, "content_mask", None)
    mask = (batch.loss_mask if mask is None else mask).clone().bool()
    pos = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, pos, -1).max(-1).values  # [batch]; -1 for a row without a response
    rows = torch.nonzero(last >= 0).flatten()
    rows = rows[batch.tokens[rows, last[rows]].to(mask.device) == end_of_turn]
    mask[rows, last[rows]] = False
    return mask


def check_same_vocab(model: Model, original: Model) -> None:
    """Raise unless `original` has the same shape and tokenizer as `model` (KL needs both)."""
    a, b = model.cfg, original.cfg
    shape = ("d_vocab", "n_layers", "n_heads", "d_model", "d_head")
    diff = {k: (getattr(b, k), getattr(a, k)) for k in shape if getattr(a, k) != getattr(b, k)}
    if diff:
        shown = ", ".join(f"{k}: {o} vs {m}" for k, (o, m) in diff.items())
        raise ValueError(
            f"`original` does not match `model` ({shown}). KL to the original needs a copy of the "
            "same model before tuning (e.g. copy.deepcopy(model) taken before training)."
        )
    ta, tb = model.tokenizer, original.tokenizer
    if ta is not tb and (ta is None or tb is None or len(ta) != len(tb)
                         or ta.get_vocab() != tb.get_vocab()):
        raise ValueError("`original` uses a different tokenizer than `model`: the next-token "
                         "distributions are not comparable. Use a copy of the same model.")


def _scored_mask(batch: ChatBatch, eot: int, tokens: Tokens) -> Bool[Tensor, "batch pos-1"]:
    """Which next-token predictions (positions 0..pos-2) a metric is over."""
    return (content_mask(batch, eot) if tokens == "content" else batch.loss_mask)[:, 1:]


def _scored_logits(model: Model, tokens: Tensor, scored: Tensor) -> Float[Tensor, "n vocab"]:
    """`model(tokens)[:, :-1][scored]` (tokens `[b, pos]`, scored `[b, pos-1]`), without the work
    those rows do not need: the tokens every row starts with (a chat template's system turn), up
    to the first scored prediction, run once and their key/value cache is copied to the rows; the
    unembedding runs only at the scored positions."""
    dev = model.cfg.device
    tokens, scored = tokens.to(dev), scored.to(dev)
    same = (tokens == tokens[:1]).all(0).long().cumprod(0).sum()  # shared leading tokens
    first = scored.any(0).long().argmax()
    s = int(torch.minimum(same, first)) if bool(scored.any()) else 0
    if s < 2 or len(tokens) < 2:
        resid = backend.final_residual(model, tokens)[:, :-1]
    else:
        cache = backend.new_kv_cache(model, 1)
        backend.cached_forward(model, tokens[:1, :s], cache, residual=True)
        cache = backend.cache_rows(cache, torch.zeros(len(tokens), dtype=torch.long, device=dev))
        resid = backend.cached_forward(model, tokens[:, s:], cache, residual=True)[:, :-1]
        scored = scored[:, s:]
    return backend.logits_from_residual(model, resid[scored])


class OriginalLogprobs:
    """The frozen original's next-token log-probs at the scored positions of fixed benign data.

    Computed once (`[n_scored, d_vocab]` float32 per batch) and passed as `original=` to
    `utility_per_prompt` / `evaluate`: KL to the original then costs one forward per tuned model
    instead of two, with the same numbers (the same operations on the same inputs). Above
    `max_bytes` nothing is kept and each use recomputes them (still exact).

    Args:
        original: the frozen model before tuning.
        data: benign examples with answers (a dataset, spec, or `ChatBatch`es).
        batch_size, tokens, group_by_length: as in `utility_per_prompt`; a use must pass the same
            data and settings.
    """

    def __init__(self, original: Model, data: BatchesLike, *, batch_size: int = 8,
                 tokens: Tokens = "content", max_bytes: int = 2 * 1024**3,
                 group_by_length: bool = False):
        if tokens not in ("content", "response"):
            raise ValueError(f"tokens must be 'content' or 'response', got {tokens!r}.")
        self.model, self.tokens, self.batch_size, self.data = original, tokens, batch_size, data
        self.group_by_length = group_by_length
        self.batches = as_batches(original, data, batch_size, group_by_length=group_by_length)
        eot = end_of_turn_id(original.tokenizer)
        self._masks = [_scored_mask(b, eot, tokens) for b in self.batches]
        n_scored = sum(int(m.sum()) for m in self._masks)
        self.kept = n_scored * original.cfg.d_vocab * 4 <= max_bytes
        self._versions = _weight_versions(original)  # in-place updates bump these
        with backend.inference_layout(original):
            self._logp = ([self._compute(i) for i in range(len(self.batches))] if self.kept
                          else None)

    @torch.no_grad()
    def _compute(self, i: int) -> Tensor:
        return _scored_logits(self.model, self.batches[i].tokens, self._masks[i]).float(
        ).log_softmax(-1)

    def logprobs(self, i: int, batch: ChatBatch) -> Float[Tensor, "n_scored d_vocab"]:
        """Batch i's log-probs; `batch` must be the data's batch i (checked)."""
        mine = self.batches[i]
        if batch is not mine and not (batch.tokens.shape == mine.tokens.shape
                                      and torch.equal(batch.tokens, mine.tokens)):
            raise ValueError(f"Batch {i} differs from the one OriginalLogprobs was computed on: "
                             "pass the same data, batch_size and tokens to both.")
        if self._logp is not None:
            return self._logp[i]
        if _weight_versions(self.model) != self._versions:
            raise ValueError("The original model was changed (trained in place?) after "
                             "OriginalLogprobs was built, and its log-probs were not kept (above "
                             "max_bytes): build it from a frozen copy (backend.copy_model).")
        return self._compute(i)


def _weight_versions(model: Model) -> list[int]:
    """Torch's in-place modification counters of the model's parameters."""
    return [p._version for p in model.parameters()]


@torch.no_grad()
def utility_per_prompt(
    model: Model, data: BatchesLike, *, original: Union[Model, OriginalLogprobs, None] = None,
    batch_size: int = 8, tokens: Tokens = "content", group_by_length: bool = False,
) -> dict[str, Tensor]:
    """Per prompt (dataset order), from one forward pass per model and batch:

    - "reference_nll": [n] token mean of -log P(answer token | prefix);
    - "kl_to_original": [n] token mean of KL(original || model) at the positions predicting those
      tokens (absent without `original`; an `OriginalLogprobs` of the same data gives the same
      values without the original's forward);
    - "n_tokens": [n] how many tokens each mean is over (NaN means above where it is 0).

    tokens: "content" (default, v2): the answer without its end-of-turn token (`content_mask`);
        "response": with it (v1, as the training loss).
    group_by_length: batch a dataset's examples sorted by length (`make_batches`): less padding,
        the same per-prompt values (to float rounding), still in dataset order. Batches given
        as such keep their own grouping (`ChatBatch.indices`).
    """
    if tokens not in ("content", "response"):
        raise ValueError(f"tokens must be 'content' or 'response', got {tokens!r}.")
    ref = original if isinstance(original, OriginalLogprobs) else None
    if ref is not None:
        ref_grouped = getattr(ref, "group_by_length", False)
        if (ref.tokens, ref.batch_size, ref_grouped) != (tokens, batch_size, group_by_length):
            raise ValueError(f"OriginalLogprobs was computed with tokens={ref.tokens!r}, "
                             f"batch_size={ref.batch_size}, group_by_length={ref_grouped}; this "
                             f"call has {tokens!r}, {batch_size}, {group_by_length}. Use the same "
                             "settings.")
        original = ref.model
    if original is not None:
        check_same_vocab(model, original)
    eot = end_of_turn_id(model.tokenizer)
    batches = ref.batches if ref is not None and data is ref.batches else as_batches(
        model, data, batch_size, group_by_length=group_by_length)
    if ref is not None and len(batches) != len(ref.batches):
        raise ValueError(f"{len(batches)} batches, but OriginalLogprobs has {len(ref.batches)}: "
                         "pass the data it was computed on.")
    # The original runs forward passes here unless its log-probs are kept.
    forwards = original if original is not None and (ref is None or not ref.kept) else model
    with backend.inference_layout(model), backend.inference_layout(forwards):
        sums = _utility_sums(model, batches, original, ref, eot, tokens)
    n = torch.cat(sums.pop("n_tokens"))
    if int(n.sum()) == 0:
        raise DataError("No answer tokens in these batches (empty answers?): the metric is "
                        "undefined. Give examples with non-empty responses.")
    out = {k: in_dataset_order((torch.cat(v) / n).float(), batches) for k, v in sums.items() if v}
    return {**out, "n_tokens": in_dataset_order(n.float(), batches)}


def _utility_sums(model: Model, batches: list[ChatBatch], original: Optional[Model],
                  ref: Optional[OriginalLogprobs], eot: int, tokens: Tokens
                  ) -> dict[str, list[Tensor]]:
    """Per batch, the per-prompt sums of NLL and KL over scored tokens, and their counts."""
    sums: dict[str, list[Tensor]] = {"reference_nll": [], "kl_to_original": [], "n_tokens": []}
    for i, batch in enumerate(batches):
        mask = _scored_mask(batch, eot, tokens)
        rows = mask.nonzero()[:, 0]
        logq = _scored_logits(model, batch.tokens, mask).float().log_softmax(-1)
        target = batch.tokens[:, 1:][mask].to(logq.device)
        nll = -logq.gather(-1, target[:, None])[:, 0].cpu()
        zeros = torch.zeros(len(batch), dtype=torch.float64)
        sums["reference_nll"].append(zeros.index_add(0, rows, nll.double()))
        sums["n_tokens"].append(mask.sum(-1).double())
        # Stored log-probs are the original's even when `model` is that same object trained in
        # place since (a notebook's habit): only a bare model identical to `model` gives KL 0.
        if ref is not None or (original is not None and original is not model):
            logp = (ref.logprobs(i, batch) if ref is not None else _scored_logits(
                original, batch.tokens, mask).float().log_softmax(-1)).to(logq.device)
            kl = (logp.exp() * (logp - logq)).sum(-1).cpu()
            sums["kl_to_original"].append(zeros.index_add(0, rows, kl.double()))
        elif original is model:  # the same weights: KL is exactly 0, no second pass needed
            sums["kl_to_original"].append(zeros.clone())
    return sums


def _prompt_mean(values: Tensor) -> MetricValue:
    return MetricValue(float(values.double().nanmean()), values.tolist())


def reference_nll(
    model: Model, data: BatchesLike, *, batch_size: int = 8, tokens: Tokens = "content",
) -> MetricValue:
    """NLL of reference answers: mean over prompts of each answer's token-mean NLL (content tokens
    by default; see `utility_per_prompt`). A float carrying `.per_prompt`."""
    return _prompt_mean(utility_per_prompt(model, data, batch_size=batch_size,
                                           tokens=tokens)["reference_nll"])


def kl_to_original(
    model: Model, original: Union[Model, OriginalLogprobs], data: BatchesLike, *,
    batch_size: int = 8, tokens: Tokens = "content",
) -> MetricValue:
    """KL(original || model) of next-token distributions along benign prompts and their answers.

    At each position predicting an answer token (teacher forced), KL = sum_v p_orig(v)
    (log p_orig(v) - log p_model(v)); token mean per prompt, then mean over prompts. 0 when the
    model is unchanged. `original` is a frozen copy of the model before tuning (same vocabulary and
    shape), or its `OriginalLogprobs` on `data`. A float carrying `.per_prompt`.
    """
    return _prompt_mean(utility_per_prompt(model, data, original=original, batch_size=batch_size,
                                           tokens=tokens)["kl_to_original"])


def over_refusal_rate(model: Model, dataset: DataLike, **kwargs) -> dict:
    """Refusal rate on safe prompts that look unsafe (XSTest "safe"): lower is better.

    Same arguments and result as `safety.refusal_rate`.
    """
    return refusal_rate(model, dataset, **kwargs)


# --------------------------------------------------------------------------------------------------
# Task accuracy: multiple choice by log-likelihood
# --------------------------------------------------------------------------------------------------

_LETTERS = "ABCDEFGHIJ"


def _answer_index(raw: str, n_choices: int, where: str) -> int:
    raw = raw.strip()
    if raw.upper() in _LETTERS[:n_choices] and len(raw) == 1:
        return _LETTERS.index(raw.upper())
    if raw.isdigit() and int(raw) < n_choices:
        return int(raw)
    raise DataError(f"{where}: answer {raw!r} is neither a letter A-{_LETTERS[n_choices - 1]} nor "
                    f"an index 0-{n_choices - 1}.")


def load_mmlu_csv(path: Union[str, Path], *, n: Optional[int] = None) -> list[dict]:
    """MMLU items from a CSV file: rows `question, choice_1..choice_k, answer`.

    The answer is a letter (A-D, as in the original hendrycks/test files) or an index (0-3, as in
    some re-exports); a header row (`question,...,answer`) is skipped if present. Returns items
    {"question", "choices", "answer_index", "category"} (category: the file's subject), the first n.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; MMLU subjects are files like "
                        "'<subject>_test.csv'.")
    with path.open(newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r]
    if rows and rows[0][0].strip().lower() == "question":
        rows = rows[1:]
    subject = path.stem.removesuffix("_test")
    items = []
    for i, r in enumerate(rows[:n] if n is not None else rows):
        if len(r) < 4:
            raise DataError(f"{path} row {i + 1} has {len(r)} columns; expected question, at least "
                            "two choices and the answer.")
        choices = [c.strip() for c in r[1:-1]]
        items.append({"question": r[0].strip(), "choices": choices, "category": subject,
                      "answer_index": _answer_index(r[-1], len(choices), f"{path} row {i + 1}")})
    if not items:
        raise DataError(f"{path} has no questions.")
    return items


def load_mc_items(spec: str = "bundled", *, n: Optional[int] = None) -> list[dict]:
    """Multiple-choice items: "bundled" (`bundled/mc_items.jsonl`, 95 easy items written for this
    project), an MMLU CSV file, or a JSON/JSONL file of {"question", "choices", "answer_index"}
    (or "answer": a letter). The first n items."""
    if spec == "bundled":
        bundled = resources.files("cast_interp").joinpath("bundled", "mc_items.jsonl")
        text = bundled.read_text("utf-8")
        rows = [json.loads(x) for x in text.splitlines() if x.strip()]
    elif spec.endswith(".csv"):
        return load_mmlu_csv(spec, n=n)
    elif spec.endswith((".jsonl", ".json")):
        text = Path(spec).read_text("utf-8")
        rows = json.loads(text) if spec.endswith(".json") else [
            json.loads(x) for x in text.splitlines() if x.strip()]
    else:
        raise DataError(f"Unknown task {spec!r}: use 'bundled', an MMLU .csv or a .jsonl of items.")
    for i, r in enumerate(rows):
        if "answer_index" not in r and "answer" in r and "choices" in r:
            r["answer_index"] = _answer_index(str(r["answer"]), len(r["choices"]), f"item #{i}")
    return rows[:n] if n is not None else rows


def _check_items(items: Sequence[dict]) -> None:
    if not items:
        raise DataError("No multiple-choice items: nothing to evaluate.")
    for i, it in enumerate(items):
        missing = [k for k in ("question", "choices", "answer_index") if k not in it]
        if missing:
            raise DataError(f"Item #{i} lacks {missing}; items need question, choices, "
                            "answer_index.")
        if not it["choices"] or not 0 <= int(it["answer_index"]) < len(it["choices"]):
            raise DataError(f"Item #{i}: answer_index {it['answer_index']} is not an index of its "
                            f"{len(it['choices'])} choices.")


def task_accuracy(
    model: Model, items: Sequence[dict], *, normalize: Literal["sum", "mean"] = "sum",
    batch_size: int = 8,
) -> dict:
    """Multiple-choice accuracy by log-likelihood ("cloze" scoring), with its chance level.

    Each item {"question", "choices", "answer_index"}: the question is the user turn and each
    choice is scored as the assistant's answer, by the summed log-probability of its tokens ("sum",
    default) or their mean ("mean", length-normalized: prefer it when choices differ much in
    length). The end-of-turn token is not scored. The highest-scoring choice is the model's answer;
    ties go to the first choice. Cloze rather than letter scoring (ours): a 135M model picks letters
    near chance even when it knows the answer.

    Returns {"accuracy", "chance" (mean of 1/n_choices), "n", "correct": list[bool] per item,
    "predicted": list[int], "normalize"}.
    """
    _check_items(items)
    if normalize not in ("sum", "mean"):
        raise ValueError(f"normalize must be 'sum' or 'mean', got {normalize!r}.")
    questions = [encode_prompt(model, it["question"]) for it in items]
    choices = [[encode_text(model, str(c)) for c in it["choices"]] for it in items]
    lp = prefix_logprobs(model, questions, choices, batch_size=batch_size)
    if normalize == "mean":
        lp = [v / torch.tensor([len(c) for c in cs], dtype=torch.float32)
              for v, cs in zip(lp, choices)]
    predicted = [int(v.argmax()) for v in lp]
    correct = [p == int(it["answer_index"]) for p, it in zip(predicted, items)]
    return {"accuracy": sum(correct) / len(items),
            "chance": sum(1 / len(it["choices"]) for it in items) / len(items),
            "n": len(items), "correct": correct, "predicted": predicted, "normalize": normalize}


def multiple_choice_accuracy(
    model: Model, items: Sequence[dict], *, batch_size: int = 8,
    normalize: Literal["sum", "mean"] = "sum",
) -> MetricValue:
    """`task_accuracy` as a float (the share correct) carrying per-item correctness (0/1)."""
    res = task_accuracy(model, items, normalize=normalize, batch_size=batch_size)
    return MetricValue(res["accuracy"], [float(c) for c in res["correct"]])


# --------------------------------------------------------------------------------------------------
# GSM8K (generation; for models larger than SmolLM2-135M)
# --------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> Optional[str]:
    """The last number in a text, commas removed ("1,250.50" -> "1250.50"); None if none."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def _same_number(a: Optional[str], b: str) -> bool:
    if a is None:
        return False
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        return a == b


def gsm8k_accuracy(
    model: Model, dataset: DataLike, *, max_new_tokens: int = 256,
    batch_size: int = 16,
) -> float:
    """Exact match of the last number of the greedy answer with `meta["final_answer"]` (as set by
    `data.load_gsm8k`); numbers compare by value ("18.0" == "18")."""
    ds = as_dataset(dataset)
    golds = []
    for i, e in enumerate(ds):
        gold = e.meta.get("final_answer")
        if gold is None and e.response and "####" in e.response:
            gold = e.response.split("####")[-1].strip().replace(",", "")
        if not gold:
            raise DataError(f"Example #{i} of {ds.name!r} has no final answer (meta['final_answer']"
                            " or a response ending '#### <n>'); load GSM8K with data.load_gsm8k.")
        golds.append(gold)
    answers = generate(model, ds.prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    return sum(_same_number(last_number(a), g) for a, g in zip(answers, golds)) / len(golds)
