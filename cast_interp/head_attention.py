"""Looking inside the heads the conflict map flags: where do they attend when the model answers?

The conflict map says *which* heads carry the utility risk of a safety update; it does not say what
those heads do. A first look is their attention at the moment the model decides how to answer: the
last token of the chat-formatted prompt, whose output predicts the answer's first token (refuse or
comply). From there, we ask how much of the head's attention goes to

    "first_token"  position 0 (often an "attention sink" that a head uses to do nothing),
    "template"     the chat template's other tokens (role markers, system prompt, end-of-turn),
    "prompt"       the user's own words,

and compare harmful with benign prompts: a head that reads the prompt on harmful requests and the
template on benign ones behaves differently from one that does the same everywhere.

- `format_regions`: the formatted prompt's tokens and the region of each (exact: from the
  tokenizer's character offsets, with the prompt located in the template by formatting it twice).
- `attention_by_region`: `[n_layers, n_heads, 3]` mean attention mass per region over a dataset, for
  every head at once (one forward per batch, TransformerLens hook `blocks.{l}.attn.hook_pattern`).
- `attention_pattern` / `plot_attention_pattern`: the full pattern of a few heads on one prompt.

Attention weights are a description, not an explanation: where a head looks is not what it writes
(ablations and attribution, `sensitivity.py` / `attribution/`, measure effects).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .backend import Model

from .data import ChatDataset, ChatExample, DataError, format_prompt, make_batches
from .heads import Head, validate_heads

REGIONS: tuple[str, ...] = ("first_token", "template", "prompt")


# --------------------------------------------------------------------------------------------------
# Which token is what
# --------------------------------------------------------------------------------------------------


@dataclass
class FormattedPrompt:
    """A chat-formatted prompt, token by token: ids, readable strings, and each token's region."""

    ids: list[int]
    tokens: list[str]
    regions: list[str]

    def region_index(self) -> Tensor:
        """`[pos]` int64 index into `REGIONS` of each token."""
        return torch.tensor([REGIONS.index(r) for r in self.regions], dtype=torch.long)


def _prompt_span(tokenizer: Any, prompt: str, system_prompt: Optional[str]) -> tuple[str, int, int]:
    """(formatted text, start, end) of the user's prompt inside the formatted text.

    Formatting the prompt and the empty prompt gives prefix + prompt + suffix and prefix + suffix;
    the span is where the two agree around it, so a prompt that also occurs in the template (e.g. "a"
    inside "assistant") is still found at the right place.
    """
    text = format_prompt(tokenizer, prompt, system_prompt=system_prompt)
    empty = format_prompt(tokenizer, "", system_prompt=system_prompt)
    for content in dict.fromkeys((prompt, prompt.strip())):  # templates may trim the content
        if not content or len(text) - len(content) != len(empty):
            continue
        start = text.find(content)
        while start >= 0:
            end = start + len(content)
            if text[:start] == empty[:start] and text[end:] == empty[start:]:
                return text, start, end
            start = text.find(content, start + 1)
    raise DataError(f"Could not locate the prompt {prompt[:60]!r} in its chat-formatted text "
                    f"{text[:200]!r}: the chat template changes the prompt's text. Pass prompts "
                    "without leading/trailing whitespace or special tokens.")


def format_regions(tokenizer: Any, prompt: str, *,
                   system_prompt: Optional[str] = None) -> FormattedPrompt:
    """Tokens of `data.format_prompt(tokenizer, prompt)` (the ids `make_batches` uses) and their
    regions: "first_token" (position 0), "prompt" (any token overlapping the user's text),
    "template" (the rest). Needs a tokenizer that returns character offsets (any fast tokenizer)."""
    text, start, end = _prompt_span(tokenizer, prompt, system_prompt)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError) as exc:
        raise DataError("format_regions needs a tokenizer that returns character offsets "
                        "(return_offsets_mapping=True: a 'fast' tokenizer).") from exc
    ids = list(enc["input_ids"])
    regions = []
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        if i == 0:
            regions.append("first_token")
        elif a < end and b > start:
            regions.append("prompt")
        else:
            regions.append("template")
    tokens = [tokenizer.decode([t]) for t in ids]
    return FormattedPrompt(ids=ids, tokens=tokens, regions=regions)


# --------------------------------------------------------------------------------------------------
# Attention from the answer's first decision
# --------------------------------------------------------------------------------------------------


def _as_prompt_dataset(data: Union[ChatDataset, Sequence[str]]) -> ChatDataset:
    if isinstance(data, ChatDataset):
        return data
    if isinstance(data, str) or not all(isinstance(p, str) for p in data):
        raise TypeError("data must be a ChatDataset or a list of prompt strings, got "
                        f"{type(data).__name__}.")
    return ChatDataset("prompts", [ChatExample(p) for p in data])


