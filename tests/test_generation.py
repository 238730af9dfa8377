"""Greedy generation (batched, left-padded), finished vs cut answers on a known-answer model, and
the self-reference answers built on it (`data.self_reference`, tested here beside that model)."""

import hashlib
import json

import pytest
import torch

from cast_interp import data, generation
from cast_interp.data import (
    SELF_REFERENCE_FORMAT,
    ChatDataset,
    ChatExample,
    format_prompt,
    make_batches,
    self_reference,
)
from cast_interp.generation import generate, generate_tokens
from cast_interp.model import tiny_model


def _manual_greedy(model, ids, n):
    """Greedy decoding without a KV cache or padding: the reference."""
    toks = torch.tensor([ids])
    out = []
    for _ in range(n):
        nxt = int(model(toks)[0, -1].argmax())
        if nxt == model.tokenizer.eos_token_id:
            break
        out.append(nxt)
        toks = torch.cat([toks, torch.tensor([[nxt]])], 1)
    return out


def test_batched_left_padded_generation_equals_unpadded_reference():
    m = tiny_model(seed=1)
    tok = m.tokenizer
    prompts = ["hi", "a much longer prompt than the first", "mid length one"]
    ids = [tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    batched = generate_tokens(m, ids, max_new_tokens=12)
    for i, p in enumerate(ids):
        assert batched[i] == _manual_greedy(m, p, 12)


def test_generate_returns_in_prompt_order():
    m = tiny_model(seed=2)
    prompts = ["zzzz zzzz zzzz", "q", "medium"]
    together = generate(m, prompts, max_new_tokens=6, batch_size=2)
    alone = [generate(m, [p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone


# --------------------------------------------------------------------------------------------------
# Finished vs cut answers, on a model whose greedy answer is known
# --------------------------------------------------------------------------------------------------

ANSWER = "abcde"


def chain_model(*, n_ctx: int = 64):
    """A tiny model whose greedy answer to any prompt is `ANSWER` then end-of-turn.

    Attention and MLP outputs are zeroed, so the logits at a position depend on its own token only;
    `<|assistant|>`, a, b, c, d, e get orthogonal embeddings and the unembedding maps each to the
    next one (e to `<|end|>`): a bigram chain that ends after exactly len(ANSWER) tokens.
    """
    m = tiny_model(seed=0, n_ctx=n_ctx)
    tok = m.tokenizer
    chain = [tok.convert_tokens_to_ids("<|assistant|>")] + tok(ANSWER, add_special_tokens=False)[
        "input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        for block in m.blocks:
            block.attn.W_O.zero_()
            block.mlp.W_out.zero_()
        m.W_U.zero_()
        m.b_U.zero_()
        for i, (src, dst) in enumerate(zip(chain[:-1], chain[1:])):
            m.W_E[src] = 0.0
            m.W_E[src, i] = 1.0
            m.W_U[i, dst] = 1.0
    return m


def _prompt_ids(m, prompt):
    return m.tokenizer(format_prompt(m.tokenizer, prompt), add_special_tokens=False)["input_ids"]


def test_finished_flags_at_the_boundary():
    m = chain_model()
    ids = [_prompt_ids(m, "hi"), _prompt_ids(m, "a longer prompt")]
    abcde = m.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    for cap, n_out, finished in [(0, 0, False), (4, 4, False), (5, 5, True), (9, 5, True)]:
        # cap 5: the model ends right after the 5th token, so the answer is complete, not cut.
        out, ended = generate_tokens(m, ids, max_new_tokens=cap, return_finished=True)
        assert out == [abcde[:n_out]] * 2 and ended == [finished] * 2, cap
    assert generate_tokens(m, ids, max_new_tokens=4) == [abcde[:4]] * 2  # default return unchanged


def test_generate_caps_new_tokens_to_the_context_per_batch():
    m = chain_model(n_ctx=32)
    long_prompt = "x" * 26
    n_long = len(_prompt_ids(m, long_prompt))
    assert n_long == 29  # <|user|> + 26 bytes + <|end|> + <|assistant|>
    prompts = [long_prompt, "hi"]
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(m, prompts, max_new_tokens=256)
    # Room after the long prompt: 32 - 29 - 1 (kept for end-of-turn) = 2 tokens.
    texts, finished = generate(m, prompts, max_new_tokens=256, batch_size=1, context_limit="cap",
                               return_finished=True)
    assert texts == ["ab", ANSWER] and finished == [False, True]
    # One batch: the cap of its longest prompt applies to both.
    texts, finished = generate(m, prompts, max_new_tokens=256, batch_size=2, context_limit="cap",
                               return_finished=True)
    assert texts == ["ab", "ab"] and finished == [False, False]
    with pytest.raises(ValueError, match="leaves no room for an answer"):
        generate(m, ["y" * 40], max_new_tokens=4, context_limit="cap")
    with pytest.raises(ValueError, match="context_limit must be"):
        generate(m, prompts, context_limit="truncate")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# Self-reference answers (data.self_reference), on the same known-answer model
# --------------------------------------------------------------------------------------------------


def _util_set():
    return ChatDataset("u", [ChatExample("x" * 26, "ref 0"), ChatExample("hi", "ref 1"),
                             ChatExample("hello", "ref 2", meta={"keep": 1})])


def test_self_reference_marks_cut_answers_truncated():
    m = chain_model(n_ctx=32)
    ds = self_reference(m, _util_set(), batch_size=1)  # default cap 256, bounded by the context
    assert [e.response for e in ds] == ["ab", ANSWER, ANSWER]
    assert [e.truncated for e in ds] == [True, False, False] and ds.n_truncated == 1
    assert ds[2].meta == {"keep": 1, "truncated": False}
    # Tokenized: the cut answer ends without end-of-turn and still fits the context exactly.
    (batch,) = make_batches(m, ds, batch_size=3)
    eot = m.tokenizer.eos_token_id
    lengths = [n + len(e.response) + (not e.truncated) for n, e in zip(batch.prompt_lengths, ds)]
    assert lengths == [29 + 2, 5 + 6, 8 + 6] and max(lengths) == m.cfg.n_ctx - 1
    ends = [int(batch.tokens[i, n - 1]) == eot for i, n in enumerate(lengths)]
    assert ends == [False, True, True]
    small = self_reference(m, _util_set(), max_new_tokens=3, batch_size=1)
    assert [e.response for e in small] == ["ab", "abc", "abc"] and small.n_truncated == 3


def test_self_reference_cache_round_trips_the_flag(tmp_path, monkeypatch):
    m = chain_model(n_ctx=32)
    path = tmp_path / "selfref.jsonl"
    first = self_reference(m, _util_set(), batch_size=1, cache_path=path)
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert rows[0]["format"] == SELF_REFERENCE_FORMAT == 2 and rows[0]["n_truncated"] == 1
    assert [r["truncated"] for r in rows[1:]] == [True, False, False]

    class Generated(Exception):
        pass

    def no_generation(*args, **kwargs):
        raise Generated

    monkeypatch.setattr(generation, "generate", no_generation)
    again = self_reference(m, _util_set(), batch_size=1, cache_path=path)  # read, not generated
    assert [(e.response, e.truncated) for e in again] == [(e.response, e.truncated) for e in first]
    assert again.fingerprint() == first.fingerprint()
    monkeypatch.setattr(data, "SELF_REFERENCE_FORMAT", 3)  # a new format invalidates the file
    with pytest.raises(Generated):
        self_reference(m, _util_set(), batch_size=1, cache_path=path)


def test_self_reference_regenerates_a_v1_cache(tmp_path):
    m = chain_model(n_ctx=32)
    ds = _util_set()
    path = tmp_path / "selfref.jsonl"
    # A file as version 1 wrote it for this call: its key, 48-token answers, no truncated flag.
    v1_key = hashlib.sha256(json.dumps(["tiny", 48, ds.prompts]).encode()).hexdigest()[:16]
    path.write_text("\n".join([json.dumps({"key": v1_key})] +
                              [json.dumps({"response": "OLD"})] * 3) + "\n")
    out = self_reference(m, ds, max_new_tokens=48, batch_size=1, cache_path=path)
    assert [e.response for e in out] == ["ab", ANSWER, ANSWER]
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["response"] for r in rows[1:]] == ["ab", ANSWER, ANSWER]
    assert [r["truncated"] for r in rows[1:]] == [True, False, False]
