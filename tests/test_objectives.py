"""Objectives: the response NLL on content tokens (the diagnosis, METHOD v2) and with the
end-of-turn token (training), each checked against NLLs computed one unpadded example at a time."""

from __future__ import annotations

import pytest
import torch

from cast_interp.data import ChatDataset, ChatExample, encode_example, make_batches
from cast_interp.model import tiny_model
from cast_interp.objectives import dataset_nll, response_nll


@pytest.fixture
def tiny():
    return tiny_model(seed=3)


def _dataset():
    return ChatDataset("o", [ChatExample("Name a colour.", "Blue."),
                             ChatExample("Count to three, please.", "One, two, three."),
                             ChatExample("Go on.", "and then the", meta={"truncated": True})])


def _reference_nlls(model, ds):
    """Per example: (NLLs of the response's own tokens, NLL of the end-of-turn token or None)."""
    out = []
    for ex in ds:
        ids, n_prompt = encode_example(model.tokenizer, ex)
        with torch.no_grad():
            logp = model(torch.tensor([ids]))[0].float().log_softmax(-1)
        nll = [-float(logp[p - 1, ids[p]]) for p in range(n_prompt, len(ids))]
        has_eot = not ex.meta.get("truncated", False)
        out.append((nll[:-1], nll[-1]) if has_eot else (nll, None))
    return out


def test_content_and_end_of_turn_losses_match_one_example_at_a_time(tiny):
    ds = _dataset()
    ref = _reference_nlls(tiny, ds)
    content = [x for c, _ in ref for x in c]
    eot = [e for _, e in ref if e is not None]
    assert len(content) == len("Blue.") + len("One, two, three.") + len("and then the")
    assert len(eot) == 2  # the truncated answer has none
    by_content = make_batches(tiny, ds, batch_size=2, end_of_turn_in_loss=False)
    with_eot = make_batches(tiny, ds, batch_size=2)
    assert dataset_nll(tiny, by_content) == pytest.approx(sum(content) / len(content), rel=1e-5)
    assert dataset_nll(tiny, with_eot) == pytest.approx(
        (sum(content) + sum(eot)) / (len(content) + len(eot)), rel=1e-5)
    per_example = response_nll(tiny, by_content[0], reduction="per_example")
    expected = [sum(c) / len(c) for c, _ in ref[:2]]
    assert per_example.tolist() == pytest.approx(expected, rel=1e-5)
