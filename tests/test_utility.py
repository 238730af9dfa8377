"""Utility metrics: per-prompt KL and NLL on content tokens, task accuracy by log-likelihood, the
MMLU reader and the bundled multiple-choice items."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from cast_interp.data import (ChatDataset, ChatExample, DataError, end_of_turn_id, load_bundled,
                              make_batches)
from cast_interp.model import tiny_model
from cast_interp.objectives import response_nll
from cast_interp.utility import (
    _scored_logits,
    content_mask,
    kl_to_original,
    last_number,
    load_mc_items,
    load_mmlu_csv,
    multiple_choice_accuracy,
    OriginalLogprobs,
    reference_nll,
    task_accuracy,
    utility_per_prompt,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread



def _benign(n):
    return load_bundled("benign", "test").take(n)


# --------------------------------------------------------------------------------------------------
# content tokens
# --------------------------------------------------------------------------------------------------


def test_content_mask_drops_only_the_end_of_turn_token(tiny):
    (batch,) = make_batches(tiny, _benign(3), batch_size=3)
    eot = tiny.tokenizer.eos_token_id
    mask = content_mask(batch, eot)
    assert (batch.loss_mask.sum(-1) - mask.sum(-1)).tolist() == [1, 1, 1]
    assert not (mask & (batch.tokens == eot)).any()
    assert (mask <= batch.loss_mask).all()
    # A batch built without a content mask (content_mask = loss_mask) loses its end-of-turn
    # token too, but a truncated answer (no end-of-turn token at its end) keeps all its tokens.
    bare = copy.deepcopy(batch)
    bare.content_mask = bare.loss_mask.clone()
    assert torch.equal(content_mask(bare, eot), mask)
    last = int(bare.loss_mask[0].nonzero().max())
    bare.tokens[0, last] = int(bare.tokens[0, last - 1])
    assert int(content_mask(bare, eot)[0].sum()) == int(bare.loss_mask[0].sum())
    # A batch's own content mask is the starting point (here: one that also drops the first token).
    own = copy.deepcopy(batch)
    own.content_mask = mask.clone()
    first = own.content_mask.float().argmax(-1)
    own.content_mask[torch.arange(3), first] = False
    assert (mask.sum(-1) - content_mask(own, eot).sum(-1)).tolist() == [1, 1, 1]
    # A truncated self-reference answer gets no end-of-turn token: all its tokens are content.
    e = _benign(1).examples[0]
    cut = ChatDataset("cut", [ChatExample(e.prompt, e.response, meta={"truncated": True})])
    (cb,) = make_batches(tiny, cut)
    assert int(content_mask(cb, eot).sum()) == int(cb.loss_mask.sum()) == int(mask[0].sum())


def _manual_per_prompt(model, batch, original=None):
    """Token-mean NLL (and KL) per row over content positions, written out directly."""
    eot = model.tokenizer.eos_token_id
    with torch.no_grad():
        logq = model(batch.tokens)[:, :-1].log_softmax(-1)
        logp = original(batch.tokens)[:, :-1].log_softmax(-1) if original else None
    nll, kl = [], []
    for b in range(len(batch)):
        pos = [p for p in range(batch.tokens.shape[1] - 1)
               if batch.loss_mask[b, p + 1] and int(batch.tokens[b, p + 1]) != eot]
        nll.append(sum(-float(logq[b, p, batch.tokens[b, p + 1]]) for p in pos) / len(pos))
        if logp is not None:
            kl.append(sum(float((logp[b, p].exp() * (logp[b, p] - logq[b, p])).sum())
                          for p in pos) / len(pos))
    return nll, kl


def test_reference_nll_per_prompt_known_answer(tiny):
    ds = _benign(5)
    (batch,) = make_batches(tiny, ds, batch_size=5)
    manual, _ = _manual_per_prompt(tiny, batch)
    got = reference_nll(tiny, ds, batch_size=2)
    assert got.per_prompt == pytest.approx(manual, rel=1e-5)
    assert float(got) == pytest.approx(sum(manual) / 5, rel=1e-5)  # mean over prompts
    # "response" tokens (end-of-turn included) equal the training loss per example.
    with torch.no_grad():
        per_example = response_nll(tiny, batch, reduction="per_example").tolist()
    resp = reference_nll(tiny, [batch], tokens="response")
    assert resp.per_prompt == pytest.approx(per_example, rel=1e-5)
    assert resp.per_prompt != pytest.approx(got.per_prompt, rel=1e-3)


def test_kl_per_prompt_zero_for_same_model_and_known_after_perturbation(tiny):
    ds = _benign(4)
    for original in (tiny, copy.deepcopy(tiny)):
        kl = kl_to_original(tiny, original, ds)
        assert kl == 0.0 and kl.per_prompt == [0.0] * 4
    original = copy.deepcopy(tiny)
    with torch.no_grad():
        tiny.unembed.W_U.add_(0.3 * torch.randn_like(tiny.unembed.W_U))  # a view on the bridge
    (batch,) = make_batches(tiny, ds, batch_size=4)
    _, manual = _manual_per_prompt(tiny, batch, original)
    kl = kl_to_original(tiny, original, ds, batch_size=3)
    assert min(manual) > 0
    assert kl.per_prompt == pytest.approx(manual, rel=1e-4)
    assert float(kl) == pytest.approx(sum(manual) / 4, rel=1e-4)
    assert kl_to_original(original, tiny, ds) > 1e-6
    both = utility_per_prompt(tiny, ds, original=original)
    assert both["kl_to_original"].tolist() == pytest.approx(manual, rel=1e-4)
    assert both["n_tokens"].tolist() == content_mask(batch, tiny.tokenizer.eos_token_id)[
        :, 1:].sum(-1).float().tolist()


def _shared_opening(n):
    """Benign examples whose prompts all start with the same sentence (a system-like turn)."""
    return ChatDataset("shared", [ChatExample("Answer in one line, please. " + e.prompt, e.response)
                                  for e in _benign(n).examples])


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_scored_logits_equal_the_full_forward(request, which):
    """The shared leading tokens run once (cache copied to the rows) and the unembedding only at
    scored positions: the same logits as a plain forward, on a model with a one-token shared
    template (tiny, shared opening added) and one with a system turn (SmolLM2)."""
    model = request.getfixturevalue(which)
    ds = _shared_opening(3) if which == "tiny" else _benign(3)
    (batch,) = make_batches(model, ds, batch_size=3)
    scored = content_mask(batch, end_of_turn_id(model.tokenizer))[:, 1:]
    tokens = batch.tokens
    shared = int((tokens == tokens[:1]).all(0).long().cumprod(0).sum())
    assert shared >= 15  # the shared path is the one under test
    with torch.no_grad():
        full = model(tokens.to(model.cfg.device))[:, :-1][scored.to(model.cfg.device)]
        got = _scored_logits(model, tokens, scored)
    assert got.shape == full.shape
    torch.testing.assert_close(got, full, atol=2e-4 if which == "smollm2" else 1e-5, rtol=0)


def test_original_logprobs_give_the_same_kl_as_the_original_model(tiny):
    """Kept or recomputed, the original's stored log-probs give KL and NLL bit-identical to
    passing the original model itself; other data or settings are refused, not mis-scored."""
    ds = _benign(5)
    original = copy.deepcopy(tiny)
    with torch.no_grad():
        tiny.unembed.W_U.add_(0.3 * torch.randn_like(tiny.unembed.W_U))
    slow = utility_per_prompt(tiny, ds, original=original, batch_size=2)
    assert float(slow["kl_to_original"].min()) > 0
    for max_bytes in (2**31, 0):  # kept, and too big to keep (recomputed per use)
        ref = OriginalLogprobs(original, ds, batch_size=2, max_bytes=max_bytes)
        assert ref.kept == (max_bytes > 0)
        for data in (ds, ref.batches):
            fast = utility_per_prompt(tiny, data, original=ref, batch_size=2)
            assert fast.keys() == slow.keys()
            assert all(torch.equal(fast[k], slow[k]) for k in slow)
    assert kl_to_original(tiny, ref, ds, batch_size=2).per_prompt == slow["kl_to_original"].tolist()
    assert float(kl_to_original(original, ref, ds, batch_size=2)) == 0.0  # the original itself
    with pytest.raises(ValueError, match="differs"):
        utility_per_prompt(tiny, ChatDataset("other", _benign(6).examples[1:]), original=ref,
                           batch_size=2)
    with pytest.raises(ValueError, match="batches, but"):
        utility_per_prompt(tiny, _benign(3), original=ref, batch_size=2)
    with pytest.raises(ValueError, match="same settings"):
        utility_per_prompt(tiny, ds, original=ref, batch_size=3)


def test_utility_bad_input(tiny):
    with pytest.raises(DataError, match="without a response"):
        reference_nll(tiny, load_bundled("over_refusal").take(3))
    with pytest.raises(DataError, match="empty"):
        reference_nll(tiny, ChatDataset("none", []))
    with pytest.raises(DataError):
        reference_nll(tiny, [])
    with pytest.raises(ValueError, match="tokens"):
        reference_nll(tiny, _benign(2), tokens="all")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="d_model"):
        kl_to_original(tiny, tiny_model(seed=0, n_ctx=512, d_model=16, d_head=4), _benign(2))
    with pytest.raises(ValueError, match="d_vocab"):
        kl_to_original(tiny, tiny_model(seed=0, n_ctx=512, d_vocab=300), _benign(2))


# --------------------------------------------------------------------------------------------------
# task accuracy
# --------------------------------------------------------------------------------------------------


def test_task_accuracy_planted_in_the_logits(tiny):
    # Plant the answer: a large unembedding bias on "x" makes the one-token choice "x" win
    # whatever the question, at whichever index it stands.
    x = tiny.tokenizer("x", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        tiny.unembed.b_U[x] += 50.0
    questions = ["Pick one.", "Which letter?", "Choose.", "Your answer?", "Go."]
    items = [{"question": q, "choices": ["w", "y", "z"][:i % 3] + ["x"] + ["w", "y", "z"][i % 3:],
              "answer_index": i % 3} for i, q in enumerate(questions)]
    res = task_accuracy(tiny, items, batch_size=3)
    assert res["accuracy"] == 1.0 and res["correct"] == [True] * 5
    assert res["predicted"] == [i % 3 for i in range(5)]
    assert res["chance"] == 0.25 and res["n"] == 5
    wrong = [dict(it, answer_index=(it["answer_index"] + 1) % 4) for it in items]
    assert task_accuracy(tiny, wrong)["correct"] == [False] * 5
    mixed = items[:2] + [{"question": "Yes or no?", "choices": ["x", "w"], "answer_index": 1}]
    res = task_accuracy(tiny, mixed)
    assert res["correct"] == [True, True, False]
    assert res["chance"] == pytest.approx((0.25 + 0.25 + 0.5) / 3)
    acc = multiple_choice_accuracy(tiny, mixed)
    assert acc == pytest.approx(2 / 3) and acc.per_prompt == [1.0, 1.0, 0.0]



def test_task_accuracy_matches_manual_likelihoods(tiny, manual_logprob):
    qs = ["Pick a colour.", "Name a fruit.", "Say hi."]
    choices = ["red", "green!", "a much longer blue answer"]
    manual = [[manual_logprob(tiny, q, c) for c in choices] for q in qs]
    best = [max(range(3), key=lambda j: m[j]) for m in manual]
    items = [{"question": q, "choices": choices, "answer_index": b} for q, b in zip(qs, best)]
    assert task_accuracy(tiny, items)["accuracy"] == 1.0
    shifted = [dict(it, answer_index=(it["answer_index"] + 1) % 3) for it in items]
    assert task_accuracy(tiny, shifted)["accuracy"] == 0.0
    best_mean = [max(range(3), key=lambda j: m[j] / len(choices[j].encode())) for m in manual]
    items_mean = [{"question": q, "choices": choices, "answer_index": b}
                  for q, b in zip(qs, best_mean)]
    assert task_accuracy(tiny, items_mean, normalize="mean")["accuracy"] == 1.0


def test_task_accuracy_bad_items(tiny):
    with pytest.raises(DataError, match="No multiple-choice"):
        task_accuracy(tiny, [])
    with pytest.raises(DataError, match="answer_index"):
        task_accuracy(tiny, [{"question": "q", "choices": ["a"], "answer_index": 3}])
    with pytest.raises(DataError, match="lacks"):
        task_accuracy(tiny, [{"question": "q", "choices": ["a"]}])
    with pytest.raises(ValueError, match="normalize"):
        task_accuracy(tiny, [{"question": "q", "choices": ["a"], "answer_index": 0}],
                      normalize="max")  # type: ignore[arg-type]


def test_bundled_mc_items():
    items = load_mc_items()
    assert len(items) >= 80
    assert all(len(it["choices"]) == 4 and len(set(it["choices"])) == 4 for it in items)
    assert len({it["question"] for it in items}) == len(items)
    # The answer is not always in the same place (each position holds a quarter of the answers).
    positions = Counter(it["answer_index"] for it in items)
    assert set(positions) == {0, 1, 2, 3} and min(positions.values()) >= len(items) // 4 - 1
    assert {it["category"] for it in items} == {"knowledge", "arithmetic", "words"}
    assert load_mc_items(n=5) == items[:5]


# --------------------------------------------------------------------------------------------------
# MMLU CSV
# --------------------------------------------------------------------------------------------------


def test_mmlu_reader_letters_without_header(tmp_path):
    path = tmp_path / "astronomy_test.csv"
    path.write_text('What orbits Earth?,The Moon,Mars,"Venus, the planet",Jupiter,A\n'
                    "2 + 2 =,3,4,5,6,b\n", encoding="utf-8")
    items = load_mmlu_csv(path)
    assert items == [
        {"question": "What orbits Earth?", "choices": ["The Moon", "Mars", "Venus, the planet",
                                                       "Jupiter"],
         "answer_index": 0, "category": "astronomy"},
        {"question": "2 + 2 =", "choices": ["3", "4", "5", "6"], "answer_index": 1,
         "category": "astronomy"}]
    assert load_mc_items(str(path)) == items
    assert len(load_mmlu_csv(path, n=1)) == 1


def test_mmlu_reader_indices_with_header(tmp_path):
    path = tmp_path / "x_test.csv"
    path.write_text("question,choice0,choice1,choice2,choice3,answer\nQ?,a,b,c,d,3\n")
    (item,) = load_mmlu_csv(path)
    assert item["answer_index"] == 3 and item["choices"] == ["a", "b", "c", "d"]


def test_mmlu_reader_bad_input(tmp_path):
    bad = tmp_path / "bad_test.csv"
    bad.write_text("Q?,a,b,c,d,E\n")
    with pytest.raises(DataError, match="row 1.*'E'"):
        load_mmlu_csv(bad)
    short = tmp_path / "short_test.csv"
    short.write_text("Q?,a,A\n")
    with pytest.raises(DataError, match="columns"):
        load_mmlu_csv(short)
    with pytest.raises(DataError, match="does not exist"):
        load_mmlu_csv(tmp_path / "missing.csv")
    with pytest.raises(DataError, match="Unknown task"):
        load_mc_items("mmlu")


def test_mmlu_reader_on_shared_files(shared_datasets):
    path = shared_datasets / "mmlu" / "global_facts_test.csv"
    items = load_mmlu_csv(path)
    assert len(items) == 100  # 101 lines: the header and 100 questions
    assert all(len(it["choices"]) == 4 and 0 <= it["answer_index"] < 4 for it in items)
    assert {it["category"] for it in items} == {"global_facts"}


def test_last_number():
    assert last_number("so 3 + 4 = 7. The answer is 1,250.50") == "1250.50"
    assert last_number("It is -12.") == "-12"
    assert last_number("no digits") is None
