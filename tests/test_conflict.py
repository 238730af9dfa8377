import math

import pytest
import torch

from cast_interp.conflict import (ConflictResult, ZeroGradientWarning, accumulate_gradients,
                                  optimization_conflict)
from cast_interp.data import ChatDataset, ChatExample, load_bundled, make_batches
from cast_interp.heads import COMPONENTS, component_param_names, kv_group, per_head_gradients
from cast_interp.model import tiny_model
from cast_interp.objectives import NonFiniteLossError, response_nll


@pytest.fixture
def gqa_model():
    return tiny_model(seed=1, n_key_value_heads=2)


def _data(n=8):
    return load_bundled("harmful", "calibration").take(n), load_bundled("benign", "calibration").take(n)


def _batches(model, n=8, batch_size=2):
    safe, util = _data(n)
    return (make_batches(model, safe, batch_size=batch_size),
            make_batches(model, util, batch_size=batch_size))


def _full_set_head_grad(model, ds, layer, head):
    """g(h) by torch.autograd.grad of the token-mean loss over the whole set as one batch."""
    [batch] = make_batches(model, ds, batch_size=len(ds))
    attn = model.blocks[layer].attn
    names = [(c, n) for c in COMPONENTS for n in component_param_names(model, c)]
    params = [getattr(attn, n) for _, n in names]
    loss = response_nll(model, batch, reduction="mean")
    grads = torch.autograd.grad(loss, params)
    parts = []
    for (c, _), g in zip(names, grads):
        idx = kv_group(model, head) if c in ("k", "v") else head
        parts.append(g[idx].flatten())
    return torch.cat(parts).double()


def test_conflict_matches_manual_cosine_for_one_head(gqa_model):
    safe, util = _data(8)
    sb, ub = _batches(gqa_model, 8, batch_size=3)  # uneven batches: 3, 3, 2
    res = optimization_conflict(gqa_model, sb, ub, n_bootstrap=0)
    for layer, head in [(0, 1), (1, 3)]:
        gs = _full_set_head_grad(gqa_model, safe, layer, head)
        gu = _full_set_head_grad(gqa_model, util, layer, head)
        cos = torch.dot(gs, gu) / (gs.norm() * gu.norm())
        assert res.O[layer, head].item() == pytest.approx(1 - cos.item(), abs=1e-5)
        assert res.dot[layer, head].item() == pytest.approx(torch.dot(gs, gu).item(), rel=1e-4)
        assert res.norms["safe"][layer, head].item() == pytest.approx(gs.norm().item(), rel=1e-5)
        assert res.norms["util"][layer, head].item() == pytest.approx(gu.norm().item(), rel=1e-5)
    assert ((res.O >= 0) & (res.O <= 2)).all()


def test_accumulated_gradient_equals_one_big_batch(gqa_model):
    safe, _ = _data(6)
    acc = accumulate_gradients(gqa_model, make_batches(gqa_model, safe, batch_size=4))  # 4 + 2
    [big] = make_batches(gqa_model, safe, batch_size=6)
    response_nll(gqa_model, big, reduction="mean").backward()
    ref = per_head_gradients(gqa_model)
    gqa_model.zero_grad(set_to_none=True)
    for c in COMPONENTS:
        assert acc[c].shape == ref[c].shape
        torch.testing.assert_close(acc[c], ref[c], rtol=1e-4, atol=1e-7)


def test_gradients_leave_model_state_as_it_was(gqa_model):
    gqa_model.embed.W_E.requires_grad_(False)
    sb, ub = _batches(gqa_model, 4)
    optimization_conflict(gqa_model, sb, ub, n_bootstrap=5)
    assert gqa_model.embed.W_E.requires_grad is False
    assert gqa_model.blocks[0].mlp.W_in.requires_grad is True
    assert all(p.grad is None for p in gqa_model.parameters())


def test_gqa_kv_parts_are_shared_within_a_group(gqa_model):
    sb, ub = _batches(gqa_model, 4)
    acc = accumulate_gradients(gqa_model, sb)
    res = optimization_conflict(gqa_model, sb, ub, n_bootstrap=0)
    for c in ("k", "v"):
        assert torch.equal(acc[c][:, 0], acc[c][:, 1]) and torch.equal(acc[c][:, 2], acc[c][:, 3])
        assert not torch.equal(acc[c][:, 0], acc[c][:, 2])
        assert torch.equal(res.component_O[c][:, 0], res.component_O[c][:, 1])
    assert not torch.equal(acc["q"][:, 0], acc["q"][:, 1])
    # per-group K/V conflict = 1 - cos over the group's concatenated K and V gradients
    accu = accumulate_gradients(gqa_model, ub)
    for l in range(2):
        for g, h in ((0, 0), (1, 2)):
            a = torch.cat([acc["k"][l, h], acc["v"][l, h]]).double()
            b = torch.cat([accu["k"][l, h], accu["v"][l, h]]).double()
            expected = 1 - torch.dot(a, b) / (a.norm() * b.norm())
            assert res.kv_group_O[l, g].item() == pytest.approx(expected.item(), abs=1e-5)
    assert res.kv_group_O.shape == (2, 2)


