"""The whole experiment (`cast-interp run`) on a tiny model: outputs, budgets, resume, bad input."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from cast_interp import pipeline
from cast_interp.cli import main
from cast_interp.io import read_json
from cast_interp.pipeline import RunConfig, plan_arms, run_experiment, summarize


def _cfg(out_dir, **kw) -> RunConfig:
    return RunConfig.from_preset("smoke", out_dir=str(out_dir), model="tiny", **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    doc = run_experiment(_cfg(out), progress=False)
    return out, doc


def test_run_writes_results_report_and_figures(finished):
    out, doc = finished
    saved = read_json(out / "results.json")
    assert saved["config"]["model"] == "tiny" and saved["config"]["preset"] == "smoke"
    assert saved["diagnosis"]["config"]["diagnosis"]["n_calibration"] == 4
    names = set(saved["arms"])
    n_total = 2 * 4
    assert names == {a.name for a in plan_arms(_cfg(out), n_total)}
    for piece in saved["arms"].values():
        m = piece["eval"]["metrics"]
        assert 0.0 <= m["refusal_rate"] <= 1.0 and m["kl_to_original"] >= 0.0
        assert len(piece["tuning"]["losses"]) == saved["config"]["steps"]
    report = (out / "report.md").read_text()
    for method in ("full", "cast", "random", "bottom", "top_o", "top_s", "layer_band"):
        assert f"| {method} |" in report
    assert "Which heads caused the utility drop" in report
    for fig in ("conflict_maps", "o_vs_s", "sorted_c", "tradeoff", "drop_vs_k", "training_curves",
                "attribution_vs_map"):
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{fig}.{ext}").stat().st_size > 1000
    assert not list(out.rglob("*.partial"))


def test_arms_are_budget_matched(finished):
    out, doc = finished
    arms = doc["arms"]
    full = arms["full_k0_s0"]["tuning"]["n_trainable"]
    k = next(a["arm"]["k"] for a in arms.values() if a["arm"]["method"] == "cast")
    same = {a["tuning"]["n_trainable"] for a in arms.values()
            if a["arm"]["method"] in ("cast", "random", "bottom", "top_o", "top_s")}
    assert len(same) == 1, f"head-skipping arms differ in trainable parameters: {same}"
    assert same.pop() < full
    for a in arms.values():
        if a["arm"]["method"] in ("cast", "random", "bottom", "top_o", "top_s"):
            assert len(a["skip_heads"]) == k


def test_summary_rows_are_means_of_the_arms(finished):
    out, doc = finished
    base = read_json(out / "arms" / "original.json")
    rows = summarize(base, doc["arms"])
    full = next(r for r in rows if r["method"] == "full")
    m = doc["arms"]["full_k0_s0"]["eval"]["metrics"]
    b = base["eval"]["metrics"]
    assert full["d_reference_nll"] == pytest.approx(m["reference_nll"] - b["reference_nll"])
    assert full["kl_to_original"] == pytest.approx(m["kl_to_original"])


def test_figures_regenerate_from_saved_files(finished, tmp_path):
    out, _ = finished
    paths = pipeline.run_figures(out, tmp_path)
    assert {p.stem for p in paths} >= {"conflict_maps", "tradeoff", "attribution_vs_map"}


def test_interrupted_run_resumes_without_redoing_finished_arms(tmp_path, monkeypatch, finished):
    from cast_interp import sparse_tuning

    cfg = _cfg(tmp_path, attribute=False)
    real = sparse_tuning.safety_finetune
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops the run during the third arm
        return real(*args, **kwargs)

    monkeypatch.setattr(sparse_tuning, "safety_finetune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, progress=False)
    done = sorted(p.name for p in (tmp_path / "arms").glob("*_s*.json"))
    assert len(done) == 2 and not (tmp_path / "results.json").exists()
    for p in (tmp_path / "arms").glob("*.json"):
        json.loads(p.read_text())  # everything on disk is complete
    before = {p: p.read_bytes() for p in (tmp_path / "arms").glob("*_s*.json")}

    calls.clear()
    monkeypatch.setattr(sparse_tuning, "safety_finetune", real)
    counted = []
    monkeypatch.setattr(sparse_tuning, "safety_finetune",
                        lambda *a, **k: (counted.append(1), real(*a, **k))[1])
    doc = run_experiment(cfg, progress=False)
    n_arms = len(plan_arms(cfg, 8))
    assert len(counted) == n_arms - 2, "finished arms were trained again"
    for p, content in before.items():
        assert p.read_bytes() == content
    # Same seed, same data: the resumed run equals the uninterrupted one, arm by arm.
    _, ref = finished
    for name, piece in doc["arms"].items():
        assert piece["eval"]["metrics"] == pytest.approx(ref["arms"][name]["eval"]["metrics"],
                                                         rel=1e-5, abs=1e-6)


def test_changed_settings_are_not_reused(tmp_path, finished):
    out, _ = finished
    cfg = _cfg(out)
    other = replace(cfg, steps=cfg.steps + 1)
    assert cfg.key(*pipeline.TUNE_FIELDS) != other.key(*pipeline.TUNE_FIELDS)
    assert pipeline._load_piece(out / "arms" / "cast_k1_s0.json",
                                other.key(*pipeline.TUNE_FIELDS, *pipeline.EVAL_FIELDS)) is None


def test_cli_bad_input_is_one_clear_line(tmp_path, capsys):
    assert main(["attribute", "--run", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "config.json" in err and "cast-interp run" in err
    assert main(["eval", "--model", "no-such-model", "--out", str(tmp_path / "e.json")]) == 2
    assert "no-such-model" in capsys.readouterr().err
    with pytest.raises(ValueError, match="Unknown preset"):
        RunConfig.from_preset("huge")


def test_cli_diagnose_writes_map_and_figures(tmp_path, capsys):
    from cast_interp.conflict_map import ConflictMap

    out = tmp_path / "diag"
    assert main(["diagnose", "--model", "tiny", "--n-calibration", "4", "--n-sensitivity", "4",
                 "--batch-size", "2", "--n-bootstrap", "10", "--out", str(out)]) == 0
    cmap = ConflictMap.load(out)
    assert cmap.shape == (2, 4) and cmap.config["diagnosis"]["n_sensitivity"] == 4
    assert "top 8 heads by C" in capsys.readouterr().out
    for fig in ("conflict_maps", "o_vs_s", "sorted_c"):
        assert (out / "figures" / f"{fig}.pdf").exists()


def test_cli_attribute_on_a_finished_run(finished, tmp_path, capsys):
    import shutil

    src, _ = finished
    run = tmp_path / "run"
    shutil.copytree(src, run)
    assert main(["attribute", "--run", str(run), "--method", "exact"]) == 0
    att = read_json(run / "results.json")["attribution"]
    assert att["method"] == "exact" and att["n_heads_computed"] == 8
    assert "Which heads caused the utility drop" in capsys.readouterr().out