def _pattern_name(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_pattern"


def attention_by_region(
    model: Model,
    data: Union[ChatDataset, Sequence[str]],
    *,
    batch_size: int = 8,
    system_prompt: Optional[str] = None,
) -> Float[Tensor, "layer head region"]:
    """Mean attention mass that each head sends from the last prompt token to each region.

    For every example, the query is the last token of the chat-formatted prompt (its output predicts
    the answer's first token); its attention row is summed over the key positions of each region of
    `REGIONS` ("first_token", "template", "prompt"), and the result averaged over examples. Rows sum
    to 1. Responses in `data` are ignored. Float32 on CPU, indexed [layer, head, region].
    """
    ds = _as_prompt_dataset(data)
    if len(ds) == 0:
        raise DataError("attention_by_region needs at least one prompt; got an empty dataset.")
    prompts_only = ChatDataset(ds.name, [ChatExample(e.prompt) for e in ds], ds.source)
    layout = [format_regions(model.tokenizer, e.prompt, system_prompt=system_prompt).region_index()
              for e in prompts_only]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    total = torch.zeros(L, H, len(REGIONS), dtype=torch.float64)
    names = {_pattern_name(l) for l in range(L)}
    seen = 0
    batches = make_batches(model, prompts_only, batch_size=batch_size, system_prompt=system_prompt,
                           require_response=False)
    for batch in batches:
        with torch.no_grad():
            _, cache = model.run_with_cache(batch.tokens.to(model.cfg.device),
                                            names_filter=lambda n: n in names)
        for i, n_prompt in enumerate(batch.prompt_lengths):
            region = layout[seen + i]
            if region.numel() != n_prompt:  # the same text, so the same tokens; guard anyway
                raise DataError(f"Example {seen + i}: {n_prompt} prompt tokens in the batch but "
                                f"{region.numel()} from format_regions; the tokenizer is not "
                                "deterministic on this text.")
            onehot = torch.nn.functional.one_hot(region, len(REGIONS)).double()  # [pos, region]
            for l in range(L):
                row = cache[_pattern_name(l)][i, :, n_prompt - 1, :n_prompt]  # [head, key]
                total[l] += row.double().cpu() @ onehot
        seen += len(batch)
    return (total / seen).float()


@dataclass
class HeadPatterns:
    """Attention patterns of some heads on one prompt.

    patterns: `[n_selected, query, key]` (causal: zero above the diagonal), in the order of `heads`.
    prompt: the formatted prompt's tokens and regions (`FormattedPrompt`).
    """

    heads: list[Head]
    patterns: Float[Tensor, "selected query key"]
    prompt: FormattedPrompt


def attention_pattern(
    model: Model,
    prompt: str,
    heads: Sequence[Head],
    *,
    system_prompt: Optional[str] = None,
) -> HeadPatterns:
    """The attention patterns of `heads` on the chat-formatted `prompt` (no answer appended)."""
    heads = [tuple(h) for h in heads]
    validate_heads(model, heads)  # clear error for a head outside the model
    fp = format_regions(model.tokenizer, prompt, system_prompt=system_prompt)
    layers = sorted({l for l, _ in heads})
    names = {_pattern_name(l) for l in layers}
    tokens = torch.tensor([fp.ids], device=model.cfg.device)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    pats = torch.stack([cache[_pattern_name(l)][0, h] for l, h in heads]).float().cpu()
    return HeadPatterns(heads=[(int(l), int(h)) for l, h in heads], patterns=pats, prompt=fp)


REGION_COLORS = {"first_token": "#999999", "template": "#0072B2", "prompt": "#D55E00"}


def plot_attention_pattern(
    patterns: HeadPatterns,
    index: int = 0,
    *,
    title: Optional[str] = None,
    ax: Any = None,
    save: Optional[Any] = None,
):
    """Heatmap (query rows x key columns) of head `patterns.heads[index]` on its prompt.

    Tick labels are the tokens, coloured by region (grey first token, blue template, orange prompt);
    the last row is the attention `attention_by_region` summarises. Returns a matplotlib Figure (no
    pyplot state); `save=path` writes it (`figures.save_figure`).
    """
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    from .figures import STYLE, save_figure

    pat = patterns.patterns[index].numpy()
    fp = patterns.prompt
    n = pat.shape[0]
    labels = [t.replace("\n", "\\n") for t in fp.tokens]
    with rc_context(STYLE):
        size = min(3.0 + 0.16 * n, 12.0)
        if ax is None:
            fig = Figure(figsize=(size + 1.0, size), layout="constrained")
            ax = fig.add_subplot()
        else:
            fig = ax.figure
        im = ax.imshow(np.ma.masked_where(np.triu(np.ones((n, n), bool), 1), pat), cmap="viridis",
                       vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_xticks(np.arange(n))
        ax.set_yticks(np.arange(n))
        fs = 7 if n <= 40 else 5
        ax.set_xticklabels(labels, rotation=90, fontsize=fs)
        ax.set_yticklabels(labels, fontsize=fs)
        for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
            for t, r in zip(ticks, fp.regions):
                t.set_color(REGION_COLORS[r])
        ax.set_xlabel("key (attended to)")
        ax.set_ylabel("query")
        l, h = patterns.heads[index]
        ax.set_title(title or f"Attention of L{l}H{h}")
        fig.colorbar(im, ax=ax, shrink=0.8, label="attention weight")
    if save is not None:
        save_figure(fig, save)
    return fig
