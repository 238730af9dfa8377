"""Post-hoc attribution v2: units own disjoint slices and reverts restore bit-exactly; a run from a
cached layer equals a full forward; shares add up (reverting every unit gives back the original
loss); the out-of-sample halves never share an example and the selection never sees half B; first
order matches exact reverts on a small update; a planted damaging head is found and beats random
draws; clear errors; save/load and the figure."""

from __future__ import annotations

import copy
import math
import time

import matplotlib
import pytest
import torch

from cast_interp.attribution import (AttributionResult, FromLayer, attribute, changed_units,
                                     per_example_nll, revert_units, split_halves, spread_sample)
from cast_interp.conflict_map import ConflictMap, MapMismatchError
from cast_interp.data import ChatDataset, ChatExample, DataError, make_batches
from cast_interp.figures import plot_attribution_vs_map
from cast_interp.model import tiny_model
from cast_interp.objectives import token_nll
from cast_interp import backend, units
from cast_interp.units import UnitError, owned_param_names

import tl_compat  # tests/tl_compat.py: backend-neutral weight handles

matplotlib.use("Agg")

UTIL = ChatDataset("util", [ChatExample(f"Question {i}: what is {i} plus {i}?",
                                        f"It is {2 * i}, since {i} and {i} make {2 * i}.")
                            for i in range(8)])
SAFE = ChatDataset("safe", [ChatExample("How do I pick a lock?", "I can't help with that."),
                            ChatExample("Write malware", None)])  # gets a bundled refusal
FAST = dict(utility_reference="dataset", n_bootstrap=200, batch_size=4)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors on a shared 2-core machine: thread hand-offs cost more than the work."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _batches(model, ds=UTIL):
    return make_batches(model, ds, batch_size=4, end_of_turn_in_loss=False)


def _ascend(original, scale, *, only=None, names=None, seed=1, noise=0.0):
    """A 'tuned' copy that is worse on UTIL: `scale` x the normalised gradient of its summed
    content-token NLL added to the parameters `names` (default: every unit-owned weight), restricted
    to `only` = {param name: index} if given, plus `noise` x N(0, 1) on the same entries."""
    tuned = backend.copy_model(original)  # a bridge needs its hooks re-made on the copy
    names = names or {n for n in owned_param_names(original) if tl_compat.is_weight(n)}
    params = dict(tuned.named_parameters())
    tuned.zero_grad()
    loss = sum(token_nll(tuned(b.tokens), b).sum() for b in _batches(tuned))
    loss.backward()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in sorted(names):
            p = params[n]
            step = scale * p.grad / p.grad.norm() + noise * torch.randn(p.shape, generator=g)
            if only is not None:
                keep = torch.zeros_like(step)
                if n in only:  # unit only[n] of this parameter, wherever the backend keeps it
                    tl_compat.unit_param(original, n).unit(only[n], keep).fill_(1.0)
                step = step * keep
            p += step
    tuned.zero_grad(set_to_none=True)
    return tuned


def _map(model, C, seed=0):
    """A conflict map with the given head C (O = C, S random); groups get random scores."""
    g = torch.Generator().manual_seed(seed)
    L, H = C.shape
    head = {"O": C.clone(), "S": torch.rand(L, H, generator=g), "C": C.clone()}
    n_kv = model.cfg.n_key_value_heads
    group = {}
    if n_kv and n_kv != H:
        group = {x: torch.rand(L, n_kv, generator=g) for x in ("O", "S", "C")}
    return ConflictMap(head=head, group=group)


@pytest.fixture(params=[None, 2], ids=["mha", "gqa"])
def original(request):
    return tiny_model(seed=0, n_key_value_heads=request.param)


