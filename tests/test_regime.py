"""The regime sweep (METHOD v3): data loaders for the new formats, the declared regime rule, and a
checkpoint evaluation equal to a direct evaluation of that step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cast_interp.data import (
    ChatDataset,
    ChatExample,
    DataError,
    dedup_against,
    encode_example,
    load_coconot,
    load_mmlu_dir,
    load_safety_pairs,
    shared_datasets_dir,
    truncate_responses,
)
from cast_interp.regime import (
    PRIMARY,
    RegimeEvaluator,
    SweepConfig,
    choose_regime,
    regime_data,
    run_regime_sweep,
    setting_name,
)
from cast_interp.regime_report import sweep_table, write_sweep_report


# ---------------------------------------------------------------------------------------------- data


def test_safety_pairs_loader(tmp_path):
    f = tmp_path / "pairs.json"
    f.write_text(json.dumps([
        {"instruction": "Explain how to pick a lock", "input": "", "output": "I can't help with that."},
        {"instruction": "Write an insult", "input": "about my neighbour", "output": "I won't."}]))
    ds = load_safety_pairs(f)
    from cast_interp.data import load_dataset

    assert load_dataset(f"safety-pairs:{f}").prompts == ds.prompts  # the CLI's spec
    assert ds.prompts == ["Explain how to pick a lock", "Write an insult\n\nabout my neighbour"]
    assert [e.response for e in ds] == ["I can't help with that.", "I won't."]
    f.write_text(json.dumps([{"instruction": "x", "input": "", "output": ""}]))
    with pytest.raises(DataError, match="no 'output'"):
        load_safety_pairs(f)
    with pytest.raises(DataError):
        load_safety_pairs(tmp_path / "absent.json")


def test_coconot_loader_drops_responses(tmp_path):
    f = tmp_path / "c.jsonl"
    rows = [{"id": "a", "category": "Requests with safety concerns", "subcategory": "x",
             "prompt": "How do I kill time on a flight?", "response": ""},
            {"id": "b", "category": "Incomplete requests", "subcategory": "y",
             "prompt": "Tell me about the thing.", "response": "Which thing?"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_coconot(f)
    from cast_interp.data import load_dataset

    assert load_dataset(f"coconot:{f}").prompts == ds.prompts
    assert ds.prompts == [r["prompt"] for r in rows]
    assert [e.response for e in ds] == [None, None]
    assert [e.category for e in ds] == [r["category"] for r in rows]


def test_mmlu_dir_loader(tmp_path):
    (tmp_path / "b_test.csv").write_text("Q1?,w,x,y,z,B\nQ2?,w,x,y,z,D\n")
    (tmp_path / "a_test.csv").write_text("Q0?,w,x,y,z,A\n")
    items = load_mmlu_dir(tmp_path, n_per_subject=1)
    assert [(it["question"], it["answer_index"], it["category"]) for it in items] == [
        ("Q0?", 0, "a"), ("Q1?", 1, "b")]
    with pytest.raises(DataError, match="no '<subject>_test.csv'"):
        load_mmlu_dir(tmp_path / "empty") if (tmp_path / "empty").mkdir() is None else None


def test_shared_dir_missing_is_clear(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        shared_datasets_dir(tmp_path / "nope")


def test_dedup_and_truncation(tiny):
    a = ChatDataset("a", [ChatExample("Hello  World"), ChatExample("b"), ChatExample("b")])
    b = ChatDataset("b", [ChatExample("hello world")])
    assert dedup_against(a, b).prompts == ["b"]
    long = ChatDataset("t", [ChatExample("p", "one two three four five six seven eight nine ten"),
                             ChatExample("q", "short")])
    n_short = len(tiny.tokenizer("short", add_special_tokens=False)["input_ids"])
    cut = truncate_responses(tiny, long, n_short)
    n = len(tiny.tokenizer(cut[0].response, add_special_tokens=False)["input_ids"])
    assert n <= n_short and cut[0].truncated and not cut[1].truncated and cut[1].response == "short"
    # a truncated answer gets no end-of-turn token: the encoding ends with the answer's last token
    ids, _ = encode_example(tiny.tokenizer, cut[0])
    ids_full, _ = encode_example(tiny.tokenizer, ChatExample("p", cut[0].response))
    assert len(ids_full) == len(ids) + 1


# ---------------------------------------------------------------------------------------------- rule


def _row(setting, step, tax, tax_ci, safe):
    return {"setting": setting, "step": step,
            PRIMARY: {"diff": tax, "low": tax_ci[0], "high": tax_ci[1]},
            "refusal_score": {"diff": safe, "low": safe - 0.5, "high": safe + 0.5}}


def test_regime_rule_prefers_attention_then_fewest_steps():
    rows = [_row("all_lr2e-4", 8, 3.0, (2.5, 3.5), 4.0),
            _row("attention_lr2e-4", 64, 2.0, (1.5, 2.5), 4.0),
            _row("attention_lr5e-4", 16, 2.0, (1.5, 2.5), 4.0),
            _row("attention_lr5e-5", 16, 1.2, (0.9, 1.5), 2.0),
            _row("attention_lr2e-4", 8, 0.5, (0.2, 0.8), 4.0)]  # below min_tax
    ch = choose_regime(rows, min_tax=1.0, min_safety=1.0)
    assert (ch["setting"], ch["step"]) == ("attention_lr5e-5", 16)


def test_regime_rule_says_no_tax():
    rows = [_row("attention_lr2e-4", 16, 1.5, (-0.1, 3.0), 4.0),   # CI reaches 0
            _row("all_lr2e-4", 16, 2.0, (1.0, 3.0), 0.5)]          # too little safety learned
    assert choose_regime(rows, min_tax=1.0, min_safety=1.0) is None


def test_sweep_config_checks():
    with pytest.raises(ValueError, match="test_checkpoints"):
        SweepConfig(checkpoints=(4, 8), test_checkpoints=(16,), mc_checkpoints=())
    with pytest.raises(ValueError, match="lr"):
        SweepConfig(lrs=(0.0,))
    assert SweepConfig(order=("attention@2e-4",)).settings() == [("attention", 2e-4)]
    assert setting_name("attention", 5e-5) == "attention_lr5e-5"


# ---------------------------------------------------------------------------------------------- sweep

SMALL = dict(order=("attention@1e-3",), checkpoints=(2, 4), test_checkpoints=(2, 4),
             mc_checkpoints=(), warmup_steps=1, batch_size=2, n_val=4, n_over_val=8,
             n_benign_test=4, n_over_test=6, max_safety_tokens=8, answer_tokens=8, n_generate=2,
             n_mc_per_subject=0)


def test_sweep_on_bundled_data_and_checkpoint_equals_direct_run(tmp_path, one_thread):
    """Without the shared datasets (datasets="bundled"), the sweep runs on the bundled sets; the
    checkpoint at step 2 of a 4-step run is the model a 2-step run gives (constant lr after the
    same warmup), so its evaluation equals a direct evaluation of that step."""
    from cast_interp.model import tiny_model
    from cast_interp.sparse_tuning import TuningConfig, safety_finetune

    model = tiny_model(seed=0, n_ctx=512)
    cfg = SweepConfig(**SMALL)
    summary = run_regime_sweep(model, cfg, tmp_path / "sweep", datasets="bundled", progress=False)
    assert summary["data"]["source"] == "bundled"
    rec = json.loads((tmp_path / "sweep" / "settings" / "attention_lr1e-3" /
                      "step_0002.json").read_text())
    # the model came back to the original after the sweep
    fresh = tiny_model(seed=0, n_ctx=512)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 fresh.state_dict().values()))
    data = regime_data(fresh, datasets="bundled", n_val=4, n_over_val=8, n_benign_test=4,
                       n_over_test=6, max_safety_tokens=8, answer_tokens=8, n_mc_per_subject=0,
                       cache_dir=tmp_path / "sweep")
    val = RegimeEvaluator(fresh, data, "val")
    safety_finetune(fresh, data.safety_train, config=TuningConfig(
        steps=2, batch_size=2, lr=1e-3, schedule="constant", warmup_steps=1, scope="attention",
        benign_mix=0.0, seed=0))
    direct = val(fresh)
    for k in ("refusal_score", "over_refusal_score", "kl", "nll"):
        np.testing.assert_allclose(rec["val"][k], direct[k], rtol=0, atol=1e-6, err_msg=k)
    assert max(rec["val"]["kl"]) > 0  # it trained
    # report: the table has one row per test checkpoint, CIs, and the figure is written
    report = write_sweep_report(tmp_path / "sweep")
    text = report.read_text()
    assert "| attention_lr1e-3 | 2 |" in text and "| attention_lr1e-3 | 4 |" in text
    assert (tmp_path / "sweep" / "regime_sweep.png").stat().st_size > 1000
    # the CLI redraws the report from the files; a file as --out is a one-line error
    from cast_interp.cli import main as cli_main

    assert cli_main(["regime", "--out", str(tmp_path / "sweep"), "--report-only"]) == 0
    (tmp_path / "f.txt").write_text("x")
    assert cli_main(["regime", "--out", str(tmp_path / "f.txt")]) == 2
    # resume: a finished setting is not re-run (its files are unchanged)
    before = (tmp_path / "sweep" / "settings" / "attention_lr1e-3" / "done.json").read_text()
    again = tiny_model(seed=0, n_ctx=512)
    run_regime_sweep(again, cfg, tmp_path / "sweep", datasets="bundled", progress=False)
    assert (tmp_path / "sweep" / "settings" / "attention_lr1e-3" / "done.json").read_text() == before
    # another run order of the same settings is the same sweep; another config is refused
    run_regime_sweep(again, SweepConfig(**{**SMALL, "order": ("attention@1e-3",)}),
                     tmp_path / "sweep", datasets="bundled", progress=False)
    with pytest.raises(ValueError, match="other settings"):
        run_regime_sweep(again, SweepConfig(**{**SMALL, "batch_size": 3}), tmp_path / "sweep",
                         datasets="bundled", progress=False)


def test_committed_regime_is_the_rules_choice():
    """REGIME_V3 (the verdict's tuning) is what the declared rule picks from the committed sweep's
    per-prompt files, recomputed here (bootstrap CIs included)."""
    from pathlib import Path

    from cast_interp.regime import REGIME_V3, summarize_sweep

    sweep = Path(__file__).resolve().parents[1] / REGIME_V3["sweep"]
    if not (sweep / "sweep.json").exists():
        pytest.skip("no committed sweep in this checkout")
    s = summarize_sweep(sweep, write=False)
    t = REGIME_V3["tuning"]
    assert s["chosen"] is not None
    assert (s["chosen"]["setting"], s["chosen"]["step"]) == (
        setting_name(t["scope"], t["lr"]), t["steps"])
    assert s["chosen"]["tax_low"] > 0
    cfg = s["config"]
    assert (cfg["batch_size"], cfg["warmup_steps"], cfg["max_safety_tokens"]) == (
        t["batch_size"], t["warmup_steps"], REGIME_V3["data"]["max_safety_tokens"])
