"""The peer comparison harness (`peers/config.py`, `run.py`, `summary.py`; issue 25): its plan, its matched-safety reading
and the `smoke` preset end to end on the tiny model with the bundled data (no ../shared needed)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from cast_interp.peers import (PEER_METHODS, PeerPiece, PeersConfig, estimate_peers_seconds,
                               plan_peers, run_peers, write_peers_report)
from cast_interp.peers import best_method, common_levels


def test_plan_counts_per_method():
    """The `peers` preset: every method on both training seeds; 2 interpolation sources, 2 anchor
    shares, 2 LoRA settings; full tuning and CAST before the interpolations that read them."""
    cfg = PeersConfig.from_preset("peers")
    plan = plan_peers(cfg)
    names = [p.name for p in plan]
    assert len(names) == len(set(names))
    per = Counter(p.method for p in plan)
    assert per == {"full": 2, "cast": 2, "interp": 4, "anchor": 4, "lora": 4, "projection": 2,
                   "bottom_layers": 2, "top_layers": 2, "act_tune": 2, "act_skip": 2,
                   "cast_anchor": 2}
    assert set(per) == set(PEER_METHODS)
    assert sorted({p.arm for p in plan}) == sorted(
        ["full", "cast", "interp_full", "interp_cast", "anchor_s25", "anchor_s50", "lora_r8_qv",
         "lora_r8_qkvo", "projection_global", "bottom_layers", "top_layers", "act_tune",
         "act_skip", "cast_anchor_s25"])
    for p in plan:
        if p.method == "interp":
            assert names.index(p.source.name) < names.index(p.name)
    assert {p.seed for p in plan} == {0, 1} and all(
        sum(q.arm == p.arm for q in plan) == 2 for p in plan)
    est = estimate_peers_seconds(cfg)
    assert (est["n_pieces"], est["n_trained"], est["n_interp"]) == (28, 24, 4)
    # 24 trained pieces: 16 bf16 steps x 3.0 s (projection: twice), 8 curve points x 8.2 s, 3
    # test checkpoints x 49 s; 4 interpolations: 5 points x (8.2 + 49) s; set-up: data, one
    # map, the original.
    assert est["core_s"] == pytest.approx(24 * (48 + 65.6 + 147) + 2 * 48 + 4 * 5 * 57.2)
    assert est["setup_s"] == pytest.approx(105 + 385 + 240)
    assert est["wall_s"] < 2 * 3600
    small = PeersConfig.from_preset("smoke", methods=["full", "cast", "interp"],
                                    interp_sources=["cast"], train_seeds=[3])
    assert [p.name for p in plan_peers(small)] == ["full_t3", "cast_t3", "interp_cast_t3"]
    assert PeerPiece("lora", 1, "r8_qv").arm == "lora_r8_qv"


def test_config_checks():
    with pytest.raises(ValueError, match="Unknown PeersConfig field"):
        PeersConfig.from_dict({"steps": 4, "n_random": 3})
    with pytest.raises(ValueError, match="Unknown preset"):
        PeersConfig.from_preset("cpu-full")
    with pytest.raises(ValueError, match="including"):
        PeersConfig(methods=["full", "lora"])
    with pytest.raises(ValueError, match="alphas"):
        PeersConfig(alphas=[0.0, 0.5, 1.0])
    with pytest.raises(ValueError, match="share"):
        PeersConfig(anchor_shares=[0.01])  # 0 anchors in a batch of 8
    with pytest.raises(ValueError, match="rank"):
        PeersConfig(lora=[{"rank": 0}])
    with pytest.raises(ValueError, match="Unknown LoraConfig field"):
        PeersConfig(lora=[{"rank": 8, "dropout": 0.1}])
    with pytest.raises(ValueError, match="test_checkpoints"):
        PeersConfig(test_checkpoints=[8, 12])  # must end at the last step (the tax)
    with pytest.raises(ValueError, match="projection_modes"):
        PeersConfig(projection_modes=["layer"])
    with pytest.raises(ValueError, match="min_range_share"):
        PeersConfig(min_range_share=1.5)


def test_common_levels_leave_out_the_arm_that_breaks_the_range():
    """Known curves: full reads on [1, 3], CAST on [1.5, 3.5] (they share [1.5, 3]), a weak arm
    on [0.2, 0.8] (never reaches them), a fast arm on [1.2, 2.5], a narrow arm on [0.5, 1.6]
    (reaches just past the bottom). With min_range_share 0.5 (at least 0.75 of the 1.5 wide
    shared range) the weak and the narrow arms are left out and the levels span [1.5, 2.5]; with
    0 the largest set that shares any point keeps the narrow arm, on [1.5, 1.6]."""
    curves = {"full_t0": {"steps": [5, 10], "safety": [1.0, 3.0]},
              "cast_t0": {"steps": [5, 10], "safety": [1.5, 3.5]},
              "weak_t0": {"steps": [5, 10], "safety": [0.2, 0.8]},
              "fast_t0": {"steps": [5, 10], "safety": [1.2, 2.5]},
              "narrow_t0": {"steps": [5, 10], "safety": [0.5, 1.6]},
              "narrow_t1": {"steps": [5, 10], "safety": [0.4, 1.9]}}
    arm_of = {n: n[:-3] for n in curves}
    lv = common_levels(curves, arm_of, n_levels=3, min_range_share=0.5)
    assert sorted(lv["arms"]) == ["cast", "fast", "full"]
    assert sorted(e["arm"] for e in lv["excluded"]) == ["narrow", "weak"]
    assert lv["levels"] == pytest.approx([1.5, 2.0, 2.5])
    assert lv["ranges"]["narrow"] == pytest.approx([0.5, 1.6])  # over both seeds
    lv = common_levels(curves, arm_of, n_levels=3, min_range_share=0.0)
    assert sorted(lv["arms"]) == ["cast", "fast", "full", "narrow"]
    assert lv["levels"] == pytest.approx([1.5, 1.55, 1.6])
    # A range full tuning and CAST do not share: no level, whatever the others do.
    curves["cast_t0"] = {"steps": [5, 10], "safety": [3.2, 4.0]}
    lv = common_levels(curves, arm_of)
    assert lv["levels"] == [] and "full tuning and CAST" in lv["reason"]


def test_an_arm_left_out_is_still_compared_pairwise_at_matched_safety():
    """Planted: along safety x, full tuning costs 1.0 * x per prompt and a weak arm 0.5 * x (half
    the cost at the same safety), plus prompt noise; the weak arm reaches x in [0.5, 1.5], full in
    [1, 3]. On their shared range [1, 1.5] the weak arm minus full is -0.5 * mean(levels) = -0.625,
    found with a CI excluding 0; an arm with full's own cost curve (other noise) is not called
    different; an arm whose range misses full's gets no reading, with the reason."""
    from cast_interp.peers import pairwise_difference

    rng = np.random.default_rng(0)
    noise = {k: rng.normal(0, 0.05, size=40) for k in ("full", "weak", "same")}

    def curve(arm, slope, lo, hi):
        xs = np.array([lo, (lo + hi) / 2, hi])
        return {"steps": [4, 8, 12], "safety": list(xs),
                "cost": np.stack([slope * x + noise[arm] for x in xs])}

    curves = {}
    for s in (0, 1):
        curves[f"full_t{s}"] = curve("full", 1.0, 1.0, 3.0)
        curves[f"weak_t{s}"] = curve("weak", 0.5, 0.5, 1.5)
        curves[f"same_t{s}"] = curve("same", 1.0, 0.8, 2.0)
        curves[f"far_t{s}"] = curve("weak", 0.5, 3.5, 4.0)
    d = pairwise_difference("weak", "full", curves, [0, 1], n_boot=500)
    assert d["levels"] == pytest.approx([1.0, 1.25, 1.5])
    assert d["diff"]["diff"] == pytest.approx(-0.625, abs=0.03)
    assert d["diff"]["significant"] and d["diff"]["high"] < 0
    same = pairwise_difference("same", "full", curves, [0, 1], n_boot=500)["diff"]
    assert not same["significant"] and same["low"] < 0 < same["high"]
    far = pairwise_difference("far", "full", curves, [0, 1], n_boot=500)
    assert far["levels"] == [] and far["reason"]
    assert pairwise_difference("weak", "full", curves, [0, 1, 2]) is None  # seed 2 missing