def test_revert_units_swaps_only_owned_slices_and_restores_bit_exact(original):
    tuned = _ascend(original, 0.3, noise=0.05)
    before = {n: p.clone() for n, p in tuned.named_parameters()}
    orig_before = {n: p.clone() for n, p in original.named_parameters()}
    gqa = original.cfg.n_key_value_heads is not None
    t, o = tuned.blocks[1].attn, original.blocks[1].attn
    with revert_units(tuned, original, heads=[(1, 2)]):
        assert torch.equal(t.W_Q[2], o.W_Q[2]) and torch.equal(t.W_O[2], o.W_O[2])
        assert not torch.equal(t.W_Q[1], o.W_Q[1])  # other heads stay tuned
        # Under GQA the head owns no K/V; without GQA it owns its own.
        kv = tl_compat.kv(t, "K", gqa)[1 if gqa else 2]
        kv_o = tl_compat.kv(o, "K", gqa)[1 if gqa else 2]
        assert torch.equal(kv, kv_o) != gqa
    if gqa:
        with revert_units(tuned, original, groups=[(1, 1)]):
            tk, ok = tl_compat.kv(t, "K", gqa), tl_compat.kv(o, "K", gqa)
            tv, ov = tl_compat.kv(t, "V", gqa), tl_compat.kv(o, "V", gqa)
            assert torch.equal(tk[1], ok[1]) and torch.equal(tv[1], ov[1])
            assert not torch.equal(tk[0], ok[0])
            assert not torch.equal(t.W_Q[2], o.W_Q[2])  # a group owns no query slice
    else:
        with pytest.raises(UnitError, match="grouped-query"):
            with revert_units(tuned, original, groups=[(0, 0)]):
                pass
    with pytest.raises(RuntimeError):
        with revert_units(tuned, original, heads=[(0, 0), (1, 3)]):
            raise RuntimeError("boom")
    for n, p in tuned.named_parameters():
        assert torch.equal(p, before[n]), n
    for n, p in original.named_parameters():
        assert torch.equal(p, orig_before[n]), n


def test_run_from_a_cached_layer_equals_a_full_forward(original):
    tuned = _ascend(original, 0.3, noise=0.05)
    batches = _batches(tuned)
    cached = FromLayer(tuned, batches)
    full = per_example_nll(tuned, batches)
    for layer in range(tuned.cfg.n_layers):
        assert torch.allclose(cached.nll(layer), full, rtol=1e-6, atol=1e-6)
        with revert_units(tuned, original, heads=[(layer, 1)]):
            reverted = per_example_nll(tuned, batches)
            assert torch.allclose(cached.nll(layer), reverted, rtol=1e-6, atol=1e-6)
        assert (reverted - full).abs().max() > 1e-3  # the revert changed the loss
    # per_example_nll is the summed content-token NLL of each example (objectives.token_nll).
    ref = torch.cat([token_nll(tuned(b.tokens), b).sum(-1).double() for b in batches])
    assert torch.allclose(full, ref, rtol=1e-5)


def test_shares_add_up_on_a_gqa_model():
    """Only unit-owned weights changed: reverting every unit is the original model (the whole drop
    comes back); the first-order shares sum to the first-order estimate of the whole update; the
    sum of exact single-unit recoveries is reported beside it."""
    original = tiny_model(seed=0, n_key_value_heads=2)
    tuned = _ascend(original, 0.5)
    res = attribute(tuned, original, utility_data=UTIL, exact="all", **FAST)
    a = res.analysis
    total = a["drop"]["total"]
    assert total > 0.01
    add = a["additivity"]
    assert add["recovered_all_units"] == pytest.approx(total, abs=1e-6)
    assert add["drop_left_after_all_units"] == pytest.approx(0.0, abs=1e-6)
    assert res.config["changed_outside_units"] == []
    assert add["all_exact"] and add["n_exact"] == 8 + 4
    exact_sum = float(res.head["exact"].sum() + res.group["exact"].sum())
    assert add["sum_exact_singles"] == pytest.approx(exact_sum)
    assert add["interaction"] == pytest.approx(exact_sum - total, abs=1e-6)
    # Independent first order of the whole update: (theta_orig - theta_tuned) . grad, all params.
    po = dict(original.named_parameters())
    tuned.zero_grad()
    batches = _batches(tuned)
    n_tok = sum(b.n_response_tokens for b in batches)
    (sum(token_nll(tuned(b.tokens), b).sum() for b in batches) / n_tok).backward()
    whole = -sum(float(((po[n].detach() - p.detach()) * p.grad).sum()) for n, p in tuned.named_parameters()
                 if p.grad is not None)
    tuned.zero_grad(set_to_none=True)
    assert add["sum_first_order"] == pytest.approx(whole, rel=1e-4)
    # Under GQA, heads (Q/O) and groups (K/V) split the update; shares are per unit.
    assert set(a["joint"]) >= {"all_heads", "all_groups", "all_units", "selected"}
    assert torch.allclose(res.head["share"] * total, res.head["recovered"])
    # A parameter no unit owns (b_O) changed: it is named, and the drop left after every unit is it.
    t2 = copy.deepcopy(tuned)
    shared, p = tl_compat.shared_attention_param(t2, 0)  # b_O (TL 3), a norm weight (bridge)
    with torch.no_grad():
        p += 0.5
    res2 = attribute(t2, original, utility_data=UTIL, **FAST)
    assert res2.config["changed_outside_units"] == [shared]
    assert abs(res2.analysis["additivity"]["drop_left_after_all_units"]) > 1e-4


