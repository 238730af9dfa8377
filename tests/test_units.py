"""What a unit owns (METHOD.md v2): counted independently from the configs' shapes."""

import pytest
import torch

from cast_interp import backend
from cast_interp.heads import HeadIndexError, rank_heads, validate_heads
from cast_interp.model import tiny_model
from cast_interp.units import (UnitError, absent_param_names, all_units, component_params,
                               group_heads, label, owned_param_names, unit_components, unit_masks,
                               unit_param_count, unit_slices, validate_units)


def test_gqa_head_owns_q_and_o_and_group_owns_k_and_v():
    m = tiny_model(n_key_value_heads=2)  # 4 heads x d_head 8, d_model 32, 2 groups
    d, dh = 32, 8
    assert unit_components(m, "head") == ("q", "o") and unit_components(m, "group") == ("k", "v")
    assert unit_param_count(m, heads=[(0, 1)]) == d * dh + dh * d  # W_Q[h] + W_O[h], no bias
    assert unit_param_count(m, groups=[(1, 0)]) == 2 * d * dh  # W_K[g] + W_V[g]
    assert group_heads(m, 1) == [2, 3]
    # Any k heads freeze the same number of parameters (shared K/V is nobody's head).
    same_group, two_groups = [(0, 0), (0, 1)], [(0, 0), (1, 3)]
    assert unit_param_count(m, heads=same_group) == unit_param_count(m, heads=two_groups)
    masks = unit_masks(m, heads=[(0, 1)])
    (q,), (k,) = component_params(m, 0, "q"), component_params(m, 0, "k")
    assert q.unit(1, masks[q.name]).all() and not q.unit(0, masks[q.name]).any()
    assert int(masks[q.name].sum()) == d * dh  # exactly head 1's slice, on either backend
    assert not masks[k.name].any()  # the group's K is not the head's


def test_without_gqa_a_head_owns_all_four_and_there_are_no_groups():
    m = tiny_model()
    assert unit_components(m, "head") == ("q", "k", "v", "o")
    assert unit_param_count(m, heads=[(1, 2)]) == 4 * 32 * 8
    with pytest.raises(UnitError, match="grouped-query"):
        all_units(m, "group")


def test_absent_biases_belong_to_no_unit():
    m = tiny_model(n_key_value_heads=2)  # Llama-style: TL 3 keeps zero b_Q/b_K/b_V
    owned, absent = owned_param_names(m), absent_param_names(m)
    if backend.USES_BRIDGE:  # the Hugging Face module has no bias parameters at all
        assert absent == set() and not any(n.endswith("bias") for n in owned)
    else:
        assert "blocks.0.attn.b_Q" in absent and "blocks.0.attn._b_K" in absent
        assert "blocks.0.attn.b_O" not in owned
    assert not owned & absent
    total = sum(p.numel() for n, p in m.named_parameters() if n in owned)
    assert total == unit_param_count(m, heads=all_units(m, "head"), groups=all_units(m, "group"))


def test_unit_slices_are_views_and_labels():
    m = tiny_model(n_key_value_heads=2)
    s = unit_slices(m, 1, 0, "group")
    (k,), (v,) = component_params(m, 1, "k"), component_params(m, 1, "v")
    assert set(s) == {k.name, v.name}
    with torch.no_grad():
        s[k.name].fill_(7.0)
    # TransformerLens's own per-group view sees it: group 0's keys, and only them.
    w_k = m.blocks[1].attn.W_K if backend.USES_BRIDGE else m.blocks[1].attn._W_K
    assert (w_k[0] == 7.0).all() and not (w_k[1] == 7.0).any()
    assert label((3, 2)) == "L3H2" and label((3, 1), "group") == "L3G1"


def test_validation_errors_are_clear():
    m = tiny_model(n_key_value_heads=2)
    with pytest.raises(UnitError, match="2 layers x 2 groups"):
        validate_units(m, [(0, 2)], "group")
    with pytest.raises(HeadIndexError, match=r"2 layers x 4 heads"):  # one error class for both
        validate_heads(m, [(2, 0)])
    assert validate_heads(m, [(1, 3), (0, 0), (1, 3)]) == [(0, 0), (1, 3)]


def test_rank_heads_orders_by_score_and_handles_nan():
    nan = float("nan")
    s = torch.tensor([[0.5, nan, 2.0], [0.5, -1.0, 2.0]])
    flat = [(float(s[l, h]), l, h) for l in range(2) for h in range(3) if s[l, h] == s[l, h]]
    assert rank_heads(s) == [(l, h) for _, l, h in sorted(flat, key=lambda t: (-t[0], t[1], t[2]))]
    assert rank_heads(s, nan_last=True)[-1] == (0, 1)
