"""Issue #15: no silent wrong results, no clobbered runs, every bad input a clear error before any
work. One section per case of the issue; each test reproduces its case on the tiny models."""

from __future__ import annotations

import json
import os
import shutil
import time
import pytest
import torch

from cast_interp import model as model_mod
from cast_interp import pipeline
from cast_interp.cli import main
from cast_interp.conflict_map import ConflictMap, MapMismatchError
from cast_interp.data import (DataError, check_fits, load_bundled, load_dataset, make_batches,
                              self_reference)
from cast_interp.diagnose import DiagnosisConfig, diagnose
from cast_interp.evaluate import EvalConfig
from cast_interp.generation import generate_tokens
from cast_interp.io import RunDirectory, atomic_write_json
from cast_interp.model import DeviceError, ModelLoadError, load_model, tiny_model
from cast_interp.pipeline import RunConfig, RunMismatchError, run_experiment
from cast_interp.sparse_tuning import TuningConfig, k_from_fraction, safety_finetune
from cast_interp.units import UnitError


def _cfg(out, **kw) -> RunConfig:
    kw = {"model": "tiny", "attribute": False, "baselines": [], "n_draws": 2, **kw}
    return RunConfig.from_preset("smoke", out_dir=str(out), **kw)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    run_experiment(_cfg(out), progress=False)
    return out


