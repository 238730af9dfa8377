"""The same seed gives the same conflict map on SmolLM2 under either TransformerLens line.

A small diagnosis (4 + 4 calibration examples, dataset references, screened S with 8 exact units
per kind, no bootstrap) is compared with golden numbers computed under TransformerLens 3.9
(`HookedTransformer`), so running this file under both lines checks that the bridge gives the
same map. Regenerate the golden file (under TL 3 only) with CAST_REGEN_GOLDEN=1.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cast_interp import backend
from cast_interp.data import load_bundled
from cast_interp.diagnose import DiagnosisConfig, diagnose

GOLDEN = Path(__file__).parent / "golden" / "smollm2_small_map.json"
CONFIG = DiagnosisConfig(n_calibration=4, n_sensitivity=4, batch_size=4, n_bootstrap=0,
                         utility_reference="dataset", sensitivity_method="screened", n_exact=8,
                         seed=0)


def _small_map(model) -> dict:
    safe = load_bundled("harmful", "calibration").take(4)
    util = load_bundled("benign", "calibration").take(4)
    cmap = diagnose(model, safe, util, CONFIG)
    out = {}
    for kind, d in (("head", cmap.head), ("group", cmap.group)):
        out[kind] = {k: torch.nan_to_num(d[k].double(), nan=-99.0).tolist() for k in ("O", "S", "C")}
        out[kind]["exact"] = [list(u) for u in cmap.top_units(8, unit=kind, by="S")]
    return out


@pytest.mark.smollm2
@pytest.mark.slow
def test_same_seed_same_map_as_under_transformer_lens_3(smollm2):
    got = _small_map(smollm2)
    if os.environ.get("CAST_REGEN_GOLDEN") == "1" and not backend.USES_BRIDGE:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"made_with": backend.TL_VERSION, **got}))
    want = json.loads(GOLDEN.read_text())
    for kind in ("head", "group"):
        O, O_ref = (torch.tensor(x[kind]["O"]) for x in (got, want))
        S, S_ref = (torch.tensor(x[kind]["S"]) for x in (got, want))
        # HookedTransformer and the bridge agree to float32 rounding, not bit for bit
        # (different attention kernels): O to 1e-4, S (a difference of losses) to 2e-3 of its scale.
        torch.testing.assert_close(O, O_ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(S, S_ref, atol=2e-3 * float(S_ref.abs().max()), rtol=0)
        # The exactly re-measured candidates, hence the selected top units, are the same.
        assert got[kind]["exact"][:4] == want[kind]["exact"][:4], kind
