"""The planted models: the diagnosis of the trigger variant and what skipping its top heads buys.

(The known-answer diagnosis of the plain planted model is in test_diagnose.py.)"""

from __future__ import annotations

import copy

import torch

from cast_interp.diagnose import DiagnosisConfig, diagnose
from cast_interp.evaluate import reference_nll
from cast_interp.planted import (H_ALIGN, H_STAR, H_TRIGGER, H_WEAK, TRIGGER, planted_data,
                                 planted_model)
from cast_interp.sparse_tuning import TuningConfig, safety_finetune


def test_data_prefixes_and_trigger():
    safe8, util8 = planted_data(8, trigger=True)
    safe4, util4 = planted_data(4, trigger=True)
    plain_safe, plain_util = planted_data(8)
    assert [e.prompt for e in safe8[:4]] == [e.prompt for e in safe4]  # prefixes: held-out split
    assert util8.prompts == plain_util.prompts == plain_safe.prompts
    for s, u in zip(safe8, util8):
        assert s.prompt.replace(TRIGGER, "", 1) == u.prompt and TRIGGER not in u.prompt
        assert (s.response, u.response) == ("b", "a")
    # Without the trigger the model is the plain one, bit for bit.
    a, b = planted_model(), planted_model(trigger=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_trigger_variant_keeps_the_diagnosis_and_skipping_top_c_heads_removes_the_tax():
    model = planted_model(trigger=True)
    safe_all, util_all = planted_data(32, trigger=True)
    safe, util = safe_all[:16], util_all[:16]
    # The planted roles include the end-of-turn token and the planted answers (see test_diagnose).
    cmap = diagnose(model, safe, util, DiagnosisConfig(
        n_calibration=16, batch_size=8, n_bootstrap=20, include_end_of_turn=True,
        utility_reference="dataset", sensitivity_method="exact"))
    assert cmap.top_heads(1) == [(0, H_STAR)]
    assert cmap.top_heads(1, by="O") == [(0, H_WEAK)]
    assert cmap.top_heads(1, by="S") == [(0, H_ALIGN)]
    assert abs(float(cmap.S[0, H_TRIGGER])) < 1e-4 and 0.9 < cmap.O[0, H_TRIGGER] < 1.2
    assert cmap.top_heads(2) == [(0, H_STAR), (0, H_WEAK)]

    safe_test, util_test = safe_all[16:], util_all[16:]
    cfg = TuningConfig(steps=10, lr=0.3, optimizer="sgd", batch_size=8, weight_decay=0.0)
    out = {}
    for arm, skip in (("full", []), ("cast2", cmap.top_heads(2)), ("control", [(0, H_TRIGGER)])):
        m = copy.deepcopy(model)
        safety_finetune(m, safe, skip_heads=skip, config=cfg)
        out[arm] = (reference_nll(m, safe_test), reference_nll(m, util_test))
    before = (reference_nll(model, safe_test), reference_nll(model, util_test))
    assert before[0] > 1.5  # does not refuse yet
    for arm in out:
        assert out[arm][0] < 0.1, out  # every arm learns to refuse held-out harmful prompts
    assert out["full"][1] > before[1] + 1.0, out  # full tuning: a large utility tax
    assert out["cast2"][1] < before[1] + 0.05, out  # skipping the top-2 by C: none
    assert out["control"][1] > out["full"][1], out  # skipping the conflict-free route: worse
