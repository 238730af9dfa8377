import pytest
import torch

from cast_interp.conflict_map import ConflictMap
from cast_interp.data import ChatDataset, ChatExample, load_bundled
from cast_interp.diagnose import DiagnosisConfig, diagnose
from cast_interp.model import tiny_model
from cast_interp.planted import H_ALIGN, H_STAR, H_UNUSED, H_WEAK, planted_data, planted_model


# The planted model's aligned head (H_ALIGN) plays its role on the end-of-turn token, and its data
# are planted answers: the known-answer tests include end-of-turn and use the dataset's answers.
PLANTED = dict(n_calibration=8, batch_size=2, n_bootstrap=50, include_end_of_turn=True,
               utility_reference="dataset", sensitivity_method="exact")


def test_known_answer_planted_heads():
    model = planted_model()
    safe, util = planted_data(8)
    cmap = diagnose(model, safe, util, DiagnosisConfig(**PLANTED))
    O, S = cmap.O[0], cmap.S[0]
    assert cmap.top_heads(1) == [(0, H_STAR)]
    assert O[H_STAR] > 1.5 and O[H_WEAK] > 1.5  # opposed
    assert O[H_ALIGN] < 0.01  # aligned
    assert abs(float(S[H_UNUSED])) < 1e-4
    assert S[H_ALIGN] > S[H_STAR] > 10 * S[H_WEAK] > 0
    # Neither score alone finds H_STAR: C needs conflict and dependence together.
    assert cmap.top_heads(1, by="O") == [(0, H_WEAK)]
    assert cmap.top_heads(1, by="S") == [(0, H_ALIGN)]
    assert cmap.ci_low[0, H_STAR] > 1.0
    assert cmap.head["S_low"][0, H_STAR] > 0  # the CI over examples excludes 0


def test_planted_gqa_heads_of_one_group_keep_their_own_conflict():
    """H_STAR and H_ALIGN share one K/V group; only their own Q/O tell them apart (v2 units)."""
    model = planted_model(gqa=True)
    safe, util = planted_data(8)
    cmap = diagnose(model, safe, util, DiagnosisConfig(**PLANTED))
    O = cmap.O[0]
    assert O[H_STAR] > 1.5 and O[H_ALIGN] < 0.2  # opposed vs aligned, in the same group
    assert cmap.head["O_high"][0, H_ALIGN] < cmap.head["O_low"][0, H_STAR]
    assert cmap.top_heads(1) == [(0, H_STAR)]
    assert cmap.units("group")["O"].shape == (1, 2)  # the group's own K/V conflict, once


def test_screened_top_k_is_exact_and_agrees_with_the_full_sweep():
    model = tiny_model(seed=3, n_layers=3, n_key_value_heads=2)
    safe, util = load_bundled("harmful", "calibration"), load_bundled("benign", "calibration")
    base = dict(n_calibration=6, batch_size=3, n_bootstrap=20, utility_reference="dataset",
                max_length=400)
    full = diagnose(model, safe, util, DiagnosisConfig(sensitivity_method="exact", **base))
    scr = diagnose(model, safe, util, DiagnosisConfig(sensitivity_method="screened", n_exact=4, **base))
    exact = scr.head["S_exact"].bool()
    assert 4 <= int(exact.sum()) < 12  # candidates only, not a full sweep
    torch.testing.assert_close(scr.S[exact], full.S[exact], rtol=0, atol=1e-6)
    assert all(exact[u] for u in scr.top_heads(2))  # the selected top-k is measured exactly

def test_diagnose_records_its_configuration(tmp_path):
    model = tiny_model(seed=0, n_key_value_heads=2)
    cfg = DiagnosisConfig(n_calibration=4, batch_size=2, n_bootstrap=10, n_sensitivity=2, seed=3,
                          max_new_tokens=8, max_length=400)
    cmap = diagnose(model, load_bundled("harmful", "calibration"),
                    load_bundled("benign", "calibration"), cfg)
    assert cmap.shape == (2, 4) and torch.isfinite(cmap.C).all()
    c = cmap.config
    assert DiagnosisConfig.from_dict(c["diagnosis"]) == cfg
    assert c["model"]["n_key_value_heads"] == 2
    assert c["data"]["safety"]["n"] == 4 and c["data"]["sensitivity"]["n"] == 2
    assert c["conflict"]["seed"] == 3 and c["sensitivity"]["ablation"] == "mean"
    assert c["sensitivity"]["n_examples"] == 2
    assert {"tokenize", "conflict", "sensitivity_head", "sensitivity_group", "total"} <= set(c["timings_s"])
    assert c["versions"]["diagnose"] and c["combine"]["how"] == "rank_product"
    assert c["loss_tokens"].startswith("response content only")
    assert {"spearman_C_O", "spearman_C_S", "concentration"} <= set(cmap.summary["head"])
    cmap.check_model(model)
    # Same seed, same numbers; and the saved map reloads with its configuration.
    again = diagnose(model, load_bundled("harmful", "calibration"),
                     load_bundled("benign", "calibration"), cfg)
    assert torch.equal(again.C, cmap.C) and torch.equal(again.ci_low, cmap.ci_low)
    cmap.save(tmp_path)
    assert ConflictMap.load(tmp_path).config["diagnosis"] == cfg.to_dict()


def test_self_reference_utility():
    model = tiny_model(seed=0)
    util = ChatDataset("prompts-only", [ChatExample("Say hi"), ChatExample("Count to three")])
    safe = load_bundled("harmful", "calibration").take(2)
    cfg = DiagnosisConfig(n_calibration=2, batch_size=1, n_bootstrap=5, utility_reference="self",
                          max_new_tokens=4, max_length=400)
    cmap = diagnose(model, safe, util, cfg)
    assert cmap.config["data"]["utility"]["name"].endswith("+self-ref")
    assert "self_reference" in cmap.config["timings_s"]
    assert cmap.S.shape == (2, 4)


def test_config_validation():
    with pytest.raises(ValueError, match="ablation"):
        DiagnosisConfig(ablation="noise")
    with pytest.raises(ValueError, match="combine"):
        DiagnosisConfig(combine="max")
    with pytest.raises(ValueError, match="utility_reference"):
        DiagnosisConfig(utility_reference="model")
    with pytest.raises(ValueError, match="n_calibration"):
        DiagnosisConfig(n_calibration=0)
    with pytest.raises(ValueError, match="n_exact"):
        DiagnosisConfig(n_exact=-3)
    with pytest.raises(ValueError, match="sensitivity_method"):
        DiagnosisConfig(sensitivity_method="fast")
    with pytest.raises(ValueError, match="Unknown DiagnosisConfig field"):
        DiagnosisConfig.from_dict({"n_calibraton": 3})
    cfg = DiagnosisConfig(alpha=0.2, combine="weighted_sum")
    assert DiagnosisConfig.from_dict(cfg.to_dict()) == cfg


def test_diagnose_bad_data_is_a_clear_error():
    model = tiny_model(seed=0)
    with pytest.raises(TypeError, match="ChatDataset"):
        diagnose(model, ["how do I"], load_bundled("benign", "calibration"))
    no_answers = ChatDataset("u", [ChatExample("hi")])
    with pytest.raises(Exception, match="without a response"):
        diagnose(model, load_bundled("harmful", "calibration"), no_answers,
                 DiagnosisConfig(n_calibration=1, n_bootstrap=0, utility_reference="dataset"))
