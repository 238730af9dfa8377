import json
import math

import pytest
import torch

from cast_interp.conflict import optimization_conflict
from cast_interp.conflict_map import (ConflictMap, MapMismatchError, combine, gini, minmax,
                                      percentile_rank)
from cast_interp.data import load_bundled, make_batches
from cast_interp.heads import HeadIndexError
from cast_interp.model import model_id, tiny_model
from cast_interp.objectives import dataset_nll

NAN = float("nan")
O4 = torch.tensor([[0.5, 1.0], [1.5, 2.0]])
S4 = torch.tensor([[-1.0, 0.0], [1.0, 3.0]])


def _map(O, S, C=None, **kw):
    C = combine(O, S) if C is None else C
    return ConflictMap(head={"O": O.float(), "S": S.float(), "C": C.float()}, **kw)


# -- combine -----------------------------------------------------------------------------------------


def test_combine_known_answers():
    # minmax(O) = [0, 1/3, 2/3, 1]; S clipped at 0 = [0, 0, 1, 3] -> minmax [0, 0, 1/3, 1]
    torch.testing.assert_close(combine(O4, S4, how="product"),
                               torch.tensor([[0.0, 0.0], [2 / 9, 1.0]]))
    # percentile ranks: O [1, 2, 3, 4]/4; clipped S ties averaged [1.5, 1.5, 3, 4]/4
    torch.testing.assert_close(combine(O4, S4, how="rank_product"),
                               torch.tensor([[0.09375, 0.1875], [0.5625, 1.0]]))
    torch.testing.assert_close(combine(O4, S4, how="weighted_sum", alpha=0.25),
                               torch.tensor([[0.0, 1 / 12], [5 / 12, 1.0]]))
    dot = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    torch.testing.assert_close(combine(O4, S4, how="first_order_harm", dot=dot), -dot)


def test_combine_nan_and_constant_inputs():
    O = torch.tensor([[NAN, 1.0], [1.5, 2.0]])
    C = combine(O, S4, how="product")
    assert math.isnan(C[0, 0])
    # NaN is ignored by the scaling: minmax over the finite O [1, 1.5, 2]
    torch.testing.assert_close(C[1], torch.tensor([0.5 * (1 / 3), 1.0]))
    S_nan = S4.clone()
    S_nan[1, 0] = NAN
    assert math.isnan(combine(O4, S_nan, how="product")[1, 0]) and math.isnan(combine(O4, S_nan, how="rank_product")[1, 0])
    # A constant factor carries no ranking: it maps to 1, C ranks by the other factor.
    torch.testing.assert_close(minmax(torch.full((2, 2), 0.7)), torch.ones(2, 2, dtype=torch.float64))
    torch.testing.assert_close(combine(torch.full((2, 2), 1.2), S4, how="product"),
                               minmax(S4.clamp_min(0)).float())
    assert torch.isnan(minmax(torch.full((2,), NAN))).all()
    torch.testing.assert_close(percentile_rank(torch.tensor([3.0, 1.0, NAN])),
                               torch.tensor([1.0, 0.5, NAN], dtype=torch.float64), equal_nan=True)


def test_combine_bad_options():
    with pytest.raises(ValueError, match="Unknown combination"):
        combine(O4, S4, how="max")
    with pytest.raises(ValueError, match="needs the gradient dot"):
        combine(O4, S4, how="first_order_harm")
    with pytest.raises(ValueError, match="alpha"):
        combine(O4, S4, how="weighted_sum", alpha=1.5)
    with pytest.raises(HeadIndexError, match="same"):
        combine(O4, torch.zeros(3, 2))


# -- selection ---------------------------------------------------------------------------------------


