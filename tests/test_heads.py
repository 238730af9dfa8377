import pytest
import torch

from cast_interp.heads import (
    HeadIndexError, head_param_count, head_param_masks, heads_from_selection, kv_group,
    per_head_gradients, rank_heads, validate_heads,
)
from cast_interp.model import tiny_model


def test_validate_heads_rejects_out_of_range_with_a_clear_message():
    m = tiny_model()
    assert validate_heads(m, [(1, 3), (0, 0), (1, 3)]) == [(0, 0), (1, 3)]
    with pytest.raises(HeadIndexError, match=r"2 layers x 4 heads"):
        validate_heads(m, [(2, 0)])
    with pytest.raises(HeadIndexError, match="pair"):
        validate_heads(m, ["x"])


def test_rank_heads_orders_by_score_ties_by_position_and_handles_nan():
    nan = float("nan")
    s = torch.tensor([[0.5, nan, 2.0], [0.5, -1.0, 2.0]])
    # Ties (2.0 at (0,2) and (1,2); 0.5 at (0,0) and (1,0)) keep (layer, head) order.
    assert rank_heads(s) == [(0, 2), (1, 2), (0, 0), (1, 0), (1, 1)]
    assert rank_heads(s, largest=False) == [(1, 1), (0, 0), (1, 0), (0, 2), (1, 2)]
    assert rank_heads(s, nan_last=True)[-1] == (0, 1)
    # The same order as a plain sort of the finite values (computed another way).
    flat = [(float(s[l, h]), l, h) for l in range(2) for h in range(3) if s[l, h] == s[l, h]]
    assert rank_heads(s) == [(l, h) for _, l, h in sorted(flat, key=lambda t: (-t[0], t[1], t[2]))]


def test_kv_group_matches_transformer_lens_repeat_interleave():
    """Head h reads K of group kv_group(h): a loss on head h's z has K-gradient in that group only."""
    m = tiny_model(n_key_value_heads=2)
    toks = torch.randint(0, 200, (2, 10))
    for h in range(4):
        m.zero_grad()
        store = {}

        def hook(z, hook):
            store["z"] = z
            return z

        m.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_z", hook)])
        store["z"][:, :, h].pow(2).sum().backward()
        g = m.blocks[0].attn._W_K.grad.abs().sum((1, 2))
        assert g[kv_group(m, h)] > 0
        assert g[1 - kv_group(m, h)] == 0


def test_per_head_gradients_shapes_and_shared_kv():
    m = tiny_model(n_key_value_heads=2)
    m(torch.randint(0, 200, (2, 8))).sum().backward()
    g = per_head_gradients(m)
    assert g["q"].shape == (2, 4, 32 * 8 + 8)
    assert g["o"].shape == (2, 4, 8 * 32)
    # heads 0 and 1 share group 0: identical K/V gradient vectors
    assert torch.equal(g["k"][:, 0], g["k"][:, 1])
    assert not torch.equal(g["k"][:, 1], g["k"][:, 2])
    assert torch.equal(g["q"][1, 2], torch.cat([m.blocks[1].attn.W_Q.grad[2].flatten(),
                                                m.blocks[1].attn.b_Q.grad[2]]))


def test_masks_kv_policy_any_vs_all():
    m = tiny_model(n_key_value_heads=2)
    any_ = head_param_masks(m, [(0, 0)], kv_policy="any")
    all_ = head_param_masks(m, [(0, 0)], kv_policy="all")
    assert any_["blocks.0.attn._W_K"][0].all() and not all_["blocks.0.attn._W_K"].any()
    assert any_["blocks.0.attn.W_Q"][0].all() and not any_["blocks.0.attn.W_Q"][1:].any()
    both = head_param_masks(m, [(0, 0), (0, 1)], kv_policy="all")
    assert both["blocks.0.attn._W_K"][0].all() and not both["blocks.0.attn._W_K"][1].any()
    # counts: Q (W+b) + O per head, plus one K/V group (W+b each)
    per_q, per_o, per_kv = 32 * 8 + 8, 8 * 32, 2 * (32 * 8 + 8)
    assert head_param_count(m, [(0, 0)], kv_policy="any") == per_q + per_o + per_kv
    assert head_param_count(m, [(0, 0)], kv_policy="all") == per_q + per_o


def test_heads_from_selection_counts_fractions_and_errors():
    m = tiny_model()
    ranking = [(1, 2), (0, 1), (0, 3), (1, 0)]
    assert heads_from_selection(m, 2, ranking) == [(0, 1), (1, 2)]
    assert heads_from_selection(m, 0.25, ranking) == [(0, 1), (1, 2)]
    assert heads_from_selection(m, [(1, 1)]) == [(1, 1)]
    with pytest.raises(HeadIndexError, match="out of range"):
        heads_from_selection(m, 9, ranking)