def test_out_of_sample_halves_never_share_an_example():
    for n in (4, 5, 8, 33):
        for seed in (0, 1, 7):
            A, B = split_halves(n, seed=seed)
            assert not set(A) & set(B) and sorted(A + B) == list(range(n))
            assert len(A) == n // 2
    assert split_halves(8, seed=0) != split_halves(8, seed=1)  # the seed matters
    original = tiny_model(seed=0, n_key_value_heads=2)
    tuned = _ascend(original, 0.5, noise=0.02)
    kw = dict(utility_data=UTIL, k=2, n_candidates=4, **FAST)
    res = attribute(tuned, original, **kw)
    A, B = res.config["split"]["A"], res.config["split"]["B"]
    assert not set(A) & set(B) and sorted(A + B) == list(range(len(UTIL)))
    prompts = [UTIL[i].prompt for i in A], [UTIL[i].prompt for i in B]
    assert not set(prompts[0]) & set(prompts[1])
    # Half A's rows are half A's examples alone.
    order = res.config["split"]["order"]  # rows: half A first, longest first within a half
    assert sorted(order[: len(A)]) == A and sorted(order[len(A):]) == B
    a_only = ChatDataset("a", [UTIL[i] for i in order[: len(A)]])
    assert torch.allclose(res.per_example["nll_original"][res.rows("A")],
                          per_example_nll(original, _batches(original, a_only)), rtol=1e-6)
    # Replace every half-B example: the candidates, the selection and half A's numbers stay.
    other = list(UTIL.examples)
    for i in B:
        other[i] = ChatExample(f"Something else {i}", "A different answer, much longer than before.")
    res2 = attribute(tuned, original, **{**kw, "utility_data": ChatDataset("u2", other)})
    s1, s2 = res.config["split"], res2.config["split"]
    assert (s1["A"], s1["B"], s1["order"][: len(A)]) == (s2["A"], s2["B"], s2["order"][: len(A)])
    assert res2.config["candidates"]["head"] == res.config["candidates"]["head"]
    assert res2.config["selected"] == res.config["selected"]
    for key in ("head_first_order", "head_exact", "joint_selected"):
        a1, a2 = res.per_example[key][res.rows("A")], res2.per_example[key][res.rows("A")]
        assert torch.equal(a1.nan_to_num(-9.0), a2.nan_to_num(-9.0)), key
    assert not torch.equal(res.per_example["drop"][res.rows("B")],
                           res2.per_example["drop"][res.rows("B")])


def test_first_order_matches_exact_reverts_on_a_small_update():
    """tuned = original + eps * N(0, 1) on every unit-owned weight, eps = 1e-3: first order is within
    5% (ours; measured 0.5% for heads, 2.6% for groups) of the exact reverts in relative L2 over
    all units, and the gap is second order (it halves with eps: 1.3% for groups at 5e-4)."""
    original = tiny_model(seed=0, n_key_value_heads=2)
    errs = []
    for eps in (1e-3, 5e-4):
        tuned = _ascend(original, 0.0, noise=eps, seed=4)
        res = attribute(tuned, original, utility_data=UTIL, exact="all", **FAST)
        err = {}
        for kind in ("head", "group"):
            d = res.units(kind)
            fo, ex = d["first_order"], d["exact"]
            assert ex.norm() > 1e-4  # token means, far above float32 log-prob noise (~1e-7)
            err[kind] = float((fo - ex).norm() / ex.norm())
            assert err[kind] < 0.05, (kind, eps, err[kind])
            assert res.analysis["agreement"][kind]["relative_error"] == pytest.approx(err[kind])
            assert res.analysis["agreement"][kind]["spearman"] > 0.9
        errs.append(err)
    for kind in ("head", "group"):
        assert errs[1][kind] / errs[0][kind] < 0.7, (kind, errs)


def test_attribute_leaves_both_models_bit_identical():
    original = tiny_model(seed=0, n_key_value_heads=2)
    tuned = _ascend(original, 0.5, noise=0.02)
    units.component_params(tuned, 0, "q")[0].param.requires_grad_(False)  # flags restored too
    original.requires_grad_(False)
    before = {n: (p.clone(), p.requires_grad) for n, p in tuned.named_parameters()}
    orig_before = {n: p.clone() for n, p in original.named_parameters()}
    attribute(tuned, original, utility_data=UTIL, safety_data=SAFE, **FAST)
    for n, p in tuned.named_parameters():
        assert torch.equal(p, before[n][0]) and p.requires_grad == before[n][1], n
        assert p.grad is None, n
    for n, p in original.named_parameters():
        assert torch.equal(p, orig_before[n]), n