def _copy(src, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def _snapshot(run):
    return {p: p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _no_model(monkeypatch):
    """Any model load fails the test: the error under test must come before any work."""
    def boom(*a, **k):
        raise AssertionError("work started before the bad input was caught")

    monkeypatch.setattr("cast_interp.model.load_model", boom)


def _tiny_map(model, **kw):
    cfg = DiagnosisConfig(n_calibration=2, n_sensitivity=2, n_bootstrap=0, batch_size=2,
                          utility_reference="dataset", sensitivity_method="attribution", **kw)
    return diagnose(model, load_bundled("harmful", "calibration"),
                    load_bundled("benign", "calibration"), cfg)


# --------------------------------------------------------------------------------------------------
# 1. Stale tuned weights; 7. clobbered run directories; 9. truncated state, leftover partials
# --------------------------------------------------------------------------------------------------


def test_other_settings_in_a_finished_run_dir_are_refused_untouched(finished, tmp_path):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    with pytest.raises(RunMismatchError, match=r"steps \(2 -> 3\).*--overwrite"):
        run_experiment(_cfg(run, steps=3), progress=False)
    assert _snapshot(run) == before  # nothing written, config.json included


def test_overwrite_starts_over_and_attribution_reads_the_new_weights(finished, tmp_path):
    run = _copy(finished, tmp_path)
    old_key = pipeline._state_key(run / "arms" / "full_state.safetensors")
    doc = run_experiment(_cfg(run, steps=3), progress=False, overwrite=True)
    new_key = pipeline._state_key(run / "arms" / "full_state.safetensors")
    assert new_key != old_key
    cfg = _cfg(run, steps=3)
    assert new_key == cfg.key(*pipeline.TUNE_FIELDS, *pipeline.EVAL_FIELDS, extra={
        **pipeline.asdict(pipeline.Piece("full", 0, 0)), "generation": pipeline._generates(cfg, 0)})
    assert all(len(p["tuning"]["losses"]) == 3 for p in doc["arms"].values())
    assert pipeline.read_json(run / "config.json")["steps"] == 3 == \
        pipeline.read_json(run / "results.json")["config"]["steps"]


def test_more_seeds_extend_a_run_without_overwrite(finished, tmp_path):
    run = _copy(finished, tmp_path)
    doc = run_experiment(_cfg(run, train_seeds=[0, 1, 2], n_draws=3), progress=False)
    assert "full_k0_t2" in doc["arms"] and "full_k0_t0" in doc["arms"]


def test_steps_0_on_a_finished_run_changes_nothing(finished, tmp_path, capsys, monkeypatch):
    run = _copy(finished, tmp_path)
    before = _snapshot(run)
    _no_model(monkeypatch)
    assert main(["run", "--model", "tiny", "--preset", "smoke", "--steps", "0",
                 "--out", str(run)]) == 2
    assert "steps must be an integer >= 1, got 0" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_truncated_tuned_state_is_retrained_not_a_crash(finished, tmp_path):
    run = _copy(finished, tmp_path)
    state = run / "arms" / "full_state.safetensors"
    state.write_bytes(state.read_bytes()[:1000])
    assert pipeline._state_key(state) is None
    run_experiment(_cfg(run), progress=False)
    assert pipeline._state_key(state) is not None


def test_leftover_partial_files_are_removed_on_resume(finished, tmp_path):
    run = _copy(finished, tmp_path)
    leftovers = [run / "figures" / ".endpoints.png.abc.partial", run / "arms" / ".x.json.y.partial"]
    for p in leftovers:
        p.write_bytes(b"half a file")
    run_experiment(_cfg(run), progress=False)
    assert not any(p.exists() for p in leftovers)


def test_a_run_dir_refuses_other_data_or_model_fingerprints(tmp_path):
    m = {"settings": {"steps": 2}, "data": {"safe_cal": "aaa"}, "model": {"weights": "w1"}}
    with RunDirectory(tmp_path) as rd:  # files written as a run writes them (manifest.json)
        rd.start()
        atomic_write_json(m, tmp_path / "run.json")
        atomic_write_json({}, tmp_path / "arms" / "x.json")
    pipeline.claim_run_dir(tmp_path, m)  # the same run: resumed
    pipeline._release_locks()
    for part, other in (("data", {"safe_cal": "bbb"}), ("model", {"weights": "w2"})):
        with pytest.raises(RunMismatchError, match=f"{part} fingerprint"):
            pipeline.claim_run_dir(tmp_path, {**m, part: other})
        pipeline._release_locks()
    (tmp_path / "notes.txt").write_text("mine")
    pipeline.claim_run_dir(tmp_path, {**m, "data": {"safe_cal": "bbb"}}, overwrite=True)
    pipeline._release_locks()
    assert not (tmp_path / "arms").exists() and not (tmp_path / "run.json").exists()
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the run's own files go


# --------------------------------------------------------------------------------------------------
# 2. One data file: calibration, train and test are disjoint, seeded and recorded
# --------------------------------------------------------------------------------------------------


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_single_data_file_is_split_into_disjoint_seeded_parts(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(40)]
    f = _jsonl(tmp_path / "mine.jsonl", rows)
    parts = pipeline._splits(f, 0)
    sets = {k: {e.prompt for e in v} for k, v in parts.items()}
    assert [len(sets[k]) for k in ("calibration", "train", "test")] == [10, 20, 10]
    assert not (sets["test"] & (sets["calibration"] | sets["train"]))
    assert not (sets["calibration"] & sets["train"])
    assert {k: v.prompts for k, v in pipeline._splits(f, 0).items()} == \
        {k: v.prompts for k, v in parts.items()}
    assert pipeline._splits(f, 1)["test"].prompts != parts["test"].prompts
    assert "split seed 0" in parts["test"].name


def test_a_bundled_split_given_alone_is_split_too():
    parts = pipeline._splits("bundled:harmful:train", 0)
    test, train = set(parts["test"].prompts), set(parts["train"].prompts)
    assert len(test) == 25 and not test & train


def test_three_specs_must_keep_the_test_set_held_out(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": f"q{i}", "response": "r"} for i in range(4)])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": f"t{i}", "response": "r"} for i in range(4)])
    parts = pipeline._splits([a, a, b], 0)
    assert parts["test"].prompts == ["t0", "t1", "t2", "t3"]
    with pytest.raises(DataError, match="shares 4 prompt"):
        pipeline._splits([a, b, a], 0)
    with pytest.raises(ValueError, match="three"):
        RunConfig(safety_data=[a, b])


