import math

import pytest
import torch

from cast_interp.conflict import ConflictResult, ZeroGradientWarning, optimization_conflict
from cast_interp.data import ChatDataset, ChatExample, load_bundled, make_batches
from cast_interp.model import tiny_model
from cast_interp.objectives import NonFiniteLossError, response_nll
from cast_interp.units import component_params, unit_components


@pytest.fixture
def gqa_model():
    return tiny_model(seed=1, n_key_value_heads=2)


def _data(n=8):
    return load_bundled("harmful", "calibration").take(n), load_bundled("benign", "calibration").take(n)


def _batches(model, n=8, batch_size=2):
    safe, util = _data(n)
    kw = dict(batch_size=batch_size, max_length=400, end_of_turn_in_loss=False)
    return make_batches(model, safe, **kw), make_batches(model, util, **kw)


def _full_set_grad(model, ds, layer, index, kind):
    """g(u) by torch.autograd.grad of the token-mean loss over the whole set as one batch, over
    exactly the parameters the unit owns (an independent route from the per-example pass)."""
    [batch] = make_batches(model, ds, batch_size=len(ds), max_length=400, end_of_turn_in_loss=False)
    ps = [p for c in unit_components(model, kind) for p in component_params(model, layer, c)]
    grads = torch.autograd.grad(response_nll(model, batch), [p.param for p in ps])
    return torch.cat([p.unit(index, g).flatten() for p, g in zip(ps, grads)]).double()


def test_head_and_group_conflict_match_manual_cosine(gqa_model):
    safe, util = _data(6)
    sb, ub = _batches(gqa_model, 6, batch_size=4)  # uneven batches: 4, 2
    res = optimization_conflict(gqa_model, sb, ub, n_bootstrap=0)
    for kind, (layer, i) in (("head", (0, 1)), ("head", (1, 3)), ("group", (1, 0))):
        gs = _full_set_grad(gqa_model, safe, layer, i, kind)
        gu = _full_set_grad(gqa_model, util, layer, i, kind)
        cos = torch.dot(gs, gu) / (gs.norm() * gu.norm())
        d = res.units(kind)
        assert d["O"][layer, i].item() == pytest.approx(1 - cos.item(), abs=1e-5)
        assert d["dot"][layer, i].item() == pytest.approx(torch.dot(gs, gu).item(), rel=1e-4)
        assert d["norm_safe"][layer, i].item() == pytest.approx(gs.norm().item(), rel=1e-5)
    assert set(res.head) >= {"O_q", "O_o"} and "O_k" not in res.head  # a head owns Q/O only
    assert set(res.group) >= {"O_k", "O_v"} and "O_q" not in res.group
    assert res.group["O"].shape == (2, 2) and res.head["O"].shape == (2, 4)


def test_heads_of_one_group_get_their_own_conflict(gqa_model):
    """v1 copied the group's K/V gradient into each head; v2 heads differ within a group."""
    sb, ub = _batches(gqa_model, 6)
    O = optimization_conflict(gqa_model, sb, ub, n_bootstrap=0).O
    assert not torch.equal(O[:, 0], O[:, 1]) and not torch.equal(O[:, 2], O[:, 3])


def test_balanced_O_is_mean_of_component_cosines(gqa_model):
    sb, ub = _batches(gqa_model, 6)
    res = optimization_conflict(gqa_model, sb, ub, n_bootstrap=0)
    for d, comps in ((res.head, "qo"), (res.group, "kv")):
        cos = torch.stack([1 - d[f"O_{c}"] for c in comps]).mean(0)
        torch.testing.assert_close(d["O_balanced"], 1 - cos)


def test_gradients_leave_model_state_as_it_was(gqa_model):
    gqa_model.embed.W_E.requires_grad_(False)
    sb, ub = _batches(gqa_model, 4)
    optimization_conflict(gqa_model, sb, ub, n_bootstrap=5)
    assert gqa_model.embed.W_E.requires_grad is False
    assert gqa_model.blocks[0].mlp.W_in.requires_grad is True
    assert all(p.grad is None for p in gqa_model.parameters())