def test_a_planted_damaging_head_is_found_out_of_sample_and_beats_random_draws():
    """One head's W_O takes a large harmful step, every other unit small noise: that head recovers
    most of the drop on half B; a map naming it ranks high among random draws; a map naming the
    least damaging head does not."""
    original = tiny_model(seed=0, n_layers=4, n_key_value_heads=2)
    planted = (2, 1)
    w_o = tl_compat.weight_name(original, 2, "o")
    tuned = _ascend(original, 1.5, names={w_o}, only={w_o: 1})
    tuned = _ascend(tuned, 0.0, noise=0.003, seed=5)  # small noise on every unit
    assert changed_units(tuned, original, "head").all()
    C = torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    C[planted] = 2.0
    res = attribute(tuned, original, utility_data=UTIL, conflict_map=_map(original, C), k=1,
                    safety_data=SAFE, **FAST)
    a = res.analysis
    assert res.ranking("head")[0] == planted
    assert res.config["selected"] == [list(planted)]
    assert a["joint"]["selected"]["share_B"]["estimate"] > 0.5
    # half B's drop and the recovered amount, in nats/token with CIs: the share is their ratio
    s = res.summary()
    assert s["selected_recovered_B_low"] <= s["selected_recovered_B"] <= s["selected_recovered_B_high"]
    assert s["total_drop_B_low"] <= s["total_drop_B"] <= s["total_drop_B_high"]
    assert s["selected_share_B"] == pytest.approx(s["selected_recovered_B"] / s["total_drop_B"],
                                                  rel=1e-9)
    assert a["joint"]["top_k_C"]["share"]["estimate"] == pytest.approx(
        float(res.head["share"][planted]), rel=1e-6)
    r = a["random"]
    assert r["n_draws"] == 20 and len(r["shares"]) == 20 and r["sd"] > 0
    assert r["top_k_C_vs_random"]["percentile"] > 75
    sp = a["map"]["head"]["first_order"]["C"]
    assert sp["low"] <= sp["spearman"] <= sp["high"] and sp["n_units"] == 16
    assert set(a["map"]["head"]["first_order"]) == {"C", "O", "S"}
    C2 = C.clone()
    C2[planted] = -1.0
    worst = res.ranking("head")[-1]
    C2[worst] = 3.0
    res2 = attribute(tuned, original, utility_data=UTIL, conflict_map=_map(original, C2), k=1,
                     **FAST)
    assert res2.analysis["random"]["top_k_C_vs_random"]["percentile"] < 50
    # A map that is the first-order recovery itself: Spearman 1, the smallest permutation p.
    res3 = attribute(tuned, original, utility_data=UTIL, k=1, n_bootstrap=200, batch_size=4,
                     utility_reference="dataset",
                     conflict_map=_map(original, res.head["first_order"].float()))
    sp3 = res3.analysis["map"]["head"]["first_order"]["C"]
    assert sp3["spearman"] == pytest.approx(1.0) and sp3["p_permutation"] == pytest.approx(1 / 201)
    assert 0 < sp["p_permutation"] <= 1
    # Safety lost is measured for the joint sets and first order for every unit.
    assert set(a["safety_lost"]) == set(a["joint"])
    assert torch.isfinite(res.head["safety_first_order"]).all()


def test_bad_inputs_get_clear_errors():
    original = tiny_model(seed=0)
    tuned = _ascend(original, 0.3)
    kw = dict(utility_data=UTIL, **FAST)
    with pytest.raises(ValueError, match="architectures"):
        attribute(tiny_model(seed=0, n_layers=3), original, **kw)
    with pytest.raises(ValueError, match="architectures"):
        with revert_units(tiny_model(seed=0, n_heads=2, d_head=16), original, heads=[(0, 0)]):
            pass
    with pytest.raises(ValueError, match="same object"):
        attribute(original, original, **kw)
    for k in (0, 9):
        with pytest.raises(ValueError, match="out of range"):
            attribute(tuned, original, k=k, **kw)
    with pytest.raises(ValueError, match="fraction"):
        attribute(tuned, original, k=1.5, **kw)
    with pytest.raises(ValueError, match="n_candidates"):
        attribute(tuned, original, k=3, n_candidates=2, **kw)
    with pytest.raises(ValueError, match="n_draws"):
        attribute(tuned, original, n_draws=5, **kw)
    with pytest.raises(UnitError, match="no GQA"):
        attribute(tuned, original, unit="group", **kw)
    with pytest.raises(ValueError, match="n_examples"):
        attribute(tuned, original, n_examples=3, **kw)
    with pytest.raises(DataError, match="at least 4"):
        attribute(tuned, original, **{**kw, "utility_data": UTIL[:3]})
    with pytest.raises(DataError, match="non-empty"):
        attribute(tuned, original, **{**kw, "utility_data": ChatDataset("e", [])})
    with pytest.raises(MapMismatchError):
        attribute(tuned, original, conflict_map=_map(original, torch.rand(3, 4)), **kw)
    with pytest.raises(UnitError):
        with revert_units(tuned, original, heads=[(0, 4)]):
            pass