def test_best_method_names_the_winner_and_a_tie():
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.01, (2, 64))
    grids = {"full": 1.0 + noise, "cast": 0.6 + noise + rng.normal(0, 0.01, (2, 64)),
             "anchor_s25": 0.2 + noise}
    b = best_method(grids, n_boot=400)
    assert b["best"] == "anchor_s25" and b["runner_up"] == "cast"
    assert b["vs_runner_up"]["significant"] and b["vs_runner_up"]["diff"] == pytest.approx(
        -0.4, abs=0.01)
    assert "lower than the runner-up" in b["statement"] and b["tied"] == []
    grids["cast"] = grids["anchor_s25"] + rng.normal(0, 0.05, (2, 64))  # the same cost
    b = best_method(grids, n_boot=400)
    assert b["runner_up"] in ("cast", "anchor_s25")
    assert "no detectable difference" in b["statement"] and len(b["tied"]) == 1


def test_smoke_peers_end_to_end(tmp_path, one_thread):
    """The smoke preset: every planned piece is written, the summary has each method with its
    budget and time, interpolation at a = 1 evaluates equal to its tuned source's last test
    checkpoint, the layer freezes match CAST's parameter count, the report and figures are
    written, a resume trains nothing, and another config in the same folder is refused."""
    from cast_interp.model import tiny_model

    out = tmp_path / "p"
    cfg = PeersConfig.from_preset("smoke")
    run_peers(tiny_model(seed=0, n_ctx=512), cfg, out, progress=False)
    plan = plan_peers(cfg)
    assert sorted(p.stem for p in (out / "pieces").glob("*.json")) == sorted(p.name for p in plan)
    assert not list((out / "pieces").glob("*.claim"))
    pieces = {p.name: json.loads((out / "pieces" / f"{p.name}.json").read_text()) for p in plan}

    # Interpolation at a = 1 is the tuned piece: the same per-prompt values at its last step.
    for p in plan:
        if p.method == "interp":
            rec, src = pieces[p.name], pieces[p.source.name]
            assert rec["alphas"] == cfg.alphas and sorted(rec["test"], key=float)[-1] == "1"
            for m in ("refusal_score", "over_refusal_score", "kl", "nll"):
                np.testing.assert_allclose(rec["test"]["1"][m], src["test"][str(cfg.steps)][m],
                                           rtol=0, atol=1e-6, err_msg=f"{p.name} {m}")
            # a = 0.2 is not the tuned model: safety differs from the source's
            assert rec["test"]["0.2"]["refusal_score"] != src["test"][str(cfg.steps)][
                "refusal_score"]
    # Budgets: k = 4 of 8 heads = one whole layer of the tiny model, so the layer freezes and the
    # activation arms freeze CAST's count; LoRA trains its adapters only, r (d_in + d_out) each.
    cast = pieces["cast_t0"]
    assert len(cast["skip"]) == 4
    for arm in ("bottom_layers", "top_layers", "act_skip", "act_tune"):
        assert len(pieces[f"{arm}_t0"]["skip"]) == 4
        assert pieces[f"{arm}_t0"]["n_trainable"] == cast["n_trainable"]
    assert {tuple(u)[0] for u in pieces["bottom_layers_t0"]["skip"]} == {0}
    assert {tuple(u)[0] for u in pieces["top_layers_t0"]["skip"]} == {1}
    assert pieces["full_t0"]["n_trainable"] > cast["n_trainable"]
    assert pieces["lora_r8_qv_t0"]["n_trainable"] == 2 * 2 * 8 * (32 + 32)  # 2 layers, Q and V
    assert pieces["cast_anchor_s25_t0"]["skip"] == cast["skip"]
    for p in pieces.values():
        assert set(p["val"]) >= {"1", "2", "3", "4"} or p["piece"]["method"] == "interp"
        assert p["wall_time_s"] > 0

    s = json.loads((out / "summary.json").read_text())
    assert s["n_pieces"] == s["n_planned"] == len(plan)
    assert set(s["methods"]) == {p.arm for p in plan}
    tax = s["tax"]["over_refusal_score"]
    assert tax["low"] <= tax["diff"] <= tax["high"]
    lv = s["levels"]
    assert len(lv["levels"]) == cfg.n_levels and {"full", "cast"} <= set(lv["arms"])
    for a, m in s["methods"].items():
        assert m["complete"] and m["n_trainable"] > 0 and m["train_time_s"] >= 0
        if a in lv["arms"]:
            c = m["cost"]
            assert c["low"] <= c["diff"] <= c["high"] and c["n_seeds"] == 2
            assert ("vs_full" in m) == (a != "full") and ("cast_minus" in m) == (a != "cast")
        else:
            assert a in {e["arm"] for e in lv["excluded"]} and "cost" not in m
    assert s["best"]["best"] in lv["arms"]
    assert max(s["interpolation_check"].values()) <= 1e-6
    if {"interp_cast", "interp_full"} <= set(lv["arms"]):
        assert "interp_cast_vs_interp_full" in s["compositions"]

    report = write_peers_report(out).read_text()
    for section in ("## 1. The tax", "## 2. Matched safety", "## 3. The comparison",
                    "Lowest cost at matched safety", "CAST + interpolation"):
        assert section in report
    for f in ("peers_pareto.png", "peers_matched_cost.png"):
        assert (out / "figures" / f).stat().st_size > 1000

    before = {p.name: p.read_text() for p in (out / "pieces").glob("*.json")}
    run_peers(tiny_model(seed=0, n_ctx=512), cfg, out, progress=False)
    assert {p.name: p.read_text() for p in (out / "pieces").glob("*.json")} == before
    with pytest.raises(ValueError, match="another config"):
        run_peers(tiny_model(seed=0, n_ctx=512), PeersConfig.from_preset("smoke", lora_lr=2e-3),
                  out, progress=False)
    assert {p.name: p.read_text() for p in (out / "pieces").glob("*.json")} == before


