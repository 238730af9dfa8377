import random

import pytest
import torch

from cast_interp.conflict_map import ConflictMap
from cast_interp.data import ChatDataset, ChatExample, load_bundled, make_batches
from cast_interp.diagnose import DiagnosisConfig, diagnose
from cast_interp.model import tiny_model

# Planted heads of the known-answer model (one layer, four heads).
H_STAR, H_ALIGN, H_WEAK, H_UNUSED = 0, 1, 2, 3


def planted_model():
    """A one-layer model whose heads have hand-set roles (MLP off, features on reserved dims).

    Tokens: `<|assistant|>` carries feature dim 0, the response tokens "a" and "b" (identical
    embeddings) feature dim 1; every token has dim 5 = 1; prompt tokens are random in dims 8+.
    Unembedding: dim 0 -> "a" and "b" equally (so at the first response position almost all mass is
    on {a, b}: then the safety target "b" and the utility target "a" give exactly opposed logit
    gradients), dim 2 -> "a" minus "b", dims 1 and 3 -> end of turn.

    H_STAR:  at `<|assistant|>` attends to itself and writes +dim 2 (prefers "a"): utility uses it,
             its gradient comes from the opposed position -> high O and high S.
    H_WEAK:  the same with a 6x smaller output: same high O, small S.
    H_ALIGN: at "a"/"b" attends to itself and writes dim 3 (prefers end of turn), which both sets
             want after identical contexts -> O ~ 0, yet the largest S.
    H_UNUSED: random Q/K/V, output scaled by 1e-6 -> S ~ 0.
    """
    m = tiny_model(seed=0, n_layers=1, n_heads=4, d_model=32, d_head=8, d_mlp=16)
    tok = m.tokenizer
    ida, idb = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    end, asst = tok.eos_token_id, tok.convert_tokens_to_ids("<|assistant|>")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        blk = m.blocks[0]
        blk.mlp.W_out.zero_()
        blk.mlp.b_out.zero_()
        E = torch.zeros_like(m.embed.W_E)
        E[:, 8:] = 0.3 * torch.randn(E.shape[0], 24, generator=g)
        E[:, 5] = 1.0
        E[asst] = 0.0
        E[asst, 0] = E[asst, 5] = 1.0
        for t in (ida, idb):
            E[t] = 0.0
            E[t, 1] = E[t, 5] = 1.0
        m.embed.W_E.copy_(E)
        U = torch.zeros_like(m.unembed.W_U)
        U[8:] = 0.05 * torch.randn(24, U.shape[1], generator=g)
        U[0, ida] = U[0, idb] = 4.0
        U[2, ida], U[2, idb] = 0.5, -0.5
        U[1, end] = U[3, end] = 1.0
        m.unembed.W_U.copy_(U)
        m.unembed.b_U.zero_()
        a = blk.attn
        for p in (a.W_Q, a.W_K, a.W_V, a.W_O, a.b_Q, a.b_K, a.b_V, a.b_O):
            p.zero_()
        for h, feature, out_dim, scale in ((H_STAR, 0, 2, 0.3), (H_WEAK, 0, 2, 0.05),
                                           (H_ALIGN, 1, 3, 0.4)):
            a.W_Q[h, feature, 0] = a.W_K[h, feature, 0] = 1.5  # self-attention on the feature
            a.W_V[h, feature, 0] = 1.0
            a.W_O[h, 0, out_dim] = scale
        for p in (a.W_Q, a.W_K, a.W_V):
            p[H_UNUSED] = 0.3 * torch.randn(32, 8, generator=g)
        a.W_O[H_UNUSED] = 1e-6 * torch.randn(8, 32, generator=g)
    return m


def planted_data(n=8):
    """Same prompts (no "a"/"b" in them); utility answers "a", safety answers "b"."""
    rng = random.Random(0)
    alphabet = "CDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "
    prompts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(8, 16))) for _ in range(n)]
    return (ChatDataset("planted-safe", [ChatExample(p, "b") for p in prompts]),
            ChatDataset("planted-util", [ChatExample(p, "a") for p in prompts]))


def test_known_answer_planted_heads():
    model = planted_model()
    safe, util = planted_data(8)
    cmap = diagnose(model, safe, util, DiagnosisConfig(n_calibration=8, batch_size=2, n_bootstrap=50))
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


def test_diagnose_records_its_configuration(tmp_path):
    model = tiny_model(seed=0, n_key_value_heads=2)
    cfg = DiagnosisConfig(n_calibration=4, batch_size=2, n_bootstrap=10, n_sensitivity=2, seed=3)
    cmap = diagnose(model, load_bundled("harmful", "calibration"),
                    load_bundled("benign", "calibration"), cfg)
    assert cmap.shape == (2, 4) and torch.isfinite(cmap.C).all()
    c = cmap.config
    assert DiagnosisConfig.from_dict(c["diagnosis"]) == cfg
    assert c["model"]["n_key_value_heads"] == 2
    assert c["data"]["safety"]["n"] == 4 and c["data"]["sensitivity"]["n"] == 2
    assert c["conflict"]["seed"] == 3 and c["sensitivity"]["ablation"] == "mean"
    assert c["sensitivity"]["n_examples"] == 2
    assert {"tokenize", "conflict", "sensitivity", "total"} <= set(c["timings_s"])
    assert c["versions"]["diagnose"] and c["combine"]["how"] == "product"
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
                          max_new_tokens=4)
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
                 DiagnosisConfig(n_calibration=1, n_bootstrap=0))