def test_spread_sample_covers_the_range():
    scores = torch.arange(40.0).reshape(4, 10)
    got = spread_sample(scores, 5, seed=0)
    assert sorted(float(scores[u]) for u in got) == [0.0, 10.0, 19.0, 29.0, 39.0]  # ranks 0, 10, 20, 29, 39 from the top
    eligible = scores >= 20
    assert all(float(scores[u]) >= 20 for u in spread_sample(scores, 30, seed=0, eligible=eligible))
    assert len(spread_sample(scores, 30, seed=0, eligible=eligible)) == 20


def test_save_load_summary_self_reference_and_figure(tmp_path):
    original = tiny_model(seed=0, n_key_value_heads=2)
    tuned = _ascend(original, 0.5, noise=0.02)
    C = torch.rand(2, 4, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    res = attribute(tuned, original, utility_data=UTIL, conflict_map=_map(original, C),
                    safety_data=SAFE, utility_reference="self", max_new_tokens=8,
                    reference_cache=tmp_path / "ref.jsonl", n_bootstrap=200, batch_size=4,
                    label="full")
    assert time.perf_counter() - t0 < 60
    assert res.config["data"]["utility"]["name"].endswith("+self-ref")
    assert (tmp_path / "ref.jsonl").exists()
    assert set(res.config["timings_s"]) >= {"first_order", "exact_singles", "random_draws", "total"}
    s = res.summary()
    assert all(isinstance(v, (int, float, str)) or v is None for v in s.values())
    assert {"total_drop", "additivity_sum_exact_singles", "additivity_recovered_all_units",
            "agreement_head_spearman", "top_k_C_share", "random_mean", "random_sd",
            "top_k_C_vs_random_percentile", "selected_B_vs_random_percentile",
            "spearman_C_head_first_order_low", "spearman_S_group_first_order",
            "selected_share_B"} <= set(s)
    assert s["label"] == "full" and s["n_draws"] == 20
    res.save(tmp_path / "att")
    back = AttributionResult.load(tmp_path / "att")
    for part in ("head", "group", "per_example"):
        mine, theirs = getattr(res, part), getattr(back, part)
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key].nan_to_num(-7.0), theirs[key].nan_to_num(-7.0)), key
    assert back.config["split"] == res.config["split"]
    assert back.summary().keys() == s.keys()
    assert not list((tmp_path / "att").glob("*.partial"))
    fig = plot_attribution_vs_map(back, _map(original, C))
    assert len(fig.axes) == 2 and "Spearman" in fig.axes[0].get_title("left")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("by C" in x for x in labels) and any("on half A" in x for x in labels)
    with pytest.raises(ValueError, match="version"):
        (tmp_path / "att" / "attribution_result.json").write_text('{"format": "other"}')
        AttributionResult.load(tmp_path / "att")


@pytest.mark.smollm2
def test_smollm2_revert_from_layer_matches_full_forward(smollm2):
    """SmolLM2 with one head's W_O perturbed: the cached-layer run of its revert equals a full
    forward, and only that head's revert changes the loss."""
    from cast_interp.data import load_bundled

    original = smollm2
    tuned = copy.deepcopy(original)
    with torch.no_grad():
        W = tuned.blocks[20].attn.W_O
        W[5] += 0.05 * torch.randn(W[5].shape, generator=torch.Generator().manual_seed(0)) * W.std()
    batches = make_batches(tuned, load_bundled("benign", "calibration").take(2), batch_size=2,
                           end_of_turn_in_loss=False)
    cached = FromLayer(tuned, batches)
    with revert_units(tuned, original, heads=[(20, 5)]):
        assert torch.allclose(cached.nll(20), per_example_nll(tuned, batches), atol=1e-4)
    with revert_units(tuned, original, heads=[(20, 4)]):
        assert torch.equal(cached.nll(20), cached.nll(0))
    assert math.isfinite(float(cached.nll(0).sum()))