def test_top_heads_order_nan_and_errors():
    O = torch.tensor([[0.1, 0.9, NAN], [0.5, 0.9, 0.3]])
    S = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, NAN]])
    m = _map(O, S, C=O.clone())
    assert set(m.top_heads(2, by="C")) == {(0, 1), (1, 1)} and m.top_heads(3)[2] == (1, 0)
    assert m.top_heads(2, by="C", largest=False) == [(0, 0), (1, 2)]
    assert m.top_heads(5)[2:] == [(1, 0), (1, 2), (0, 0)]  # NaN never selected
    assert m.top_heads(1, by="S") == [(1, 1)]
    assert m.top_heads(0) == []
    assert m.top_heads(0.5) == m.top_heads(3)  # fraction of all 6 heads
    assert len(m.top_heads(0.01)) == 1  # a positive fraction names at least one head
    assert m.ranking()[-1] == (0, 2) and m.ranking(largest=False)[-1] == (0, 2)
    with pytest.raises(HeadIndexError, match="only 5 of 6"):
        m.top_heads(6)
    with pytest.raises(HeadIndexError, match="out of range"):
        m.top_heads(7)
    with pytest.raises(HeadIndexError, match="fraction"):
        m.top_heads(1.5)
    with pytest.raises(TypeError):
        m.top_heads(True)
    with pytest.raises(ValueError, match="by must be"):
        m.top_heads(1, by="X")


def test_ties_are_broken_by_a_seeded_order_not_by_layer():
    """v1 broke ties by (layer, head), so "bottom-k" of a map with many C = 0 was layers 0-6."""
    flat = torch.zeros(6, 5)  # every head tied
    firsts = set()
    for seed in range(10):
        m = _map(flat, flat, C=flat, config={"combine": {"tie_break_seed": seed}})
        top = m.top_heads(5)
        assert top == m.top_heads(5)  # deterministic for a seed
        firsts.add(tuple(top))
        assert top != [(0, h) for h in range(5)] or seed > 0  # not layer order (seed 0 checked)
    assert len(firsts) >= 9  # different seeds, different orders
    bottom = _map(flat, flat, C=flat).top_heads(5, largest=False)
    assert sorted(l for l, _ in bottom) != [0] * 5


def test_map_rejects_mismatched_shapes():
    with pytest.raises(HeadIndexError, match="S has shape"):
        ConflictMap(head={"O": torch.zeros(2, 3), "S": torch.zeros(3, 2), "C": torch.zeros(2, 3)})


# -- concentration -----------------------------------------------------------------------------------


def test_concentration_beside_its_null():
    """A planted concentrated C beats the permutation null; C from unrelated noise does not."""
    from cast_interp.conflict_map import summarize

    g = torch.Generator().manual_seed(0)
    O, S = torch.rand(10, 10, generator=g), torch.rand(10, 10, generator=g)
    O.view(-1)[:5] += 5.0
    S.view(-1)[:5] += 5.0  # five units high in both: C (a product) piles up on them
    planted = summarize({"O": O, "S": S, "C": combine(O, S, how="product")}, how="product",
                        alpha=0.5, seed=0)["concentration"]["C"]
    assert planted["concentrated"] and planted["top10_share"] > planted["null"]["top10_share"]["null_high"]
    O2, S2 = torch.rand(10, 10, generator=g), torch.rand(10, 10, generator=g)
    noise = summarize({"O": O2, "S": S2, "C": combine(O2, S2)}, how="rank_product", alpha=0.5,
                      seed=0)["concentration"]["C"]
    assert noise["concentrated"] is False
    lo, hi = noise["null"]["gini"]["null_low"], noise["null"]["gini"]["null_high"]
    assert lo <= noise["gini"] <= hi
    assert gini(torch.tensor([1.0, 3.0])) == pytest.approx(0.25)  # sum|xi-xj| / (2 n^2 mean)


def test_noise_null_of_equal_units_is_centred_on_the_mean():
    from cast_interp.conflict_map import noise_null

    v = torch.tensor([[1.0, 2.0, 3.0]])
    boot = v[None] + torch.tensor([[[0.1, -0.1, 0.0]]])
    torch.testing.assert_close(torch.as_tensor(noise_null(v, boot)),
                               torch.tensor([[2.1, 1.9, 2.0]], dtype=torch.float64))


# -- on a real (tiny) model --------------------------------------------------------------------------


def _zero_ablation_S(model, batches):
    """S by hand: one full forward per head with its z zeroed (the naive definition)."""
    base = dataset_nll(model, batches)
    S = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for l in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            def hook(z, hook, h=h):
                z[:, :, h] = 0.0
                return z
            with model.hooks(fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook)]):
                S[l, h] = dataset_nll(model, batches) - base
    return S