def test_zero_gradient_is_nan_with_a_warning_naming_the_head():
    model = tiny_model(seed=0)
    with torch.no_grad():  # head L1H2 cannot affect anything: no value, no output
        attn = model.blocks[1].attn
        attn.W_V[2].zero_(); attn.b_V[2].zero_(); attn.W_O[2].zero_()
    sb, ub = _batches(model, 4)
    with pytest.warns(ZeroGradientWarning, match="L1H2"):
        res = optimization_conflict(model, sb, ub, n_bootstrap=10)
    assert math.isnan(res.O[1, 2]) and res.norms["safe"][1, 2] == 0
    assert all(math.isnan(res.component_O[c][1, 2]) for c in COMPONENTS)
    assert math.isnan(res.ci_low[1, 2]) and math.isnan(res.ci_high[1, 2])
    mask = torch.ones_like(res.O, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.isfinite(res.O[mask]).all()


def test_nan_loss_names_objective_and_batch():
    model = tiny_model(seed=0)
    tilde = model.tokenizer.convert_tokens_to_ids("~")
    with torch.no_grad():
        model.embed.W_E[tilde] = float("nan")
    safe = load_bundled("harmful", "calibration").take(2)
    util = ChatDataset("u", [ChatExample("hello", "fine"), ChatExample("what is ~", "a tilde")])
    with pytest.raises(NonFiniteLossError, match="utility batch 1"):
        optimization_conflict(model, make_batches(model, safe, batch_size=1),
                              make_batches(model, util, batch_size=1), n_bootstrap=0)
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


def test_bootstrap_interval_properties(gqa_model):
    sb, ub = _batches(gqa_model, 8, batch_size=2)  # 4 batches per set
    res = optimization_conflict(gqa_model, sb, ub, n_bootstrap=200, seed=0)
    assert ((res.ci_low <= res.O + 1e-6) & (res.O <= res.ci_high + 1e-6)).all()
    width = (res.ci_high - res.ci_low).mean()
    assert width > 0
    # Same seed, same numbers.
    again = optimization_conflict(gqa_model, sb, ub, n_bootstrap=200, seed=0)
    assert torch.equal(res.ci_low, again.ci_low) and torch.equal(res.O, again.O)
    # Every batch twice: same point estimate, a resampled sum varies ~1/sqrt(2) as much.
    dup = optimization_conflict(gqa_model, sb + sb, ub + ub, n_bootstrap=200, seed=0)
    torch.testing.assert_close(dup.O, res.O, rtol=0, atol=1e-5)
    ratio = (dup.ci_high - dup.ci_low).mean() / width
    assert 0.5 < ratio < 0.9
    # Identical batches: every resample has the same direction, the interval collapses to O.
    same = optimization_conflict(gqa_model, [sb[0]] * 4, [ub[0]] * 4, n_bootstrap=50)
    torch.testing.assert_close(same.ci_low, same.O, rtol=0, atol=1e-5)
    torch.testing.assert_close(same.ci_high, same.O, rtol=0, atol=1e-5)
    for c in COMPONENTS:
        assert ((res.component_ci_low[c] <= res.component_O[c] + 1e-6)
                & (res.component_O[c] <= res.component_ci_high[c] + 1e-6)).all()


def test_result_to_dict_and_config(gqa_model):
    sb, ub = _batches(gqa_model, 4)
    res = optimization_conflict(gqa_model, sb, ub, n_bootstrap=0)
    assert isinstance(res, ConflictResult)
    d = res.to_dict()
    assert {"O", "dot", "ci_low", "kv_group_O", "component_O.q", "norms.util_o"} <= set(d)
    assert torch.isnan(res.ci_low).all()  # no bootstrap -> undefined, not a number
    cfg = d["config"]
    assert cfg["n_batches_safe"] == 2 and cfg["n_tokens_safe"] == sum(b.n_response_tokens for b in sb)
    assert cfg["kv_gradient"].startswith("group-shared")
    assert cfg["loss_safe"] > 0 and "gradients" in cfg["timings_s"]


@pytest.mark.smollm2
def test_smollm2_conflict_shapes_and_gqa(smollm2):
    safe, util = _data(4)
    sb = make_batches(smollm2, safe, batch_size=2)
    ub = make_batches(smollm2, util, batch_size=2)
    res = optimization_conflict(smollm2, sb, ub, n_bootstrap=20)
    assert res.O.shape == (30, 9) and res.kv_group_O.shape == (30, 3)
    assert torch.isfinite(res.O).all() and ((res.O >= 0) & (res.O <= 2)).all()
    for c in ("k", "v"):
        v = res.component_O[c]
        for g in range(3):
            assert torch.equal(v[:, 3 * g], v[:, 3 * g + 1]) and torch.equal(v[:, 3 * g], v[:, 3 * g + 2])
    assert (res.ci_low <= res.ci_high).all()
