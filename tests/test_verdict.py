"""The v3 verdict (`verdict.py`): its arms' head sets, its data splits, a checkpoint evaluation
equal to a direct evaluation of that step, and the `smoke` preset end to end on the tiny model
with the bundled data (no ../shared needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cast_interp.registry.arms import c_quantile_bins, select_arm_units
from cast_interp.verdict import (
    VerdictConfig,
    VerdictPiece,
    mean_c_percentile,
    plan_verdict,
    run_verdict,
)
from cast_interp.harness import run_data


class _Map:
    """A map-like object with known scores: C = 0..n-1 in row-major order."""

    def __init__(self, L: int, H: int):
        self.C = torch.arange(L * H, dtype=torch.float32).view(L, H)
        self.O, self.S = self.C.clone(), self.C.clone()

    def units(self, kind="head"):
        return {"O": self.O, "S": self.S, "C": self.C}


def test_layer_matched_sets_keep_casts_layer_profile():
    m = _Map(6, 5)
    cast = select_arm_units("cast", m, 7)  # C grows with the index: the last 7 heads
    assert cast == [(4, 3), (4, 4), (5, 0), (5, 1), (5, 2), (5, 3), (5, 4)]
    seen = set()
    for d in range(10):
        lm = select_arm_units("layer_matched", m, 7, seed=d)
        assert len(lm) == 7 and len(set(lm)) == 7
        assert sorted(l for l, _ in lm) == sorted(l for l, _ in cast)
        seen.add(tuple(lm))
    assert len(seen) > 1  # draws differ (layer 4 has 5 choose 2 = 10 options)


def test_graded_sets_stay_in_their_c_bin():
    m = _Map(4, 5)  # 20 units, C = 0..19
    bins = c_quantile_bins(m.C, 4, tie_seed=0)
    assert [len(b) for b in bins] == [5, 5, 5, 5]
    assert sorted(u for b in bins for u in b) == [(l, h) for l in range(4) for h in range(5)]
    for b in range(4):
        units = select_arm_units("graded", m, 3, seed=b, bin=b, n_bins=4)
        assert len(units) == 3
        assert all(5 * b <= float(m.C[l, h]) < 5 * (b + 1) for l, h in units)
    with pytest.raises(Exception, match="bin=4 is out of range"):
        select_arm_units("graded", m, 3, bin=4, n_bins=4)
    with pytest.raises(Exception, match="fewer than k=6"):
        select_arm_units("graded", m, 6, bin=0, n_bins=4)
    with pytest.raises(ValueError, match="needs bin="):
        select_arm_units("graded", m, 3)


def test_mean_c_percentile_known_answer():
    m = _Map(2, 5)  # C = 0..9: percentile ranks (k + 1) / 10 or k / 9 by the map's convention
    from cast_interp.conflict_map import percentile_rank

    pr = percentile_rank(m.C.flatten())
    lowest, highest = float(pr.min()), float(pr.max())
    assert mean_c_percentile([(0, 0)], m) == pytest.approx(lowest)
    assert mean_c_percentile([(1, 4)], m) == pytest.approx(highest)
    assert mean_c_percentile([(0, 0), (1, 4)], m) == pytest.approx((lowest + highest) / 2)


def test_plan_orders_pieces_and_counts_them():
    cfg = VerdictConfig.from_preset("cpu-full")
    plan = plan_verdict(cfg)
    names = [p.name for p in plan]
    assert len(names) == len(set(names))
    assert names[:2] == ["full_t0", "full_t1"]
    assert sum(p.method == "random" for p in plan) == 20 * 2
    assert sum(p.method == "layer_matched" for p in plan) == 10
    assert sum(p.method == "graded" for p in plan) == 5 * 4
    assert names[-2:] == ["full_float32_t0", "full_float32_t1"]
    # draw-major: a run cut after 2k random pieces holds k whole sets (both seeds)
    rnd = [p for p in plan if p.method == "random"]
    assert [(p.draw, p.seed) for p in rnd[:4]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert VerdictPiece("graded", 0, bin=3, draw=1).arm == "graded_b3_d1"
    # The cost model, by hand: 76 bf16 pieces of 16 steps x 3.0 s, 8 curve points x 8.2 s and 2
    # test checkpoints x 49 s; 2 float32 pieces whose steps cost 2.1x; set-up: data, 2 maps,
    # the original.
    from cast_interp.verdict import estimate_verdict_seconds

    est = estimate_verdict_seconds(cfg)
    piece = 48 + 65.6 + 98
    assert est["n_pieces"] == 78
    assert est["core_s"] == pytest.approx(76 * piece + 2 * (piece + 48 * 1.1))
    assert est["wall_s"] == pytest.approx(105 + 2 * 385 + 240 + est["core_s"] / 2)
    assert estimate_verdict_seconds(cfg, n_cores=1)["wall_s"] > est["wall_s"]


def test_config_checks():
    with pytest.raises(ValueError, match="test_checkpoints"):
        VerdictConfig(test_checkpoints=[16])
    with pytest.raises(ValueError, match="test_checkpoints"):
        VerdictConfig(test_checkpoints=[8, 17])
    with pytest.raises(ValueError, match="maps must start"):
        VerdictConfig(maps=["sensitive"])
    with pytest.raises(ValueError, match="train_seeds"):
        VerdictConfig(train_seeds=[0, 0])
    with pytest.raises(ValueError, match="Unknown VerdictConfig field"):
        VerdictConfig.from_dict({"steps": 4, "lr_typo": 1})
    with pytest.raises(ValueError, match="Unknown preset"):
        VerdictConfig.from_preset("gpu-huge")


def test_diagnosis_splits_are_disjoint_from_training_and_test(tiny):
    cfg = VerdictConfig.from_preset("smoke")
    data = run_data(tiny, cfg)
    assert data.source == "bundled"
    sets = {k: {e.prompt for e in v} for k, v in vars(data).items()
            if hasattr(v, "examples")}
    for a in ("safety_cal", "benign_diag", "over_diag"):
        assert sets[a], a
        for b in sets:
            if b != a:
                assert not sets[a] & sets[b], (a, b)
    assert len(data.safety_cal) == cfg.n_calibration
    # every diagnosis example carries an answer (refusals for D_safe, the model's own for D_util)
    assert all(e.response for e in data.over_diag) and all(e.response for e in data.benign_diag)


def test_checkpoint_evaluation_equals_a_direct_run(tmp_path, one_thread):
    """A piece's step-2 test record (of a 4-step run) equals training 2 steps and evaluating
    (constant lr after the same warmup: the warmup ends inside both runs)."""
    from cast_interp.model import tiny_model
    from cast_interp.harness import CurveEvaluator, test_evaluator
    from cast_interp.verdict import run_piece

    cfg = VerdictConfig.from_preset("smoke", n_random=0, n_layer_matched=0, n_per_bin=0,
                                    warmup_steps=1)
    model = tiny_model(seed=0, n_ctx=512)
    data = run_data(model, cfg, tmp_path)
    test = test_evaluator(model, data)
    units = [(0, 1)]
    rec = run_piece(model, VerdictPiece("random", 0, draw=0), units, cfg, data,
                    CurveEvaluator(data), test)
    fresh = tiny_model(seed=0, n_ctx=512)
    from cast_interp.sparse_tuning import safety_finetune

    tcfg = cfg.tuning(0)
    tcfg.steps = 2
    safety_finetune(fresh, data.safety_train, skip_heads=units, config=tcfg)
    direct = test(fresh)
    for k in ("refusal_score", "over_refusal_score", "kl", "nll"):
        np.testing.assert_allclose(rec["test"]["2"][k], direct[k], rtol=0, atol=1e-6, err_msg=k)
    assert max(rec["test"]["2"]["kl"]) > 0
    assert sorted(int(s) for s in rec["val"]) == [1, 2, 3, 4]  # every curve_every step


def test_smoke_verdict_end_to_end(tmp_path, one_thread):
    """The smoke preset: every planned piece trains, the summary has the tax, the matched levels,
    CAST against the random sets (no rank from 3 sets), the graded slope, both maps, the float32
    check; a resume trains nothing; another config in the same folder is refused."""
    from cast_interp.cli import main as cli_main
    from cast_interp.model import tiny_model

    out = tmp_path / "v"
    assert cli_main(["verdict", "--preset", "smoke", "--out", str(out)]) == 0
    cfg = VerdictConfig.from_preset("smoke")
    pieces = sorted(p.stem for p in (out / "pieces").glob("*.json"))
    assert pieces == sorted(p.name for p in plan_verdict(cfg))
    s = json.loads((out / "summary.json").read_text())
    tax = s["tax"]["over_refusal_score"]
    assert tax["low"] <= tax["diff"] <= tax["high"]
    assert len(s["levels"]["levels"]) == cfg.n_levels
    comp = s["comparisons"]["cast_general_vs_random"]
    assert comp["n_sets"] == 3 and comp["rank"] is None and "fewer than 20" in comp["rank_note"]
    assert comp["pred_low"] <= comp["low"] and comp["pred_high"] >= comp["high"]
    assert "cast_general_vs_layer_matched" in s["comparisons"]
    assert s["graded"]["n_sets"] == cfg.n_bins * cfg.n_per_bin + cfg.n_random
    assert set(s["maps"]) >= {"spearman_C", "top_k_overlap"}
    assert set(s["precision"]) == {"refusal_score", "over_refusal_score", "tax"}
    for k in ("refusal_score", "over_refusal_score"):  # the declared check, per checkpoint
        c = s["precision"][k]["check"]
        assert len(c["deviation"]) == len(s["precision"][k]["steps"])
        assert c["passed"] == all(d <= sp + 1e-6 for d, sp in zip(c["deviation"], c["spread"]))
    assert s["precision"]["tax"]["float32"]["n_prompts"] == s["tax"]["over_refusal_score"]["n_prompts"]
    report = (out / "report.md").read_text()
    for section in ("## 1. The tax", "## 3. Primary endpoints", "Graded slope (primary 2)",
                    "layer-matched", "## 5. bf16 training check", "The tax (primary, last step)"):
        assert section in report
    assert (out / "figures" / "verdict_curves.png").stat().st_size > 1000
    before = {p.name: p.read_text() for p in (out / "pieces").glob("*.json")}
    run_verdict(tiny_model(seed=0, n_ctx=512), cfg, out, progress=False)
    assert {p.name: p.read_text() for p in (out / "pieces").glob("*.json")} == before
    with pytest.raises(ValueError, match="another config"):
        run_verdict(tiny_model(seed=0, n_ctx=512), VerdictConfig.from_preset("smoke", steps=3,
                                                                             test_checkpoints=[2, 3]),
                    out, progress=False)
    assert cli_main(["verdict", "--out", str(out), "--report-only"]) == 0
    (tmp_path / "f.txt").write_text("x")
    assert cli_main(["verdict", "--preset", "smoke", "--out", str(tmp_path / "f.txt")]) == 2


def test_piece_claims_keep_two_workers_apart(tmp_path):
    """A claimed piece is skipped by another worker while its owner lives; a claim whose process
    is gone is taken over."""
    import os
    import subprocess

    from cast_interp.harness import claim_piece

    path = tmp_path / "pieces" / "random_d0_t0.claim"
    mine = claim_piece(path)
    assert mine == path and path.read_text() == str(os.getpid())
    assert claim_piece(path) is None  # held by a live process (this one)
    path.unlink()
    dead = subprocess.Popen(["true"])
    dead.wait()
    path.write_text(str(dead.pid))  # a finished process's claim
    assert claim_piece(path) == path and path.read_text() == str(os.getpid())