@pytest.fixture
def real_map():
    model = tiny_model(seed=2, n_key_value_heads=2)
    safe = make_batches(model, load_bundled("harmful", "calibration").take(6), batch_size=2)
    util = make_batches(model, load_bundled("benign", "calibration").take(6), batch_size=2)
    res = optimization_conflict(model, safe, util, n_bootstrap=30)
    S = _zero_ablation_S(model, util)
    S_group = torch.zeros(2, 2)  # the map needs group S under GQA; a known value here
    cmap = ConflictMap.from_results(res, S, S_group, config={"model": model_id(model), "seeds": {"b": 0}})
    return model, res, S, cmap


def test_from_results_combines_and_keeps_everything(real_map):
    model, res, S, cmap = real_map
    torch.testing.assert_close(cmap.C, combine(res.O, S))
    assert cmap.top_heads(1) == [divmod(int(torch.argmax(cmap.C)), 4)]
    assert set(cmap.components) == {"q", "o"} and "norm_safe_o" in cmap.head  # heads own Q/O
    assert set(cmap.units("group")) >= {"O", "S", "C", "O_k", "O_v"}
    assert cmap.config["combine"]["how"] == "rank_product"
    assert cmap.config["conflict"]["n_bootstrap"] == 30
    sm = cmap.summary["head"]
    assert sm["spearman_C_O"] == pytest.approx(__import__("scipy").stats.spearmanr(
        cmap.C.flatten(), cmap.O.flatten()).statistic)
    assert {"C", "O", "S"} == set(sm["concentration"]) and sm["n_O_above_1"] == int((res.O > 1).sum())
    assert cmap.concentration(by="O")["null"] is not None  # from the O bootstrap
    harm = cmap.recombine(how="first_order_harm")
    torch.testing.assert_close(harm.C, -res.dot)
    assert harm.config["combine"]["how"] == "first_order_harm"
    assert cmap.config["combine"]["how"] == "rank_product"  # the original is unchanged
    assert "L" in repr(cmap)


def test_dataframe_has_one_row_per_head(real_map):
    _, res, S, cmap = real_map
    df = cmap.to_dataframe()
    assert len(df) == 8
    assert {"layer", "head", "kv_group", "O", "S", "C", "rank_C", "O_q", "norm_safe", "O_low",
            "O_high", "dot"} <= set(df.columns)
    row = df[(df["layer"] == 1) & (df["head"] == 3)].iloc[0]
    assert row.O == pytest.approx(float(res.O[1, 3])) and row.S == pytest.approx(float(S[1, 3]))
    assert row.kv_group == 1
    assert sorted(df.rank_C) == list(range(1, 9))
    groups = cmap.to_dataframe("group")
    assert len(groups) == 4 and groups.O.tolist() == pytest.approx(res.group["O"].flatten().tolist())


def test_save_load_round_trip_is_exact(real_map, tmp_path):
    _, _, _, cmap = real_map
    cmap.head["O"][0, 0] = NAN  # NaN must survive too
    cmap.head["C"][0, 0] = NAN
    cmap.save(tmp_path / "map")
    assert sorted(p.name for p in (tmp_path / "map").iterdir()) == ["conflict_map.json",
                                                                    "conflict_map.safetensors"]
    back = ConflictMap.load(tmp_path / "map")
    a, b = cmap._tensors(), back._tensors()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert back.config == json.loads(json.dumps(cmap.config))
    assert back.summary["head"]["spearman_C_S"] == pytest.approx(cmap.summary["head"]["spearman_C_S"])
    assert back.top_heads(3) == cmap.top_heads(3)
    with pytest.raises(FileNotFoundError, match="not a saved ConflictMap"):
        ConflictMap.load(tmp_path / "nothing")


def test_check_model_rejects_another_model(real_map):
    model, _, _, cmap = real_map
    cmap.check_model(model)
    with pytest.raises(MapMismatchError, match="3 x 4"):
        cmap.check_model(tiny_model(n_layers=3))
    other = tiny_model(seed=2, n_key_value_heads=2)
    other.cfg.model_name = "another"
    with pytest.raises(MapMismatchError, match="model_name"):
        cmap.check_model(other)
    with pytest.raises(HeadIndexError):  # a MapMismatchError is a HeadIndexError
        cmap.check_model(tiny_model(n_heads=2, d_head=16))
    with pytest.raises(MapMismatchError, match="key/value"):  # same shape, no GQA
        cmap.check_model(tiny_model(seed=2))