def test_interpolation_waits_for_its_source_and_max_pieces_resumes(tmp_path, one_thread):
    """A run cut by max_pieces before an interpolation's source is trained leaves no
    interpolation piece; the resume trains the source, saves its state and then interpolates."""
    from cast_interp.model import tiny_model

    cfg = PeersConfig.from_preset("smoke", methods=["full", "cast", "interp"],
                                  interp_sources=["cast"], train_seeds=[0], alphas=[0.5, 1.0])
    out = tmp_path / "p"
    run_peers(tiny_model(seed=0, n_ctx=512), cfg, out, progress=False, max_pieces=1)
    assert sorted(p.stem for p in (out / "pieces").glob("*.json")) == ["full_t0"]
    assert not (out / "states").exists() or not list((out / "states").iterdir())
    s = run_peers(tiny_model(seed=0, n_ctx=512), cfg, out, progress=False)
    assert sorted(p.stem for p in (out / "pieces").glob("*.json")) == [
        "cast_t0", "full_t0", "interp_cast_t0"]
    assert (out / "states" / "cast_t0.safetensors").exists()
    assert s["interpolation_check"]["interp_cast_t0"] <= 1e-6


def test_interpolation_waits_while_another_worker_holds_its_source(tmp_path, one_thread):
    """A source claimed by a live process (another worker) is skipped and its interpolation waits
    (polling) instead of ending the run; once that process is gone its claim is taken over and
    both pieces run."""
    import subprocess
    import threading

    from cast_interp.model import tiny_model

    cfg = PeersConfig.from_preset("smoke", methods=["full", "cast", "interp"],
                                  interp_sources=["cast"], train_seeds=[0], alphas=[0.5, 1.0])
    out = tmp_path / "p"
    done = out / "pieces" / "full_t0.json"
    # the other worker holds CAST's piece until this run has trained full tuning, and a second more
    other = subprocess.Popen(["sh", "-c", f"while [ ! -f '{done}' ]; do sleep 0.1; done; sleep 1"])
    threading.Thread(target=other.wait, daemon=True).start()  # reaped when it ends: no zombie
    claim = out / "pieces" / "cast_t0.claim"
    claim.parent.mkdir(parents=True)
    claim.write_text(str(other.pid))
    run_peers(tiny_model(seed=0, n_ctx=512), cfg, out, progress=False, poll_s=0.2)
    assert other.poll() is not None  # run_peers returned only after the other worker ended
    assert sorted(p.stem for p in (out / "pieces").glob("*.json")) == [
        "cast_t0", "full_t0", "interp_cast_t0"]
    assert not claim.exists()


def test_peers_cli_smoke(tmp_path, one_thread):
    """`cast-interp peers --preset smoke` runs end to end and writes its report; --report-only
    redraws it; a file as --out or an empty folder for --report-only is a one-line error."""
    from cast_interp.cli import main as cli_main

    out = tmp_path / "p"
    assert cli_main(["peers", "--preset", "smoke", "--out", str(out)]) == 0
    assert "## " in (out / "report.md").read_text()
    assert cli_main(["peers", "--out", str(out), "--report-only"]) == 0
    (tmp_path / "f.txt").write_text("x")
    assert cli_main(["peers", "--preset", "smoke", "--out", str(tmp_path / "f.txt")]) == 2
    assert cli_main(["peers", "--out", str(tmp_path / "empty"), "--report-only"]) == 2
    # A folder that holds something else is refused before the model loads.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert cli_main(["peers", "--preset", "smoke", "--out", str(tmp_path / "other")]) == 2
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.txt"]