def test_zero_gradient_is_nan_with_a_warning_naming_the_head():
    model = tiny_model(seed=0)
    with torch.no_grad():  # head L1H2 cannot affect anything: no value, no output
        attn = model.blocks[1].attn
        attn.W_V[2].zero_(); attn.W_O[2].zero_()
    sb, ub = _batches(model, 4)
    with pytest.warns(ZeroGradientWarning, match="L1H2"):
        res = optimization_conflict(model, sb, ub, n_bootstrap=10)
    assert math.isnan(res.O[1, 2]) and res.head["norm_safe"][1, 2] == 0
    assert math.isnan(res.head["O_low"][1, 2]) and math.isnan(res.head["O_high"][1, 2])
    mask = torch.ones_like(res.O, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(res.O[mask]).all()


def test_nan_loss_names_objective_and_example():
    model = tiny_model(seed=0)
    tilde = model.tokenizer.convert_tokens_to_ids("~")
    with torch.no_grad():
        model.embed.W_E[tilde] = float("nan")
    safe = load_bundled("harmful", "calibration").take(2)
    util = ChatDataset("u", [ChatExample("hello", "fine"), ChatExample("what is ~", "a tilde")])
    with pytest.raises(NonFiniteLossError, match="utility example 1"):
        optimization_conflict(model, make_batches(model, safe, batch_size=1, max_length=400),
                              make_batches(model, util, batch_size=2), n_bootstrap=0)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_bad_batches_are_clear_errors(gqa_model):
    sb, ub = _batches(gqa_model, 2)
    with pytest.raises(ValueError, match="no batches"):
        optimization_conflict(gqa_model, [], ub)
    with pytest.raises(TypeError, match="list of ChatBatch"):
        optimization_conflict(gqa_model, sb[0], ub)
    with pytest.raises(ValueError, match="ci must be"):
        optimization_conflict(gqa_model, sb, ub, ci=1.5)
    one = make_batches(gqa_model, _data(1)[0], max_length=400)
    with pytest.raises(ValueError, match="at least 2"):
        optimization_conflict(gqa_model, one, ub, n_bootstrap=10)


def test_bootstrap_is_over_examples(gqa_model):
    sb, ub = _batches(gqa_model, 8, batch_size=4)  # 2 batches per set, 8 examples
    res = optimization_conflict(gqa_model, sb, ub, n_bootstrap=200, seed=0)
    width = (res.head["O_high"] - res.head["O_low"]).mean()
    assert width > 0 and res.head["O_boot"].shape == (200, 2, 4)
    # Same seed, same numbers; batching does not matter (the unit of resampling is the example).
    again = optimization_conflict(gqa_model, *_batches(gqa_model, 8, batch_size=1), n_bootstrap=200,
                                  seed=0)
    torch.testing.assert_close(again.head["O_low"], res.head["O_low"], rtol=0, atol=1e-5)
    torch.testing.assert_close(again.O, res.O, rtol=0, atol=1e-5)
    # Every example twice: same point estimate, a resampled sum varies ~1/sqrt(2) as much.
    dup = optimization_conflict(gqa_model, sb + sb, ub + ub, n_bootstrap=200, seed=0)
    torch.testing.assert_close(dup.O, res.O, rtol=0, atol=1e-5)
    ratio = (dup.head["O_high"] - dup.head["O_low"]).mean() / width
    assert 0.5 < ratio < 0.9
    # Identical examples: every resample has the same direction, the interval collapses to O.
    one = make_batches(gqa_model, _data(1)[0], max_length=400, end_of_turn_in_loss=False)
    one_u = make_batches(gqa_model, _data(1)[1], max_length=400, end_of_turn_in_loss=False)
    same = optimization_conflict(gqa_model, one * 4, one_u * 4, n_bootstrap=50)
    torch.testing.assert_close(same.head["O_low"], same.O, rtol=0, atol=1e-5)
    torch.testing.assert_close(same.head["O_high"], same.O, rtol=0, atol=1e-5)


def test_result_config(gqa_model):
    sb, ub = _batches(gqa_model, 4)
    res = optimization_conflict(gqa_model, sb, ub, n_bootstrap=0)
    assert isinstance(res, ConflictResult)
    assert torch.isnan(res.head["O_low"]).all()  # no bootstrap -> undefined, not a number
    cfg = res.config
    assert cfg["n_examples_safe"] == 4 and cfg["n_tokens_safe"] == sum(b.n_response_tokens for b in sb)
    assert cfg["bootstrap_unit"].startswith("calibration example")
    assert cfg["counts"]["head"]["n_units"] == 8 and cfg["counts"]["group"]["n_units"] == 4
    assert cfg["counts"]["head"]["n_O_above_1"] == int((res.O > 1).sum())


@pytest.mark.smollm2
def test_smollm2_conflict_shapes_and_gqa(smollm2):
    safe, util = _data(4)
    kw = dict(batch_size=2, end_of_turn_in_loss=False)
    res = optimization_conflict(smollm2, make_batches(smollm2, safe, **kw),
                                make_batches(smollm2, util, **kw), n_bootstrap=20)
    assert res.O.shape == (30, 9) and res.group["O"].shape == (30, 3)
    assert torch.isfinite(res.O).all() and ((res.O >= 0) & (res.O <= 2)).all()
    assert (res.head["O_low"] <= res.head["O_high"]).all()
