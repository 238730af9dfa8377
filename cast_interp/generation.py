"""Greedy generation for evaluation and self-reference answers, batched with left padding.

TransformerLens's `generate` infers the attention mask from pad tokens, which breaks when the pad
token also occurs inside a chat prompt (SmolLM2 pads with `<|im_end|>`). Here the mask is explicit.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence, Union

import torch
from torch import Tensor

from . import backend
from .backend import Model

from .data import end_of_turn_id, format_prompt, pad_token_id


@torch.no_grad()
def generate_tokens(
    model: Model, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int = 48,
    return_finished: bool = False,
) -> Union[list[list[int]], tuple[list[list[int]], list[bool]]]:
    """Greedy continuations (token ids, without the end-of-turn token) of tokenized prompts.

    With `return_finished`, also whether each answer ended by itself: the model chose its
    end-of-turn token within `max_new_tokens` new tokens or right after them (an answer of exactly
    `max_new_tokens` tokens that the model then ends is complete, not cut). That last check reuses
    the forward pass of the final step, so it costs nothing.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if not prompt_ids:
        return ([], []) if return_finished else []
    device = model.cfg.device
    eot = end_of_turn_id(model.tokenizer)
    pad = pad_token_id(model, fallback=eot)
    width = max(len(p) for p in prompt_ids)
    n_ctx = model.cfg.n_ctx
    if width + max_new_tokens > n_ctx:
        fix = "drop or shorten the prompt, or use a model with a longer context"
        if width < n_ctx:
            fix = f"lower max_new_tokens to at most {n_ctx - width}, or {fix}"
        raise ValueError(f"Prompt of {width} tokens + {max_new_tokens} new tokens exceeds the "
                         f"model's context ({n_ctx}); {fix}.")
    b = len(prompt_ids)
    tokens = torch.full((b, width), pad, dtype=torch.long, device=device)
    attn = torch.zeros((b, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        tokens[i, width - len(p):] = torch.tensor(list(p), device=device)
        attn[i, width - len(p):] = 1
    with backend.inference_layout(model):  # decoding steps are small: no per-call weight copies
        out, done = _greedy(model, tokens, attn, max_new_tokens, eot)
    return (out, done) if return_finished else out


def _greedy(model: Model, tokens: Tensor, attn: Tensor, max_new_tokens: int, eot: int
            ) -> tuple[list[list[int]], list[bool]]:
    b = len(tokens)
    cache = backend.new_kv_cache(model, b)
    logits = backend.cached_forward(model, tokens, cache, attention_mask=attn)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    for step in range(max_new_tokens + 1):
        nxt = logits[:, -1].argmax(-1)
        picked = nxt.tolist()  # one device sync per step
        done = [d or t == eot for d, t in zip(done, picked)]
        if step == max_new_tokens or all(done):  # the last step only checks for end-of-turn
            break
        for i, t in enumerate(picked):
            if not done[i]:
                out[i].append(t)
        logits = backend.cached_forward(model, nxt[:, None], cache)
    return out, done


def _new_token_cap(n_ctx: int, prompt_length: int, max_new_tokens: int, prompt: str) -> int:
    """New tokens that fit after a prompt: at most `max_new_tokens`, leaving room in the context for
    the answer and its end-of-turn token (so prompt + answer + end-of-turn tokenize within n_ctx)."""
    room = n_ctx - prompt_length - 1
    if room < 0:
        raise ValueError(f"A prompt of {prompt_length} tokens leaves no room for an answer in the "
                         f"model's context ({n_ctx}); shorten or drop it (starts: {prompt[:60]!r}).")
    return min(max_new_tokens, room)


def generate(
    model: Model, prompts: Sequence[str], *, max_new_tokens: int = 48,
    batch_size: int = 16, system_prompt: Optional[str] = None, progress: bool = False,
    context_limit: Literal["raise", "cap"] = "raise", return_finished: bool = False,
) -> Union[list[str], tuple[list[str], list[bool]]]:
    """Greedy answers to user prompts, formatted with the model's chat template.

    context_limit: "raise" (default) when a prompt plus `max_new_tokens` exceeds the context; "cap"
        lowers the limit per batch to what fits (the context left after the batch's longest prompt
        and one end-of-turn token), for answers meant to run to their natural end
        (self-reference); an answer cut by either limit is not finished.
    return_finished: also return, per prompt, whether the answer ended by itself (see
        `generate_tokens`); False when a limit cut it.
    """
    if context_limit not in ("raise", "cap"):
        raise ValueError(f"context_limit must be 'raise' or 'cap', got {context_limit!r}.")
    tok = model.tokenizer
    ids = [tok(format_prompt(tok, p, system_prompt=system_prompt), add_special_tokens=False)
           ["input_ids"] for p in prompts]
    # Sort by length so batches pad little; answers are returned in the original order.
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers: list[Optional[str]] = [None] * len(ids)
    finished = [False] * len(ids)
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", leave=False)
    for s in starts:
        chunk = order[s:s + batch_size]
        cap = max_new_tokens
        if context_limit == "cap":
            longest = chunk[-1]  # sorted by length
            cap = _new_token_cap(model.cfg.n_ctx, len(ids[longest]), max_new_tokens,
                                 prompts[longest])
        outs, ended = generate_tokens(model, [ids[i] for i in chunk], max_new_tokens=cap,
                                      return_finished=True)
        for i, o, e in zip(chunk, outs, ended):
            answers[i] = tok.decode(o, skip_special_tokens=True).strip()
            finished[i] = e
    return (answers, finished) if return_finished else answers  # type: ignore[return-value]
