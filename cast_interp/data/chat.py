"""Chat formatting, end of turn and padding, in one place: an example through the model's chat
template (`format_prompt`, `encode_example`: loss on response tokens only), the token that ends an
assistant turn (`end_of_turn_id`, from the model family), special tokens in data text, and padded
batches (`ChatBatch`, `make_batches`) with the checks that examples fit the model's context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from ..checks import check_int
from .examples import ChatDataset, ChatExample, DataError, _nonempty


@dataclass
class ChatBatch:
    """Right-padded token ids, the mask of the tokens the loss is on, and the mask of content tokens.

    `loss_mask[b, p]` is True where the loss is taken at token p: `-log P(tokens[b, p] |
    tokens[b, :p])`. From `make_batches`, that is the response and (by default) its end-of-turn
    token. `content_mask[b, p]` is True on the response's own tokens only: never the end-of-turn
    token, the chat template or padding; it is always a subset of `loss_mask`. The diagnosis losses
    use content tokens (METHOD v2). Right padding needs no attention mask under causal attention, so a
    batch is run as `model(batch.tokens)`.

    `content_mask=None` (for callers that build batches without it, e.g.
    `sparse_tuning.batches.collate`) means "the same as `loss_mask`": such a batch does not know
    which of its loss tokens are end-of-turn tokens, so build diagnosis batches with
    `make_batches`.

    `indices` (from `make_batches(..., group_by_length=True)`): the dataset index of each row, so
    per-prompt results can be put back in dataset order (`in_dataset_order`). None: the rows are
    the batches' examples in dataset order.
    """

    tokens: Int[Tensor, "batch pos"]
    loss_mask: Bool[Tensor, "batch pos"]
    prompt_lengths: list[int]
    content_mask: Optional[Bool[Tensor, "batch pos"]] = None
    indices: Optional[list[int]] = None

    def __post_init__(self):
        if self.content_mask is None:
            self.content_mask = self.loss_mask
        if self.content_mask.shape != self.loss_mask.shape:
            raise DataError(f"content_mask has shape {tuple(self.content_mask.shape)} but "
                            f"loss_mask has {tuple(self.loss_mask.shape)}; they must match (one "
                            "per token).")

    @property
    def n_response_tokens(self) -> int:
        """Tokens the loss is on (`loss_mask`), the weight of this batch in a token mean."""
        return int(self.loss_mask.sum())

    @property
    def n_content_tokens(self) -> int:
        return int(self.content_mask.sum())

    def to(self, device) -> "ChatBatch":
        return ChatBatch(self.tokens.to(device), self.loss_mask.to(device), self.prompt_lengths,
                         self.content_mask.to(device), self.indices)

    def __len__(self) -> int:
        return self.tokens.shape[0]


def example_lengths(batch: ChatBatch) -> Tensor:
    """Number of tokens of each example up to its last loss token (the end-of-turn when it is in
    the loss; the last content token with `end_of_turn_in_loss=False`), at least its prompt.

    Computed from the masks, not from the pad id (SmolLM2 pads with a token that also ends turns).
    """
    T = batch.tokens.shape[1]
    pos = torch.arange(1, T + 1).expand_as(batch.loss_mask)
    last_resp = (pos * batch.loss_mask.cpu()).amax(dim=1)
    prompt = torch.tensor(batch.prompt_lengths, dtype=torch.long)
    return torch.maximum(last_resp, prompt)


def padded_token_share(batches: Sequence[ChatBatch]) -> float:
    """Share of the tokens a forward over `batches` computes (rows x width) that are padding: 0
    when every row fills its batch. An example's tokens are counted by `example_lengths` (up to
    its last loss token)."""
    computed = sum(b.tokens.numel() for b in batches)
    real = sum(int(example_lengths(b).sum()) for b in batches)
    return (computed - real) / computed if computed else 0.0


def in_dataset_order(values: Tensor, batches: Sequence[ChatBatch]) -> Tensor:
    """Per-row values `[n, ...]`, concatenated in the batches' row order, put back in dataset order
    (rows of batches without `indices` are taken to be in dataset order already)."""
    if all(b.indices is None for b in batches):
        return values
    if any(b.indices is None for b in batches):
        raise DataError("Some batches record their dataset order (group_by_length) and some do "
                        "not: build all of them with one make_batches call.")
    order = torch.tensor([i for b in batches for i in b.indices], dtype=torch.long)
    if len(order) != len(values) or not torch.equal(order.sort().values,
                                                    torch.arange(len(values))):
        raise DataError("The batches' indices are not a permutation of their rows: build them "
                        "with one make_batches(..., group_by_length=True) call.")
    out = torch.empty_like(values)
    out[order.to(values.device)] = values
    return out


def format_prompt(tokenizer: Any, prompt: str, *, system_prompt: Optional[str] = None) -> str:
    """The chat-formatted text of a user turn, ending where the assistant's answer begins."""
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    # Base models without a template: a plain instruction format (ours).
    return f"### Instruction:\n{prompt}\n\n### Response:\n"


