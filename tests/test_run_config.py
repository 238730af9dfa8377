"""`RunConfig` holds the stage configs: one save/load protocol (nested round trip, unknown keys and
formats refused with the fix, the flat config.json of earlier runs migrated to the same values),
one default per setting (the pipeline's departures listed in `PIPELINE_DEFAULTS`), piece keys that
change exactly when a config they depend on changes, and `RunDir` naming every file a run writes."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from cast_interp.attribution import AttributionConfig
from cast_interp.diagnose import DiagnosisConfig
from cast_interp.evaluate import EvalConfig
from cast_interp.io import RunDirectory, read_json
from cast_interp.pipeline import (PIPELINE_DEFAULTS, PIPELINE_VERSION, PRESETS, RUN_NAMES, STAGES,
                                  Piece, RunConfig, RunDir, run_experiment)
from cast_interp.pipeline import rundir, runner
from cast_interp.sparse_tuning import TuningConfig

REPO = Path(__file__).resolve().parents[1]
COMMITTED_RUN = REPO / "figures" / "run_v2"


def _custom() -> RunConfig:
    """A config off every default: run settings, run names and stage fields without a run name."""
    return RunConfig.from_preset(
        "smoke", out_dir="x", model="tiny", train_seeds=[3, 4], n_draws=2, seed=5, n_eval=6,
        steps=3, attribution_spread=2,
        diagnosis=DiagnosisConfig(alpha=0.25, n_exact=5, max_new_tokens=40),
        tuning=TuningConfig(weight_decay=0.0, warmup_steps=1, optimizer="sgd"),
        evaluation=EvalConfig(task_normalize="mean", openings=("No",), batch_size=3),
        attribution=AttributionConfig(exact="all", n_bootstrap=300, batch_size=2))


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------


def test_nested_config_round_trips_through_json():
    cfg = _custom()
    # Run names given beside a stage config replace its field; its other fields stay.
    assert (cfg.tuning.steps, cfg.tuning.weight_decay, cfg.tuning.optimizer) == (3, 0.0, "sgd")
    assert cfg.diagnosis.seed == cfg.evaluation.seed == cfg.attribution.seed == 5
    assert (cfg.evaluation.n_harmful, cfg.evaluation.n_benign, cfg.evaluation.n_over_refusal) == (
        6, 6, 6)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["format"] == "run-config-2" and d["steps"] == 3 and d["tuning"]["weight_decay"] == 0.0
    assert "steps" not in d["tuning"] and "n_harmful" not in d["evaluation"]  # each value once
    back = RunConfig.from_dict(d)
    assert back == cfg and back.evaluation.openings == ("No",)
    assert RunConfig(**d) == cfg  # the constructor takes a saved dict too
    for stage, cls in STAGES.items():
        sub = getattr(cfg, stage)
        assert cls.from_dict(json.loads(json.dumps(sub.to_dict()))) == sub, stage
    assert "format" in cfg.diagnosis.to_dict() and "format" in cfg.attribution.to_dict()
    # TuningConfig's dict is hashed by the peer and verdict harnesses: no format key in it, but
    # its from_dict reads one.
    assert "format" not in cfg.tuning.to_dict()
    assert TuningConfig.from_dict({**cfg.tuning.to_dict(), "format": TuningConfig.FORMAT}) == \
        cfg.tuning


def test_unknown_keys_and_formats_are_errors_naming_key_and_fix():
    d = RunConfig().to_dict()
    with pytest.raises(ValueError, match=r"Unknown RunConfig field\(s\) \['bogus'\].*under its "
                                         r"stage"):
        RunConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match=r"Unknown TuningConfig field\(s\) \['wd'\]"):
        RunConfig.from_dict({**d, "tuning": {**d["tuning"], "wd": 0.1}})
    with pytest.raises(ValueError, match=r"Unknown AttributionConfig field\(s\) \['spread'\]"):
        AttributionConfig.from_dict({"spread": 3})
    with pytest.raises(ValueError, match="format 'run-config-9'.*reads 'run-config-2'"):
        RunConfig.from_dict({**d, "format": "run-config-9"})
    with pytest.raises(ValueError, match="format 'x'"):
        EvalConfig.from_dict({"format": "x"})
    with pytest.raises(ValueError, match="must carry its \"format\""):
        RunConfig.from_dict({k: v for k, v in d.items() if k != "format"})
    # A stage field a run sets per piece, and run names that must agree.
    with pytest.raises(ValueError, match=r"tuning.seed must stay 0.*train_seeds"):
        RunConfig(tuning=TuningConfig(seed=3))
    with pytest.raises(ValueError, match=r"evaluation.n_harmful.*set n_eval"):
        RunConfig(evaluation=EvalConfig(n_harmful=10, n_benign=10, n_over_refusal=5))


def _flat(cfg: RunConfig) -> dict:
    """The flat config.json a run wrote before the stage configs nested (format 1)."""
    d = cfg.to_dict()
    return {k: v for k, v in d.items() if k != "format" and k not in STAGES}


def test_old_flat_config_json_migrates_to_the_presets_values():
    old = read_json(COMMITTED_RUN / "config.json")
    assert "format" not in old  # the committed run predates the nesting
    cfg = RunConfig.from_dict(old)
    assert cfg == RunConfig.from_preset("cpu-full", out_dir="figures/run", attribute=True,
                                        attribution_arms=["full", "cast", "random"])
    for name, value in old.items():  # every flat value read back under its name
        assert getattr(cfg, name) == (value if value is not None or name != "lr" else 2e-4), name
    assert cfg.tuning.lr == TuningConfig().lr  # lr None: the tuning config's default
    assert RunConfig.from_dict(read_json(COMMITTED_RUN / "results.json")["config"]) == cfg
    for preset in PRESETS:  # the flat form of each preset reads back as that preset
        want = RunConfig.from_preset(preset)
        assert RunConfig.from_dict(_flat(want)) == want, preset
        assert RunConfig.from_dict({**_flat(want), "lr": None}) == want, preset


# --------------------------------------------------------------------------------------------------
# One default per setting
# --------------------------------------------------------------------------------------------------


def test_a_run_departs_from_stage_defaults_only_where_pipeline_defaults_says():
    cfg = RunConfig()
    assert cfg == RunConfig.from_preset("cpu")
    for stage, cls in STAGES.items():
        ours, standalone = getattr(cfg, stage), cls()
        differ = {f.name for f in fields(cls)
                  if getattr(ours, f.name) != getattr(standalone, f.name)}
        assert differ == set(PIPELINE_DEFAULTS[stage]), stage
    assert (cfg.steps, cfg.benign_mix, cfg.n_sensitivity) == (8, 0.25, 8)


def test_run_names_read_and_write_their_stage_fields():
    cfg = RunConfig()
    for name, targets in RUN_NAMES.items():
        stage, f = targets[0]
        assert getattr(cfg, name) == getattr(getattr(cfg, stage), f), name
    cfg.lr = 1e-3  # a new tuning config, checked by its own rules
    assert cfg.tuning.lr == 1e-3
    with pytest.raises(ValueError, match="steps"):
        cfg.steps = 0
    assert replace(cfg, n_eval=5).evaluation.n_over_refusal == 5 and cfg.n_eval == 10
    with pytest.raises(ValueError, match="lr must be a finite number in \\(0, 1\\]"):
        RunConfig(lr=2.0)


# --------------------------------------------------------------------------------------------------
# Keys: a piece is redone exactly when a config it depends on changes
# --------------------------------------------------------------------------------------------------


def _keys(cfg: RunConfig) -> dict:
    ctx = SimpleNamespace(cfg=cfg)
    piece = Piece("cast", 1, cfg.train_seeds[0])
    return {"diagnosis": runner._diag_key(cfg), "piece": runner._piece_key(ctx, piece),
            "original": runner._original_path_key(SimpleNamespace(cfg=cfg, run_dir=RunDir(".")))[1],
            "attribution": runner._attribution_key(cfg, piece)}


@pytest.mark.parametrize("change, changed", [
    ({"diagnosis": DiagnosisConfig(n_sensitivity=8, alpha=0.3)}, {"diagnosis", "attribution"}),
    ({"n_calibration": 16}, {"diagnosis", "attribution"}),
    ({"tuning": TuningConfig(steps=8, benign_mix=0.25, weight_decay=0.0)},
     {"piece", "attribution"}),
    ({"lr": 1e-4}, {"piece", "attribution"}),
    ({"train_precision": "bf16"}, {"piece", "attribution"}),
    ({"eval_every": 2}, {"piece", "attribution"}),
    ({"evaluation": replace(RunConfig().evaluation, task_normalize="mean")},
     {"piece", "original", "attribution"}),
    ({"n_eval": 8}, {"piece", "original", "attribution"}),
    ({"seed": 1}, {"diagnosis", "piece", "original", "attribution"}),
    ({"attribution_spread": 4}, {"attribution"}),
    ({"attribution": replace(RunConfig().attribution, n_bootstrap=500)}, {"attribution"}),
    ({"model": "tiny"}, {"diagnosis", "piece", "original", "attribution"}),
    # Additive settings and the report's inference: nothing finished is redone.
    ({"n_draws": 6, "train_seeds": [0, 1, 2], "out_dir": "elsewhere", "n_boot": 500,
      "attribute": True, "baselines": ["bottom"]}, set()),
])
def test_a_key_changes_when_and_only_when_a_config_it_depends_on_changes(change, changed):
    base = RunConfig()
    before, after = _keys(base), _keys(replace(base, **change))
    assert {k for k in before if before[k] != after[k]} == changed


# --------------------------------------------------------------------------------------------------
# The run directory
# --------------------------------------------------------------------------------------------------


def test_every_file_a_run_writes_is_named_by_run_dir(tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig.from_preset("smoke", out_dir=str(out), model="tiny", n_draws=0,
                                train_seeds=[0], baselines=[], attribute=True)
    doc = run_experiment(cfg, progress=False)
    rd = RunDir(out)
    pieces = [Piece("full", 0, 0), Piece("cast", 1, 0)]
    named = {rd.config, rd.manifest, rd.results, rd.report, rd.self_reference("val"),
             rd.self_reference("train"), rd.original, rd.attribution_reference,
             rd.attribution_summary("full"), *(rd.piece(p.name) for p in pieces),
             *(rd.tuned_state(p) for p in pieces)}  # kept for stage 4, now or later
    folders = {rd.figures, rd.diagnosis, rd.attribution_arm("full")}
    written = {out / rel for rel in RunDirectory(out).files()}
    assert named <= written
    assert all(p in named or p.parent in folders for p in written), sorted(
        p for p in written if p not in named and p.parent not in folders)
    assert read_json(rd.config) == cfg.to_dict() == doc["config"]
    assert doc["format"] == "run-results-1"
    assert read_json(rd.piece("full_k0_t0"))["format"] == "run-piece-1"
    # The saved config is the run's: resumed from config.json, nothing is redone.
    again = run_experiment(RunConfig.from_dict(read_json(rd.config)), progress=False)
    assert again["arms"] == doc["arms"]


def test_a_run_directory_of_the_flat_config_era_is_refused_as_another_run():
    """Its pieces are keyed by pipeline-2 (before the stage configs were hashed): resuming into it
    would redo every piece, so it is refused with the fix rather than silently recomputed."""
    old = read_json(COMMITTED_RUN / "run.json")
    assert old["version"] == "pipeline-2"
    why = rundir._other_run(old, {**old, "version": PIPELINE_VERSION})
    assert why is not None and "'pipeline-2'" in why and "redo" in why
    same = {**old, "version": PIPELINE_VERSION}
    assert rundir._other_run(same, same) is None
    changed = {**same, "settings": {**same["settings"], "steps": 9}}
    assert "steps (8 -> 9)" in rundir._other_run(same, changed)
    # A stage field without a run name is named with its stage.
    a = {**same, "settings": {**same["settings"], "tuning": {"weight_decay": 0.01}}}
    b = {**same, "settings": {**same["settings"], "tuning": {"weight_decay": 0.0}}}
    assert "tuning.weight_decay (0.01 -> 0.0)" in rundir._other_run(a, b)
