"""Data: the two calibration sets of CAST, and the loaders and tokenization every stage shares.

CAST needs prompt/response pairs, formatted with the model's chat template, with the loss taken on
response tokens only:

- D_safe: harmful prompts paired with refusals (safety objective L_safe);
- D_util: benign prompts paired with reference answers (utility objective L_util), either a dataset's
  answer or the model's own greedy answer before training ("self-reference", see `self_reference`);
- safe-but-alarming prompts (XSTest-style) to measure over-refusal.

The package ships its own small bundled data (`load_bundled`), written for this project, split into
`calibration` (diagnosis), `train` (safety fine-tuning) and `test` (evaluation). Loaders read the
standard public formats (AdvBench, JailbreakBench, XSTest, Alpaca, refusal-direction splits, GSM8K,
any CSV/JSON/JSONL with named columns) and Hugging Face dataset names when the hub is reachable.

A dataset spec string, as the CLI takes it:
    "bundled:harmful:test"      bundled file and split (split optional)
    "advbench:/path/file.csv"   a format name and a path (format inferred from the name if omitted)
    "/path/file.jsonl"          a local file; columns guessed (prompt/instruction/goal/question...)
    "hf:org/name[:split]"       a Hugging Face dataset (needs the hub)

The package:

    examples.py   `ChatExample`, `ChatDataset`, the bundled data, calibration/train/test splits
    formats.py    loaders of public formats and dataset specs (`load_dataset`)
    chat.py       chat template, end of turn, encoding with the response-token loss mask, batches
    (here)        self-reference answers: the original model's own answers as D_util's responses
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args

from .chat import (ChatBatch, check_fits, check_special_tokens, encode_example, end_of_turn_id,
                   example_lengths, format_prompt, in_dataset_order, make_batches, pad_token_id,
                   padded_token_share, special_token_ids, truncate_responses)
from .examples import (SPLIT_FRACTIONS, SPLITS, BundledKind, ChatDataset, ChatExample, DataError,
                       Split, bundled_refusals, check_held_out, load_bundled, split_dataset,
                       with_refusals)
from .formats import (PROMPT_COLUMNS, RESPONSE_COLUMNS, SHARED_DATASETS_ENV, dedup_against,
                      load_advbench, load_alpaca, load_coconot, load_dataset, load_gsm8k, load_hf,
                      load_jailbreakbench, load_mmlu_dir, load_refusal_direction,
                      load_safety_pairs, load_table, load_xstest, shared_datasets_dir)

__all__ = ["ChatExample", "ChatDataset", "DataError", "Split", "BundledKind", "load_bundled",
           "bundled_refusals", "with_refusals", "SPLITS", "SPLIT_FRACTIONS", "split_dataset",
           "check_held_out", "PROMPT_COLUMNS", "RESPONSE_COLUMNS", "load_table", "load_advbench",
           "load_jailbreakbench", "load_xstest", "load_alpaca", "load_refusal_direction",
           "load_gsm8k", "load_hf", "load_dataset", "SHARED_DATASETS_ENV", "shared_datasets_dir",
           "load_safety_pairs", "load_coconot", "load_mmlu_dir", "dedup_against", "ChatBatch",
           "example_lengths", "padded_token_share", "in_dataset_order", "format_prompt",
           "end_of_turn_id", "pad_token_id", "special_token_ids", "check_special_tokens", "encode_example",
           "make_batches", "check_fits", "truncate_responses", "UtilityReference",
           "UTILITY_REFERENCES", "SELF_REFERENCE_FORMAT", "self_reference"]


# --------------------------------------------------------------------------------------------------
# Self-reference answers
# --------------------------------------------------------------------------------------------------


UtilityReference = Literal["self", "dataset"]
"""Where L_util's responses come from: "self", the model's own greedy answers before training
(`self_reference`), or "dataset", the utility set's own responses."""
UTILITY_REFERENCES: tuple[str, ...] = get_args(UtilityReference)

SELF_REFERENCE_FORMAT = 2
"""Version of the self-reference cache: 2 = answers to their natural end with a `truncated` flag
(METHOD v2). Version 1 files (48-token answers, no flag) have another key and are regenerated."""