def pad_token_id(tokenizer_or_model: Any, fallback: Optional[int] = None) -> int:
    """The id that pads a batch: the tokenizer's pad token, else `fallback` (default EOS). Padding
    is masked out of every loss and attention, so any id works; one rule keeps batches equal."""
    tok = getattr(tokenizer_or_model, "tokenizer", tokenizer_or_model)
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    return tok.eos_token_id if fallback is None else fallback


def end_of_turn_id(tokenizer: Any) -> int:
    """The token that ends an assistant turn: its model family's (`registry/models.py`; e.g.
    `<|eot_id|>` for Llama 3, `<|im_end|>` for SmolLM2), else EOS."""
    from ..registry.models import end_of_turn_token

    token = end_of_turn_token(tokenizer)
    if token is not None:
        tid = tokenizer.convert_tokens_to_ids(token)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(tid, int) and tid >= 0 and (tid != unk or token == tokenizer.unk_token):
            return int(tid)
    return int(tokenizer.eos_token_id)


def _ends_turn(example: ChatExample) -> bool:
    """Whether an end-of-turn token follows the response: not without a response, nor after a cut
    one (a truncated answer did not end, so teaching "stop here" at its cut would be false)."""
    return example.response is not None and not example.truncated


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids of the tokenizer's special tokens (end-of-turn, role markers, padding...): text that
    tokenizes into one of them acts as chat-template control, not as words."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(i))
    return ids


def check_special_tokens(tokenizer: Any, dataset: "ChatDataset", *, allow: bool = False) -> None:
    """DataError naming the first example whose prompt or response holds text that the tokenizer
    turns into a special token (e.g. "<|end|><|assistant|>Sure" ends the user's turn and opens a
    forged assistant turn), unless `allow` (the option to keep them as control tokens)."""
    if allow:
        return
    special = special_token_ids(tokenizer)
    if not special:
        return
    for i, ex in enumerate(dataset):
        for field_name, text in (("prompt", ex.prompt), ("response", ex.response)):
            if not text:
                continue
            found = [t for t in tokenizer(text, add_special_tokens=False)["input_ids"]
                     if t in special]
            if found:
                names = sorted({tokenizer.convert_ids_to_tokens(t) for t in found})
                raise DataError(
                    f"{dataset.name}: example #{i + 1}'s {field_name} holds the chat template's "
                    f"special token(s) {names} ({len(found)} in all): as text they would act as "
                    "turn markers (a forged turn). Remove them, or allow them explicitly "
                    "(allow_special_tokens=True, --allow-special-tokens).")


def encode_example(tokenizer: Any, example: ChatExample, *,
                   system_prompt: Optional[str] = None) -> tuple[list[int], int]:
    """(token ids of prompt + response [+ end-of-turn], number of prompt tokens).

    The end-of-turn token is appended unless the example has no response or is truncated
    (`meta["truncated"]`). Prompt and response are tokenized separately so the boundary is exact.
    """
    prompt_ids = tokenizer(format_prompt(tokenizer, example.prompt, system_prompt=system_prompt),
                           add_special_tokens=False)["input_ids"]
    if example.response is None:
        return list(prompt_ids), len(prompt_ids)
    resp_ids = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    eot = [end_of_turn_id(tokenizer)] if _ends_turn(example) else []
    return list(prompt_ids) + list(resp_ids) + eot, len(prompt_ids)