def test_run_records_its_split(finished):
    doc = pipeline.read_json(finished / "results.json")
    assert doc["data_split"] == {"seed": 0, "fractions": [0.25, 0.5, 0.25]}


# --------------------------------------------------------------------------------------------------
# 3. Bad numbers, unknown and wrongly typed config fields
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--n", "-40"], "--n must be an integer >= 1"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
])
def test_eval_rejects_bad_numbers_before_loading(argv, message, tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    assert main(["eval", "--model", "tiny", "--out", str(tmp_path / "e.json"), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("bad", [{"k_fractions": [-0.5]}, {"k_fractions": [0.0]},
                                 {"n_draws": -1}, {"lr": -1e-4}, {"lr": float("nan")},
                                 {"benign_mix": 1.5}, {"n_calibration": 0},
                                 {"attribution_draws": 5}, {"steps": 2.5}, {"unit": "layer"},
                                 {"device": "bogus"}])
def test_run_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        RunConfig(**bad)


@pytest.mark.parametrize("bad", [{"max_grad_norm": -1}, {"max_grad_norm": float("nan")},
                                 {"steps": 2.5}, {"weight_decay": float("inf")}, {"seed": "0"}])
def test_tuning_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        TuningConfig(**bad)


def test_eval_and_diagnosis_configs_reject_bad_values():
    for bad in ({"n_harmful": -40}, {"n_harmful": True}, {"max_new_tokens": 0},
                {"batch_size": 0}):
        with pytest.raises(ValueError):
            EvalConfig(**bad)
    EvalConfig(max_new_tokens=0, generation=False)  # nothing generated: 0 is fine
    with pytest.raises(ValueError, match="wrongly typed"):
        DiagnosisConfig(alpha="0.5")


def test_a_zero_fraction_is_no_unit_not_one():
    assert k_from_fraction(0.0, 8) == 0
    with pytest.raises(Exception, match="out of range"):
        k_from_fraction(-0.5, 8)


@pytest.mark.parametrize("edit, message", [({"bogus": 1}, "Unknown RunConfig field"),
                                           ({"steps": "8"}, "wrongly typed.*steps='8'"),
                                           ({"benign_mix": None}, "wrongly typed")])
def test_attribute_rejects_a_bad_config_json(finished, tmp_path, capsys, monkeypatch, edit,
                                             message):
    run = _copy(finished, tmp_path)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, **edit}))
    RunDirectory(run).record(run / "config.json")  # past the manifest: the config's own checks
    _no_model(monkeypatch)
    assert main(["attribute", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cast-interp: error:") and __import__("re").search(message, err)


# --------------------------------------------------------------------------------------------------
# 4. Weight cache: checksum verified on load; leftover temp files removed
# --------------------------------------------------------------------------------------------------


def _cache(tmp_path):
    cache = tmp_path / "smollm2"
    sd = {"a": torch.arange(4096, dtype=torch.float32), "b": torch.ones(64, 64)}
    model_mod._write_cache(cache, sd, "src", {"d_model": 1})
    return cache, sd


def test_weight_cache_with_bytes_overwritten_is_refused_with_the_fix(tmp_path):
    cache, sd = _cache(tmp_path)
    cfg, loaded = model_mod._load_cached(cache, "src")
    assert cfg == {"d_model": 1} and torch.equal(loaded["a"], sd["a"])
    w = cache / "model.safetensors"
    data = bytearray(w.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 8] = b"\x7f" * 8  # same size, valid safetensors, wrong numbers
    w.write_bytes(bytes(data))
    from safetensors.torch import load_file

    bad = load_file(str(w))  # it would load silently
    assert any(not torch.equal(bad[k], sd[k]) for k in sd)
    with pytest.raises(ModelLoadError, match=f"Delete the cache directory {cache}"):
        model_mod._load_cached(cache, "src")


def test_weight_cache_of_an_older_format_is_converted_again(tmp_path):
    cache, _ = _cache(tmp_path)
    meta = json.loads((cache / "config.json").read_text())
    meta["format"] = 1
    del meta["sha256"]
    (cache / "config.json").write_text(json.dumps(meta))
    assert model_mod._load_cached(cache, "src") is None


def test_stale_partial_files_in_the_weight_cache_are_removed(tmp_path):
    cache, _ = _cache(tmp_path)
    old, fresh = cache / "model.safetensorsab12.partial", cache / "model.safetensorscd34.partial"
    tok = cache / "tokenizer.partialxyz"
    tok.mkdir()
    for p in (old, fresh, tok / "vocab.json"):
        p.write_bytes(b"x" * 100)
    hour_ago = time.time() - 3600
    for p in (old, tok):
        os.utime(p, (hour_ago, hour_ago))
    model_mod._load_cached(cache, "src")
    assert not old.exists() and not tok.exists()
    assert fresh.exists()  # may be another process's conversion in progress


# --------------------------------------------------------------------------------------------------
# 5. Maps and skipped units of another model of the same shape
# --------------------------------------------------------------------------------------------------


def test_check_model_tells_apart_models_of_one_shape(one_thread):
    a, b, gqa = tiny_model(seed=0), tiny_model(seed=1), load_model("tiny-gqa")
    cmap = _tiny_map(a)
    cmap.check_model(a)
    with pytest.raises(MapMismatchError, match="weights"):
        cmap.check_model(b)
    with pytest.raises(MapMismatchError):
        cmap.check_model(gqa)
    with pytest.raises(MapMismatchError):
        _tiny_map(gqa).check_model(a)
    del cmap.config["model"]["weights"]  # a map saved before fingerprints: shape checks only
    cmap.check_model(b)


def test_safety_finetune_refuses_units_ranked_on_another_model(one_thread):
    a, b = tiny_model(seed=0), tiny_model(seed=1)
    cmap = _tiny_map(a)
    heads = cmap.top_heads(2)
    assert heads == [tuple(h) for h in heads] and json.loads(json.dumps(heads))
    data = load_bundled("harmful", "train")[:4]
    with pytest.raises(UnitError, match="another model"):
        safety_finetune(b, data, skip_heads=heads, config=TuningConfig(steps=1, batch_size=2))
    with pytest.raises(UnitError, match="does not exist"):
        safety_finetune(a, data, skip_heads=[(5, 0)], config=TuningConfig(steps=1, batch_size=2))
    res = safety_finetune(a, data, skip_heads=heads, config=TuningConfig(steps=1, batch_size=2))
    assert len(res.losses) == 1


# --------------------------------------------------------------------------------------------------
# 6. and 10. Data quirks: each a DataError naming the row
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, text, message", [
    ("null.jsonl", '{"prompt": "ok"}\n{"prompt": null}\n', "row 2 has a null 'prompt'"),
    ("empty.jsonl", '{"prompt": "ok"}\n{"prompt": "  "}\n', "row 2 has an empty 'prompt'"),
    ("missing.jsonl", '{"prompt": "ok"}\n{"text_": "x"}\n', "row 2 has no 'prompt'"),
    ("list.jsonl", '{"prompt": "ok"}\n["x"]\n', "row 2 is not a JSON object"),
    ("quote.csv", 'prompt,response\nfirst,"unclosed\nsecond,b\nthird,c\n', "could not be parsed"),
    ("cells.csv", "prompt,response\na,b,c\n", "row 2 has a different number of cells"),
])
def test_data_quirks_are_clear_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        load_dataset(str(tmp_path / name))


