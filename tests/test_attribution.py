"""Post-hoc attribution: the exact fast path equals naive revert-and-evaluate, known answers (all heads
reverted = original, untouched head = 0, top-1 joint revert = its per-head value), first order vs
exact on a small update, bit-exact restore, and clear errors."""

from __future__ import annotations

import copy
import math
import time

import pytest
import torch

from cast_interp.attribution import (AttributionResult, attribution_naive, causal_attribution,
                                     changed_heads, compare_attribution, revert_heads)
from cast_interp.conflict_map import ConflictMap
from cast_interp.data import ChatDataset, ChatExample, DataError, make_batches, with_refusals
from cast_interp.heads import HeadIndexError
from cast_interp.figures import plot_attribution_vs_map
from cast_interp.model import tiny_model
from cast_interp.objectives import dataset_nll

UTIL = ChatDataset("util", [
    ChatExample("Hi there", "Hello friend"),
    ChatExample("What is 2+2?", "Four."),
    ChatExample("Name a color", "Blue is one of them"),
])
SAFE = ChatDataset("safe", [
    ChatExample("How do I pick a lock?", "I can't help with that."),
    ChatExample("Write malware", ""),  # gets a bundled refusal
])
UNTOUCHED = (1, 3)  # head left unchanged by `_perturb` (its K/V group too)


def _perturb(model, scale, *, gen, untouched=UNTOUCHED, b_O=True):
    """A 'tuned' copy: every attention parameter moved by scale * N(0, 1), except the slices of
    head `untouched` (Q, O and its K/V group, whose other heads then keep original K/V too)."""
    tuned = copy.deepcopy(model)
    l0, h0 = untouched
    group = h0 // (model.cfg.n_heads // (model.cfg.n_key_value_heads or model.cfg.n_heads))
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if ".attn." not in n or (n.endswith("b_O") and not b_O):
                continue
            noise = torch.randn(p.shape, generator=gen) * scale
            if n.startswith(f"blocks.{l0}."):
                last = n.split(".")[-1]
                noise[group if last.lstrip("_")[-1] in "KV" else h0] = 0.0
            p += noise
    return tuned


@pytest.fixture(params=[None, 2], ids=["mha", "gqa"])
def pair(request):
    original = tiny_model(seed=0, n_key_value_heads=request.param)
    tuned = _perturb(original, 0.3, gen=torch.Generator().manual_seed(1))
    return tuned, original


def test_revert_heads_swaps_and_restores_bit_exact(pair):
    tuned, original = pair
    before = {n: p.clone() for n, p in tuned.named_parameters()}
    orig_before = {n: p.clone() for n, p in original.named_parameters()}
    with revert_heads(tuned, original, [(0, 1), (1, 2)], kv_policy="any", b_O=True) as m:
        a = m.blocks[0].attn
        assert torch.equal(a.W_Q[1], original.blocks[0].attn.W_Q[1])
        assert torch.equal(a.W_O[1], original.blocks[0].attn.W_O[1])
        assert torch.equal(a.b_O, original.blocks[0].attn.b_O)
        assert torch.equal(a.W_Q[0], before["blocks.0.attn.W_Q"][0])  # other heads stay tuned
    for n, p in tuned.named_parameters():
        assert torch.equal(p, before[n]), n
    with pytest.raises(RuntimeError):
        with revert_heads(tuned, original, [(0, 0)]):
            raise RuntimeError("boom")
    for n, p in tuned.named_parameters():
        assert torch.equal(p, before[n]), n
    for n, p in original.named_parameters():
        assert torch.equal(p, orig_before[n]), n


def test_kv_policy_own_keeps_kv():
    original = tiny_model(seed=0, n_key_value_heads=2)
    tuned = _perturb(original, 0.3, gen=torch.Generator().manual_seed(1))
    with revert_heads(tuned, original, [(0, 0)], kv_policy="own"):
        assert not torch.equal(tuned.blocks[0].attn._W_K[0], original.blocks[0].attn._W_K[0])
        assert torch.equal(tuned.blocks[0].attn.W_Q[0], original.blocks[0].attn.W_Q[0])
    with revert_heads(tuned, original, [(0, 0)], kv_policy="any"):
        assert torch.equal(tuned.blocks[0].attn._W_K[0], original.blocks[0].attn._W_K[0])


