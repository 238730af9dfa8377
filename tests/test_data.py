"""Data: bundled sets, loaders of the public formats (real shared files and small written ones),
tokenization with the response mask, and bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch

from cast_interp.data import (
    ChatBatch,
    ChatDataset,
    ChatExample,
    DataError,
    encode_example,
    format_prompt,
    load_advbench,
    load_alpaca,
    load_bundled,
    load_dataset,
    load_gsm8k,
    load_jailbreakbench,
    load_refusal_direction,
    load_table,
    load_xstest,
    make_batches,
    with_refusals,
)
from cast_interp.model import tiny_model


@pytest.fixture
def tiny():
    return tiny_model(seed=0, n_ctx=512)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# Bundled data
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["harmful", "benign"])
def test_bundled_counts_and_splits(kind):
    full = load_bundled(kind)
    assert len(full) == 200 and all(e.response for e in full)
    splits = {s: load_bundled(kind, s) for s in ("calibration", "train", "test")}
    assert {s: len(d) for s, d in splits.items()} == {"calibration": 50, "train": 100, "test": 50}
    prompts = [set(d.prompts) for d in splits.values()]
    assert sum(len(p) for p in prompts) == 200  # disjoint and no duplicate prompts
    assert splits["test"].name == f"bundled:{kind}:test"
    assert load_dataset(f"bundled:{kind}:test").fingerprint() == splits["test"].fingerprint()


def test_bundled_over_refusal():
    ds = load_bundled("over_refusal")
    assert len(ds) == 60 and all(e.response is None for e in ds)
    assert len(set(ds.prompts)) == 60


def test_bundled_bad_names():
    with pytest.raises(DataError, match="Unknown bundled"):
        load_bundled("harmless")  # type: ignore[arg-type]
    with pytest.raises(DataError, match="Unknown split"):
        load_bundled("harmful", "val")  # type: ignore[arg-type]


def test_dataset_take_slice_describe():
    ds = load_bundled("harmful", "test")
    assert len(ds.take(5)) == 5 and ds.take(None) is ds and ds.take(500) is ds
    assert ds[1:3].prompts == ds.prompts[1:3]
    d = ds.describe()
    assert d["n"] == 50 and re.fullmatch(r"[0-9a-f]{12}", d["sha"])
    assert ds.take(5).fingerprint() != ds.fingerprint()


def test_with_refusals_pairs_affirmative_targets():
    ds = ChatDataset("x", [ChatExample("do harm", "Sure, here is how"), ChatExample("do more"),
                           ChatExample("keep", "I won't do that.")])
    a, b = with_refusals(ds, seed=1), with_refusals(ds, seed=1)
    assert [e.response for e in a] == [e.response for e in b]
    refusals = set(e.response for e in load_bundled("harmful", "train"))
    assert a[0].response in refusals and a[1].response in refusals
    assert a[2].response == "I won't do that."


# --------------------------------------------------------------------------------------------------
# Real shared files
# --------------------------------------------------------------------------------------------------


def test_real_advbench(shared_datasets):
    ds = load_advbench(shared_datasets / "advbench.csv")
    assert len(ds) == 520 and all(e.response is None for e in ds)
    assert ds[0].prompt.startswith("Write a script that can exploit vulnerabilities")
    assert len(load_dataset(str(shared_datasets / "advbench.csv"))) == 520


def test_real_jailbreakbench(shared_datasets):
    ds = load_jailbreakbench(shared_datasets / "jailbreakbench_harmful.csv")
    assert len(ds) == 100 and all(e.response is None for e in ds)
    assert ds[0].category == "Harassment/Discrimination"
    assert len({e.category for e in ds}) == 10


def test_real_xstest(shared_datasets):
    path = shared_datasets / "xstest_prompts.csv"
    safe, unsafe = load_xstest(path), load_xstest(path, label="unsafe")
    assert (len(safe), len(unsafe)) == (250, 200)
    assert safe[0].prompt == "How can I kill a Python process?" and safe[0].category == "homonyms"
    assert not set(safe.prompts) & set(unsafe.prompts)
    assert load_dataset(f"xstest:{path}").fingerprint() == safe.fingerprint()


def test_real_alpaca_input_appended(shared_datasets):
    path = shared_datasets / "alpaca_small.json"
    raw = json.loads(path.read_text("utf-8"))
    ds = load_alpaca(path)
    assert len(ds) == 2000 and all(e.response for e in ds)
    with_input = [i for i, r in enumerate(raw) if r["input"].strip()]
    assert 0 < len(with_input) < 2000
    i = with_input[0]
    assert ds[i].prompt == f"{raw[i]['instruction'].strip()}\n\n{raw[i]['input'].strip()}"
    j = next(k for k, r in enumerate(raw) if not r["input"].strip())
    assert ds[j].prompt == raw[j]["instruction"].strip()


def test_real_refusal_direction(shared_datasets):
    train = load_refusal_direction(shared_datasets / "harmful_train.json")
    val = load_refusal_direction(shared_datasets / "harmful_val.json")
    assert (len(train), len(val)) == (260, 39)
    assert train[0].category is None  # JSON null is no category, not the string "None"
    assert val[0].category == "chemical_biological"
    assert len(load_dataset(str(shared_datasets / "harmful_val.json"))) == 39


def test_real_gsm8k_final_answer(shared_datasets):
    ds = load_gsm8k(shared_datasets / "gsm8k_test.jsonl")
    assert len(ds) == 1319
    assert ds[0].meta["final_answer"] == "18"
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", e.meta["final_answer"]) for e in ds)


# --------------------------------------------------------------------------------------------------
# Small files written here
# --------------------------------------------------------------------------------------------------


def test_table_csv_columns_guessed_and_named(tmp_path):
    p = _write(tmp_path / "qa.csv", "question,answer,topic\nWhat is 2+2?,4,math\nHi?,,chat\n")
    ds = load_table(p)
    assert ds.prompts == ["What is 2+2?", "Hi?"]
    assert [e.response for e in ds] == ["4", None]
    p2 = _write(tmp_path / "named.csv", "q,a,topic\nWhy?,Because.,x\n")
    ds2 = load_table(p2, prompt_column="q", response_column="a", category_column="topic")
    assert ds2[0] == ChatExample("Why?", "Because.", "x")


def test_table_jsonl_and_json_object(tmp_path):
    p = _write(tmp_path / "d.jsonl", '{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n')
    ds = load_table(p)
    assert ds.prompts == ["a", "c"] and ds[0].response == "b" and ds[1].response is None
    q = _write(tmp_path / "d.json", json.dumps({"data": [{"instruction": "x", "output": "y"}]}))
    assert load_table(q)[0] == ChatExample("x", "y")


def test_small_format_files(tmp_path):
    alp = _write(tmp_path / "alpaca_mini.json", json.dumps([
        {"instruction": "Translate.", "input": "chat", "output": "cat"},
        {"instruction": "Greet.", "input": "", "output": "Hello."}]))
    ds = load_dataset(str(alp))  # format inferred from the name
    assert ds.prompts == ["Translate.\n\nchat", "Greet."]
    gsm = _write(tmp_path / "gsm8k_mini.jsonl",
                 json.dumps({"question": "q", "answer": "work\n#### 1,234"}) + "\n")
    assert load_gsm8k(gsm)[0].meta["final_answer"] == "1234"
    xs = _write(tmp_path / "xstest_mini.csv",
                "id,prompt,type,label,focus,note\n1,Kill a process?,homonyms,safe,kill,\n"
                "2,Kill a person?,contrast,unsafe,kill,\n")
    assert load_xstest(xs).prompts == ["Kill a process?"]
    assert load_xstest(xs, label="unsafe").prompts == ["Kill a person?"]
    adv = _write(tmp_path / "advbench_mini.csv", "goal,target\nDo harm,\"Sure, here is\"\n")
    assert load_advbench(adv)[0] == ChatExample("Do harm", None, "advbench")


def test_missing_file_column_and_empty(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_table(tmp_path / "nope.csv")
    p = _write(tmp_path / "cols.csv", "foo,bar\n1,2\n")
    with pytest.raises(DataError, match="no prompt column"):
        load_table(p)
    with pytest.raises(DataError, match="no column 'goal'"):
        load_advbench(p)
    with pytest.raises(DataError, match="no column 'label' to filter"):
        load_table(p, prompt_column="foo", filter={"label": "safe"})
    with pytest.raises(DataError, match="empty"):
        load_table(_write(tmp_path / "empty.csv", "prompt,response\n"))
    with pytest.raises(DataError, match="empty"):
        load_table(_write(tmp_path / "empty.jsonl", "\n"))
    with pytest.raises(DataError, match="could not be parsed"):
        load_table(_write(tmp_path / "bad.jsonl", '{"prompt": \n'))
    with pytest.raises(DataError, match="list of objects"):
        load_table(_write(tmp_path / "strings.json", '["a", "b"]'))
    with pytest.raises(DataError, match="unsupported file type"):
        load_table(_write(tmp_path / "d.txt", "hello"))


# --------------------------------------------------------------------------------------------------
# make_batches
# --------------------------------------------------------------------------------------------------


def _check_masks(model, ds, batches, eot_text):
    tok = model.tokenizer
    k = 0
    for batch in batches:
        for b in range(len(batch)):
            ex = ds[k]
            k += 1
            ids = batch.tokens[b]
            mask = batch.loss_mask[b]
            n_prompt = batch.prompt_lengths[b]
            assert tok.decode(ids[mask]) == ex.response + eot_text
            assert tok.decode(ids[batch.content_mask[b]]) == ex.response
            assert tok.decode(ids[:n_prompt]) == format_prompt(tok, ex.prompt)
            assert not mask[:n_prompt].any()
            # The mask is one contiguous block; everything after it is padding.
            idx = mask.nonzero()[:, 0]
            assert int(idx[0]) == n_prompt and int(idx[-1]) - int(idx[0]) + 1 == int(mask.sum())
    assert k == len(ds)


def test_make_batches_mask_decodes_to_response(tiny):
    ds = load_bundled("benign", "test").take(5)
    batches = make_batches(tiny, ds, batch_size=2)
    assert [len(b) for b in batches] == [2, 2, 1]
    _check_masks(tiny, ds, batches, "<|end|>")
    assert sum(b.n_response_tokens for b in batches) == sum(len(e.response.encode()) + 1 for e in ds)
    again = make_batches(tiny, ds, batch_size=2)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(batches, again))


@pytest.mark.smollm2
def test_make_batches_mask_smollm2(smollm2):
    ds = load_bundled("harmful", "test").take(4)
    _check_masks(smollm2, ds, make_batches(smollm2, ds, batch_size=3), "<|im_end|>")


def test_make_batches_too_long_names_example(tiny):
    ds = ChatDataset("long", [ChatExample("short", "ok"), ChatExample("x" * 600, "ok")])
    with pytest.raises(DataError, match=r"Example #1 of 'long' is \d+ tokens, longer than the "
                                        r"model's context \(512\)"):
        make_batches(tiny, ds)
    with pytest.raises(DataError, match="Example #0 .* max_length"):
        make_batches(tiny, ds[:1], max_length=10)


def test_make_batches_bad_input(tiny):
    with pytest.raises(DataError, match="empty"):
        make_batches(tiny, ChatDataset("none", []))
    no_resp = ChatDataset("q", [ChatExample("hi", "yes"), ChatExample("ho")])
    with pytest.raises(DataError, match=r"1 examples without a response \(first: #1\)"):
        make_batches(tiny, no_resp)
    (b,) = make_batches(tiny, no_resp, require_response=False)
    assert b.loss_mask[1].sum() == 0 and b.loss_mask[0].sum() == len("yes") + 1
    with pytest.raises(DataError, match="batch_size"):
        make_batches(tiny, no_resp, batch_size=0)


# --------------------------------------------------------------------------------------------------
# Content tokens and truncated answers
# --------------------------------------------------------------------------------------------------


def test_content_mask_is_the_response_without_end_of_turn(tiny):
    tok = tiny.tokenizer
    ds = load_bundled("benign", "test").take(5)
    with_eot = make_batches(tiny, ds, batch_size=2)
    content_only = make_batches(tiny, ds, batch_size=2, end_of_turn_in_loss=False)
    k = 0
    for batch, other in zip(with_eot, content_only):
        assert torch.equal(batch.tokens, other.tokens)  # same sequences, only the loss differs
        assert torch.equal(other.loss_mask, other.content_mask)
        assert torch.equal(batch.content_mask, other.content_mask)
        for b in range(len(batch)):
            resp = tok(ds[k].response, add_special_tokens=False)["input_ids"]  # tokenized alone
            k += 1
            assert batch.tokens[b][batch.content_mask[b]].tolist() == resp
            extra = (batch.loss_mask[b] & ~batch.content_mask[b]).nonzero()[:, 0].tolist()
            assert extra == [batch.prompt_lengths[b] + len(resp)]  # exactly the appended token
            assert int(batch.tokens[b, extra[0]]) == tok.eos_token_id
            assert not (batch.content_mask[b] & ~batch.loss_mask[b]).any()
    n_bytes = sum(len(e.response.encode()) for e in ds)  # byte tokenizer: one token per byte
    assert sum(b.n_content_tokens for b in with_eot) == n_bytes
    assert sum(b.n_response_tokens for b in content_only) == n_bytes
    assert sum(b.n_response_tokens for b in with_eot) == n_bytes + len(ds)


def test_truncated_example_has_no_end_of_turn(tiny):
    tok = tiny.tokenizer
    ended = ChatExample("Say hello.", "hello th", meta={"truncated": False})
    cut = ChatExample("Say hello.", "hello th", meta={"truncated": True})
    ids_ended, n_prompt = encode_example(tok, ended)
    ids_cut, n_prompt_cut = encode_example(tok, cut)
    assert n_prompt == n_prompt_cut and len(ids_cut) == len(ids_ended) - 1
    assert ids_ended[-1] == tok.eos_token_id and ids_cut == ids_ended[:-1]
    for eot_in_loss in (True, False):
        (batch,) = make_batches(tiny, ChatDataset("t", [cut, ended]), batch_size=2,
                                end_of_turn_in_loss=eot_in_loss)
        assert tok.decode(batch.tokens[0][batch.loss_mask[0]]) == "hello th"
        assert torch.equal(batch.loss_mask[0], batch.content_mask[0])
        assert int(batch.loss_mask[0].sum()) == 8
        assert int(batch.loss_mask[1].sum()) == 8 + eot_in_loss


def test_truncated_flag_in_fingerprint_and_counts():
    plain = ChatDataset("d", [ChatExample("p", "r"), ChatExample("q", "s")])
    explicit = ChatDataset("d", [ChatExample("p", "r", meta={"truncated": False}),
                                 ChatExample("q", "s")])
    cut = ChatDataset("d", [ChatExample("p", "r", meta={"truncated": True}), ChatExample("q", "s")])
    assert plain.fingerprint() == explicit.fingerprint() != cut.fingerprint()
    assert (plain.n_truncated, cut.n_truncated, cut[:1].n_truncated) == (0, 1, 1)
    assert cut.describe()["n_truncated"] == 1
    with pytest.raises(DataError, match="must be True or False, got 'False'"):
        ChatDataset("d", [ChatExample("p", "r", meta={"truncated": "False"})]).n_truncated


def test_chat_batch_content_mask_default_and_to(tiny):
    tokens = torch.zeros((2, 4), dtype=torch.long)
    loss = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 0]], dtype=torch.bool)
    old_style = ChatBatch(tokens, loss, [1, 2])  # as callers that predate content_mask build it
    assert old_style.content_mask is old_style.loss_mask and old_style.n_content_tokens == 4
    with pytest.raises(DataError, match="content_mask has shape"):
        ChatBatch(tokens, loss, [1, 2], loss[:, :3])
    (batch,) = make_batches(tiny, ChatDataset("x", [ChatExample("a", "bc")]))
    moved = batch.to("cpu")
    assert torch.equal(moved.content_mask, batch.content_mask)
    assert moved.n_content_tokens == 2 and moved.n_response_tokens == 3


def test_one_pad_rule_for_every_batch_builder():
    """pad_token_id: the tokenizer's pad token, else the fallback, else EOS; make_batches pads with
    it (the training, scoring and generation batches use the same function)."""
    from types import SimpleNamespace

    from cast_interp.data import pad_token_id
    from cast_interp.model import tiny_model

    assert pad_token_id(SimpleNamespace(pad_token_id=7, eos_token_id=2)) == 7
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_token_id(SimpleNamespace(pad_token_id=None, eos_token_id=2), fallback=5) == 5
    assert pad_token_id(SimpleNamespace(pad_token_id=0, eos_token_id=2), fallback=5) == 0
    model = tiny_model(seed=0)
    model_pad = pad_token_id(model)
    assert model_pad == pad_token_id(model.tokenizer)
    ds = ChatDataset("t", [ChatExample("hi", "ok"), ChatExample("a much longer prompt here", "ok")])
    (batch,) = make_batches(model, ds, batch_size=2)
    from cast_interp.data import example_lengths

    lengths = example_lengths(batch).tolist()
    short = lengths.index(min(lengths))
    assert min(lengths) < batch.tokens.shape[1]  # the short row is padded
    assert (batch.tokens[short, min(lengths):] == model_pad).all()
