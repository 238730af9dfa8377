"""What the verdict and the peer comparison share (`harness.py`): one regime config, the bf16 curve
evaluator that keeps its copy between calls, and the committed run's config still loading."""

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch

from cast_interp.harness import CurveEvaluator, RegimeSettings, run_data
from cast_interp.peers import PeersConfig
from cast_interp.verdict import VerdictConfig

ROOT = Path(__file__).resolve().parents[1]


def test_verdict_and_peers_share_the_regime_settings_and_their_defaults():
    """Both configs are RegimeSettings; every regime field has one default, the same in both,
    except the two each comparison declares (its preset and its test checkpoints)."""
    v, p = VerdictConfig(), PeersConfig()
    assert isinstance(v, RegimeSettings) and isinstance(p, RegimeSettings)
    differ = {f.name for f in fields(RegimeSettings) if getattr(v, f.name) != getattr(p, f.name)}
    assert differ == {"preset", "test_checkpoints"}
    assert p.tuning(3).to_dict() == v.tuning(3).to_dict()
    assert p.tuning(3, lr=3e-4).lr == 3e-4 and v.tuning(3, "float32").precision == "float32"
    with pytest.raises(ValueError, match="Unknown PeersConfig field"):
        PeersConfig.from_preset("peers", n_random=3)  # a verdict field is not a peers field
    with pytest.raises(ValueError, match="n_harmful_test"):
        VerdictConfig(n_harmful_test=0)
    with pytest.raises(ValueError, match="end at the last step"):
        PeersConfig(test_checkpoints=[6, 11])
    # One save/load protocol (config_io): the format is read if present, another one refused.
    d = p.to_dict()
    assert "format" not in d  # compared on resume and hashed into keys: the record has the format
    assert PeersConfig.from_dict({**d, "format": PeersConfig.FORMAT}) == p
    with pytest.raises(ValueError, match="format"):
        VerdictConfig.from_dict({**v.to_dict(), "format": "regime-settings-0"})


def test_the_committed_runs_configs_load_unchanged():
    """figures/run (the verdict) and figures/peers resume only if their saved configs reload to the same
    dicts (and they are their presets')."""
    doc = json.loads((ROOT / "figures" / "run" / "verdict.json").read_text())
    cfg = VerdictConfig.from_dict(doc["config"])
    assert json.loads(json.dumps(cfg.to_dict())) == doc["config"]
    assert cfg == VerdictConfig.from_preset("cpu-full")
    doc = json.loads((ROOT / "figures" / "peers" / "peers.json").read_text())
    assert PeersConfig.from_dict(doc["config"]).to_dict() == doc["config"]
    assert PeersConfig.from_dict(doc["config"]) == PeersConfig.from_preset("peers")


def test_bf16_curves_reuse_one_copy_and_equal_a_fresh_copy(one_thread):
    """The evaluator's kept bf16 copy, refreshed after the weights change, gives exactly what a
    new bf16 copy gives, and not what the old weights gave."""
    from cast_interp.model import tiny_model

    cfg = VerdictConfig.from_preset("smoke")
    model = tiny_model(seed=0, n_ctx=512)
    data = run_data(model, cfg)
    kept = CurveEvaluator(data, dtype="bfloat16")
    before = kept(model)
    copy = kept._shadow[1]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    after = kept(model)
    assert kept._shadow[1] is copy  # no second copy
    fresh = CurveEvaluator(data, dtype="bfloat16")(model)
    for k in ("refusal_score", "over_refusal_score"):
        assert after[k] == fresh[k], k
        assert not np.allclose(after[k], before[k]), k
    f32 = CurveEvaluator(data, dtype="float32")(model)
    np.testing.assert_allclose(after["refusal_score"], f32["refusal_score"], atol=0.5)
    with pytest.raises(ValueError, match="dtype"):
        CurveEvaluator(data, dtype="float16")


def test_a_map_found_done_is_timed_as_reused(tmp_path, one_thread):
    """The first start times the diagnosis; a run that finds the map done (same key) records
    "re-used", and the reports print that instead of a time near 0."""
    import shutil

    from cast_interp.harness import conflict_maps
    from cast_interp.model import tiny_model
    from cast_interp.report.markdown import stage_time

    cfg = VerdictConfig.from_preset("smoke")
    model = tiny_model(seed=0, n_ctx=512)
    data = run_data(model, cfg)
    first: dict = {}
    a = conflict_maps(model, cfg, data, tmp_path / "a", progress=False, timings=first)
    assert isinstance(first["diagnosis_s"], float) and first["diagnosis_s"] > 0
    shutil.copytree(tmp_path / "a" / "diagnosis", tmp_path / "b" / "diagnosis")
    second: dict = {}
    b = conflict_maps(model, cfg, data, tmp_path / "b", progress=False, timings=second)
    assert second == {"diagnosis_s": "re-used"}
    np.testing.assert_array_equal(a["general"].C, b["general"].C)
    assert stage_time(second["diagnosis_s"]) == "re-used"
    assert stage_time(768.0) == "12.8 min" and stage_time(0.4) == "0 s"
    assert stage_time(None) == "—" and stage_time(float("nan")) == "—"