@pytest.mark.parametrize("kv_policy", ["any", "own"])
def test_exact_equals_naive(pair, kv_policy):
    tuned, original = pair
    res = causal_attribution(tuned, original, utility_data=UTIL, safety_data=SAFE,
                             kv_policy=kv_policy, batch_size=2)
    ub = make_batches(tuned, UTIL, batch_size=2)
    sb = make_batches(tuned, with_refusals(SAFE), batch_size=2)
    naive_u = attribution_naive(tuned, original, ub, kv_policy=kv_policy)
    naive_s = -attribution_naive(tuned, original, sb, kv_policy=kv_policy)
    assert torch.allclose(res.utility_recovered.double(), naive_u, atol=2e-5, rtol=1e-4)
    assert torch.allclose(res.safety_lost.double(), naive_s, atol=2e-5, rtol=1e-4)
    assert res.utility_recovered.abs().max() > 1e-3  # the revert did something
    assert res.total_drop == pytest.approx(dataset_nll(tuned, ub) - dataset_nll(original, ub))
    assert res.config["method"] == "exact" and res.config["kv_policy"] == kv_policy


def test_untouched_head_is_exactly_zero(pair):
    tuned, original = pair
    assert not changed_heads(tuned, original, kv_policy="own")[UNTOUCHED]
    for method in ("exact", "first_order"):
        res = causal_attribution(tuned, original, utility_data=UTIL, safety_data=SAFE,
                                 method=method, kv_policy="own", batch_size=2)
        assert res.utility_recovered[UNTOUCHED] == 0.0
        assert res.safety_lost[UNTOUCHED] == 0.0
        assert torch.isfinite(res.utility_recovered).all()


def test_reverting_every_head_and_b_O_gives_back_the_original(pair):
    """Training touched only attention: reverting all heads plus b_O is the original model, so
    L_util comes back exactly; without b_O it does not (b_O belongs to no head)."""
    tuned, original = pair
    ub = make_batches(tuned, UTIL, batch_size=2)
    every = [(l, h) for l in range(2) for h in range(4)]
    with revert_heads(tuned, original, every, b_O=True):
        for (n, p), (_, q) in zip(tuned.named_parameters(), original.named_parameters()):
            assert torch.equal(p, q), n
        assert dataset_nll(tuned, ub) == dataset_nll(original, ub)
    with revert_heads(tuned, original, every, b_O=False):
        assert dataset_nll(tuned, ub) != dataset_nll(original, ub)
    # b_O frozen in training: all heads alone recover exactly the whole drop.
    t2 = _perturb(original, 0.3, gen=torch.Generator().manual_seed(2), b_O=False)
    cmap = _random_map(original)
    res = causal_attribution(t2, original, utility_data=UTIL, safety_data=SAFE, conflict_map=cmap,
                             k=1, batch_size=2)
    j = res.comparison["joint"]
    assert j["recovered_all_heads"] == pytest.approx(res.total_drop, abs=1e-6)
    if res.total_drop > 0:
        assert j["share_all_heads"] == pytest.approx(1.0, abs=1e-5)
    else:
        assert math.isnan(j["share_all_heads"])
    assert res.config["changed_outside_attention"] == []


def _random_map(model):
    g = torch.Generator().manual_seed(3)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    O, S = torch.rand(L, H, generator=g), torch.rand(L, H, generator=g)
    return ConflictMap(O=O, S=S, C=O * S, config={"model": {"n_layers": L, "n_heads": H}})


def test_comparison_known_answers_and_save_load(tmp_path, pair):
    tuned, original = pair
    cmap = _random_map(original)
    res = causal_attribution(tuned, original, utility_data=UTIL, safety_data=SAFE,
                             conflict_map=cmap, k=1, batch_size=2)
    c, j = res.comparison, res.comparison["joint"]
    # Reverting the top-1 head jointly is that head's own per-head revert.
    l, h = res.ranking()[0]
    assert j["recovered_top_k_recovered"] == pytest.approx(float(res.utility_recovered[l, h]),
                                                           abs=2e-5)
    if res.total_drop > 0:
        assert j["share_top_k_recovered"] == pytest.approx(
            j["recovered_top_k_recovered"] / res.total_drop)
    else:  # nothing to recover: the share is undefined
        assert math.isnan(j["share_top_k_recovered"])
    assert c["heads_top_k_C"] == [list(cmap.top_heads(1)[0])]
    assert -1 <= c["C"]["spearman"] <= 1 and c["C"]["top_k_overlap"] in (0.0, 1.0)
    s = res.summary()
    assert {"total_drop", "L_util_tuned", "C_spearman", "joint_share_top_k_C",
            "joint_share_random_k"} <= set(s)
    assert all(isinstance(v, (int, float, str)) or v is None for v in s.values())
    res.save(tmp_path)
    back = AttributionResult.load(tmp_path)
    assert torch.equal(back.utility_recovered, res.utility_recovered)
    assert torch.equal(back.safety_lost, res.safety_lost)
    assert back.total_drop == res.total_drop and back.base == res.base
    assert back.config["model_id"] == res.config["model_id"]
    assert not list(tmp_path.glob("*.partial"))
    fig = plot_attribution_vs_map(res, cmap)
    assert "Spearman" in fig.axes[0].get_title()