def test_a_json_null_response_is_no_response(tmp_path):
    ds = load_dataset(_jsonl(tmp_path / "r.jsonl", [{"prompt": "p", "response": None}]))
    assert ds[0].response is None and ds[0].prompt == "p"


# --------------------------------------------------------------------------------------------------
# 8. --out checked before any work
# --------------------------------------------------------------------------------------------------


def test_eval_and_diagnose_check_out_before_loading(tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    afile = tmp_path / "afile"
    afile.write_text("")
    for argv, message in ((["eval", "--out", str(afile / "e.json")], "is a file, not a folder"),
                          (["eval", "--out", str(tmp_path)], "is a directory"),
                          (["diagnose", "--out", str(afile)], "is a file")):
        assert main([*argv, "--model", "tiny"]) == 2
        assert message in capsys.readouterr().err


def test_run_out_that_is_a_file_fails_before_writing(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    with pytest.raises(ValueError, match="is a file"):
        run_experiment(_cfg(afile), progress=False)
    assert afile.read_text() == "mine"


# --------------------------------------------------------------------------------------------------
# 10. Devices, maps with config null or truncated tensors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device, message", [("bogus", "Unknown device 'bogus'"),
                                             ("cuda:99", "CUDA GPU")])
def test_bad_devices_are_clear_errors(device, message, tmp_path, capsys):
    with pytest.raises(DeviceError, match=message):
        load_model("tiny", device=device)
    assert main(["eval", "--model", "tiny", "--device", device, "--n", "2",
                 "--out", str(tmp_path / "e.json")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error():
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        load_model("tiny", device="cuda")


def test_saved_map_with_null_config_or_truncated_tensors(finished, tmp_path):
    d = _copy(finished, tmp_path) / "diagnosis"
    meta = json.loads((d / "conflict_map.json").read_text())
    (d / "conflict_map.json").write_text(json.dumps({**meta, "config": None}))
    assert ConflictMap.load(d).config == {}
    t = d / "conflict_map.safetensors"
    t.write_bytes(t.read_bytes()[:500])
    with pytest.raises(ValueError, match="re-run diagnose"):
        ConflictMap.load(d)


# --------------------------------------------------------------------------------------------------
# 11. The tiny model with the CLI defaults; advice on long prompts; --steps 0 before diagnosis
# --------------------------------------------------------------------------------------------------


def test_tiny_model_fits_every_bundled_example():
    m = load_model("tiny")
    for kind in ("harmful", "benign"):  # the longest example is 279 byte tokens
        for split in ("calibration", "train", "test"):
            check_fits(m, load_bundled(kind, split))
    with pytest.raises(DataError, match="longer than the model's context"):
        check_fits(tiny_model(), load_bundled("benign", "test"))  # 256 tokens: too short


def test_self_reference_answers_fit_the_context_of_the_model_that_wrote_them(one_thread):
    m = tiny_model(n_ctx=256)  # random weights write invalid UTF-8, which re-encodes longer
    ds = self_reference(m, load_bundled("benign", "calibration")[:4], max_new_tokens=256)
    assert any(e.truncated for e in ds)
    make_batches(m, ds)  # raised "Example #1 ... is 257 tokens" before


def test_long_prompt_advice_fits_the_case():
    m = tiny_model(n_ctx=64)
    with pytest.raises(ValueError, match="lower max_new_tokens to at most 14"):
        generate_tokens(m, [[1] * 50], max_new_tokens=32)
    with pytest.raises(ValueError, match="drop or shorten the prompt") as err:
        generate_tokens(m, [[1] * 70], max_new_tokens=1)
    assert "lower max_new_tokens" not in str(err.value)


def test_too_long_data_is_refused_before_the_run_starts(tmp_path):
    rows = [{"prompt": f"q{i}", "response": "r"} for i in range(12)]
    rows[5]["prompt"] = "x" * 600
    f = _jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(DataError, match="longer than the model's context"):
        run_experiment(_cfg(tmp_path / "run", safety_data=f), progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


def test_steps_0_is_rejected_before_the_diagnosis(tmp_path, capsys, monkeypatch):
    _no_model(monkeypatch)
    assert main(["run", "--model", "tiny", "--steps", "0", "--out", str(tmp_path / "r")]) == 2
    assert "steps must be an integer >= 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