def make_batches(
    tokenizer_or_model: Any,
    dataset: ChatDataset,
    *,
    batch_size: int = 8,
    max_length: Optional[int] = None,
    system_prompt: Optional[str] = None,
    require_response: bool = True,
    end_of_turn_in_loss: bool = True,
    group_by_length: bool = False,
) -> list[ChatBatch]:
    """Tokenize a dataset into right-padded `ChatBatch`es, in dataset order (deterministic).

    Args:
        tokenizer_or_model: a `HookedTransformer` (its tokenizer and context length) or a tokenizer.
        max_length: longest allowed sequence; defaults to the model's `n_ctx`. A longer example is
            an error naming it (we never truncate silently: a cut response changes the loss).
        end_of_turn_in_loss: True (default; training, where the model must learn to stop) puts the
            end-of-turn token in `loss_mask`; False makes `loss_mask` equal `content_mask`, as the
            diagnosis losses L_safe and L_util use (METHOD v2). The token stays in `tokens` either
            way, so both settings run the same sequences.
        group_by_length: batch the examples sorted by length (shortest first, ties in dataset
            order) so a batch pads little (`padded_token_share`); each batch records its rows'
            dataset indices (`ChatBatch.indices`) and per-prompt results go back to dataset order
            with `in_dataset_order`. Same examples, same values up to float rounding.
    """
    tokenizer = getattr(tokenizer_or_model, "tokenizer", tokenizer_or_model)
    n_ctx = getattr(getattr(tokenizer_or_model, "cfg", None), "n_ctx", None)
    max_length = max_length or n_ctx
    if tokenizer is None:
        raise DataError("The model has no tokenizer; pass one (model.set_tokenizer(...)).")
    _nonempty(dataset)
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}.")
    if require_response:
        dataset.require_responses()
    pad = pad_token_id(tokenizer)
    encoded = []
    for i, ex in enumerate(dataset):
        ids, n_prompt = encode_example(tokenizer, ex, system_prompt=system_prompt)
        if max_length is not None and len(ids) > max_length:
            _too_long(dataset, i, len(ids), max_length, "the model's context"
                      if max_length == n_ctx else "max_length")
        content_end = len(ids) - int(_ends_turn(ex))
        encoded.append((ids, n_prompt, content_end))
    order = (sorted(range(len(encoded)), key=lambda i: len(encoded[i][0])) if group_by_length
             else list(range(len(encoded))))
    batches = []
    for start in range(0, len(encoded), batch_size):
        rows = order[start:start + batch_size]
        chunk = [encoded[i] for i in rows]
        width = max(len(ids) for ids, _, _ in chunk)
        tokens = torch.full((len(chunk), width), pad, dtype=torch.long)
        loss = torch.zeros((len(chunk), width), dtype=torch.bool)
        content = torch.zeros((len(chunk), width), dtype=torch.bool)
        for b, (ids, n_prompt, content_end) in enumerate(chunk):
            tokens[b, : len(ids)] = torch.tensor(ids)
            content[b, n_prompt:content_end] = True
            loss[b, n_prompt: len(ids) if end_of_turn_in_loss else content_end] = True
        if require_response and not loss.any():
            raise DataError(f"A batch of {dataset.name!r} has no response tokens; the loss would "
                            "be undefined. Check that responses are non-empty.")
        batches.append(ChatBatch(tokens, loss, [n for _, n, _ in chunk], content,
                                 rows if group_by_length else None))
    return batches


def _too_long(ds: ChatDataset, i: int, n: int, limit: int, what: str, extra: str = "") -> None:
    raise DataError(
        f"Example #{i} of {ds.name!r} is {n} tokens{extra}, longer than {what} ({limit}) (prompt "
        f"starts: {ds.examples[i].prompt[:60]!r}). Drop or shorten such examples, or use a model "
        "with a longer context.")


def check_fits(model: Any, dataset: ChatDataset, *, new_tokens: int = 0,
               with_response: bool = True) -> None:
    """DataError, before any work, for the first example that does not fit the model's context:
    prompt (+ response and end-of-turn if `with_response`) + `new_tokens` to generate."""
    n_ctx = model.cfg.n_ctx
    for i, ex in enumerate(dataset):
        if not with_response:
            ex = ChatExample(ex.prompt)
        n = len(encode_example(model.tokenizer, ex)[0])
        if n + new_tokens > n_ctx:
            extra = f" + {new_tokens} to generate" if new_tokens else ""
            _too_long(dataset, i, n, n_ctx, "the model's context", extra)


def truncate_responses(tokenizer_or_model: Any, ds: ChatDataset, max_tokens: int) -> ChatDataset:
    """Responses cut to their first `max_tokens` tokens (decoded back to text), marked truncated so
    no end-of-turn token follows them. Bounds the cost of training on long answers; the opening,
    where a refusal is decided, is kept."""
    check_int("max_tokens", max_tokens, 1)
    tok = getattr(tokenizer_or_model, "tokenizer", tokenizer_or_model)
    out = []
    for e in ds:
        if e.response is None:
            out.append(e)
            continue
        ids = tok(e.response, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            out.append(e)
        else:
            text = tok.decode(ids[:max_tokens], skip_special_tokens=True).rstrip()
            out.append(ChatExample(e.prompt, text, e.category, {**e.meta, "truncated": True}))
    return ChatDataset(ds.name, out, ds.source)