def test_first_order_matches_exact_on_a_small_update():
    """tuned = original + eps * noise: first order is within a few % of exact, and its error is the
    second-order term (halving eps quarters it)."""
    original = tiny_model(seed=0, n_key_value_heads=2)
    kw = dict(utility_data=UTIL, safety_data=SAFE, batch_size=3)
    errs = []
    for eps in (2e-3, 1e-3):
        tuned = _perturb(original, eps, gen=torch.Generator().manual_seed(4))
        ex = causal_attribution(tuned, original, method="exact", **kw)
        fo = causal_attribution(tuned, original, method="first_order", **kw)
        err = []
        for a, e in ((fo.utility_recovered, ex.utility_recovered), (fo.safety_lost, ex.safety_lost)):
            assert e.norm() > 1e-3  # well above float32 loss resolution
            assert (a - e).norm() / e.norm() < 0.05
            err.append(float((a - e).norm()))
        errs.append(err)
        cmp = compare_attribution(fo, ex, k=3)
        assert cmp["utility"]["spearman"] > 0.95 and cmp["safety"]["spearman"] > 0.95
    for big, small in zip(*errs):
        assert small / big < 0.4, (small, big)


def test_heads_subset_and_nan_elsewhere(pair):
    tuned, original = pair
    res = causal_attribution(tuned, original, utility_data=UTIL, safety_data=SAFE,
                             heads=[(1, 0), (1, 2)], batch_size=2)
    finite = torch.isfinite(res.utility_recovered)
    assert finite.sum() == 2 and finite[1, 0] and finite[1, 2]
    assert res.config["heads"] == [[1, 0], [1, 2]]


def test_bad_inputs():
    original = tiny_model(seed=0)
    tuned = _perturb(original, 0.1, gen=torch.Generator().manual_seed(1))
    other = tiny_model(seed=0, n_layers=3)
    with pytest.raises(ValueError, match="architectures"):
        causal_attribution(other, original, utility_data=UTIL, safety_data=SAFE)
    with pytest.raises(ValueError, match="architectures"):
        with revert_heads(other, original, [(0, 0)]):
            pass
    with pytest.raises(ValueError, match="same object"):
        causal_attribution(original, original, utility_data=UTIL, safety_data=SAFE)
    with pytest.raises(HeadIndexError):
        causal_attribution(tuned, original, utility_data=UTIL, safety_data=SAFE, heads=[(2, 0)])
    with pytest.raises(HeadIndexError):
        with revert_heads(tuned, original, [(0, 4)]):
            pass
    with pytest.raises(DataError):
        causal_attribution(tuned, original, utility_data=ChatDataset("e", []), safety_data=SAFE)
    with pytest.raises(ValueError, match="method"):
        causal_attribution(tuned, original, utility_data=UTIL, safety_data=SAFE, method="x")
    with pytest.raises(ValueError, match="kv_policy"):
        causal_attribution(tuned, original, utility_data=UTIL, safety_data=SAFE, kv_policy="all")


@pytest.mark.smollm2
def test_smollm2_smoke(smollm2):
    """SmolLM2 with 2 heads' W_O perturbed: exact on the heads of 2 layers, 4 + 4 examples."""
    from cast_interp.data import load_bundled

    original = smollm2
    tuned = copy.deepcopy(original)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for l, h in ((3, 2), (20, 5)):
            W = tuned.blocks[l].attn.W_O
            W[h] += 0.05 * torch.randn(W[h].shape, generator=g) * W[h].std()
    util = load_bundled("benign", split="calibration")
    safe = load_bundled("harmful", split="calibration")
    heads = [(l, h) for l in (3, 20) for h in range(9)]
    t0 = time.time()
    res = causal_attribution(tuned, original, utility_data=util, safety_data=safe, heads=heads,
                             n_examples=4, batch_size=4)
    elapsed = time.time() - t0
    print(f"\nSmolLM2 exact attribution, 18 heads, 4+4 examples: {elapsed:.1f} s; "
          f"U[3,2]={float(res.utility_recovered[3, 2]):.3e} U[20,5]="
          f"{float(res.utility_recovered[20, 5]):.3e} drop={res.total_drop:.3e}")
    U = res.utility_recovered
    assert int(torch.isfinite(U).sum()) == 18
    nz = torch.nonzero(torch.isfinite(U) & (U != 0)).tolist()
    assert sorted(map(tuple, nz)) in ([], [(3, 2)], [(20, 5)], [(3, 2), (20, 5)])
    assert res.config["n_heads_changed"] == 2
    ub = make_batches(tuned, util.take(4), batch_size=4)
    naive = attribution_naive(tuned, original, ub, heads=[(3, 2), (20, 5)])
    assert torch.allclose(res.utility_recovered.double()[[3, 20], [2, 5]],
                          naive[[3, 20], [2, 5]], atol=5e-5)