def self_reference(
    model: Any, dataset: ChatDataset, *, max_new_tokens: int = 256, batch_size: int = 16,
    cache_path: Optional[Union[str, Path]] = None,
) -> ChatDataset:
    """Replace each reference answer with the model's own greedy answer (before any training).

    L_util on these measures *preservation* of what the model does. Answers run to their natural
    end (the model's end-of-turn token), up to `max_new_tokens` (256, ours) and, per generation
    batch, the room the model's context leaves after the batch's longest prompt and one end-of-turn
    token (so a long prompt gives a shorter answer instead of an error). An answer cut by either
    limit is marked `meta["truncated"] = True` and gets no end-of-turn token when tokenized; count
    them with `n_truncated`. Answers are cached as JSONL at `cache_path`, keyed by the cache format
    version, model name, context length, limits, batch size (it sets the per-batch cap) and prompts.
    """
    from ..generation import generate

    key = _self_reference_key(model, dataset, max_new_tokens, batch_size)
    cached = _read_self_reference(Path(cache_path), key, len(dataset)) if cache_path else None
    if cached is not None:
        return _with_answers(dataset, *_fit_answers(model, dataset, *cached))
    answers, finished = generate(model, dataset.prompts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, context_limit="cap", return_finished=True)
    answers, truncated = _fit_answers(model, dataset, answers, [not f for f in finished])
    if cache_path is not None:
        from ..io import atomic_write_text

        head = {"key": key, "format": SELF_REFERENCE_FORMAT, "max_new_tokens": max_new_tokens,
                "n_truncated": sum(truncated)}
        lines = [json.dumps(head)] + [json.dumps({"response": a, "truncated": t})
                                      for a, t in zip(answers, truncated)]
        atomic_write_text("\n".join(lines) + "\n", Path(cache_path))
    return _with_answers(dataset, answers, truncated)


def _fit_answers(model: Any, dataset: ChatDataset, answers: list[str],
                 truncated: list[bool]) -> tuple[list[str], list[bool]]:
    """Answers cut (and marked truncated) until prompt + answer tokenize within the context: decoded
    text can re-tokenize longer than the generated ids (an invalid UTF-8 byte becomes a 3-byte
    replacement character), which would make the example too long for the model that wrote it."""
    n_ctx, tok = model.cfg.n_ctx, model.tokenizer
    answers, truncated = list(answers), list(truncated)
    for i, e in enumerate(dataset.examples):
        while True:
            ex = ChatExample(e.prompt, answers[i], meta={"truncated": truncated[i]})
            excess = len(encode_example(tok, ex)[0]) - n_ctx
            if excess <= 0 or not answers[i]:
                break
            answers[i], truncated[i] = answers[i][:max(0, len(answers[i]) - excess)], True
    return answers, truncated


def _self_reference_key(model: Any, dataset: ChatDataset, max_new_tokens: int,
                        batch_size: int) -> str:
    what = [SELF_REFERENCE_FORMAT, getattr(model.cfg, "model_name", ""), model.cfg.n_ctx,
            max_new_tokens, batch_size, dataset.prompts]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:16]


def _read_self_reference(path: Path, key: str, n: int) -> Optional[tuple[list[str], list[bool]]]:
    """(answers, truncated) from a cache file with this key, or None (absent, stale, corrupt, or
    in a run directory and not as the run wrote it: regenerated, and the log says why)."""
    if not path.exists():
        return None
    from ..io import changed_since_written

    why = changed_since_written(path)
    if why is not None:
        print(f"{why}: regenerated", flush=True)
        return None
    try:
        rows = [json.loads(x) for x in path.read_text("utf-8").splitlines() if x]
        if not rows or rows[0].get("key") != key or len(rows) != n + 1:
            return None
        answers = [r["response"] for r in rows[1:]]
        truncated = [r["truncated"] for r in rows[1:]]
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
        return None  # corrupt: regenerate
    if not all(isinstance(t, bool) for t in truncated):
        return None
    return answers, truncated


def _with_answers(dataset: ChatDataset, answers: list[str], truncated: list[bool]) -> ChatDataset:
    # An empty greedy answer has no content tokens: it adds nothing to a content-token loss (and
    # only its end-of-turn token to a loss that includes it).
    ex = [ChatExample(e.prompt, a, e.category, {**e.meta, "truncated": t})
          for e, a, t in zip(dataset.examples, answers, truncated)]
    return ChatDataset(dataset.name + "+self-ref", ex, dataset.source)
