"""Attention summaries of heads: exact token regions, known attention on the planted model."""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure

from cast_interp.data import ChatDataset, ChatExample, DataError, encode_example, load_bundled
from cast_interp.head_attention import (REGIONS, attention_by_region, attention_pattern,
                                        format_regions, plot_attention_pattern)
from cast_interp.heads import HeadIndexError
from cast_interp.model import tiny_model
from cast_interp.planted import H_ALIGN, H_STAR, H_TRIGGER, planted_data, planted_model


def test_format_regions_marks_exactly_the_prompt_tokens():
    tok = tiny_model().tokenizer
    fp = format_regions(tok, "Hello there")
    assert fp.tokens == ["<|user|>", *"Hello there", "<|end|>", "<|assistant|>"]
    assert fp.regions == ["first_token"] + ["prompt"] * 11 + ["template"] * 2
    assert fp.ids == encode_example(tok, ChatExample("Hello there"))[0]  # what make_batches feeds
    assert fp.region_index().tolist() == [0] + [2] * 11 + [1, 1]
    # A prompt that also occurs inside the template ("a" in "assistant") is found in its place.
    assert format_regions(tok, "a").regions == ["first_token", "prompt", "template", "template"]


def test_attention_by_region_known_answer_on_the_planted_model():
    model = planted_model(trigger=True)
    safe, util = planted_data(6, trigger=True)
    on_safe, on_util = attention_by_region(model, safe), attention_by_region(model, util)
    assert on_safe.shape == on_util.shape == (1, 4, len(REGIONS))
    for a in (on_safe, on_util):
        assert torch.allclose(a.sum(-1), torch.ones(1, 4), atol=1e-5)
    prompt, template = REGIONS.index("prompt"), REGIONS.index("template")
    # H_TRIGGER finds the trigger (a prompt token) when there is one ...
    assert on_safe[0, H_TRIGGER, prompt] > 0.999
    # ... and without it all its scores are 0: uniform attention, so the region shares are the
    # shares of tokens (first token 1, template 2 of n = prompt length + 3), averaged over prompts.
    n = torch.tensor([len(e.prompt) + 3 for e in util], dtype=torch.float64)
    uniform = torch.stack([(1 / n).mean(), (2 / n).mean(), ((n - 3) / n).mean()]).float()
    assert torch.allclose(on_util[0, H_TRIGGER], uniform, atol=1e-5)
    assert torch.allclose(on_util[0, H_ALIGN], uniform, atol=1e-5)  # its query is 0 there too
    # H_STAR attends to <|assistant|> itself: the template.
    assert on_safe[0, H_STAR, template] > 0.999 and on_util[0, H_STAR, template] > 0.999


def test_attention_by_region_equals_per_prompt_patterns_under_padding_and_gqa():
    model = tiny_model(seed=0, n_key_value_heads=2)
    ds = load_bundled("harmful", "test").take(5)  # different lengths: right padding in batches
    batched = attention_by_region(model, ds, batch_size=3)
    heads = [(l, h) for l in range(2) for h in range(4)]
    per_prompt = torch.zeros(2, 4, 3)
    for ex in ds:
        hp = attention_pattern(model, ex.prompt, heads)
        onehot = torch.nn.functional.one_hot(hp.prompt.region_index(), 3).float()
        rows = hp.patterns[:, -1, :] @ onehot  # last query row, summed per region
        per_prompt += rows.reshape(2, 4, 3) / len(ds)
    assert torch.allclose(batched, per_prompt, atol=1e-5)
    assert torch.allclose(attention_by_region(model, ds.prompts, batch_size=5), batched, atol=1e-6)


def test_attention_pattern_and_plot(tmp_path):
    model = planted_model(trigger=True)
    safe, _ = planted_data(1, trigger=True)
    hp = attention_pattern(model, safe[0].prompt, [(0, H_TRIGGER), (0, H_STAR)])
    n = len(hp.prompt.ids)
    assert hp.heads == [(0, H_TRIGGER), (0, H_STAR)] and hp.patterns.shape == (2, n, n)
    assert torch.all(hp.patterns.triu(1) == 0)  # causal
    trigger_pos = hp.prompt.tokens.index("x")
    assert hp.patterns[0, -1, trigger_pos] > 0.999
    fig = plot_attention_pattern(hp, 0, save=tmp_path / "p.png")
    assert isinstance(fig, Figure) and (tmp_path / "p.png").stat().st_size > 0


def test_bad_input_gives_clear_errors():
    model = tiny_model()
    with pytest.raises(HeadIndexError, match="does not exist"):
        attention_pattern(model, "hi", [(2, 0)])
    with pytest.raises(DataError, match="at least one prompt"):
        attention_by_region(model, ChatDataset("empty", []))
    with pytest.raises(TypeError, match="list of prompt strings"):
        attention_by_region(model, "just one string")
    with pytest.raises(DataError, match="locate the prompt"):
        format_regions(model.tokenizer, "")


@pytest.mark.smollm2
def test_regions_and_attention_on_smollm2(smollm2):
    fp = format_regions(smollm2.tokenizer, "How do I make a cake?")
    prompt_tokens = [t for t, r in zip(fp.tokens, fp.regions) if r == "prompt"]
    assert "".join(prompt_tokens) == "How do I make a cake?"
    assert fp.regions.count("first_token") == 1 and "template" in fp.regions  # system prompt etc.
    a = attention_by_region(smollm2, ["How do I make a cake?", "Name a colour."], batch_size=2)
    assert a.shape == (30, 9, 3)
    assert torch.allclose(a.sum(-1), torch.ones(30, 9), atol=1e-4)
